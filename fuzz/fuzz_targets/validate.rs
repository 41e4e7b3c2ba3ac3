//! The credentials validator never panics and never echoes a token: not in
//! a refusal, not in `Debug` output, for any input.
#![no_main]
use cred_watch::config::Format;
use cred_watch::validate::{self, Applied};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = 1_800_000_000_000;
    let last = Applied { fingerprint: validate::Fingerprint::of(b"x"), expires_at: Some(now + 1_000) };
    for format in [Format::ClaudeOauth, Format::Json, Format::Any] {
        for prior in [None, Some(&last)] {
            match validate::validate(format, data, now, prior, validate::Policy { allow_rollback: false, max_lifetime: std::time::Duration::from_secs(31 * 24 * 3600) }) {
                Ok(v) => {
                    assert!(!format!("{v:?}").contains("sk-ant-"));
                    let payload = validate::copy_payload(data, &v, validate::CopyShape { drop_keys: &["mcpOAuth".to_string()], strip_refresh_token: true });
                    assert!(!format!("{payload:?}").contains("sk-ant-"));
                    if format != Format::Any {
                        serde_json::from_slice::<serde_json::Value>(&payload.0).expect("a JSON copy stays JSON");
                    }
                }
                Err(r) => assert!(!r.to_string().contains("sk-ant-"), "{r}"),
            }
        }
    }
});
