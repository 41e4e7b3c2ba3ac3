//! Logging to stderr through `env_logger`, in one of two formats: under
//! journald (`JOURNAL_STREAM` names stderr's device and inode) each line is
//! `<N>message` with the syslog priority and no timestamp, since journald
//! adds both; otherwise `RFC3339-millis LEVEL message`.
//!
//! Levels: this crate logs at the configured `log_level` (changed on a
//! reload by [`set_level`]); other crates (zbus) only at warn and above.
//! `RUST_LOG`, with env_logger's full syntax (`debug`,
//! `cred_watch::agent=trace,zbus=debug`, `…/regex`), wins over the
//! configured level, after a reload too. A bare level in it sets this
//! crate's level and caps the others at warn; a crate named in it gets the
//! level it is given there.

use log::{Level, LevelFilter};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// This crate's module path prefix, what its log targets start with.
const CRATE: &str = env!("CARGO_CRATE_NAME");

/// Set when `RUST_LOG` decided the levels: the configured level is ignored.
static ENV_OVERRIDE: AtomicBool = AtomicBool::new(false);

/// The syslog priority journald reads from a `<N>` prefix.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Whether stderr is the stream journald gave us: `JOURNAL_STREAM` is
/// `DEVICE:INODE` of that stream, and a stderr redirected elsewhere (by
/// whoever started us from a service) keeps the variable but not the stream.
fn stderr_is_journal() -> bool {
    std::env::var("JOURNAL_STREAM").is_ok_and(|value| is_stream(&value, std::io::stderr().as_fd()))
}

/// Whether `fd` is the `DEVICE:INODE` that `value` names.
fn is_stream(value: &str, fd: BorrowedFd) -> bool {
    let Some((dev, ino)) = value.trim().split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<libc::dev_t>(), ino.parse::<libc::ino_t>()) else {
        return false;
    };
    nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// Adds the directives of a non-empty `RUST_LOG` to `builder`, with
/// env_logger's syntax, except that a bare level (`debug`) is this crate's
/// level and caps the other crates at warn: zbus is as verbose as asked
/// only when it is named.
fn apply_env(builder: &mut env_logger::Builder, spec: &str) {
    builder.filter_module(CRATE, LevelFilter::Info);
    let (directives, regex) = match spec.split_once('/') {
        Some((d, r)) => (d, Some(r)),
        None => (spec, None),
    };
    let mut named = Vec::new();
    for part in directives
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match part.parse::<LevelFilter>() {
            Ok(level) if !part.contains('=') => {
                builder.filter_level(level.min(LevelFilter::Warn));
                builder.filter_module(CRATE, level);
            }
            _ => named.push(part),
        }
    }
    // Named directives come last so they win over a bare level, as in
    // env_logger (`cred_watch=trace,debug` is trace for this crate).
    let mut rest = named.join(",");
    if let Some(regex) = regex {
        rest = format!("{rest}/{regex}");
    }
    if !rest.is_empty() {
        builder.parse_filters(&rest);
    }
}

/// Installs the logger at `default` (unless `RUST_LOG` is set). Call
/// once, before anything logs; later calls change nothing.
pub fn init(default: LevelFilter) {
    let journal = stderr_is_journal();
    let mut builder = env_logger::Builder::new();
    builder
        .target(env_logger::Target::Stderr)
        .write_style(env_logger::WriteStyle::Never)
        .filter_level(LevelFilter::Warn)
        // Everything of ours passes the filter: log's max level, which
        // set_level changes at run time, is what limits it.
        .filter_module(CRATE, LevelFilter::Trace)
        // env_logger writes each formatted record with one write.
        .format(move |buf, record| {
            if journal {
                writeln!(buf, "<{}>{}", priority(record.level()), record.args())
            } else {
                let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
                writeln!(buf, "{now} {:<5} {}", record.level(), record.args())
            }
        });
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let from_env = !spec.trim().is_empty();
    if from_env {
        apply_env(&mut builder, spec.trim());
    }
    // try_init sets log's max level to the most verbose directive.
    if builder.try_init().is_err() {
        return;
    }
    ENV_OVERRIDE.store(from_env, Ordering::Relaxed);
    if !from_env {
        log::set_max_level(default);
    }
}

/// Applies a configured level (at start and after a reload) unless
/// `RUST_LOG` is set.
pub fn set_level(level: LevelFilter) {
    if !ENV_OVERRIDE.load(Ordering::Relaxed) {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(spec: &str) -> env_logger::Logger {
        let mut builder = env_logger::Builder::new();
        builder
            .filter_level(LevelFilter::Warn)
            .filter_module(CRATE, LevelFilter::Trace);
        apply_env(&mut builder, spec);
        builder.build()
    }

    fn enabled(logger: &env_logger::Logger, target: &str, level: Level) -> bool {
        use log::Log;
        logger.enabled(&log::Metadata::builder().target(target).level(level).build())
    }

    #[test]
    fn a_bare_level_is_ours_and_caps_other_crates_at_warn() {
        let f = filter("debug");
        assert!(enabled(&f, "cred_watch::agent", Level::Debug));
        assert!(!enabled(&f, "cred_watch::agent", Level::Trace));
        assert!(enabled(&f, "zbus::conn", Level::Warn));
        assert!(!enabled(&f, "zbus::conn", Level::Info));
        let f = filter("error");
        assert!(!enabled(&f, "cred_watch", Level::Warn));
        assert!(!enabled(&f, "zbus", Level::Warn));
        assert!(enabled(&f, "zbus", Level::Error));
    }

    #[test]
    fn module_filters_follow_env_logger() {
        let f = filter("cred_watch::agent=trace,zbus=debug");
        assert!(enabled(&f, "cred_watch::agent", Level::Trace));
        assert!(!enabled(&f, "cred_watch::apply", Level::Debug));
        assert!(enabled(&f, "cred_watch::apply", Level::Info));
        assert!(enabled(&f, "zbus::conn", Level::Debug));
        assert!(!enabled(&f, "zvariant", Level::Info));
        // A named crate wins over a bare level wherever it is written.
        let f = filter("cred_watch=trace,info");
        assert!(enabled(&f, "cred_watch::agent", Level::Trace));
        let f = filter("warn,cred_watch::watch=off");
        assert!(!enabled(&f, "cred_watch::watch", Level::Error));
        assert!(enabled(&f, "cred_watch::agent", Level::Warn));
        assert!(!enabled(&f, "cred_watch::agent", Level::Info));
    }

    #[test]
    fn the_journal_is_only_the_stream_it_names() {
        let file = tempfile::tempfile().unwrap();
        let st = nix::sys::stat::fstat(file.as_fd()).unwrap();
        let value = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(is_stream(&value, file.as_fd()));
        assert!(!is_stream(
            &format!("{}:{}", st.st_dev, st.st_ino + 1),
            file.as_fd()
        ));
        assert!(!is_stream("0:0", file.as_fd()));
        assert!(!is_stream("8:1234", file.as_fd()));
        assert!(!is_stream("", file.as_fd()));
        assert!(!is_stream("not a stream", file.as_fd()));
        let other = tempfile::tempfile().unwrap();
        assert!(!is_stream(&value, other.as_fd()));
    }
}
