//! End-to-end against a real systemd: boots a Debian rootfs with
//! systemd-nspawn, installs the built .deb, and checks observable facts only
//! (file bytes and modes, the bridge's InvocationID and start count, unit
//! states, the journal). See tests/run.sh for how the .deb and the rootfs are
//! made; with `CRED_WATCH_E2E=required` (CI) a missing prerequisite fails.
mod common;
#[path = "e2e/container.rs"]
mod container;
use common::assert_no_secret;
use container::Container;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn creds(seq: u64) -> String {
    common::creds(seq)
}

const SRC: &str = "/root/.claude/.credentials.json";
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

fn prerequisites() -> Option<(PathBuf, PathBuf)> {
    let required = std::env::var("CRED_WATCH_E2E").is_ok_and(|v| v == "required");
    let missing = |why: &str| {
        assert!(!required, "end-to-end tests required but {why}");
        eprintln!("e2e_nspawn: skipped: {why} (run tests/run.sh as root)");
        None
    };
    if unsafe { libc::geteuid() } != 0 {
        return missing("not root");
    }
    let Some(rootfs) = container::rootfs() else {
        return missing("no rootfs (tests/e2e/rootfs.sh builds it)");
    };
    let Some(deb_dir) = container::deb_dir() else {
        return missing("no .deb in target/debian (cargo deb builds it)");
    };
    if Command::new("systemd-nspawn")
        .arg("--version")
        .output()
        .is_err()
    {
        return missing("systemd-nspawn is not installed");
    }
    Some((rootfs, deb_dir))
}

#[test]
fn e2e_on_real_systemd() {
    let Some((rootfs, deb_dir)) = prerequisites() else {
        return;
    };
    let c = Container::boot("cred-watch-e2e", &rootfs, &deb_dir);
    let mut report = Vec::new();

    // 1. Installed but neither enabled nor started.
    c.ok("dpkg -i /mnt/deb/cred-watch_*.deb >/dev/null");
    assert_eq!(c.sh("systemctl is-enabled cred-watch").1.trim(), "disabled");
    assert_eq!(c.sh("systemctl is-active cred-watch").1.trim(), "inactive");
    assert!(c.ok("test -f /etc/cred-watch/cred-watch.toml && test -d /etc/cred-watch/conf.d && man -w cred-watch.toml 2>/dev/null || ls /usr/share/man/man5/cred-watch.toml.5.gz").contains("cred-watch.toml.5"));
    // The shipped configuration has no watch yet: refused with 78.
    assert_eq!(c.sh("cred-watch check").0, 78);

    // 2. Configured, enabled and started: active once READY=1 arrived.
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
    assert_eq!(
        c.bridge_starts(),
        1,
        "first credentials adopted without a restart"
    );

    // 3. A valid atomic rename: the copy follows and the bridge restarts once.
    let before = c.show("bridge", "InvocationID");
    let v2 = creds(2);
    c.write_creds(SRC, &v2);
    let want = common::without(&v2, &["mcpOAuth"]);
    assert!(common::wait_until(Duration::from_secs(10), || {
        serde_json::from_str::<serde_json::Value>(&c.ok(&format!("cat {DEST}"))).ok()
            == Some(want.clone())
    }));
    assert!(
        common::wait_until(Duration::from_secs(10), || c.bridge_starts() == 2),
        "{}",
        c.journal()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.bridge_starts(), 2, "exactly one restart");
    assert_ne!(c.show("bridge", "InvocationID"), before);

    // 4. MCP-only rewrite and a corrupted token: no restart.
    let mcp = v2.replace("\"mcp-2\"", "\"mcp-2b\"");
    c.write_creds(SRC, &mcp);
    c.write_creds(
        SRC,
        &creds(3).replace("sk-ant-oat01-test-access-000003", ""),
    );
    c.write_creds(SRC, "{\"claudeAiOauth\": {\"accessToken\": ");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        c.bridge_starts(),
        2,
        "no restart for MCP-only or corrupt files:\n{}",
        c.journal()
    );
    assert!(c.journal().contains("refused"), "refusals are logged");
    assert!(
        serde_json::from_str::<serde_json::Value>(&c.ok(&format!("cat {DEST}"))).ok()
            == Some(want.clone()),
        "last good copy kept"
    );

    // Idle after real D-Bus restarts: no thread of the agent wakes up.
    let pid = c.show("cred-watch", "MainPID");
    let switches = || -> u64 {
        c.ok(&format!(
            "cat /proc/{pid}/task/*/status | awk '/ctxt_switches/ {{ s += $2 }} END {{ print s }}'"
        ))
        .parse()
        .unwrap()
    };
    let before = switches();
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

    // 5. 100 renames in ~2s: bounded restarts, final copy == final source.
    let starts0 = c.bridge_starts();
    let t = Instant::now();
    c.ok(&burst_script(100, "0.02", "burst", 2));
    let storm = t.elapsed();
    let restarts = c.bridge_starts_settled(Duration::from_millis(2500)) - starts0;
    let bound = storm.as_secs_f64() / 1.0 + 2.0;
    let final_src = common::without(&c.ok(&format!("cat {SRC}")), &["mcpOAuth"]);
    let final_dest: serde_json::Value =
        serde_json::from_str(&c.ok(&format!("cat {DEST}"))).unwrap();
    assert_eq!(final_dest, final_src, "final copy equals final source");
    assert!(
        restarts >= 1 && restarts as f64 <= bound,
        "{restarts} restarts in {storm:?} (bound {bound})"
    );
    report.push(format!("| cred-watch | 100 renames in {:.1}s | {restarts} bridge restarts (bound {bound:.1}) | final copy correct: yes | cred-watch {} |", storm.as_secs_f64(), c.ok("systemctl is-active cred-watch")));

    // 6. A unit that does not exist: a clear error, retried, agent stays up.
    c.write_creds("/root/other/.credentials.json", &creds(10));
    c.write_creds("/root/other/.credentials.json", &creds(11));
    assert!(
        common::wait_until(Duration::from_secs(10), || c
            .journal()
            .contains("nope.service")),
        "{}",
        c.journal()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let j = c.journal();
    assert!(j.contains("nope.service") && j.contains("not found"), "{j}");
    assert_eq!(c.ok("systemctl is-active cred-watch"), "active");

    // doctor against real systemd: units known/active, stale handles.
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
    c.ok("systemctl stop cred-watch");
    let bridge_pid = c.show("bridge", "MainPID");
    c.write_creds(
        SRC,
        &common::creds_exp(20, common::now_ms() + 4 * 3_600_000),
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
    // The copy made while it was down is noticed at start: one restart.
    assert!(
        common::wait_until(Duration::from_secs(10), || c.bridge_starts() == starts + 1),
        "{}",
        c.journal()
    );
    report.push(format!(
        "doctor output on the container:\n```\n{}\n```",
        c.sh("cred-watch doctor").1.trim()
    ));

    // 8. `systemctl reload` applies a changed configuration.
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

    // `sync` next to the running service: the agent does the pass.
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

    // With WatchdogSec= the agent pings at half the interval; systemd would
    // kill and restart it otherwise.
    c.ok("mkdir -p /etc/systemd/system/cred-watch.service.d && printf '[Service]\\nWatchdogSec=2s\\n' > /etc/systemd/system/cred-watch.service.d/watchdog.conf");
    c.ok("systemctl daemon-reload && systemctl restart cred-watch");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(c.ok("systemctl is-active cred-watch"), "active");
    assert_eq!(c.show("cred-watch", "NRestarts"), "0", "{}", c.journal());
    assert_ne!(
        c.show("cred-watch", "WatchdogTimestampMonotonic"),
        "0",
        "watchdog pings received"
    );
    c.ok("rm -r /etc/systemd/system/cred-watch.service.d && systemctl daemon-reload");

    // 7. A broken configuration: start fails with 78, no restart loop.
    c.sh_input("cat > /etc/cred-watch/cred-watch.toml", &config("0999"));
    assert_ne!(c.sh("systemctl restart cred-watch").0, 0);
    std::thread::sleep(Duration::from_secs(3));
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

    // 10. The old way side by side, under the same burst: a .path unit with
    // PathChanged= and a oneshot chmod service (default start limits).
    c.ok("printf '[Path]\\nPathChanged=/root/.claude/.credentials.json\\n' > /etc/systemd/system/oldway.path");
    c.ok("printf '[Service]\\nType=oneshot\\nExecStart=/bin/sh -c \"echo x >> /run/oldway.starts; chmod 644 /root/.claude/.credentials.json\"\\n' > /etc/systemd/system/oldway.service");
    c.ok("systemctl daemon-reload && systemctl start oldway.path");
    let starts0 = c.bridge_starts();
    let t = Instant::now();
    c.ok(&burst_script(100, "0.02", "side", 5));
    let storm = t.elapsed();
    let restarts = c.bridge_starts_settled(Duration::from_millis(2500)) - starts0;
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
        serde_json::from_str::<serde_json::Value>(&c.ok(&format!("cat {DEST}"))).ok()
            == Some(want.clone())
    }));
    let old_mode_after = c.ok(&format!("stat -c %a {SRC}"));
    report.push(format!(
        "| .path unit + chmod oneshot | the same burst, {:.1}s | chmod service ran {old_runs} times | path unit afterwards: {path_state}; a later change left the source at mode {old_mode_after} | cred-watch alongside: {restarts} restarts, copy correct, still {} |",
        storm.as_secs_f64(),
        c.ok("systemctl is-active cred-watch")
    ));

    // D-Bus unreachable: the restart fails, is retried with backoff, and
    // happens once the bus is back.
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

    // systemctl daemon-reexec while the restart job runs (a slow stop).
    c.ok("mkdir -p /etc/systemd/system/bridge.service.d && printf '[Service]\\nExecStop=/bin/sleep 2\\n' > /etc/systemd/system/bridge.service.d/slow.conf && systemctl daemon-reload");
    let starts = c.bridge_starts();
    c.write_creds(
        SRC,
        &common::creds_exp(61, common::now_ms() + 7 * 3_600_000 + 1),
    );
    std::thread::sleep(Duration::from_millis(700));
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

    // 9. No token text anywhere it could leak.
    let j = c.journal();
    assert_no_secret(&j, "journalctl -u cred-watch");
    assert_no_secret(&c.ok("cat /var/lib/cred-watch/state.json"), "state.json");
    assert_no_secret(&c.ok("systemctl show cred-watch"), "systemctl show");
    assert_no_secret(&c.ok("cred-watch status"), "cred-watch status");

    // Purge removes the state.
    c.ok("systemctl disable --now cred-watch && dpkg --purge cred-watch >/dev/null");
    assert_ne!(
        c.sh("test -e /var/lib/cred-watch").0,
        0,
        "purge removes /var/lib/cred-watch"
    );

    let report = report.join("\n");
    eprintln!("\n{report}");
    let _ = std::fs::write(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-report.md"),
        format!("{report}\n"),
    );
}
