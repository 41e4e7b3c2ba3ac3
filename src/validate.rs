//! Credential formats, and the checks that refuse a broken, expired or older
//! file. Messages never contain file contents: only key names and reasons.

use crate::config::Format;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::fmt;

/// Bytes that may hold a token. `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

/// Identifies validated content: SHA-256 of the validated payload.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(bytes: &[u8]) -> Self {
        Fingerprint(Sha256::digest(bytes).into())
    }
    /// All 64 hex digits (kept in the state file to compare, never logged).
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The first 12 hex digits, the only form that is ever shown.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.short())
    }
}

/// Why a credentials file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("invalid JSON ({0})")]
    InvalidJson(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("missing `{0}`")]
    Missing(&'static str),
    #[error("`{0}` is empty")]
    Empty(&'static str),
    #[error("`{0}` has the wrong type (expected {1})")]
    WrongType(&'static str, &'static str),
    /// The expected prefix is deliberately not quoted: no log line may
    /// contain token text, not even a prefix.
    #[error("`{0}` does not have the expected {kind} prefix", kind = prefix_kind(.1))]
    BadPrefix(&'static str, &'static str),
    #[error("`scopes` lacks \"user:inference\"")]
    MissingScope,
    #[error("token already expired at {}", crate::validate::fmt_ms(*.0))]
    Expired(i64),
    #[error("rollback: expiresAt {} is older than the last applied {} (set allow_rollback = true to accept)", crate::validate::fmt_ms(*.new), crate::validate::fmt_ms(*.last))]
    Rollback { new: i64, last: i64 },
}

fn prefix_kind(prefix: &str) -> &'static str {
    if prefix == REFRESH_PREFIX {
        "refresh-token"
    } else {
        "access-token"
    }
}

impl Refusal {
    /// A refusal that a file still being written would produce: worth a
    /// warning only when the write is known to be finished.
    pub fn maybe_partial(&self) -> bool {
        matches!(self, Refusal::InvalidJson(_))
    }
}

/// Milliseconds since the epoch as an RFC 3339 UTC time.
pub fn fmt_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What the agent last applied, needed for the rollback check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub fingerprint: Fingerprint,
    pub expires_at: Option<i64>,
}

/// A validated credentials file. `Debug` leaves the parsed object out.
#[derive(Clone)]
pub struct Validated {
    pub fingerprint: Fingerprint,
    pub expires_at: Option<i64>,
    /// The parsed object (JSON formats), for `drop_keys`.
    pub object: Option<Map<String, Value>>,
    pub warnings: Vec<&'static str>,
}

impl fmt::Debug for Validated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validated")
            .field("fingerprint", &self.fingerprint)
            .field("expires_at", &self.expires_at)
            .field("warnings", &self.warnings)
            .finish_non_exhaustive()
    }
}

pub const ACCESS_PREFIX: &str = "sk-ant-oat01-";
pub const REFRESH_PREFIX: &str = "sk-ant-ort01-";

/// The per-watch rules validation follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub allow_rollback: bool,
    /// Longest accepted distance from now to `expiresAt`.
    pub max_lifetime: std::time::Duration,
}

/// Validates `bytes` per `format`. `now_ms` is the current time; `last` is
/// what was applied before (for rollback refusal).
pub fn validate(
    format: Format,
    bytes: &[u8],
    now_ms: i64,
    last: Option<&Applied>,
    policy: Policy,
) -> Result<Validated, Refusal> {
    let allow_rollback = policy.allow_rollback;
    match format {
        Format::Any => Ok(Validated {
            fingerprint: Fingerprint::of(bytes),
            expires_at: None,
            object: None,
            warnings: vec![],
        }),
        Format::Json => {
            let object = parse_object(bytes)?;
            let fingerprint = Fingerprint::of(&canonical(&Value::Object(object.clone())));
            Ok(Validated {
                fingerprint,
                expires_at: None,
                object: Some(object),
                warnings: vec![],
            })
        }
        Format::ClaudeOauth => {
            let object = parse_object(bytes)?;
            let oauth = match object.get("claudeAiOauth") {
                None | Some(Value::Null) => return Err(Refusal::Missing("claudeAiOauth")),
                Some(Value::Object(o)) => o,
                Some(_) => return Err(Refusal::WrongType("claudeAiOauth", "an object")),
            };
            token(oauth, "accessToken", ACCESS_PREFIX)?;
            token(oauth, "refreshToken", REFRESH_PREFIX)?;
            let expires_at = match oauth.get("expiresAt") {
                None | Some(Value::Null) => return Err(Refusal::Missing("expiresAt")),
                Some(Value::Number(n)) => n.as_i64().ok_or(Refusal::WrongType(
                    "expiresAt",
                    "an integer (ms since the epoch)",
                ))?,
                Some(_) => {
                    return Err(Refusal::WrongType(
                        "expiresAt",
                        "an integer (ms since the epoch)",
                    ))
                }
            };
            match oauth.get("scopes") {
                None | Some(Value::Null) => return Err(Refusal::Missing("scopes")),
                Some(Value::Array(a)) => {
                    if !a.iter().any(|s| s.as_str() == Some("user:inference")) {
                        return Err(Refusal::MissingScope);
                    }
                }
                Some(_) => return Err(Refusal::WrongType("scopes", "an array of strings")),
            }
            let mut warnings = Vec::new();
            match oauth.get("subscriptionType") {
                Some(Value::String(s)) if !s.is_empty() && s.chars().all(|c| !c.is_uppercase()) => {
                }
                Some(Value::String(_)) => warnings.push("`subscriptionType` is not lowercase"),
                _ => warnings.push("`subscriptionType` is missing"),
            }
            if expires_at <= now_ms {
                return Err(Refusal::Expired(expires_at));
            }
            // Only the credential decides identity: an MCP-only rewrite keeps it.
            let fingerprint = Fingerprint::of(&canonical(&Value::Object(oauth.clone())));
            if let Some(last) = last {
                if let Some(last_exp) = last.expires_at {
                    if !allow_rollback && last.fingerprint != fingerprint && expires_at < last_exp {
                        return Err(Refusal::Rollback {
                            new: expires_at,
                            last: last_exp,
                        });
                    }
                }
            }
            Ok(Validated {
                fingerprint,
                expires_at: Some(expires_at),
                object: Some(object),
                warnings,
            })
        }
    }
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, Refusal> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(Refusal::NotObject),
        // Position and category only: serde_json's message is not shown, so
        // no fragment of the file can reach a log.
        Err(e) => Err(Refusal::InvalidJson(match e.classify() {
            serde_json::error::Category::Eof => {
                format!("truncated at line {} column {}", e.line(), e.column())
            }
            _ => format!("syntax error at line {} column {}", e.line(), e.column()),
        })),
    }
}

fn token(o: &Map<String, Value>, key: &'static str, prefix: &'static str) -> Result<(), Refusal> {
    match o.get(key) {
        None | Some(Value::Null) => Err(Refusal::Missing(key)),
        Some(Value::String(s)) if s.is_empty() => Err(Refusal::Empty(key)),
        Some(Value::String(s)) if !s.starts_with(prefix) || s.len() == prefix.len() => {
            Err(Refusal::BadPrefix(key, prefix))
        }
        Some(Value::String(_)) => Ok(()),
        Some(_) => Err(Refusal::WrongType(key, "a string")),
    }
}

/// JSON with object keys sorted, so that key order does not change identity.
pub fn canonical(v: &Value) -> Vec<u8> {
    fn write(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Object(o) => {
                let mut keys: Vec<&String> = o.keys().collect();
                keys.sort();
                out.push(b'{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend(serde_json::to_vec(k).unwrap_or_default());
                    out.push(b':');
                    write(&o[k.as_str()], out);
                }
                out.push(b'}');
            }
            Value::Array(a) => {
                out.push(b'[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(x, out);
                }
                out.push(b']');
            }
            other => out.extend(serde_json::to_vec(other).unwrap_or_default()),
        }
    }
    let mut out = Vec::new();
    write(v, &mut out);
    out
}

/// The bytes to write to a copy destination: the source as is, or without
/// `drop_keys` (then re-serialized, key order kept).
pub fn copy_payload(raw: &[u8], v: &Validated, drop_keys: &[String]) -> Secret {
    match (&v.object, drop_keys.is_empty()) {
        (Some(object), false) => {
            let mut o = object.clone();
            for k in drop_keys {
                o.shift_remove(k);
            }
            let mut bytes = serde_json::to_vec_pretty(&Value::Object(o)).unwrap_or_default();
            bytes.push(b'\n');
            Secret(bytes)
        }
        _ => Secret(raw.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn creds(access: &str, refresh: &str, exp: i64) -> String {
        format!(
            r#"{{"claudeAiOauth":{{"accessToken":"{access}","refreshToken":"{refresh}","expiresAt":{exp},"scopes":["user:inference"],"subscriptionType":"max"}},"mcpOAuth":{{"x":1}}}}"#
        )
    }

    fn good(exp: i64) -> String {
        creds("sk-ant-oat01-AAAA", "sk-ant-ort01-BBBB", exp)
    }

    const STRICT: Policy = Policy {
        allow_rollback: false,
        max_lifetime: std::time::Duration::from_secs(31 * 24 * 3600),
    };
    const LAX: Policy = Policy {
        allow_rollback: true,
        ..STRICT
    };

    fn check(s: &str) -> Result<Validated, Refusal> {
        validate(Format::ClaudeOauth, s.as_bytes(), NOW, None, STRICT)
    }

    #[test]
    fn accepts_good_and_ignores_mcp_changes() {
        let a = check(&good(NOW + 1000)).unwrap();
        assert!(a.warnings.is_empty());
        let b = check(&good(NOW + 1000).replace(r#"{"x":1}"#, r#"{"x":2}"#)).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.fingerprint, check(&good(NOW + 2000)).unwrap().fingerprint);
    }

    #[test]
    fn refusals_have_their_own_reason() {
        let g = good(NOW + 1000);
        assert!(matches!(
            check(&g[..g.len() - 5]),
            Err(Refusal::InvalidJson(_))
        ));
        assert_eq!(
            check(&creds("sk-ant-oat01-A", "", NOW + 1)).unwrap_err(),
            Refusal::Empty("refreshToken")
        );
        assert_eq!(
            check(&g.replace("\"accessToken\"", "\"other\"")).unwrap_err(),
            Refusal::Missing("accessToken")
        );
        assert_eq!(
            check(&good(NOW - 1)).unwrap_err(),
            Refusal::Expired(NOW - 1)
        );
        assert_eq!(
            check(r#"{"mcpOAuth":{}}"#).unwrap_err(),
            Refusal::Missing("claudeAiOauth")
        );
        assert_eq!(
            check(&g.replace("user:inference", "user:profile")).unwrap_err(),
            Refusal::MissingScope
        );
        assert_eq!(
            check(&creds("bogus", "sk-ant-ort01-B", NOW + 1)).unwrap_err(),
            Refusal::BadPrefix("accessToken", ACCESS_PREFIX)
        );
        assert_eq!(check("[1]").unwrap_err(), Refusal::NotObject);
    }

    #[test]
    fn rollback_is_refused_unless_allowed() {
        let newer = check(&good(NOW + 5000)).unwrap();
        let last = Applied {
            fingerprint: newer.fingerprint,
            expires_at: newer.expires_at,
        };
        let older = creds("sk-ant-oat01-OLD", "sk-ant-ort01-OLD", NOW + 1000);
        let r = validate(
            Format::ClaudeOauth,
            older.as_bytes(),
            NOW,
            Some(&last),
            STRICT,
        );
        assert_eq!(
            r.unwrap_err(),
            Refusal::Rollback {
                new: NOW + 1000,
                last: NOW + 5000
            }
        );
        assert!(validate(Format::ClaudeOauth, older.as_bytes(), NOW, Some(&last), LAX).is_ok());
        // The same credential again is not a rollback.
        assert!(validate(
            Format::ClaudeOauth,
            good(NOW + 5000).as_bytes(),
            NOW,
            Some(&last),
            STRICT
        )
        .is_ok());
    }

    #[test]
    fn messages_and_debug_never_show_tokens() {
        let g = good(NOW + 1000);
        let wrong_prefix = creds("7sk-ant-oat01-A", "sk-ant-ort01-B", NOW + 1000);
        for bad in [
            &g[..40],
            &g[..g.len() - 1],
            "{\"claudeAiOauth\": {\"accessToken\": \"sk-ant-oat01-XYZ\" nope",
            wrong_prefix.as_str(),
        ] {
            let e = check(bad).unwrap_err();
            assert!(!e.to_string().contains("sk-ant-"), "{e}");
        }
        let v = check(&g).unwrap();
        let payload = copy_payload(g.as_bytes(), &v, &["mcpOAuth".into()]);
        assert!(!format!("{payload:?} {v:?}").contains("sk-ant-"));
        let dropped: Value = serde_json::from_slice(&payload.0).unwrap();
        assert!(dropped.get("mcpOAuth").is_none() && dropped.get("claudeAiOauth").is_some());
    }
}
