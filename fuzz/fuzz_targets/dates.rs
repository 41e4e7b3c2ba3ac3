//! Dates and extreme numbers: `fmt_ms` is total (any i64, no panic, a
//! valid RFC 3339 time exactly for 1970..=9999), and `validate` with any
//! `expiresAt`, `now`, `max_lifetime` and last applied expiry never panics,
//! never overflows, decides by the documented window and never echoes a
//! token.
#![no_main]
use cred_watch::config::Format;
use cred_watch::validate::{self, Applied, Fingerprint, Policy, Refusal, MAX_DATE_MS};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, UNIX_EPOCH};

/// Values the bytes may select instead of a raw number.
const EDGES: [i64; 10] = [
    i64::MIN,
    i64::MIN + 1,
    -1,
    0,
    1_800_000_000_000,
    MAX_DATE_MS,
    MAX_DATE_MS + 1,
    253_402_214_400_000,
    i64::MAX - 1,
    i64::MAX,
];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    /// A raw i64, or (one selector byte in four) an edge value.
    fn number(&mut self) -> i64 {
        let [sel] = self.take::<1>();
        let raw = i64::from_le_bytes(self.take());
        if sel % 4 == 0 {
            EDGES[usize::from(sel / 4) % EDGES.len()]
        } else {
            raw
        }
    }
}

fn doc(expires_at: &str) -> String {
    format!(
        r#"{{"claudeAiOauth":{{"accessToken":"sk-ant-oat01-fuzz_A-1","refreshToken":"sk-ant-ort01-fuzz_B-2","expiresAt":{expires_at},"scopes":["user:inference"],"subscriptionType":"max"}},"mcpOAuth":{{}}}}"#
    )
}

fn check_fmt(ms: i64) {
    let s = validate::fmt_ms(ms);
    if (0..=MAX_DATE_MS).contains(&ms) {
        let t = humantime::parse_rfc3339(&s).expect("fmt_ms gives RFC 3339 in range");
        let secs = t
            .duration_since(UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs();
        assert_eq!(secs as i64, ms / 1000, "{ms} -> {s}");
    } else {
        assert_eq!(s, format!("{ms} ms (not a valid date)"));
    }
}

fn check_refusal(r: &Refusal) {
    let msg = r.to_string();
    assert!(!msg.contains("sk-ant-") && !msg.contains("fuzz_"), "{msg}");
    let _ = format!("{r:?}");
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let (exp, now, last_exp) = (input.number(), input.number(), input.number());
    let max = Duration::new(
        u64::from_le_bytes(input.take()),
        u32::from_le_bytes(input.take()) % 1_000_000_000,
    );
    let [flags] = input.take::<1>();
    for ms in [exp, now, last_exp] {
        check_fmt(ms);
    }
    let policy = Policy {
        allow_rollback: flags & 1 != 0,
        max_lifetime: max,
    };
    let last = Applied {
        fingerprint: Fingerprint::of(b"previous"),
        expires_at: Some(last_exp),
    };
    let prior = (flags & 2 != 0).then_some(&last);
    let window = (0..=MAX_DATE_MS).contains(&exp)
        && exp > now
        && exp <= now.saturating_add(i64::try_from(max.as_millis()).unwrap_or(i64::MAX));
    match validate::validate(
        Format::ClaudeOauth,
        doc(&exp.to_string()).as_bytes(),
        now,
        prior,
        policy,
    ) {
        Ok(v) => {
            assert!(window, "accepted {exp} at {now} with {max:?}");
            assert_eq!(v.expires_at, Some(exp));
        }
        Err(r) => {
            check_refusal(&r);
            match r {
                Refusal::NotADate(x) => assert!(x == exp && !(0..=MAX_DATE_MS).contains(&exp)),
                Refusal::Expired(x) => assert!(x == exp && exp <= now),
                Refusal::TooFarAhead { expires_at, .. } => assert!(expires_at == exp && !window),
                Refusal::Rollback { new, last } => {
                    assert!(
                        window
                            && !policy.allow_rollback
                            && prior.is_some()
                            && new == exp
                            && last == last_exp
                            && exp < last_exp
                    )
                }
                other => panic!("unexpected refusal {other:?}"),
            }
        }
    }
    // The rest of the input as the `expiresAt` literal: anything goes, no panic.
    if let Ok(tail) = std::str::from_utf8(input.0) {
        for format in [Format::ClaudeOauth, Format::Json] {
            if let Err(r) = validate::validate(format, doc(tail).as_bytes(), now, prior, policy) {
                check_refusal(&r);
            }
        }
    }
});
