//! Prometheus text exposition of the state, for node_exporter's textfile
//! collector: written atomically with the state (coalesced, never on the
//! path from an event to its fix). Counters come from the state file, so
//! they survive an agent restart. No token text, ever: only names,
//! timestamps and counts.

use crate::config::Settings;
use crate::fsutil::{self, FileMeta, FsError};
use crate::state::State;
use std::fmt::Write;
use std::os::fd::AsFd;
use std::path::Path;

/// One metric family: its header, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Family { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let _ = if labels.is_empty() {
            writeln!(self.out, "{name} {value}")
        } else {
            writeln!(self.out, "{name}{{{}}} {value}", labels.join(","))
        };
    }
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

type Recs<'a> = [(&'a str, &'a crate::state::WatchRecord)];

/// The metrics for `state`. `source_ok(n)`: watch `n`'s source is present,
/// valid and applied.
pub fn render(settings: &Settings, state: &State, source_ok: &dyn Fn(usize) -> bool) -> String {
    let mut out = String::new();
    let none = crate::state::WatchRecord::default();
    let recs: Vec<_> = settings
        .watches
        .iter()
        .map(|w| (w.name.as_str(), state.watches.get(&w.name).unwrap_or(&none)))
        .collect();
    gauges(&mut out, &recs, source_ok);
    refusals(&mut out, &recs);
    restarts(&mut out, settings, state);
    refreshes(&mut out, settings, &recs);
    let name = "cred_watch_last_reconcile_timestamp_seconds";
    let mut f = Family::new(
        &mut out,
        name,
        "gauge",
        "When every watch was last reconciled (Unix time).",
    );
    if let Some(ms) = state.agent.last_reconcile_ms {
        f.sample(name, &[], seconds(ms));
    }
    out
}

fn gauges(out: &mut String, recs: &Recs, source_ok: &dyn Fn(usize) -> bool) {
    let name = "cred_watch_token_expiry_timestamp_seconds";
    let mut f = Family::new(
        out,
        name,
        "gauge",
        "When the token last applied expires (Unix time).",
    );
    for (watch, rec) in recs {
        if let Some(ms) = rec.expires_at_ms {
            f.sample(name, &[("watch", watch)], seconds(ms));
        }
    }
    let name = "cred_watch_last_applied_timestamp_seconds";
    let mut f = Family::new(
        out,
        name,
        "gauge",
        "When a new credential was last applied (Unix time).",
    );
    for (watch, rec) in recs {
        if let Some(ms) = rec.applied_at_ms {
            f.sample(name, &[("watch", watch)], seconds(ms));
        }
    }
    let name = "cred_watch_source_ok";
    let mut f = Family::new(
        out,
        name,
        "gauge",
        "1 when the source is present, valid and applied, else 0.",
    );
    for (n, (watch, _)) in recs.iter().enumerate() {
        f.sample(
            name,
            &[("watch", watch)],
            if source_ok(n) { 1.0 } else { 0.0 },
        );
    }
}

fn refusals(out: &mut String, recs: &Recs) {
    let name = "cred_watch_refusals_total";
    let mut f = Family::new(out, name, "counter", "Source files refused, by reason.");
    for (watch, rec) in recs {
        for (reason, count) in &rec.refusals {
            f.sample(name, &[("watch", watch), ("reason", reason)], *count as f64);
        }
    }
}

fn restarts(out: &mut String, settings: &Settings, state: &State) {
    let name = "cred_watch_restarts_total";
    let mut f = Family::new(
        out,
        name,
        "counter",
        "Restart jobs of the units that read the credentials, by result.",
    );
    let mut units: Vec<&String> = settings
        .watches
        .iter()
        .flat_map(|w| w.restart.iter().flat_map(|r| &r.units))
        .collect();
    units.sort();
    units.dedup();
    for unit in units {
        let u = state.units.get(unit).cloned().unwrap_or_default();
        f.sample(
            name,
            &[("unit", unit), ("result", "done")],
            u.restarts as f64,
        );
        f.sample(
            name,
            &[("unit", unit), ("result", "failed")],
            u.failed_total as f64,
        );
    }
}

fn refreshes(out: &mut String, settings: &Settings, recs: &Recs) {
    let name = "cred_watch_refresh_total";
    let mut f = Family::new(
        out,
        name,
        "counter",
        "Refreshes through [watch.refresh]'s unit, by result.",
    );
    for (w, (watch, rec)) in settings.watches.iter().zip(recs) {
        if w.refresh.is_none() {
            continue;
        }
        let r = rec.refresh.clone().unwrap_or_default();
        f.sample(
            name,
            &[("watch", watch), ("result", "ok")],
            r.refreshes as f64,
        );
        f.sample(
            name,
            &[("watch", watch), ("result", "failed")],
            r.failed_total as f64,
        );
    }
}

/// Replaces the metrics file atomically (temp file in its directory,
/// rename), mode 0644 so that node_exporter can read it.
pub fn write(path: &Path, text: &str) -> Result<(), FsError> {
    let (dir_path, name) = crate::config::split_file(path);
    let dir = fsutil::open_dir(dir_path)?;
    let meta = FileMeta {
        owner: None,
        group: None,
        mode: 0o644,
    };
    fsutil::replace_file(dir.as_fd(), dir_path, name, text.as_bytes(), meta)
}
