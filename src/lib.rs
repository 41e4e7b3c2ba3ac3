//! cred-watch: watches an OAuth credentials file that a CLI replaces by
//! atomic rename, validates it, fixes its permissions or copies it to a
//! shared place, and restarts the units that read it.

/// The agent: event loop, signals, timers, state.
pub mod agent;
/// Actions: mode through the fd, ancestor search bits, atomic copies.
pub mod apply;
/// Command line: flags, subcommands, exit codes.
pub mod cli;
/// Checked time arithmetic for deadlines and timestamps.
pub mod clock;
/// One-shot commands: sync and status.
pub mod commands;
/// Configuration: raw TOML and drop-ins, validated into settings.
pub mod config;
/// Host diagnosis: one line per check with the reason and the fix.
pub mod doctor;
/// Test doubles for systemd, chosen by environment variables.
pub mod doubles;
/// Path walking through directory fds and atomic replacement.
pub mod fsutil;
/// Logging to stderr with syslog priority prefixes under journald.
pub mod logging;
/// Prometheus text metrics from the state, for node_exporter.
pub mod metrics;
/// sd_notify messages to systemd.
pub mod notify;
/// One reconcile of one watch: read, validate, apply.
pub mod reconcile;
/// Restart scheduling: settle, min_interval, coalescing, backoff.
pub mod schedule;
/// Safe reads of the source file.
pub mod source;
/// Persisted state under state_dir.
pub mod state;
/// Service manager trait, restart worker and unit queries over D-Bus.
pub mod systemd;
/// The rules of one watch as events in, effects out (no I/O).
pub mod tracker;
/// Credential formats, fingerprints and refusals.
pub mod validate;
/// Inotify watches that survive deletion and re-creation of directories.
pub mod watch;

/// Exit status for a configuration error (sysexits EX_CONFIG).
pub const EX_CONFIG: i32 = 78;
