//! Runs an end-to-end scenario as named steps in one booted container.
//! Each step reports `step NAME: ok` or `step NAME: FAILED: reason`; a
//! failed step does not hide the ones after it: those that do not need it
//! still run, those that need it are reported as skipped, and the caller
//! fails at the end with the list.
#![allow(dead_code)]

use super::container::Container;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

/// A step: runs in the booted container, asserts what it checks, and hands
/// on what later steps need through `S`.
pub type Step<S> = fn(&Container, &mut S);

/// `name after needed, steps;` lines to the `(name, needs, step)` table.
macro_rules! steps {
    ($($step:ident $(after $($need:ident),+)?;)*) => {
        &[$((stringify!($step), &[$($(stringify!($need)),+)?], $step as _)),*]
    };
}
pub(crate) use steps;

/// Runs the steps in order, each after the steps it needs have passed.
/// Returns the failures, one line each.
pub fn run<S>(c: &Container, steps: &[(&str, &[&str], Step<S>)], shared: &mut S) -> Vec<String> {
    record_panic_locations();
    let mut passed: Vec<&str> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for &(name, needs, step) in steps {
        let missing: Vec<&str> = needs
            .iter()
            .copied()
            .filter(|n| !passed.contains(n))
            .collect();
        if !missing.is_empty() {
            let why = format!("skipped: needs {}", missing.join(", "));
            eprintln!("step {name}: FAILED: {why}");
            failed.push(format!("{name} ({why})"));
            continue;
        }
        let t = Instant::now();
        match std::panic::catch_unwind(AssertUnwindSafe(|| step(c, shared))) {
            Ok(()) => {
                eprintln!("step {name}: ok ({:.1}s)", t.elapsed().as_secs_f64());
                passed.push(name);
            }
            Err(panic) => {
                let why = panic_reason(&panic);
                eprintln!("step {name}: FAILED: {why}");
                failed.push(format!("{name} ({why})"));
            }
        }
    }
    failed
}

/// Where the last panic happened, for the step's one-line reason.
static LAST_PANIC_AT: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Keeps the default panic output (the whole message, with the journal
/// where an assertion adds it) and records the location.
fn record_panic_locations() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Some(at) = info.location() {
            *LAST_PANIC_AT.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(format!("{}:{}", at.file(), at.line()));
        }
        default(info);
    }));
}

/// Where a step panicked and the first line of the message.
fn panic_reason(panic: &Box<dyn std::any::Any + Send>) -> String {
    let msg = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("panic");
    let first: String = msg
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    let at = LAST_PANIC_AT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    format!("at {at}: {first}")
}

/// Runs its closure if the step fails (panics) while it is alive: what the
/// step changed in the container's setup is put back for the steps after it.
pub struct OnFailure<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for OnFailure<F> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            (self.0)();
        }
    }
}

/// `c.sh`, reporting a failure instead of panicking (for `OnFailure`).
pub fn put_back(c: &Container, script: &str) {
    let (code, out, err) = c.sh(script);
    if code != 0 {
        eprintln!("putting back after a failed step: `{script}`: {out}{err}");
    }
}

/// `cred-watch ARGS doctor` in the container: its exit code and output,
/// neither output holding token text.
pub fn doctor(c: &Container, args: &str) -> (i32, String) {
    let (code, out, err) = c.sh(&format!("cred-watch {args} doctor"));
    super::common::assert_no_secret(&out, "doctor stdout");
    super::common::assert_no_secret(&err, "doctor stderr");
    (code, out)
}

/// The first line of doctor's output that starts with `tag` (`ok`, `warn`,
/// `fail`, `info`; "" for any) and contains `needle`.
pub fn line_with<'a>(out: &'a str, tag: &str, needle: &str) -> Option<&'a str> {
    out.lines()
        .find(|l| l.starts_with(tag) && l.contains(needle))
}

/// Writes the report to target/NAME and asserts no step failed.
pub fn finish(report: &[String], file: &str, failed: &[String], total: usize) {
    let report = report.join("\n");
    eprintln!("\n{report}");
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(file),
        format!("{report}\n"),
    );
    assert!(
        failed.is_empty(),
        "{} of {total} e2e steps failed:\n  {}",
        failed.len(),
        failed.join("\n  ")
    );
}
