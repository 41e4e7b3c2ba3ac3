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
        hex(&self.0)
    }

    /// The first 12 hex digits, the only form that is ever shown.
    pub fn short(&self) -> String {
        hex(&self.0[..6])
    }
}

/// Lowercase hex, without a `format!` per byte (this runs for every
/// change the agent handles).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
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
    /// The key is named only when it is a short plain identifier path
    /// (a key is attacker-chosen text); the position is always given.
    #[error("{} at line {line} column {column}", duplicate_what(.key))]
    DuplicateKey {
        key: Option<String>,
        line: usize,
        column: usize,
    },
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
    #[error("`{key}` is {len} bytes long (at most {MAX_TOKEN_LEN})")]
    TokenTooLong { key: &'static str, len: usize },
    #[error("`{key}` has a character outside [A-Za-z0-9_-] after its prefix (at byte {offset})")]
    TokenCharacter { key: &'static str, offset: usize },
    #[error("`scopes` lacks \"user:inference\"")]
    MissingScope,
    #[error(
        "`expiresAt` is {0} ms since the epoch: not a valid date (accepted: years 1970 to 9999)"
    )]
    NotADate(i64),
    #[error("token already expired at {}", crate::validate::fmt_ms(*.0))]
    Expired(i64),
    #[error("`expiresAt` {} is more than {} ahead of now (max_lifetime): implausible, access tokens live hours, and once applied it would refuse every later genuine refresh as a rollback", crate::validate::fmt_ms(*.expires_at), fmt_lifetime(*.max))]
    TooFarAhead {
        expires_at: i64,
        max: std::time::Duration,
    },
    #[error("rollback: expiresAt {} is older than the last applied {} (set allow_rollback = true to accept)", crate::validate::fmt_ms(*.new), crate::validate::fmt_ms(*.last))]
    Rollback { new: i64, last: i64 },
}

impl Refusal {
    /// A short label for metrics (`cred_watch_refusals_total{reason}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::InvalidJson(_) => "invalid_json",
            Refusal::NotObject => "not_object",
            Refusal::DuplicateKey { .. } => "duplicate_key",
            Refusal::Missing(_) => "missing_key",
            Refusal::Empty(_) => "empty_token",
            Refusal::WrongType(..) => "wrong_type",
            Refusal::BadPrefix(..) => "bad_prefix",
            Refusal::TokenTooLong { .. } => "token_too_long",
            Refusal::TokenCharacter { .. } => "token_character",
            Refusal::MissingScope => "missing_scope",
            Refusal::NotADate(_) => "not_a_date",
            Refusal::Expired(_) => "expired",
            Refusal::TooFarAhead { .. } => "too_far_ahead",
            Refusal::Rollback { .. } => "rollback",
        }
    }
}

fn prefix_kind(prefix: &str) -> &'static str {
    if prefix == REFRESH_PREFIX {
        "refresh-token"
    } else {
        "access-token"
    }
}

/// A lifetime in whole days when it is one ("31 days", not humantime's
/// "1month 13h 26m 24s").
fn fmt_lifetime(d: std::time::Duration) -> String {
    const DAY: u64 = 24 * 3600;
    match (d.as_secs(), d.subsec_nanos()) {
        (s, 0) if s > 0 && s % DAY == 0 => format!("{} days", s / DAY),
        _ => humantime::format_duration(d).to_string(),
    }
}

fn duplicate_what(key: &Option<String>) -> String {
    match key {
        Some(k) => format!("duplicate key `{k}`"),
        None => "a duplicate key".to_string(),
    }
}

impl Refusal {
    /// A refusal that a file still being written would produce: worth a
    /// warning only when the write is known to be finished.
    pub fn maybe_partial(&self) -> bool {
        matches!(self, Refusal::InvalidJson(_))
    }
}

/// The last millisecond RFC 3339 can show: 9999-12-31T23:59:59.999Z.
pub const MAX_DATE_MS: i64 = 253_402_300_799_999;

/// The longest accepted token, prefix included, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Milliseconds since the epoch as an RFC 3339 UTC time. Total: a value
/// outside 1970..=9999 is shown as a number, never a panic.
pub fn fmt_ms(ms: i64) -> String {
    match date_of(ms) {
        Some(t) => humantime::format_rfc3339_seconds(t).to_string(),
        None => format!("{ms} ms (not a valid date)"),
    }
}

/// `ms` as a time that RFC 3339 formatting can show, if it is one.
fn date_of(ms: i64) -> Option<std::time::SystemTime> {
    if !(0..=MAX_DATE_MS).contains(&ms) {
        return None;
    }
    let ms = u64::try_from(ms).ok()?;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms))
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
    /// Computed when first asked for: the agent fixes the mode before it
    /// spends a canonical form and a hash on identity.
    fingerprint: std::cell::OnceCell<Fingerprint>,
    /// Identity is `claudeAiOauth` alone (an MCP-only rewrite keeps it).
    credential_only: bool,
    pub expires_at: Option<i64>,
    /// The parsed object (JSON formats), for `drop_keys`.
    pub object: Option<Map<String, Value>>,
    pub warnings: Vec<&'static str>,
}

impl Validated {
    fn new(object: Option<Map<String, Value>>, credential_only: bool) -> Validated {
        Validated {
            fingerprint: std::cell::OnceCell::new(),
            credential_only,
            expires_at: None,
            object,
            warnings: vec![],
        }
    }

    /// The identity of the credential: of `claudeAiOauth` for that format,
    /// of the canonical object for JSON, of the bytes for any other file.
    pub fn fingerprint(&self) -> Fingerprint {
        *self.fingerprint.get_or_init(|| {
            let object = self.object.as_ref();
            let part = match object.and_then(|o| o.get("claudeAiOauth")) {
                Some(Value::Object(oauth)) if self.credential_only => Some(oauth),
                _ => object,
            };
            Fingerprint::of(&part.map(canonical_object).unwrap_or_default())
        })
    }

    /// `claudeAiOauth.refreshToken` is there and not empty.
    pub fn has_refresh_token(&self) -> bool {
        self.object
            .as_ref()
            .and_then(|o| o.get("claudeAiOauth"))
            .and_then(|o| o.get("refreshToken"))
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty())
    }
}

impl fmt::Debug for Validated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validated")
            .field("fingerprint", &self.fingerprint.get())
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

impl Policy {
    /// The latest `expiresAt` accepted at `now_ms` (saturating: no overflow
    /// for any `now_ms` or `max_lifetime`).
    pub fn latest_expiry(&self, now_ms: i64) -> i64 {
        let max_ms = i64::try_from(self.max_lifetime.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_add(max_ms)
    }
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
    match format {
        Format::Any => {
            let v = Validated::new(None, false);
            v.fingerprint.get_or_init(|| Fingerprint::of(bytes));
            Ok(v)
        }
        Format::Json => Ok(Validated::new(Some(parse_object(bytes)?), false)),
        Format::ClaudeOauth => claude_oauth(parse_object(bytes)?, now_ms, last, policy),
    }
}

fn claude_oauth(
    object: Map<String, Value>,
    now_ms: i64,
    last: Option<&Applied>,
    policy: Policy,
) -> Result<Validated, Refusal> {
    let oauth = match object.get("claudeAiOauth") {
        None | Some(Value::Null) => return Err(Refusal::Missing("claudeAiOauth")),
        Some(Value::Object(o)) => o,
        Some(_) => return Err(Refusal::WrongType("claudeAiOauth", "an object")),
    };
    token(oauth, "accessToken", ACCESS_PREFIX)?;
    token(oauth, "refreshToken", REFRESH_PREFIX)?;
    let expires_at = expires_at(oauth)?;
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
        Some(Value::String(s)) if !s.is_empty() && s.chars().all(|c| !c.is_uppercase()) => {}
        Some(Value::String(_)) => warnings.push("`subscriptionType` is not lowercase"),
        _ => warnings.push("`subscriptionType` is missing"),
    }
    check_expiry(expires_at, now_ms, policy)?;
    let mut v = Validated::new(Some(object), true);
    v.expires_at = Some(expires_at);
    v.warnings = warnings;
    if let Some(warning) = check_rollback(&v, expires_at, last, now_ms, policy)? {
        v.warnings.push(warning);
    }
    Ok(v)
}

fn expires_at(oauth: &Map<String, Value>) -> Result<i64, Refusal> {
    const WHAT: &str = "an integer (ms since the epoch)";
    match oauth.get("expiresAt") {
        None | Some(Value::Null) => Err(Refusal::Missing("expiresAt")),
        Some(Value::Number(n)) => n.as_i64().ok_or(Refusal::WrongType("expiresAt", WHAT)),
        Some(_) => Err(Refusal::WrongType("expiresAt", WHAT)),
    }
}

/// A date, not expired, not implausibly far ahead.
fn check_expiry(expires_at: i64, now_ms: i64, policy: Policy) -> Result<(), Refusal> {
    if date_of(expires_at).is_none() {
        return Err(Refusal::NotADate(expires_at));
    }
    if expires_at <= now_ms {
        return Err(Refusal::Expired(expires_at));
    }
    if expires_at > policy.latest_expiry(now_ms) {
        return Err(Refusal::TooFarAhead {
            expires_at,
            max: policy.max_lifetime,
        });
    }
    Ok(())
}

/// Refuses an older credential than the last applied one: an older
/// `expiresAt` with a different credential (the fingerprint is computed
/// only for an older one). A last applied `expiresAt` that would be refused
/// today (beyond `max_lifetime`, or not a date: written by an older
/// version) is no baseline: it would wedge every later refresh. Then the
/// file is accepted with a warning.
fn check_rollback(
    v: &Validated,
    expires_at: i64,
    last: Option<&Applied>,
    now_ms: i64,
    policy: Policy,
) -> Result<Option<&'static str>, Refusal> {
    let Some((last_fp, last_exp)) = last.and_then(|l| Some((l.fingerprint, l.expires_at?))) else {
        return Ok(None);
    };
    if policy.allow_rollback || expires_at >= last_exp || v.fingerprint() == last_fp {
        return Ok(None);
    }
    if date_of(last_exp).is_none() || last_exp > policy.latest_expiry(now_ms) {
        return Ok(Some(
            "the expiresAt last applied is implausibly far ahead; not treating this file as a rollback",
        ));
    }
    Err(Refusal::Rollback {
        new: expires_at,
        last: last_exp,
    })
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, Refusal> {
    let found = std::cell::Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = serde::de::DeserializeSeed::deserialize(unique::Seed::root(&found), &mut de)
        .and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(Refusal::NotObject),
        Err(e) => Err(match found.take() {
            Some(unique::Duplicate { key }) => Refusal::DuplicateKey {
                key,
                line: e.line(),
                column: e.column(),
            },
            // Position and category only: serde_json's message is not
            // shown, so no fragment of the file can reach a log.
            None => Refusal::InvalidJson(match e.classify() {
                serde_json::error::Category::Eof => {
                    format!("truncated at line {} column {}", e.line(), e.column())
                }
                _ => format!("syntax error at line {} column {}", e.line(), e.column()),
            }),
        }),
    }
}

/// A JSON value built like `serde_json::Value`, but a repeated key in any
/// object, at any depth, is an error (serde_json would keep the last one).
mod unique {
    use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Number, Value};
    use std::cell::Cell;
    use std::fmt;

    /// The duplicate found: its path, only if every part is a short plain
    /// identifier (key names are file content).
    pub struct Duplicate {
        pub key: Option<String>,
    }

    enum Segment<'a> {
        Key(&'a str),
        Index(usize),
    }

    /// Where a value sits, as a chain up to the root.
    struct Path<'a> {
        parent: Option<&'a Path<'a>>,
        segment: Segment<'a>,
    }

    impl Path<'_> {
        fn plain(&self) -> Option<String> {
            let mut parts = Vec::new();
            let mut at = Some(self);
            while let Some(p) = at {
                match p.segment {
                    Segment::Key(k) if is_plain(k) => parts.push(k.to_string()),
                    Segment::Key(_) => return None,
                    Segment::Index(i) => parts.push(format!("[{i}]")),
                }
                at = p.parent;
            }
            parts.reverse();
            let path = parts.join(".").replace(".[", "[");
            (path.len() <= 128).then_some(path)
        }
    }

    fn is_plain(key: &str) -> bool {
        (1..=32).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    }

    #[derive(Clone, Copy)]
    pub struct Seed<'a> {
        found: &'a Cell<Option<Duplicate>>,
        path: Option<&'a Path<'a>>,
    }

    impl<'a> Seed<'a> {
        pub fn root(found: &'a Cell<Option<Duplicate>>) -> Self {
            Seed { found, path: None }
        }
    }

    impl<'de> DeserializeSeed<'de> for Seed<'_> {
        type Value = Value;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Seed<'_> {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
            Ok(Value::Bool(b))
        }
        fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
            Ok(Value::Number(n.into()))
        }
        fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
            Ok(Value::Number(n.into()))
        }
        fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
            Ok(Number::from_f64(n).map_or(Value::Null, Value::Number))
        }
        fn visit_str<E>(self, s: &str) -> Result<Value, E> {
            Ok(Value::String(s.to_string()))
        }
        fn visit_string<E>(self, s: String) -> Result<Value, E> {
            Ok(Value::String(s))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_none<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut items = Vec::new();
            loop {
                let path = Path {
                    parent: self.path,
                    segment: Segment::Index(items.len()),
                };
                let seed = Seed {
                    found: self.found,
                    path: Some(&path),
                };
                match seq.next_element_seed(seed)? {
                    Some(v) => items.push(v),
                    None => return Ok(Value::Array(items)),
                }
            }
        }

        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
            let mut map = Map::new();
            while let Some(key) = access.next_key::<String>()? {
                let path = Path {
                    parent: self.path,
                    segment: Segment::Key(&key),
                };
                if map.contains_key(&key) {
                    self.found.set(Some(Duplicate { key: path.plain() }));
                    return Err(de::Error::custom("duplicate key"));
                }
                let seed = Seed {
                    found: self.found,
                    path: Some(&path),
                };
                let value = access.next_value_seed(seed)?;
                map.insert(key, value);
            }
            Ok(Value::Object(map))
        }
    }
}

fn token(o: &Map<String, Value>, key: &'static str, prefix: &'static str) -> Result<(), Refusal> {
    let s = match o.get(key) {
        None | Some(Value::Null) => return Err(Refusal::Missing(key)),
        Some(Value::String(s)) => s,
        Some(_) => return Err(Refusal::WrongType(key, "a string")),
    };
    if s.is_empty() {
        return Err(Refusal::Empty(key));
    }
    if !s.starts_with(prefix) || s.len() == prefix.len() {
        return Err(Refusal::BadPrefix(key, prefix));
    }
    if s.len() > MAX_TOKEN_LEN {
        return Err(Refusal::TokenTooLong { key, len: s.len() });
    }
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-';
    match s.as_bytes()[prefix.len()..]
        .iter()
        .position(|b| !allowed(b))
    {
        Some(i) => Err(Refusal::TokenCharacter {
            key,
            offset: prefix.len() + i,
        }),
        None => Ok(()),
    }
}

/// JSON with object keys sorted, so that key order does not change identity.
pub fn canonical(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(v, &mut out);
    out
}

/// [`canonical`] of an object, without wrapping (cloning) it in a `Value`.
fn canonical_object(o: &Map<String, Value>) -> Vec<u8> {
    let mut out = Vec::new();
    write_object(o, &mut out);
    out
}

fn write_object(o: &Map<String, Value>, out: &mut Vec<u8>) {
    let mut entries: Vec<(&String, &Value)> = o.iter().collect();
    entries.sort_by_key(|(k, _)| *k);
    out.push(b'{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut *out, k);
        out.push(b':');
        write_canonical(v, out);
    }
    out.push(b'}');
}

fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(o) => write_object(o, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// What a copy leaves out of the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyShape<'a> {
    /// Top-level keys left out (e.g. `mcpOAuth`).
    pub drop_keys: &'a [String],
    /// Leave out `claudeAiOauth.refreshToken`: a consumer without it can
    /// use the access token but can never refresh, so it can never rotate
    /// the single-use refresh token under the source's CLI.
    pub strip_refresh_token: bool,
}

/// The bytes to write to a copy destination: the source as is, or without
/// what `shape` leaves out (then re-serialized, key order kept).
pub fn copy_payload(raw: &[u8], v: &Validated, shape: CopyShape) -> Secret {
    let strip = shape.strip_refresh_token
        && v.object
            .as_ref()
            .and_then(|o| o.get("claudeAiOauth"))
            .and_then(Value::as_object)
            .is_some_and(|o| o.contains_key("refreshToken"));
    match &v.object {
        Some(object) if strip || !shape.drop_keys.is_empty() => {
            let mut o = object.clone();
            for k in shape.drop_keys {
                o.shift_remove(k);
            }
            if strip {
                if let Some(Value::Object(oauth)) = o.get_mut("claudeAiOauth") {
                    oauth.shift_remove("refreshToken");
                }
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

    /// Identity must not change between versions (the state file keeps
    /// fingerprints): sorted keys, compact, serde_json's escaping, and the
    /// SHA-256 of that in lowercase hex (computed independently).
    #[test]
    fn canonical_form_and_fingerprint_are_stable() {
        let v: Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[1,"x"],"c":"\u00e9\"q"}}"#).unwrap();
        let bytes = canonical(&v);
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            "{\"a\":{\"c\":\"é\\\"q\",\"d\":[1,\"x\"]},\"b\":1}"
        );
        let Value::Object(o) = &v else { unreachable!() };
        assert_eq!(canonical_object(o), bytes);
        let f = Fingerprint::of(&bytes);
        assert_eq!(
            f.hex(),
            "006af201cf69ad131d6eda852689731a98f3051213c2bf10bfb2991509441b07"
        );
        assert_eq!(f.short(), "006af201cf69");
        assert_eq!(f.to_string(), "006af201cf69");
    }

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
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(
            a.fingerprint(),
            check(&good(NOW + 2000)).unwrap().fingerprint()
        );
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
            fingerprint: newer.fingerprint(),
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
        let drop = ["mcpOAuth".to_string()];
        let shape = CopyShape {
            drop_keys: &drop,
            strip_refresh_token: true,
        };
        let payload = copy_payload(g.as_bytes(), &v, shape);
        assert!(!format!("{payload:?} {v:?}").contains("sk-ant-"));
        let dropped: Value = serde_json::from_slice(&payload.0).unwrap();
        assert!(dropped.get("mcpOAuth").is_none() && dropped.get("claudeAiOauth").is_some());
    }

    const DAY_MS: i64 = 24 * 3600 * 1000;

    #[test]
    fn fmt_ms_is_total() {
        assert_eq!(fmt_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_ms(MAX_DATE_MS), "9999-12-31T23:59:59Z");
        assert_eq!(fmt_ms(253_402_300_799_999), "9999-12-31T23:59:59Z");
        assert_eq!(fmt_ms(NOW), "2027-01-15T08:00:00Z");
        for ms in [253_402_300_800_000, i64::MAX, i64::MIN, -1, i64::MIN + 1] {
            assert_eq!(fmt_ms(ms), format!("{ms} ms (not a valid date)"));
        }
    }

    #[test]
    fn expires_at_must_be_a_date() {
        for ms in [253_402_300_800_000, i64::MAX, i64::MIN, -1] {
            let e = check(&good(ms)).unwrap_err();
            assert_eq!(e, Refusal::NotADate(ms));
            assert!(e.to_string().contains("not a valid date"), "{e}");
        }
        // Even with a policy that would allow anything and a `now` at the edges.
        let anything = Policy {
            allow_rollback: true,
            max_lifetime: std::time::Duration::MAX,
        };
        for now in [i64::MIN, -1, 0, i64::MAX] {
            let r = validate(
                Format::ClaudeOauth,
                good(i64::MAX).as_bytes(),
                now,
                None,
                anything,
            );
            assert_eq!(r.unwrap_err(), Refusal::NotADate(i64::MAX));
        }
        let r = validate(
            Format::ClaudeOauth,
            good(MAX_DATE_MS).as_bytes(),
            0,
            None,
            anything,
        );
        assert_eq!(r.unwrap().expires_at, Some(MAX_DATE_MS));
    }

    #[test]
    fn expires_at_beyond_max_lifetime_is_refused() {
        let max = STRICT.max_lifetime;
        assert!(check(&good(NOW + 31 * DAY_MS)).is_ok());
        for exp in [NOW + 31 * DAY_MS + 1, 253_402_214_400_000, MAX_DATE_MS] {
            let e = check(&good(exp)).unwrap_err();
            assert_eq!(
                e,
                Refusal::TooFarAhead {
                    expires_at: exp,
                    max
                }
            );
            let msg = e.to_string();
            assert!(msg.contains("31 days") && msg.contains("rollback"), "{msg}");
        }
        assert!(check(&good(253_402_214_400_000))
            .unwrap_err()
            .to_string()
            .contains("9999-12-31T00:00:00Z"));
        // No overflow: `now` near the end of time, a huge max_lifetime.
        let huge = Policy {
            allow_rollback: false,
            max_lifetime: std::time::Duration::from_secs(u64::MAX),
        };
        assert_eq!(huge.latest_expiry(i64::MAX), i64::MAX);
        assert_eq!(STRICT.latest_expiry(i64::MAX), i64::MAX);
        assert_eq!(STRICT.latest_expiry(i64::MIN), i64::MIN + 31 * DAY_MS);
        assert!(matches!(
            validate(
                Format::ClaudeOauth,
                good(NOW).as_bytes(),
                i64::MAX,
                None,
                huge
            ),
            Err(Refusal::Expired(_))
        ));
        let tight = Policy {
            max_lifetime: std::time::Duration::ZERO,
            ..STRICT
        };
        let r = validate(
            Format::ClaudeOauth,
            good(NOW + 1).as_bytes(),
            NOW,
            None,
            tight,
        );
        assert!(matches!(r, Err(Refusal::TooFarAhead { .. })));
    }

    #[test]
    fn implausible_last_expiry_does_not_wedge_refreshes() {
        let genuine = good(NOW + 3_600_000);
        for last_exp in [253_402_214_400_000, i64::MAX, NOW + 32 * DAY_MS] {
            let last = Applied {
                fingerprint: Fingerprint::of(b"older version applied this"),
                expires_at: Some(last_exp),
            };
            let v = validate(
                Format::ClaudeOauth,
                genuine.as_bytes(),
                NOW,
                Some(&last),
                STRICT,
            )
            .unwrap();
            assert!(v.warnings.iter().any(|w| w.contains("implausibly far")));
        }
    }

    fn with_tokens(access_tail: &str, refresh_tail: &str) -> String {
        let access = serde_json::to_string(&format!("{ACCESS_PREFIX}{access_tail}")).unwrap();
        let refresh = serde_json::to_string(&format!("{REFRESH_PREFIX}{refresh_tail}")).unwrap();
        format!(
            r#"{{"claudeAiOauth":{{"accessToken":{access},"refreshToken":{refresh},"expiresAt":{},"scopes":["user:inference"],"subscriptionType":"max"}}}}"#,
            NOW + 1000
        )
    }

    #[test]
    fn token_characters_are_restricted() {
        assert!(check(&with_tokens("Ab9_-xyz", "Zz0-_q")).is_ok());
        for bad in [
            "a\0b", "a b", "ab\t", "\n", "a\u{7f}", "é", "a.b", "a+b/c=", "x\"y", "\\",
        ] {
            let e = check(&with_tokens(&format!("SECRET{bad}"), "ok")).unwrap_err();
            assert!(
                matches!(
                    e,
                    Refusal::TokenCharacter {
                        key: "accessToken",
                        ..
                    }
                ),
                "{bad:?}: {e:?}"
            );
            let e2 = check(&with_tokens("ok", &format!("SECRET{bad}"))).unwrap_err();
            assert!(
                matches!(
                    e2,
                    Refusal::TokenCharacter {
                        key: "refreshToken",
                        ..
                    }
                ),
                "{bad:?}: {e2:?}"
            );
            for msg in [e.to_string(), e2.to_string()] {
                assert!(!msg.contains("sk-ant-") && !msg.contains("SECRET"), "{msg}");
            }
        }
        assert_eq!(
            check(&with_tokens("ab cd", "ok")).unwrap_err(),
            Refusal::TokenCharacter {
                key: "accessToken",
                offset: ACCESS_PREFIX.len() + 2
            }
        );
    }

    #[test]
    fn tokens_are_at_most_4_kib() {
        let fits = "A".repeat(MAX_TOKEN_LEN - ACCESS_PREFIX.len());
        assert!(check(&with_tokens(&fits, &fits)).is_ok());
        let long = "A".repeat(MAX_TOKEN_LEN - ACCESS_PREFIX.len() + 1);
        let e = check(&with_tokens("ok", &long)).unwrap_err();
        assert_eq!(
            e,
            Refusal::TokenTooLong {
                key: "refreshToken",
                len: MAX_TOKEN_LEN + 1
            }
        );
        assert!(!e.to_string().contains("AAA"), "{e}");
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        let g = good(NOW + 1000);
        let oauth = &g[g.find("{\"accessToken").unwrap()..g.find(",\"mcpOAuth").unwrap()];
        let cases = [
            (
                format!(
                    r#"{{"claudeAiOauth":{{"accessToken":"sk-ant-oat01-broken"}},"claudeAiOauth":{oauth}}}"#
                ),
                Some("claudeAiOauth"),
            ),
            (
                g.replace("\"expiresAt\":", "\"expiresAt\":1,\"expiresAt\":"),
                Some("claudeAiOauth.expiresAt"),
            ),
            (
                g.replace(r#"{"x":1}"#, r#"{"list":[1,{"a":{"b":1,"b":2}}]}"#),
                Some("mcpOAuth.list[1].a.b"),
            ),
            (
                g.replace(r#"{"x":1}"#, r#"{"a":1,"\u0061":2}"#),
                Some("mcpOAuth.a"),
            ),
            (
                g.replace(r#"{"x":1}"#, r#"{"server|abc":1,"server|abc":2}"#),
                None,
            ),
            (
                g.replace(r#"{"x":1}"#, r#"{"sk-ant-oat01-Q":1,"sk-ant-oat01-Q":2}"#),
                None,
            ),
            (format!(r#"{{"{0}":1,"{0}":2}}"#, "A".repeat(33)), None),
        ];
        for (doc, key) in cases {
            for format in [Format::ClaudeOauth, Format::Json] {
                let e = validate(format, doc.as_bytes(), NOW, None, STRICT).unwrap_err();
                let Refusal::DuplicateKey {
                    key: k,
                    line,
                    column,
                } = &e
                else {
                    panic!("{doc}: {e:?}");
                };
                assert_eq!(k.as_deref(), key, "{doc}");
                assert!(*line == 1 && *column > 0, "{e}");
                let msg = e.to_string();
                assert!(!msg.contains("sk-ant-") && !msg.contains("server"), "{msg}");
                assert!(!msg.contains("broken") && !msg.contains("AAAA"), "{msg}");
            }
        }
        let e = check("{\n \"a\": 1,\n \"a\": 2}").unwrap_err();
        assert_eq!(e.to_string(), "duplicate key `a` at line 3 column 4");
        let e = check("{\"a|\": 1, \"a|\": 2}").unwrap_err();
        assert_eq!(e.to_string(), "a duplicate key at line 1 column 14");
        // Same keys in different objects are fine, and `any` is raw bytes.
        assert!(check(&g.replace(r#"{"x":1}"#, r#"{"x":{"x":{"x":1}}}"#)).is_ok());
        assert!(validate(Format::Any, b"{\"a\":1,\"a\":2}", NOW, None, STRICT).is_ok());
    }

    #[test]
    fn parsing_matches_serde_json() {
        let g = good(NOW + 1000);
        let docs = [
            g.as_str(),
            r#"{"n":[1,-2,3.5,1e400,18446744073709551615,-9223372036854775808],"s":"\u00e9\n","b":[true,false,null],"o":{}}"#,
        ];
        for doc in docs {
            let ours = parse_object(doc.as_bytes())
                .map(Value::Object)
                .unwrap_or(Value::Null);
            let theirs: Value = serde_json::from_str(doc).unwrap_or(Value::Null);
            assert_eq!(ours, theirs, "{doc}");
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(matches!(
            parse_object(deep.as_bytes()),
            Err(Refusal::InvalidJson(_))
        ));
        assert!(matches!(
            parse_object(b"{} x"),
            Err(Refusal::InvalidJson(_))
        ));
    }
}
