//! The configuration loader never panics; every error names the file and
//! never repeats the input (issue 9, item 5): its message holds no long word
//! of the input and its key, if any, is a plain dotted key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("/etc/cred-watch/cred-watch.toml");
    match cred_watch::config::parse_str(path, text) {
        Ok(settings) => {
            // The printed effective configuration must load back to the same settings.
            let again = cred_watch::config::parse_str(path, &settings.to_toml()).expect("effective config reloads");
            assert_eq!(again.watches, settings.watches);
        }
        Err(e) => {
            assert!(e.to_string().starts_with("/etc/cred-watch/cred-watch.toml"), "{e}");
            for word in text.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| w.len() >= 16) {
                assert!(!e.message.contains(word), "{e}");
            }
            if let Some(key) = &e.key {
                assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)), "{e}");
            }
        }
    }
});
