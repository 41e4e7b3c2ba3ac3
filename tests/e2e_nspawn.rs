//! End-to-end against a real systemd: boots a Debian rootfs with
//! systemd-nspawn, installs the built .deb, and checks observable facts only
//! (file bytes and modes, the bridge's InvocationID and start count, unit
//! states, the journal). See tests/run.sh for how the .deb and the rootfs are
//! made; with `CRED_WATCH_E2E=required` (CI) a missing prerequisite fails.
//!
//! One container is booted and the scenario runs as named steps in order
//! (`STEPS`). Each step reports `step NAME: ok` or `step NAME: FAILED:
//! reason`; a failed step does not hide the ones after it: those that do
//! not need it still run (a step that changes the container's setup puts it
//! back when it fails), those that need it are reported as skipped, and the
//! test fails at the end with the list.
mod common;
#[path = "e2e/container.rs"]
mod container;
#[path = "e2e/steps.rs"]
mod steps;
use common::assert_no_secret;
use container::Container;
use std::time::{Duration, Instant};
use steps::{put_back, steps, OnFailure};

fn creds(seq: u64) -> String {
    common::creds(seq)
}

const SRC: &str = "/root/.claude/.credentials.json";
const COPY_DIR: &str = "/var/lib/claude-credentials";
const DEST: &str = "/var/lib/claude-credentials/.credentials.json";

fn config(copy_mode: &str) -> String {
    format!(
        r#"[agent]
settle = "200ms"

[[watch]]
name = "claude"
source = "{SRC}"
source_owner = "root"

[[watch.copy]]
dest = "{DEST}"
owner = "root"
group = "claude-credentials"
mode = "{copy_mode}"
drop_keys = ["mcpOAuth"]

[watch.restart]
units = ["bridge.service"]
min_interval = "1s"
timeout = "20s"

[[watch]]
name = "other"
source = "/root/other/.credentials.json"
[watch.restart]
units = ["nope.service"]
min_interval = "0s"
"#
    )
}

/// A dummy bridge whose worker keeps the credentials open, as real ones do.
const BRIDGE: &str = "[Unit]\nDescription=dummy bridge\n[Service]\nExecStart=/bin/sh -c 'echo $$ >> /run/bridge.starts; if [ -e /root/.claude/.credentials.json ]; then exec sleep infinity 3< /root/.claude/.credentials.json; fi; exec sleep infinity'\n";

/// The bursts: `n` atomic renames, `gap` apart, with increasing expiresAt.
fn burst_script(n: u32, gap: &str, tag: &str, hours: u32) -> String {
    format!(
        r#"base=$(( ($(date +%s) + {hours} * 3600) * 1000 )); i=0
while [ $i -lt {n} ]; do
  printf '{{"claudeAiOauth":{{"accessToken":"sk-ant-oat01-{tag}%d","refreshToken":"sk-ant-ort01-{tag}%d","expiresAt":%d,"scopes":["user:inference"],"subscriptionType":"max"}},"mcpOAuth":{{"n":%d}}}}' $i $i $((base + i)) $i > {SRC}.tmp.$i
  chmod 600 {SRC}.tmp.$i; mv -f {SRC}.tmp.$i {SRC}; sleep {gap}; i=$((i + 1))
done"#
    )
}

type Step = steps::Step<Shared>;

/// What steps hand on to later ones.
#[derive(Default)]
struct Shared {
    /// Lines for target/e2e-report.md.
    report: Vec<String>,
    /// The second credentials (step `valid_rename_restarts_once`) and the
    /// copy made of them: the last good copy for the next step.
    v2: Option<(String, serde_json::Value)>,
}

/// The steps in order, each after the steps it needs to have passed (the
/// others it does not depend on: a failure there is reported, and it runs).
const STEPS: &[(&str, &[&str], Step)] = steps![
    installed_not_enabled;
    configured_and_started after installed_not_enabled;
    valid_rename_restarts_once after configured_and_started;
    a_changed_copy_is_restored_and_its_readers_restarted after valid_rename_restarts_once;
    mcp_only_and_corrupt_files_do_not_restart after valid_rename_restarts_once;
    idle_after_restarts after configured_and_started;
    burst_of_100_renames after configured_and_started;
    missing_unit_is_an_error_and_retried after configured_and_started;
    doctor_on_real_systemd after configured_and_started;
    missing_unit_once_installed_is_restarted after missing_unit_is_an_error_and_retried;
    reload_applies_a_changed_configuration after configured_and_started;
    sync_next_to_the_service after configured_and_started;
    watchdog_pings after configured_and_started;
    broken_configuration_fails_without_a_loop after configured_and_started;
    reload_with_a_typo_fails_visibly after configured_and_started;
    old_way_side_by_side after configured_and_started;
    dbus_unreachable_then_back after configured_and_started;
    daemon_reexec_during_a_restart after configured_and_started;
    refresh_through_a_real_oneshot_unit after configured_and_started;
    alert_unit_on_a_refused_source after configured_and_started;
    a_restart_into_an_exiting_unit_is_a_failure after configured_and_started;
    doctor_reads_a_consumer_unit_over_dbus after configured_and_started;
    a_bridge_whose_workers_drop_privileges after configured_and_started;
    no_token_leaks after installed_not_enabled;
    purge_removes_the_state after installed_not_enabled;
];

#[test]
fn e2e_on_real_systemd() {
    let Some((rootfs, deb_dir)) = container::prerequisites("e2e_nspawn") else {
        return;
    };
    let c = Container::boot("cred-watch-e2e", &rootfs, &deb_dir);
    let mut shared = Shared::default();
    let failed = steps::run(&c, STEPS, &mut shared);
    steps::finish(&shared.report, "e2e-report.md", &failed, STEPS.len());
}

fn dest_json(c: &Container) -> Option<serde_json::Value> {
    serde_json::from_str(&c.ok(&format!("cat {DEST}"))).ok()
}

/// Installed but neither enabled nor started.
fn installed_not_enabled(c: &Container, _: &mut Shared) {
    c.ok("dpkg -i /mnt/deb/cred-watch_*.deb >/dev/null");
    assert_eq!(c.sh("systemctl is-enabled cred-watch").1.trim(), "disabled");
    assert_eq!(c.sh("systemctl is-active cred-watch").1.trim(), "inactive");
    assert!(c.ok("test -f /etc/cred-watch/cred-watch.toml && test -d /etc/cred-watch/conf.d && man -w cred-watch.toml 2>/dev/null || ls /usr/share/man/man5/cred-watch.toml.5.gz").contains("cred-watch.toml.5"));
    // The shipped configuration has no watch yet: refused with 78.
    assert_eq!(c.sh("cred-watch check").0, 78);
}

/// Configured, enabled and started: active once READY=1 arrived.
fn configured_and_started(c: &Container, _: &mut Shared) {
    c.ok("groupadd -f claude-credentials");
    c.ok(&format!("cat > /etc/systemd/system/bridge.service <<'EOF'\n{BRIDGE}EOF\nsystemctl daemon-reload && systemctl start bridge"));
    c.write_creds(SRC, &creds(1));
    c.sh_input("cat > /etc/cred-watch/cred-watch.toml", &config("0640"));
    c.ok("cred-watch check >/dev/null");
    c.ok("systemctl enable --now cred-watch");
    assert_eq!(c.ok("systemctl is-active cred-watch"), "active");
    assert_eq!(
        c.ok(&format!("stat -c '%U:%G %a' {DEST}")),
        "root:claude-credentials 640"
    );
    assert!(
        c.show("cred-watch", "StatusText")
            .contains("watching 2 source(s)"),
        "sd_notify STATUS"
    );
    // Restarts follow state: the bridge was started before the credentials
    // were written, so it is restarted once (not adopted as it was).
    assert!(
        common::wait_until(Duration::from_secs(10), || c.bridge_starts() == 2),
        "{}",
        c.journal()
    );
    c.settled();
    assert_eq!(
        c.bridge_starts(),
        2,
        "a bridge older than the first credentials is restarted once:\n{}",
        c.journal()
    );
}

/// A valid atomic rename: the copy follows and the bridge restarts once.
fn valid_rename_restarts_once(c: &Container, shared: &mut Shared) {
    let before = c.show("bridge", "InvocationID");
    let starts = c.bridge_starts();
    let v2 = creds(2);
    c.write_creds(SRC, &v2);
    let want = common::without(&v2, &["mcpOAuth"]);
    assert!(common::wait_until(Duration::from_secs(10), || {
        dest_json(c) == Some(want.clone())
    }));
    assert!(
        common::wait_until(Duration::from_secs(10), || c.bridge_starts() == starts + 1),
        "{}",
        c.journal()
    );
    // Handled, and no second restart owed.
    c.settled();
    assert_eq!(c.bridge_starts(), starts + 1, "exactly one restart");
    assert_ne!(c.show("bridge", "InvocationID"), before);
    shared.v2 = Some((v2, want));
}

/// Copies are watched: someone writes the copy, it is restored at once (no
/// SIGUSR1, no resync) and its reader restarted once. (With the source
/// valid: while it is refused there is nothing good to restore from.)
fn a_changed_copy_is_restored_and_its_readers_restarted(c: &Container, _: &mut Shared) {
    c.settled();
    let starts = c.bridge_starts();
    let good = c.ok(&format!("cat {DEST}"));
    c.ok(&format!("echo '{{}}' > {DEST}"));
    assert!(
        common::wait_until(Duration::from_secs(10), || c.ok(&format!("cat {DEST}"))
            == good),
        "copy not restored:\n{}",
        c.journal()
    );
    assert!(
        common::wait_until(Duration::from_secs(10), || c.bridge_starts() == starts + 1),
        "{}",
        c.journal()
    );
    c.settled();
    assert_eq!(c.bridge_starts(), starts + 1, "exactly one restart");
    assert!(c.journal().contains("was modified by another writer"));
}

/// MCP-only rewrite and a corrupted token: no restart.
fn mcp_only_and_corrupt_files_do_not_restart(c: &Container, shared: &mut Shared) {
    let (v2, want) = shared
        .v2
        .clone()
        .expect("set by valid_rename_restarts_once");
    let starts = c.bridge_starts();
    let mcp = v2.replace("\"mcp-2\"", "\"mcp-2b\"");
    c.write_creds(SRC, &mcp);
    c.write_creds(
        SRC,
        &creds(3).replace("sk-ant-oat01-test-access-000003", ""),
    );
    c.write_creds(SRC, "{\"claudeAiOauth\": {\"accessToken\": ");
    // Handled (the last one is refused), and no restart owed.
    c.settled();
    assert_eq!(
        c.bridge_starts(),
        starts,
        "no restart for MCP-only or corrupt files:\n{}",
        c.journal()
    );
    assert!(
        common::wait_until(Duration::from_secs(10), || c.journal().contains("refused")),
        "refusals are logged"
    );
    assert!(dest_json(c) == Some(want.clone()), "last good copy kept");
}

/// Idle after real D-Bus restarts: no thread of the agent wakes up.
fn idle_after_restarts(c: &Container, _: &mut Shared) {
    // Everything so far handled before the idle window starts.
    c.settled();
    let pid = c.show("cred-watch", "MainPID");
    let switches = || -> u64 {
        c.ok(&format!(
            "cat /proc/{pid}/task/*/status | awk '/ctxt_switches/ {{ s += $2 }} END {{ print s }}'"
        ))
        .parse()
        .unwrap()
    };
    let before = switches();
    // The measurement window itself: nothing happens in it to wait for.
    std::thread::sleep(Duration::from_secs(3));
    let idle_switches = switches() - before;
    let threads = c.ok(&format!("ls /proc/{pid}/task | wc -l"));
    eprintln!(
        "idle after restarts: {idle_switches} context switches in 3s across {threads} threads"
    );
    assert_eq!(
        idle_switches, 0,
        "the agent woke up while idle ({threads} threads)"
    );
}

/// 100 renames in ~2s: bounded restarts, final copy == final source.
fn burst_of_100_renames(c: &Container, shared: &mut Shared) {
    let starts0 = c.bridge_starts();
    let t = Instant::now();
    c.ok(&burst_script(100, "0.02", "burst", 2));
    let storm = t.elapsed();
    // Every restart owed after the burst done.
    c.settled();
    let restarts = c.bridge_starts() - starts0;
    let bound = storm.as_secs_f64() / 1.0 + 2.0;
    let final_src = common::without(&c.ok(&format!("cat {SRC}")), &["mcpOAuth"]);
    let final_dest: serde_json::Value =
        serde_json::from_str(&c.ok(&format!("cat {DEST}"))).unwrap();
    assert_eq!(final_dest, final_src, "final copy equals final source");
    assert!(
        restarts >= 1 && restarts as f64 <= bound,
        "{restarts} restarts in {storm:?} (bound {bound})"
    );
    shared.report.push(format!("| cred-watch | 100 renames in {:.1}s | {restarts} bridge restarts (bound {bound:.1}) | final copy correct: yes | cred-watch {} |", storm.as_secs_f64(), c.ok("systemctl is-active cred-watch")));
}

/// A unit that does not exist: a clear error, retried, agent stays up.
fn missing_unit_is_an_error_and_retried(c: &Container, _: &mut Shared) {
    c.write_creds("/root/other/.credentials.json", &creds(10));
    c.write_creds("/root/other/.credentials.json", &creds(11));
    assert!(
        common::wait_until(Duration::from_secs(10), || c
            .journal()
            .contains("nope.service")),
        "{}",
        c.journal()
    );
    // Retried: a second failure is logged by the agent, still running.
    let failures = |j: &str| {
        j.lines()
            .filter(|l| l.contains("nope.service") && l.contains("not found"))
            .count()
    };
    assert!(
        common::wait_until(Duration::from_secs(20), || failures(&c.journal()) >= 2),
        "{}",
        c.journal()
    );
    let j = c.journal();
    assert!(j.contains("nope.service") && j.contains("not found"), "{j}");
    assert_eq!(c.ok("systemctl is-active cred-watch"), "active");
}

/// doctor against real systemd: units known/active, stale handles.
fn doctor_on_real_systemd(c: &Container, shared: &mut Shared) {
    let (code, out, _) = c.sh("cred-watch doctor");
    assert_eq!(code, 1, "nope.service is a problem:\n{out}");
    assert!(
        out.contains("ok   claude unit bridge.service: known and active"),
        "{out}"
    );
    assert!(
        out.contains("fail other unit nope.service: not known to systemd (not-found)"),
        "{out}"
    );
    assert!(
        out.contains("ok   claude stale handles bridge.service"),
        "{out}"
    );
    assert!(out.contains("ok   agent: running"), "{out}");
    let _restore = OnFailure(|| put_back(c, "systemctl start bridge cred-watch"));
    // Every owed restart done before the agent stops: nothing restarts the
    // bridge behind the test's back below.
    c.settled();
    c.ok("systemctl stop cred-watch");
    let bridge_pid = c.show("bridge", "MainPID");
    c.write_creds(
        SRC,
        &common::creds_exp(20, common::now_ms() + 4 * 3_600_000),
    );
    let holds = c.sh(&format!("readlink /proc/{bridge_pid}/fd/3")).1;
    assert!(
        holds.trim_end().ends_with("(deleted)"),
        "the bridge (PID {bridge_pid}, now {}) should hold the replaced file: {holds}",
        c.show("bridge", "MainPID")
    );
    let (_, out, _) = c.sh("cred-watch doctor");
    assert!(
        out.contains(&format!("fail claude stale handles bridge.service: PID {bridge_pid} (sleep) holds the deleted {SRC}")),
        "{out}"
    );
    c.ok("systemctl restart bridge");
    let (_, out, _) = c.sh("cred-watch doctor");
    assert!(
        out.contains("ok   claude stale handles bridge.service"),
        "{out}"
    );
    let starts = c.bridge_starts();
    c.ok("systemctl start cred-watch");
    // Restarts follow state: the change made while the agent was down is
    // applied at start, but the bridge was restarted after it was written,
    // so it is in sync and not restarted again.
    assert!(
        common::wait_until(Duration::from_secs(10), || c.journal().contains(
            "bridge.service started after the credential it reads was written"
        )),
        "{}",
        c.journal()
    );
    c.settled();
    assert_eq!(c.bridge_starts(), starts, "{}", c.journal());
    shared.report.push(format!(
        "doctor output on the container:\n```\n{}\n```",
        c.sh("cred-watch doctor").1.trim()
    ));
}

/// Once the unit exists, a retry restarts it; the retries (whose failures
/// would overwrite the agent's STATUS= under later steps) end.
fn missing_unit_once_installed_is_restarted(c: &Container, _: &mut Shared) {
    c.ok("printf '[Service]\\nExecStart=/bin/sleep infinity\\n' > /etc/systemd/system/nope.service && systemctl daemon-reload");
    assert!(
        common::wait_until(Duration::from_secs(30), || c
            .journal()
            .contains("restarted nope.service")),
        "{}",
        c.journal()
    );
}

/// `systemctl reload` applies a changed configuration.
fn reload_applies_a_changed_configuration(c: &Container, _: &mut Shared) {
    c.sh_input("cat > /etc/cred-watch/cred-watch.toml", &config("0644"));
    c.ok("systemctl reload cred-watch");
    assert!(
        common::wait_until(Duration::from_secs(10), || c
            .ok(&format!("stat -c %a {DEST}"))
            == "644"),
        "{}",
        c.journal()
    );
    assert_eq!(c.ok("systemctl is-active cred-watch"), "active");
}

/// `sync` next to the running service: the agent does the pass.
fn sync_next_to_the_service(c: &Container, _: &mut Shared) {
    let starts = c.bridge_starts();
    let (code, out, _) = c.sh("cred-watch sync");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("asked it to reconcile"), "{out}");
    assert_eq!(
        c.bridge_starts(),
        starts,
        "nothing changed, nothing restarted"
    );
    let (code, _, err) = c.sh("timeout 10 cred-watch run");
    assert_eq!(code, 1, "a second agent is refused: {err}");
    assert!(err.contains("is in use"), "{err}");
}

/// With WatchdogSec= the agent pings at half the interval; systemd would
/// kill and restart it otherwise.
fn watchdog_pings(c: &Container, _: &mut Shared) {
    let _restore = OnFailure(|| {
        put_back(c, "rm -rf /etc/systemd/system/cred-watch.service.d && systemctl daemon-reload && systemctl restart cred-watch")
    });
    c.ok("mkdir -p /etc/systemd/system/cred-watch.service.d && printf '[Service]\\nWatchdogSec=2s\\n' > /etc/systemd/system/cred-watch.service.d/watchdog.conf");
    c.ok("systemctl daemon-reload && systemctl restart cred-watch");
    // Proof of pings: the last one (systemd's WatchdogTimestamp) is 5 s,
    // more than twice WatchdogSec, after this process started.
    let pinged_for_us = || -> i64 {
        let at = |p: &str| c.show("cred-watch", p).parse::<i64>().unwrap_or(0);
        at("WatchdogTimestampMonotonic") - at("ExecMainStartTimestampMonotonic")
    };
    assert!(
        common::wait_until(Duration::from_secs(20), || pinged_for_us() >= 5_000_000),
        "no watchdog pings for 5 s:\n{}",
        c.journal()
    );
    assert_eq!(c.ok("systemctl is-active cred-watch"), "active");
    assert_eq!(c.show("cred-watch", "NRestarts"), "0", "{}", c.journal());
    assert_ne!(
        c.show("cred-watch", "WatchdogTimestampMonotonic"),
        "0",
        "watchdog pings received"
    );
    c.ok("rm -r /etc/systemd/system/cred-watch.service.d && systemctl daemon-reload");
}

/// A broken configuration: start fails with 78, no restart loop.
fn broken_configuration_fails_without_a_loop(c: &Container, _: &mut Shared) {
    let _restore = OnFailure(|| {
        c.sh_input("cat > /etc/cred-watch/cred-watch.toml", &config("0640"));
        put_back(
            c,
            "systemctl reset-failed cred-watch; systemctl restart cred-watch",
        );
    });
    c.sh_input("cat > /etc/cred-watch/cred-watch.toml", &config("0999"));
    assert_ne!(c.sh("systemctl restart cred-watch").0, 0);
    // systemd's decision: `failed` (a restart to come would show
    // `activating`, sub-state `auto-restart`).
    assert!(
        common::wait_until(Duration::from_secs(10), || c
            .show("cred-watch", "ActiveState")
            == "failed"),
        "{} ({})",
        c.show("cred-watch", "ActiveState"),
        c.show("cred-watch", "SubState")
    );
    assert_eq!(c.show("cred-watch", "ExecMainStatus"), "78");
    assert_eq!(c.show("cred-watch", "NRestarts"), "0");
    assert!(
        c.journal()
            .contains("cred-watch.toml:13: key `watch.copy.mode`"),
        "{}",
        c.journal()
    );
    c.sh_input("cat > /etc/cred-watch/cred-watch.toml", &config("0640"));
    c.ok("systemctl restart cred-watch");
    assert_eq!(c.ok("systemctl is-active cred-watch"), "active");
}

/// `systemctl reload` with a typo in the configuration fails (non-zero,
/// with the reason) and the agent keeps running its configuration.
fn reload_with_a_typo_fails_visibly(c: &Container, _: &mut Shared) {
    let _restore = OnFailure(|| put_back_config(c));
    let pid = c.show("cred-watch", "MainPID");
    c.sh_input(
        "cat > /etc/cred-watch/cred-watch.toml",
        &config("0640").replace(
            "min_interval = \"1s\"",
            "min_interval = \"1s\"\nmin_intervall = \"1s\"",
        ),
    );
    let (code, out, err) = c.sh("systemctl reload cred-watch");
    assert_ne!(code, 0, "reload with a typo succeeded: {out}{err}");
    let j = c.ok("journalctl -u cred-watch --no-pager -o cat -n 20");
    assert!(
        j.contains("unknown key"),
        "the reason is in the journal:\n{j}"
    );
    assert_eq!(c.ok("systemctl is-active cred-watch"), "active");
    assert_eq!(c.show("cred-watch", "MainPID"), pid, "still the same agent");
    restore_config(c);
}

/// The old way side by side, under the same burst: a .path unit with
/// PathChanged= and a oneshot chmod service (default start limits).
fn old_way_side_by_side(c: &Container, shared: &mut Shared) {
    c.ok("printf '[Path]\\nPathChanged=/root/.claude/.credentials.json\\n' > /etc/systemd/system/oldway.path");
    c.ok("printf '[Service]\\nType=oneshot\\nExecStart=/bin/sh -c \"echo x >> /run/oldway.starts; chmod 644 /root/.claude/.credentials.json\"\\n' > /etc/systemd/system/oldway.service");
    c.ok("systemctl daemon-reload && systemctl start oldway.path");
    let starts0 = c.bridge_starts();
    let t = Instant::now();
    c.ok(&burst_script(100, "0.02", "side", 5));
    let storm = t.elapsed();
    // Every restart owed after the burst done.
    c.settled();
    let restarts = c.bridge_starts() - starts0;
    let path_state = format!(
        "{} ({})",
        c.show("oldway.path", "ActiveState"),
        c.show("oldway.path", "Result")
    );
    let old_runs = c.ok("cat /run/oldway.starts 2>/dev/null | wc -l");
    let final_src = common::without(&c.ok(&format!("cat {SRC}")), &["mcpOAuth"]);
    let final_dest: serde_json::Value =
        serde_json::from_str(&c.ok(&format!("cat {DEST}"))).unwrap();
    assert_eq!(final_dest, final_src);
    // Still watching after the burst: one more change is picked up.
    let v = common::creds_exp(50, common::now_ms() + 6 * 3_600_000);
    c.write_creds(SRC, &v);
    let want = common::without(&v, &["mcpOAuth"]);
    assert!(common::wait_until(Duration::from_secs(10), || {
        dest_json(c) == Some(want.clone())
    }));
    let old_mode_after = c.ok(&format!("stat -c %a {SRC}"));
    shared.report.push(format!(
        "| .path unit + chmod oneshot | the same burst, {:.1}s | chmod service ran {old_runs} times | path unit afterwards: {path_state}; a later change left the source at mode {old_mode_after} | cred-watch alongside: {restarts} restarts, copy correct, still {} |",
        storm.as_secs_f64(),
        c.ok("systemctl is-active cred-watch")
    ));
}

/// D-Bus unreachable: the restart fails, is retried with backoff, and
/// happens once the bus is back.
fn dbus_unreachable_then_back(c: &Container, _: &mut Shared) {
    let _restore = OnFailure(|| put_back(c, "systemctl start dbus.socket dbus.service"));
    let starts = c.bridge_starts();
    c.ok("systemctl stop dbus.socket dbus.service");
    c.write_creds(
        SRC,
        &common::creds_exp(60, common::now_ms() + 7 * 3_600_000),
    );
    assert!(
        common::wait_until(Duration::from_secs(10), || c
            .journal()
            .contains("connecting to the system D-Bus")),
        "{}",
        c.journal()
    );
    assert_eq!(c.bridge_starts(), starts, "no restart without the bus");
    c.ok("systemctl start dbus.socket dbus.service");
    assert!(
        common::wait_until(Duration::from_secs(20), || c.bridge_starts() == starts + 1),
        "restart after the bus came back:\n{}",
        c.journal()
    );
    assert_eq!(c.ok("systemctl is-active cred-watch"), "active");
}

/// systemctl daemon-reexec while the restart job runs (a slow stop).
fn daemon_reexec_during_a_restart(c: &Container, _: &mut Shared) {
    let _restore = OnFailure(|| {
        put_back(
            c,
            "rm -rf /etc/systemd/system/bridge.service.d && systemctl daemon-reload && systemctl start bridge",
        )
    });
    c.ok("mkdir -p /etc/systemd/system/bridge.service.d && printf '[Service]\\nExecStop=/bin/sleep 2\\n' > /etc/systemd/system/bridge.service.d/slow.conf && systemctl daemon-reload");
    let starts = c.bridge_starts();
    c.write_creds(
        SRC,
        &common::creds_exp(61, common::now_ms() + 7 * 3_600_000 + 1),
    );
    // The restart job is running: the bridge is in its 2 s ExecStop.
    assert!(
        common::wait_until(Duration::from_secs(10), || c.show("bridge", "ActiveState")
            == "deactivating"),
        "the restart did not begin:\n{}",
        c.journal()
    );
    c.ok("systemctl daemon-reexec");
    assert!(
        common::wait_until(Duration::from_secs(30), || c.bridge_starts() > starts),
        "{}",
        c.journal()
    );
    assert!(
        common::wait_until(Duration::from_secs(10), || c
            .show("cred-watch", "StatusText")
            .contains("restarted bridge.service")),
        "{}",
        c.journal()
    );
    assert_eq!(c.ok("systemctl is-active cred-watch"), "active");
    c.ok("rm -r /etc/systemd/system/bridge.service.d && systemctl daemon-reload");
}

/// The configuration of the steps below: the base one with `agent_extra`
/// added to `[agent]` and `watch_extra` to the first watch.
fn config_with(agent_extra: &str, watch_extra: &str) -> String {
    config("0640")
        .replacen(
            "settle = \"200ms\"\n",
            &format!("settle = \"200ms\"\n{agent_extra}"),
            1,
        )
        .replacen(
            "source_owner = \"root\"\n",
            &format!("source_owner = \"root\"\n{watch_extra}"),
            1,
        )
}

/// The base configuration with `unit` restarted next to the bridge.
fn config_restarting_also(unit: &str) -> String {
    config("0640").replacen(
        "units = [\"bridge.service\"]",
        &format!("units = [\"bridge.service\", \"{unit}\"]"),
        1,
    )
}

/// The base configuration back, reloaded (for `OnFailure`: reports
/// instead of panicking).
fn put_back_config(c: &Container) {
    c.sh_input("cat > /etc/cred-watch/cred-watch.toml", &config("0640"));
    put_back(c, "systemctl reload cred-watch");
}

/// The base configuration back, reloaded, at the end of a step.
fn restore_config(c: &Container) {
    c.sh_input("cat > /etc/cred-watch/cred-watch.toml", &config("0640"));
    c.ok("systemctl reload cred-watch");
}

/// Applies a configuration and waits until the agent has reloaded it.
fn reload_with(c: &Container, toml: &str) {
    c.sh_input("cat > /etc/cred-watch/cred-watch.toml", toml);
    c.ok("systemctl reload cred-watch");
    c.settled();
}

/// The oneshot refresh unit plays the CLI (`claude auth status`): it writes
/// a newer token (with a refresh token, mode 0600, by rename) and notes
/// each run. The script lives in its own file: no unit-file quoting.
const REFRESH_UNIT: &str = "[Unit]\nDescription=plays claude auth status\n[Service]\nType=oneshot\nExecStart=/usr/local/bin/fake-claude-auth-status\n";
const FAKE_CLI: &str = r#"#!/bin/sh
set -e
echo run >> /run/refresh.runs
exp=$(( ($(date +%s) + 8 * 3600) * 1000 ))
umask 077
printf '{"claudeAiOauth":{"accessToken":"sk-ant-oat01-refreshed","refreshToken":"sk-ant-ort01-refreshed","expiresAt":%d,"scopes":["user:inference"],"subscriptionType":"max"}}' "$exp" > /root/.claude/.credentials.json.tmp.r
mv -f /root/.claude/.credentials.json.tmp.r /root/.claude/.credentials.json
"#;

/// `[watch.refresh]` on real systemd: a token expiring in `ahead` + 3 s is
/// refreshed through the unit exactly once, propagated without its refresh
/// token, and the bridge restarted exactly once.
fn refresh_through_a_real_oneshot_unit(c: &Container, shared: &mut Shared) {
    let _restore = OnFailure(|| put_back_config(c));
    c.sh_input(
        "mkdir -p /usr/local/bin && cat > /usr/local/bin/fake-claude-auth-status && chmod 755 /usr/local/bin/fake-claude-auth-status",
        FAKE_CLI,
    );
    c.sh_input(
        "cat > /etc/systemd/system/claude-refresh.service",
        REFRESH_UNIT,
    );
    c.ok("systemctl daemon-reload && rm -f /run/refresh.runs");
    let refresh =
        "[watch.refresh]\nunit = \"claude-refresh.service\"\nahead = \"4m\"\ntimeout = \"30s\"\n";
    // The token below is older than the ones the bursts applied.
    reload_with(
        c,
        &config_with("", &format!("allow_rollback = true\n{refresh}")),
    );
    let starts = c.bridge_starts();
    let t0 = Instant::now();
    c.write_creds(
        SRC,
        &common::creds_exp(71, common::now_ms() + 4 * 60_000 + 3_000),
    );
    let runs = || c.ok("cat /run/refresh.runs 2>/dev/null | wc -l");
    assert!(
        common::wait_until(Duration::from_secs(30), || runs() == "1"),
        "the refresh unit did not run:\n{}",
        c.journal()
    );
    assert!(
        common::wait_until(Duration::from_secs(30), || c
            .journal()
            .contains("refreshed through claude-refresh.service")),
        "{}",
        c.journal()
    );
    c.settled();
    let copy = c.ok(&format!("cat {DEST}"));
    assert!(
        copy.contains("sk-ant-oat01-refreshed"),
        "the copy has the refreshed token"
    );
    assert!(
        !copy.contains("refreshToken"),
        "the copy carries no refresh token"
    );
    assert_eq!(
        c.bridge_starts() - starts,
        2,
        "one restart for the expiring token, one for the refreshed one"
    );
    assert_eq!(runs(), "1", "refreshed exactly once");
    shared.report.push(format!(
        "| refresh through a real oneshot unit | 1 run, 2 bridge restarts, {:.1} s |",
        t0.elapsed().as_secs_f64()
    ));
    restore_config(c);
}

/// `[agent] alert_unit` with the packaged example: a refused source starts
/// it once and it logs at priority err.
fn alert_unit_on_a_refused_source(c: &Container, _: &mut Shared) {
    let _restore = OnFailure(|| put_back_config(c));
    let example = "/usr/share/doc/cred-watch/examples/cred-watch-alert@.service";
    c.ok(&format!("dpkg -L cred-watch | grep -qx {example}"));
    c.sh_input(
        "cat > /etc/systemd/system/cred-watch-alert@.service",
        include_str!("../packaging/examples/cred-watch-alert@.service"),
    );
    c.ok("systemctl daemon-reload");
    c.ok("mkdir -p /var/lib/node-exporter-textfile");
    reload_with(
        c,
        &config_with(
            "alert_unit = \"cred-watch-alert@%i.service\"\nmetrics_file = \"/var/lib/node-exporter-textfile/cred-watch.prom\"\n",
            "",
        ),
    );
    let metrics = || c.ok("cat /var/lib/node-exporter-textfile/cred-watch.prom");
    assert!(
        metrics().contains("cred_watch_source_ok{watch=\"claude\"} 1"),
        "{}",
        metrics()
    );
    c.write_creds(SRC, "{\"claudeAiOauth\": {}}");
    let alerts = || c.ok("journalctl -t cred-watch-alert -p err --no-pager -o cat");
    assert!(
        common::wait_until(Duration::from_secs(30), || alerts()
            .contains("watch claude needs attention")),
        "no alert at priority err:\n{}\n{}",
        alerts(),
        c.journal()
    );
    c.write_creds(SRC, "{\"claudeAiOauth\": 2}");
    c.settled();
    let m = metrics();
    assert_no_secret(&m, "metrics");
    assert!(
        m.contains("cred_watch_source_ok{watch=\"claude\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("cred_watch_refusals_total{watch=\"claude\",reason=\"missing_key\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("cred_watch_refusals_total{watch=\"claude\",reason=\"wrong_type\"} 1"),
        "{m}"
    );
    assert_eq!(
        alerts().lines().count(),
        1,
        "once per problem:\n{}",
        alerts()
    );
    c.write_creds(
        SRC,
        &common::creds_exp(81, common::now_ms() + 9 * 3_600_000),
    );
    restore_config(c);
    c.settled();
}

/// A unit whose process exits at once: the restart job is `done`, but the
/// unit is not running, and that is reported as a failed restart.
fn a_restart_into_an_exiting_unit_is_a_failure(c: &Container, _: &mut Shared) {
    let _restore = OnFailure(|| put_back_config(c));
    c.ok("printf '[Service]\\nExecStart=/bin/sh -c \"exit 1\"\\n' > /etc/systemd/system/crash.service && systemctl daemon-reload");
    let crash = "[[watch]]\nname = \"crash\"\nsource = \"/root/crash/.credentials.json\"\n[watch.restart]\nunits = [\"crash.service\"]\nmin_interval = \"0s\"\n";
    c.write_creds("/root/crash/.credentials.json", &creds(91));
    reload_with(c, &format!("{}\n{crash}", config("0640")));
    c.write_creds("/root/crash/.credentials.json", &creds(92));
    assert!(
        common::wait_until(Duration::from_secs(30), || {
            c
            .journal()
            .contains("restart of crash.service failed: job for crash.service finished, but the unit is failed")
        }),
        "{}",
        c.journal()
    );
    restore_config(c);
}

/// doctor's consumer check on real systemd: User=, Group= and Environment=
/// read over D-Bus, the copy found through CLAUDE_SECURESTORAGE_CONFIG_DIR.
fn doctor_reads_a_consumer_unit_over_dbus(c: &Container, _: &mut Shared) {
    let _restore = OnFailure(|| put_back_config(c));
    c.ok("id worker >/dev/null 2>&1 || useradd -r -M -d /nonexistent -G claude-credentials worker");
    c.ok("printf '[Service]\\nUser=worker\\nEnvironment=CLAUDE_SECURESTORAGE_CONFIG_DIR=/var/lib/claude-credentials ANTHROPIC_BASE_URL=http://127.0.0.1:9\\nExecStart=/bin/sleep infinity\\n' > /etc/systemd/system/consumer.service && systemctl daemon-reload && systemctl start consumer");
    reload_with(c, &config_restarting_also("consumer.service"));
    let (_, out) = steps::doctor(c, "");
    let line = steps::line_with(&out, "", "consumer consumer.service")
        .unwrap_or_else(|| panic!("no consumer line:\n{out}"));
    assert!(
        line.starts_with("ok") && line.contains("User=worker reads a copy"),
        "{line}\n{out}"
    );
    let root_bridge = steps::line_with(&out, "", "consumer bridge.service").unwrap_or_default();
    assert!(
        root_bridge.starts_with("fail") && root_bridge.contains("can create entries"),
        "{out}"
    );
    c.ok("systemctl stop consumer");
    restore_config(c);
}

/// A bridge's root master that starts its worker under a site user:
/// `clear` without initgroups (no supplementary group, reads nothing),
/// `hold` with initgroups, holding the copy open as a worker does.
const WORKERS_MASTER: &str = "#!/bin/sh\nif [ \"$1\" = hold ]; then\n  setpriv --reuid=site --regid=site --init-groups sh -c 'exec sleep infinity 3< /var/lib/claude-credentials/.credentials.json' &\nelse\n  setpriv --reuid=site --regid=site --clear-groups sleep infinity &\nfi\necho $! > /run/workers.pid\nwait\n";

fn start_workers(c: &Container, worker: &str) {
    c.ok(&format!(
        "printf '[Service]\\nEnvironment=CLAUDE_SECURESTORAGE_CONFIG_DIR={COPY_DIR}\\nExecStart=/usr/local/bin/workers-master {worker}\\n' > /etc/systemd/system/workers.service && systemctl daemon-reload && systemctl restart workers"
    ));
    assert!(common::wait_until(Duration::from_secs(10), || c
        .sh("test -s /run/workers.pid && kill -0 $(cat /run/workers.pid)")
        .0
        == 0));
}

/// A bridge whose root master runs its worker as a site user, as real
/// bridges do. doctor tests the worker's real groups (its PID from the
/// unit's cgroup over D-Bus, its groups from /proc) and names the missing
/// initgroups; once the worker has the group, a change restarts the bridge
/// and its new worker holds the new copy.
fn a_bridge_whose_workers_drop_privileges(c: &Container, _: &mut Shared) {
    let _restore = OnFailure(|| {
        put_back_config(c);
        put_back(c, "systemctl stop workers; rm -f /etc/systemd/system/workers.service; systemctl daemon-reload");
    });
    c.sh_input(
        "cat > /usr/local/bin/workers-master && chmod 755 /usr/local/bin/workers-master",
        WORKERS_MASTER,
    );
    c.ok("id site >/dev/null 2>&1 || useradd -r -M -d /nonexistent site");
    let site = c.ok("id -u site");
    // Without initgroups the worker has no supplementary group.
    start_workers(c, "clear");
    reload_with(c, &config_restarting_also("workers.service"));
    let (code, out) = steps::doctor(c, "");
    let line = |out: &str| -> String {
        out.lines()
            .find(|l| l.contains("consumer workers.service") && !l.starts_with("info"))
            .unwrap_or_else(|| panic!("no verdict for workers.service:\n{out}"))
            .to_string()
    };
    let failed = line(&out);
    assert!(
        code != 0
            && failed.starts_with("fail")
            && failed.contains(&format!("uid {site}) cannot read {DEST}"))
            && failed.contains("workers.service drops privileges without initgroups")
            && failed.contains("SupplementaryGroups=claude-credentials"),
        "{out}"
    );

    // With initgroups and the group, holding the copy open.
    c.ok("usermod -aG claude-credentials site");
    start_workers(c, "hold");
    let (_, out) = steps::doctor(c, "");
    assert!(
        line(&out).starts_with("ok") && line(&out).contains("reads a copy"),
        "{out}"
    );
    let held = || c.ok("stat -L -c %i /proc/$(cat /run/workers.pid)/fd/3");
    assert_eq!(held(), c.ok(&format!("stat -c %i {DEST}")));
    let before = c.show("workers", "InvocationID");
    c.write_creds(
        SRC,
        &common::creds_exp(95, common::now_ms() + 10 * 3_600_000),
    );
    assert!(
        common::wait_until(Duration::from_secs(20), || c
            .show("workers", "InvocationID")
            != before
            && c.sh("kill -0 $(cat /run/workers.pid)").0 == 0
            && held() == c.ok(&format!("stat -c %i {DEST}"))),
        "the new worker does not hold the new copy:\n{}",
        c.journal()
    );
    c.settled();
    c.ok("systemctl stop workers && rm /etc/systemd/system/workers.service && systemctl daemon-reload");
    restore_config(c);
}

/// No token text anywhere it could leak.
fn no_token_leaks(c: &Container, _: &mut Shared) {
    let j = c.journal();
    assert_no_secret(&j, "journalctl -u cred-watch");
    assert_no_secret(&c.ok("cat /var/lib/cred-watch/state.json"), "state.json");
    assert_no_secret(&c.ok("systemctl show cred-watch"), "systemctl show");
    assert_no_secret(&c.ok("cred-watch status"), "cred-watch status");
}

/// Purge removes the state.
fn purge_removes_the_state(c: &Container, _: &mut Shared) {
    c.ok("systemctl disable --now cred-watch && dpkg --purge cred-watch >/dev/null");
    assert_ne!(
        c.sh("test -e /var/lib/cred-watch").0,
        0,
        "purge removes /var/lib/cred-watch"
    );
}
