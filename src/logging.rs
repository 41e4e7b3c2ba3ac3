//! Logging to stderr: syslog priority prefixes (`<3>`…`<7>`) and no
//! timestamps under journald (`JOURNAL_STREAM` set), else an RFC 3339 time
//! and the level. `RUST_LOG` (a level) wins over the configured level.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

struct Logger {
    journal: bool,
}

static ENV_OVERRIDE: AtomicBool = AtomicBool::new(false);

fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
            && (m.target().starts_with("cred_watch") || m.level() <= Level::Warn)
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // One write per record so concurrent lines never interleave.
        let line = if self.journal {
            format!("<{}>{}\n", priority(r.level()), r.args())
        } else {
            let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
            format!("{now} {:<5} {}\n", r.level(), r.args())
        };
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

fn env_level() -> Option<LevelFilter> {
    let v = std::env::var("RUST_LOG").ok()?;
    // Accept "debug" or "cred_watch=debug"; the last level named wins.
    v.split(',')
        .filter_map(|part| part.rsplit('=').next()?.trim().parse().ok())
        .next_back()
}

/// Installs the logger. Call once, before anything logs.
pub fn init(default: LevelFilter) {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let _ = log::set_boxed_logger(Box::new(Logger { journal }));
    match env_level() {
        Some(level) => {
            ENV_OVERRIDE.store(true, Ordering::Relaxed);
            log::set_max_level(level);
        }
        None => log::set_max_level(default),
    }
}

/// Applies a configured level (after a reload) unless `RUST_LOG` is set.
pub fn set_level(level: LevelFilter) {
    if !ENV_OVERRIDE.load(Ordering::Relaxed) {
        log::set_max_level(level);
    }
}
