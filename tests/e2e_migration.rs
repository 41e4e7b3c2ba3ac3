//! The README's migration, word for word, on a fresh container, as a new
//! administrator would follow it: the old setup (`claude-credentials.path`,
//! a `chmod 644` oneshot and a restart script), then "Migrating from a
//! .path unit + chmod service + restart script" steps 1–5 (permissions mode),
//! "Copy mode, step by step" steps 1–7, then "What `dpkg --purge
//! cred-watch` leaves".
//!
//! The bridge is the case the README's copy step 5 singles out: its root
//! main process starts a worker as the site user `botuser` with its groups
//! cleared (`setpriv --clear-groups`), so `SupplementaryGroups=` (step 4)
//! does not reach it; step 5 (`cred-watch doctor | grep reader`) says so
//! before the bridge is pointed at the copy, and the copy's `group` becomes
//! the worker's primary group, as step 5 says for that case. The worker
//! holds the credentials file its CLI would read open
//! (`${CLAUDE_SECURESTORAGE_CONFIG_DIR:-/root/.claude}/.credentials.json`).
//!
//! No outage, as the README promises: after every copy step the bridge's
//! worker holds the current credentials file (the source until step 6, then
//! the copy; never a deleted one), the bridge has been started exactly as
//! often as the steps restart it (so no worker went unchecked), and its
//! journal never says "Not logged in" after the old setup.
//!
//! Every step runs the README's commands and asserts what the README says
//! they show; target/e2e-migration-report.md records what each step showed.
//! Observable facts only: modes, inodes a worker holds, InvocationIDs,
//! start counts, doctor's lines, the journal.
mod common;
#[path = "e2e/container.rs"]
mod container;
#[path = "e2e/steps.rs"]
mod steps;
use common::assert_no_secret;
use container::{now_ms, wait_until, Container};
use std::time::Duration;
use steps::{doctor, line_with, steps};

const SRC: &str = "/root/.claude/.credentials.json";
const COPY_DIR: &str = "/var/lib/claude-credentials";
const COPY: &str = "/var/lib/claude-credentials/.credentials.json";
const CONFIG: &str = "/etc/cred-watch/cred-watch.toml";
const OVERRIDE: &str = "/etc/systemd/system/bridge.service.d/override.conf";
/// The purge section's credentials of botuser's own.
const OWN_DIR: &str = "/var/lib/bridge-claude";
const OWN: &str = "/var/lib/bridge-claude/.credentials.json";
/// Migration step 4: doctor's line after step 3 (the tag padded).
const PATH_UNITS_OK: &str = "ok   path units: no enabled .path unit watches a configured source";

/// The bridge's root main process: it notes its start, starts its worker as
/// `botuser` without initgroups, and stays (as `sleep`) its parent.
const BRIDGE_MASTER: &str = "#!/bin/sh\necho $$ >> /run/bridge.starts\nsetpriv --reuid=botuser --regid=botuser --clear-groups /usr/local/bin/bridge-worker &\nexec sleep infinity\n";

/// The worker reads what its CLI would read and holds it open (fd 3). A
/// worker that cannot read it stays up, logged out, as real ones do.
const BRIDGE_WORKER: &str = "#!/bin/sh\nf=\"${CLAUDE_SECURESTORAGE_CONFIG_DIR:-/root/.claude}/.credentials.json\"\nif [ -r \"$f\" ]; then exec sleep infinity 3< \"$f\"; fi\necho \"bridge-worker: cannot read $f: Not logged in\" >&2\nexec sleep infinity\n";

const BRIDGE_UNIT: &str =
    "[Unit]\nDescription=a bridge whose workers run as botuser\n[Service]\nExecStart=/usr/local/bin/bridge-master\n";

/// The old trigger: `PathChanged=` on the file, enabled.
const OLD_PATH_UNIT: &str = "[Unit]\nDescription=watch the Claude credentials\n[Path]\nPathChanged=/root/.claude/.credentials.json\n[Install]\nWantedBy=paths.target\n";
/// The old oneshot: `chmod 644`, then the restart script.
const OLD_SERVICE: &str = "[Unit]\nDescription=make the Claude credentials readable and restart the bridge\n[Service]\nType=oneshot\nExecStart=/bin/chmod 644 /root/.claude/.credentials.json\nExecStart=/usr/local/bin/claude-credentials-restart\n";
const OLD_SCRIPT: &str = "#!/bin/sh\nsystemctl restart bridge.service\n";

/// README "Quick start on a host", permissions mode, with this host's unit.
const PERMISSIONS_WATCH: &str = r#"
[[watch]]
name = "claude"
source = "/root/.claude/.credentials.json"

[watch.permissions]
file_mode = "0644"
traverse = true

[watch.restart]
units = ["bridge.service"]
"#;
/// What copy step 7 removes (exactly as written above).
const PERMISSIONS_BLOCK: &str = "[watch.permissions]\nfile_mode = \"0644\"\ntraverse = true\n";

/// README "Copy mode, step by step", step 3, verbatim.
const COPY_TOML: &str = r#"
[[watch.copy]]
dest = "/var/lib/claude-credentials/.credentials.json"
group = "claude-credentials"
mode = "0640"
drop_keys = ["mcpOAuth"]
"#;

/// README copy step 4, between the comment lines of `systemctl edit`.
const DROP_IN: &str = "[Service]\nSupplementaryGroups=claude-credentials\n";
/// README copy step 6, added below the `SupplementaryGroups=` line.
const ENV_LINE: &str = "Environment=CLAUDE_SECURESTORAGE_CONFIG_DIR=/var/lib/claude-credentials";
/// What the worker script logs when it cannot read its credentials.
const LOGGED_OUT: &str = "Not logged in";

/// What steps hand on to later ones.
#[derive(Default)]
struct Shared {
    /// Lines for target/e2e-migration-report.md.
    report: Vec<String>,
    /// The copy's bytes just before the purge.
    copy_before_purge: String,
    /// How often the bridge's journal said "Not logged in" by the end of
    /// the old setup: never more after it.
    logged_out_after_old_setup: usize,
}

type Step = steps::Step<Shared>;

const STEPS: &[(&str, &[&str], Step)] = steps![
    old_setup_path_unit_chmod_and_restart_script;
    migrate_1_install_and_write_the_watch after old_setup_path_unit_chmod_and_restart_script;
    migrate_2_check_and_dry_run after migrate_1_install_and_write_the_watch;
    migrate_3_stop_the_old_trigger after migrate_2_check_and_dry_run;
    migrate_4_enable_and_doctor after migrate_3_stop_the_old_trigger;
    migrate_5_remove_the_old_units after migrate_4_enable_and_doctor;
    permissions_mode_follows_a_refresh after migrate_5_remove_the_old_units;
    copy_1_find_the_bridge_users after migrate_5_remove_the_old_units;
    copy_2_group_and_usermod after copy_1_find_the_bridge_users;
    copy_3_add_the_copy after copy_2_group_and_usermod;
    copy_4_give_the_workers_the_group after copy_3_add_the_copy;
    copy_5_every_reader_ok after copy_4_give_the_workers_the_group;
    copy_6_point_the_bridge_at_the_copy after copy_5_every_reader_ok;
    copy_7_take_back_permissions_mode after copy_6_point_the_bridge_at_the_copy;
    a_refresh_restarts_the_bridge_into_the_copy after copy_7_take_back_permissions_mode;
    no_token_leaks after migrate_4_enable_and_doctor;
    purge_leaves_the_copies after a_refresh_restarts_the_bridge_into_the_copy;
    purge_removal_commands after purge_leaves_the_copies;
];

#[test]
fn e2e_readme_migration() {
    let Some((rootfs, deb_dir)) = container::prerequisites("e2e_migration") else {
        return;
    };
    let c = Container::boot_with("cred-watch-migration", &rootfs, &[(&deb_dir, "/mnt/deb")]);
    let mut shared = Shared::default();
    let failed = steps::run(&c, STEPS, &mut shared);
    steps::finish(
        &shared.report,
        "e2e-migration-report.md",
        &failed,
        STEPS.len(),
    );
}

// ---------------------------------------------------------------- helpers

/// A valid credentials file expiring `hours` from now (unique per `seq`).
fn creds(seq: u64, hours: i64) -> String {
    common::creds_exp(seq, now_ms() + hours * 3_600_000 + seq as i64)
}

/// Every line `ok` or `info`, as copy steps 6 and 7 promise.
fn all_ok_or_info(out: &str) -> bool {
    out.lines()
        .all(|l| l.starts_with("ok ") || l.starts_with("info "))
}

/// The bridge's worker: the one child of its main process, once it has
/// become `sleep` (the worker script execs it whether it could read or not).
fn worker(c: &Container) -> Option<u32> {
    let main = c.show("bridge", "MainPID");
    let (_, out, _) = c.sh(&format!(
        "for p in $(cat /proc/{main}/task/{main}/children); do [ \"$(cat /proc/$p/comm)\" = sleep ] && echo $p; done"
    ));
    out.split_whitespace().next().and_then(|p| p.parse().ok())
}

/// What the worker holds open on fd 3 (`None`: nothing: it could not read).
fn held(c: &Container, pid: u32) -> Option<String> {
    let (code, out, _) = c.sh(&format!("readlink /proc/{pid}/fd/3"));
    (code == 0).then(|| out.trim().to_string())
}

/// Waits until the bridge's worker holds `path`'s current inode; returns it.
fn wait_worker_holds(c: &Container, path: &str) -> u32 {
    let mut seen = String::new();
    let mut pid = 0;
    let ok = wait_until(Duration::from_secs(30), || {
        let Some(w) = worker(c) else {
            seen = "no worker".into();
            return false;
        };
        pid = w;
        let (_, out, _) = c.sh(&format!(
            "readlink /proc/{w}/fd/3; stat -L -c %i /proc/{w}/fd/3; stat -c %i {path}"
        ));
        seen = out.clone();
        let l: Vec<&str> = out.lines().collect();
        l.len() == 3 && l[0] == path && l[1] == l[2]
    });
    assert!(
        ok,
        "the bridge's worker does not hold the current {path}: {seen}\n{}\n{}",
        c.ok("journalctl -u bridge --no-pager -o cat | tail -n 5"),
        c.sh("journalctl -u cred-watch --no-pager -o cat").1
    );
    pid
}

/// How often the bridge's journal says "Not logged in" (its worker could
/// not read its credentials). `journalctl --sync` first: what the worker
/// wrote before now is in the journal.
fn logged_out(c: &Container) -> usize {
    c.ok("journalctl --sync");
    c.ok("journalctl -u bridge --no-pager -o cat")
        .matches(LOGGED_OUT)
        .count()
}

/// No outage: the bridge's worker holds `path`'s current inode on fd 3
/// (a file it could read, not a deleted one), and the bridge's journal has
/// said "Not logged in" no more since the old setup. Returns the worker.
fn no_outage(c: &Container, shared: &Shared, path: &str) -> u32 {
    let w = wait_worker_holds(c, path);
    let fd3 = held(c, w).unwrap_or_default();
    assert!(
        fd3 == path && !fd3.contains("(deleted)"),
        "the worker holds {path}, not {fd3:?}"
    );
    assert_eq!(
        logged_out(c),
        shared.logged_out_after_old_setup,
        "the bridge's worker said \"{LOGGED_OUT}\" (an outage):\n{}",
        c.ok("journalctl -u bridge --no-pager -o cat | tail -n 5")
    );
    w
}

/// Waits until the bridge has been started `n` times in all and runs a
/// worker.
/// Once the agent has settled: `systemctl daemon-reload && systemctl
/// restart bridge`, and the one new start on record. Returns the starts
/// before it.
fn daemon_reload_and_restart_bridge(c: &Container) -> usize {
    c.settled();
    let starts = c.bridge_starts();
    c.ok("systemctl daemon-reload && systemctl restart bridge");
    wait_starts(c, starts + 1);
    starts
}

fn wait_starts(c: &Container, n: usize) {
    assert!(
        wait_until(Duration::from_secs(30), || c.bridge_starts() == n
            && worker(c).is_some()),
        "the bridge was started {} times, not {n}:\n{}",
        c.bridge_starts(),
        c.sh("journalctl -u cred-watch --no-pager -o cat").1
    );
}

/// `Uid:`/`Gid:`/`Groups:` of a process as "uid gid groups…".
fn creds_of(c: &Container, pid: u32) -> String {
    c.ok(&format!(
        "awk '/^Uid:/ {{u=$2}} /^Gid:/ {{g=$2}} /^Groups:/ {{$1=\"\"; s=$0}} END {{print u, g s}}' /proc/{pid}/status"
    ))
}

fn gid(c: &Container, group: &str) -> String {
    c.ok(&format!("getent group {group} | cut -d: -f3"))
}

fn config_text(c: &Container) -> String {
    std::fs::read_to_string(c.host_path(CONFIG)).expect("the configuration")
}

// ------------------------------------------------------------------ steps

/// The old setup: root's source, made readable for the workers by hand
/// (`/root` and `/root/.claude` 0711, the file 0644), a `.path` unit on the
/// file, a oneshot `chmod 644` + restart script, and the bridge. It works:
/// a refresh by atomic rename (0600, as the CLI writes) is made 0644 again
/// and the bridge restarted into it.
fn old_setup_path_unit_chmod_and_restart_script(c: &Container, shared: &mut Shared) {
    c.ok("useradd -r -M -d /nonexistent botuser");
    c.write_creds(SRC, &creds(1, 1));
    c.ok(&format!("chmod 711 /root /root/.claude && chmod 644 {SRC}"));
    for (path, text) in [
        ("/usr/local/bin/bridge-master", BRIDGE_MASTER),
        ("/usr/local/bin/bridge-worker", BRIDGE_WORKER),
        ("/usr/local/bin/claude-credentials-restart", OLD_SCRIPT),
    ] {
        c.sh_input(
            &format!("mkdir -p /usr/local/bin && cat > {path} && chmod 755 {path}"),
            text,
        );
    }
    for (unit, text) in [
        ("bridge.service", BRIDGE_UNIT),
        ("claude-credentials.path", OLD_PATH_UNIT),
        ("claude-credentials.service", OLD_SERVICE),
    ] {
        c.sh_input(&format!("cat > /etc/systemd/system/{unit}"), text);
    }
    c.ok("systemctl daemon-reload && systemctl enable --now claude-credentials.path && systemctl start bridge");
    wait_worker_holds(c, SRC);
    let w = worker(c).unwrap();
    assert_eq!(
        c.ok(&format!("stat -c %U /proc/{w}")),
        "botuser",
        "the worker runs as botuser"
    );
    // The old way in action.
    let before = c.show("bridge", "InvocationID");
    c.write_creds(SRC, &creds(2, 2));
    assert!(
        wait_until(Duration::from_secs(20), || c
            .ok(&format!("stat -c %a {SRC}"))
            == "644"
            && c.show("bridge", "InvocationID") != before),
        "the old .path unit + chmod service did not act:\n{}",
        c.ok(
            "journalctl -u claude-credentials.path -u claude-credentials.service --no-pager -o cat"
        )
    );
    wait_worker_holds(c, SRC);
    shared.logged_out_after_old_setup = logged_out(c);
}

/// Migration step 1: the package installed (not started yet), the
/// equivalent watch written in /etc/cred-watch/cred-watch.toml.
fn migrate_1_install_and_write_the_watch(c: &Container, _: &mut Shared) {
    c.ok("dpkg -i /mnt/deb/cred-watch_*.deb >/dev/null");
    assert_eq!(c.sh("systemctl is-enabled cred-watch").1.trim(), "disabled");
    assert_eq!(c.sh("systemctl is-active cred-watch").1.trim(), "inactive");
    c.sh_input(&format!("cat >> {CONFIG}"), PERMISSIONS_WATCH);
}

/// Migration step 2: `cred-watch check` prints the effective
/// configuration, `cred-watch sync --dry-run` what it would change (and
/// changes nothing). Also (not a README command): doctor, run now, while
/// the .path unit is still enabled, is where `old path unit` shows up.
fn migrate_2_check_and_dry_run(c: &Container, shared: &mut Shared) {
    let (code, out, err) = c.sh("cred-watch check");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("[watch.permissions]")
            && out.contains("file_mode = \"0644\"")
            && out.contains("units = [\"bridge.service\"]"),
        "check prints the effective configuration:\n{out}"
    );
    let before = c.ok(&format!(
        "stat -c '%i %a' {SRC} && systemctl show -p InvocationID --value bridge"
    ));
    let (code, out, err) = c.sh("cred-watch sync --dry-run");
    assert_no_secret(&out, "sync --dry-run");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("claude: would apply"),
        "sync --dry-run shows what it would do:\n{out}"
    );
    assert_eq!(
        c.ok(&format!(
            "stat -c '%i %a' {SRC} && systemctl show -p InvocationID --value bridge"
        )),
        before,
        "a dry run changes nothing"
    );
    let (_, out) = doctor(c, "");
    assert!(
        line_with(
            &out,
            "warn",
            "claude old path unit: claude-credentials.path is still enabled"
        )
        .is_some(),
        "while the .path unit is enabled, doctor warns `old path unit`:\n{out}"
    );
    shared.report.push(format!(
        "- before migration step 3 (old .path unit still enabled), doctor says: `{}`",
        line_with(&out, "warn", "old path unit").unwrap_or_default()
    ));
}

/// Migration step 3: the old trigger stopped first.
fn migrate_3_stop_the_old_trigger(c: &Container, _: &mut Shared) {
    c.ok("systemctl disable --now claude-credentials.path claude-credentials.service");
    assert_eq!(
        c.sh("systemctl is-enabled claude-credentials.path")
            .1
            .trim(),
        "disabled"
    );
    assert_eq!(
        c.sh("systemctl is-active claude-credentials.path").1.trim(),
        "inactive"
    );
}

/// Migration step 4: the agent enabled and started; doctor. After step 3
/// it says `ok path units: no enabled .path unit watches a configured
/// source` (the `old path unit` warning of before step 3 is checked in
/// step 2).
fn migrate_4_enable_and_doctor(c: &Container, shared: &mut Shared) {
    let before = c.show("bridge", "InvocationID");
    c.ok("systemctl enable --now cred-watch");
    assert_eq!(c.ok("systemctl is-active cred-watch"), "active");
    c.settled();
    let (code, out) = doctor(c, "");
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.lines().any(|l| l.starts_with("fail")),
        "no failure in permissions mode:\n{out}"
    );
    assert!(
        !out.contains("old path unit") && out.lines().any(|l| l == PATH_UNITS_OK),
        "after step 3 doctor says `{PATH_UNITS_OK}`:\n{out}"
    );
    assert!(
        line_with(&out, "ok", "claude consumer bridge.service")
            .is_some_and(|l| l.contains("reads the source /root/.claude/.credentials.json")),
        "the bridge keeps reading the source (permissions mode):\n{out}"
    );
    assert!(
        line_with(&out, "ok", "claude reader botuser").is_some(),
        "{out}"
    );
    assert_eq!(
        c.show("bridge", "InvocationID"),
        before,
        "the bridge started after the credentials it reads: not restarted"
    );
    shared.report.push(format!(
        "- migration step 4 (after step 3), doctor says: `{PATH_UNITS_OK}`"
    ));
}

/// Migration step 5: the old unit files and the script removed.
fn migrate_5_remove_the_old_units(c: &Container, _: &mut Shared) {
    c.ok("rm /etc/systemd/system/claude-credentials.path /etc/systemd/system/claude-credentials.service /usr/local/bin/claude-credentials-restart && systemctl daemon-reload");
    for unit in ["claude-credentials.path", "claude-credentials.service"] {
        assert_eq!(c.show(unit, "LoadState"), "not-found", "{unit}");
    }
    let (_, out) = doctor(c, "");
    assert!(!out.contains("old path unit"), "{out}");
}

/// Permissions mode does what the old chmod service did: a refresh (0600,
/// by rename) is made 0644 and the bridge restarted once into it.
fn permissions_mode_follows_a_refresh(c: &Container, _: &mut Shared) {
    c.settled();
    let starts = c.bridge_starts();
    let before = c.show("bridge", "InvocationID");
    c.write_creds(SRC, &creds(3, 3));
    wait_starts(c, starts + 1);
    wait_worker_holds(c, SRC);
    c.settled();
    assert_eq!(c.bridge_starts(), starts + 1, "exactly one restart");
    assert_ne!(c.show("bridge", "InvocationID"), before);
    assert_eq!(c.ok(&format!("stat -c %a {SRC}")), "644");
}

/// Copy step 1: the users the bridge's processes run as, with the README's
/// `cred-watch doctor | grep 'consumer bridge.service'` (no `ps`: procps is
/// not on a minimal system). It names each process of the unit under
/// another user, `PID N (comm, uid U)`: exactly the processes of the
/// unit's cgroup not running as root.
fn copy_1_find_the_bridge_users(c: &Container, shared: &mut Shared) {
    let (code, out, err) = c.sh("cred-watch doctor | grep 'consumer bridge.service'");
    assert_no_secret(&out, "doctor | grep");
    assert_no_secret(&err, "doctor | grep");
    assert_eq!(code, 0, "{out}{err}");
    let mut named: Vec<(u32, String)> = out.lines().flat_map(named_processes).collect();
    named.sort();
    named.dedup();
    // The unit's processes, from its cgroup: the README's
    // /sys/fs/cgroup/system.slice/… on the unified hierarchy (cgroup v2),
    // under systemd/ or unified/ on a hybrid one.
    let procs_file = c.ok(
        "cg=$(systemctl show -p ControlGroup --value bridge.service); for d in /sys/fs/cgroup /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do if [ -r \"$d$cg/cgroup.procs\" ]; then echo \"$d$cg/cgroup.procs\"; exit 0; fi; done; exit 1",
    );
    let procs = c.ok(&format!("cat {procs_file}"));
    let mut others: Vec<(u32, String)> = procs
        .split_whitespace()
        .filter_map(|p| {
            let uid = c.ok(&format!("awk '/^Uid:/ {{print $3}}' /proc/{p}/status"));
            (uid != "0").then(|| (p.parse().unwrap(), uid))
        })
        .collect();
    others.sort();
    assert!(
        !others.is_empty() && named == others,
        "doctor names each process of the unit under another user ({others:?}), and only those:\n{out}"
    );
    let users: Vec<String> = named
        .iter()
        .map(|(_, uid)| c.ok(&format!("getent passwd {uid} | cut -d: -f1")))
        .collect();
    assert_eq!(users, ["botuser"], "{out}");
    assert_ne!(
        c.sh("command -v ps").0,
        0,
        "no ps here: the step needs none"
    );
    shared.report.push(format!(
        "- copy step 1, `cred-watch doctor | grep 'consumer bridge.service'` (uid {} is {}; the unit's processes from {procs_file}):\n```\n{}\n```",
        named[0].1,
        users[0],
        out.trim()
    ));
    no_outage(c, shared, SRC);
}

/// Every `PID N (comm, uid U)` in a doctor line, as (N, U).
fn named_processes(line: &str) -> Vec<(u32, String)> {
    line.split("PID ")
        .skip(1)
        .filter_map(|rest| {
            let (pid, rest) = rest.split_once(" (")?;
            let pid = pid.parse().ok()?;
            let (_, rest) = rest.split_once(", uid ")?;
            let (uid, _) = rest.split_once(')')?;
            uid.parse::<u32>().ok()?;
            Some((pid, uid.to_string()))
        })
        .collect()
}

/// Copy step 2: the readers' group, with each of those users.
fn copy_2_group_and_usermod(c: &Container, shared: &mut Shared) {
    c.ok("groupadd -r claude-credentials");
    c.ok("usermod -aG claude-credentials botuser");
    assert!(
        c.ok("id -nG botuser")
            .split_whitespace()
            .any(|g| g == "claude-credentials"),
        "botuser is in the group"
    );
    no_outage(c, shared, SRC);
}

/// Copy step 3: the copy added to the watch (permissions mode kept),
/// checked and reloaded; `stat` shows exactly the two lines the README
/// quotes.
fn copy_3_add_the_copy(c: &Container, shared: &mut Shared) {
    let before = c.show("bridge", "InvocationID");
    c.sh_input(&format!("cat >> {CONFIG}"), COPY_TOML);
    c.ok("cred-watch check >/dev/null && systemctl reload cred-watch");
    let stat = format!("stat -c '%a %U:%G %n' {COPY_DIR} {COPY}");
    let want = format!("755 root:root {COPY_DIR}\n640 root:claude-credentials {COPY}");
    assert!(
        wait_until(Duration::from_secs(20), || c.sh(&stat).1.trim() == want),
        "`{stat}` shows:\n{want}\nnot:\n{}\n{}",
        c.sh(&stat).1,
        c.journal()
    );
    c.settled();
    let copy: serde_json::Value = serde_json::from_str(&c.ok(&format!("cat {COPY}"))).unwrap();
    let source = common::without(&c.ok(&format!("cat {SRC}")), &["mcpOAuth"]);
    assert_eq!(
        copy, source,
        "the copy is the source without mcpOAuth and the refresh token"
    );
    assert_eq!(
        c.ok(&format!("stat -c %a {SRC}")),
        "644",
        "[watch.permissions] kept"
    );
    assert_eq!(
        c.show("bridge", "InvocationID"),
        before,
        "the bridge still reads the source: not restarted"
    );
    no_outage(c, shared, SRC);
    shared
        .report
        .push(format!("- copy step 3, `{stat}`:\n```\n{want}\n```"));
}

/// Copy step 4: the drop-in `systemctl edit bridge.service` creates, with
/// the README's one line, then `systemctl daemon-reload && systemctl
/// restart bridge`. The restart gives the main process the group
/// (`SupplementaryGroups=`); the worker, started with `setpriv
/// --clear-groups`, has no supplementary group at all. The bridge still
/// reads the source: the new worker holds it.
fn copy_4_give_the_workers_the_group(c: &Container, shared: &mut Shared) {
    c.sh_input(
        &format!("mkdir -p /etc/systemd/system/bridge.service.d && cat > {OVERRIDE}"),
        DROP_IN,
    );
    let starts = daemon_reload_and_restart_bridge(c);
    let env = c.show("bridge", "Environment");
    assert!(
        !env.contains("CLAUDE_SECURESTORAGE_CONFIG_DIR"),
        "not pointed at the copy yet: {env}"
    );
    assert_eq!(
        c.show("bridge", "SupplementaryGroups"),
        "claude-credentials"
    );
    let cc = gid(c, "claude-credentials");
    let main: u32 = c.show("bridge", "MainPID").parse().unwrap();
    let main_creds = creds_of(c, main);
    assert!(
        main_creds.split_whitespace().skip(2).any(|g| g == cc),
        "SupplementaryGroups= gives the main process the group: {main_creds}"
    );
    let w = no_outage(c, shared, SRC);
    let worker_creds = creds_of(c, w);
    let botuser = gid(c, "botuser");
    assert_eq!(
        worker_creds.split_whitespace().skip(1).collect::<Vec<_>>(),
        [botuser.as_str()],
        "a worker that clears its groups has none (uid gid, nothing after): {worker_creds}"
    );
    c.settled();
    assert_eq!(c.bridge_starts(), starts + 1, "the one restart of step 4");
    no_outage(c, shared, SRC);
    shared.report.push(format!(
        "- after copy step 4: main process (uid gid groups) `{main_creds}`, worker `{worker_creds}`; the worker holds the source"
    ));
}

/// `cred-watch doctor | grep reader`: exit code and lines.
fn reader_lines(c: &Container) -> (i32, String) {
    let (code, out, err) = c.sh("cred-watch doctor | grep reader");
    assert_no_secret(&out, "doctor | grep reader");
    assert_no_secret(&err, "doctor | grep reader");
    (code, out)
}

/// Copy step 5: `cred-watch doctor | grep reader` tests the worker's real
/// groups against the copy before the bridge reads it: `fail`, naming this
/// case (`starts its workers with no supplementary group at all`) and the
/// copy's group as the fix. Then what step 5 says for that case: `group =
/// "botuser"` in the `[[watch.copy]]`, `cred-watch check >/dev/null &&
/// systemctl reload cred-watch`; every `reader` line is then `ok`. No
/// restart: the same worker still holds the source.
fn copy_5_every_reader_ok(c: &Container, shared: &mut Shared) {
    let w = no_outage(c, shared, SRC);
    let starts = c.bridge_starts();
    let (code, out) = reader_lines(c);
    assert_eq!(code, 0, "grep finds reader lines:\n{out}");
    let fix = format!(
        "fix: give the copy their primary group: group = \"botuser\" in the [[watch.copy]] for {COPY}"
    );
    assert!(
        out.lines()
            .all(|l| l.starts_with("fail claude reader botuser: ")
                && l.contains(&format!("cannot open {COPY}"))
                && l.contains("starts its workers with no supplementary group at all")
                && l.contains(&fix)
                && !l.contains("fix: add SupplementaryGroups")),
        "every reader line fails with the README's case and fix:\n{out}"
    );
    assert!(
        out.lines().any(|l| l.contains(&format!("PID {w} ("))),
        "doctor tests the running worker (PID {w}):\n{out}"
    );
    shared.report.push(format!(
        "- copy step 5, `cred-watch doctor | grep reader`:\n```\n{}\n```",
        out.trim()
    ));
    no_outage(c, shared, SRC);

    // Copy step 5, for workers that clear their groups.
    let toml = config_text(c);
    let fixed = toml.replacen(
        "\ngroup = \"claude-credentials\"\n",
        "\ngroup = \"botuser\"\n",
        1,
    );
    assert_ne!(fixed, toml, "the copy's group line");
    c.sh_input(&format!("cat > {CONFIG}"), &fixed);
    c.ok("cred-watch check >/dev/null && systemctl reload cred-watch");
    assert!(
        wait_until(Duration::from_secs(20), || c
            .ok(&format!("stat -c '%a %U:%G' {COPY}"))
            == "640 root:botuser"),
        "{}",
        c.journal()
    );
    c.settled();

    let (code, out) = reader_lines(c);
    assert!(
        code == 0
            && out.lines().all(|l| l.starts_with("ok "))
            && out
                .lines()
                .any(|l| l.starts_with("ok   claude reader botuser: ")
                    && l.ends_with(&format!("can open {COPY}"))),
        "every reader line ok (`ok   claude reader botuser: … can open {COPY}`):\n{out}"
    );
    assert_eq!(c.bridge_starts(), starts, "step 5 restarts nothing");
    assert_eq!(
        no_outage(c, shared, SRC),
        w,
        "the same worker still holds the source"
    );
    shared.report.push(format!(
        "- copy step 5 after `group = \"botuser\"` + `cred-watch check >/dev/null && systemctl reload cred-watch`: copy `640 root:botuser`, no restart, the worker still holds the source; `cred-watch doctor | grep reader`:\n```\n{}\n```",
        out.trim()
    ));
}

/// Copy step 6: `systemctl edit bridge.service` again, the `Environment=`
/// line added below the `SupplementaryGroups=` line; `systemctl
/// daemon-reload && systemctl restart bridge`: the new worker holds the
/// copy. Doctor: all `ok`/`info`, with the lines the README quotes (the
/// tag padded: `ok   claude …`).
fn copy_6_point_the_bridge_at_the_copy(c: &Container, shared: &mut Shared) {
    c.ok(&format!(
        "sed -i '/^SupplementaryGroups=/a {ENV_LINE}' {OVERRIDE}"
    ));
    assert_eq!(
        std::fs::read_to_string(c.host_path(OVERRIDE)).unwrap(),
        format!("{DROP_IN}{ENV_LINE}\n"),
        "the drop-in: the line of step 4, then the line of step 6"
    );
    let starts = daemon_reload_and_restart_bridge(c);
    let env = c.show("bridge", "Environment");
    assert!(
        env.contains("CLAUDE_SECURESTORAGE_CONFIG_DIR=/var/lib/claude-credentials"),
        "{env}"
    );
    no_outage(c, shared, COPY);
    c.settled();

    let (code, out) = doctor(c, "");
    assert!(
        code == 0 && all_ok_or_info(&out),
        "every line ok or info:\n{out}"
    );
    for (start, end) in [
        (
            format!("ok   claude copy {COPY}: identical to the source"),
            String::new(),
        ),
        (
            "ok   claude consumer bridge.service: ".to_string(),
            format!("reads a copy {COPY} (CLAUDE_SECURESTORAGE_CONFIG_DIR from Environment=) and cannot create entries in {COPY_DIR}"),
        ),
        (
            "ok   claude reader botuser: ".to_string(),
            format!("can open {COPY}"),
        ),
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&start) && l.ends_with(&end)),
            "the README's `{start}…{end}`:\n{out}"
        );
    }
    assert_eq!(c.bridge_starts(), starts + 1, "the one restart of step 6");
    no_outage(c, shared, COPY);
    shared.report.push(format!(
        "- copy step 6: the worker holds the copy, never logged out; doctor (exit {code}):\n```\n{}\n```",
        out.trim()
    ));
}

/// Copy step 7: `[watch.permissions]` removed, checked, reloaded; the
/// source back to 0600; the search bits: the journal lists none that
/// permissions mode added, `stat` shows 711 (from the old setup): both
/// removed with `chmod o-x,g-x /root /root/.claude`. Doctor: all `ok`.
fn copy_7_take_back_permissions_mode(c: &Container, shared: &mut Shared) {
    let toml = config_text(c);
    let without = toml.replacen(PERMISSIONS_BLOCK, "", 1);
    assert_ne!(without, toml, "the [watch.permissions] block");
    let reloads = || c.journal().matches("reloaded configuration").count();
    let before = reloads();
    c.sh_input(&format!("cat > {CONFIG}"), &without);
    c.ok("cred-watch check >/dev/null && systemctl reload cred-watch");
    // Applied before the chmod below (else permissions mode would undo it).
    assert!(
        wait_until(Duration::from_secs(20), || reloads() > before),
        "{}",
        c.journal()
    );
    c.ok(&format!("chmod 0600 {SRC}"));
    let (code, grep, _) = c.sh("journalctl -u cred-watch | grep 'search bits'");
    assert!(
        code == 1 && grep.is_empty(),
        "permissions mode added no search bits (the old setup had):\n{grep}"
    );
    let modes = c.ok("stat -c '%a %n' /root /root/.claude");
    assert_eq!(modes, "711 /root\n711 /root/.claude");
    c.ok("chmod o-x,g-x /root /root/.claude");
    c.settled();
    let after = c.ok(&format!("stat -c '%a %n' /root /root/.claude {SRC}"));
    assert_eq!(after, format!("700 /root\n700 /root/.claude\n600 {SRC}"));
    let (code, out) = doctor(c, "");
    assert!(
        code == 0 && all_ok_or_info(&out),
        "doctor again: all ok:\n{out}"
    );
    assert!(!out.contains("claude permissions"), "{out}");
    no_outage(c, shared, COPY);
    shared.report.push(format!(
        "- copy step 7: `journalctl -u cred-watch | grep 'search bits'` finds nothing (exit 1); `stat -c '%a %n' /root /root/.claude` shows `{}`; after `chmod o-x,g-x /root /root/.claude`: `{}`; doctor all ok/info (exit {code})",
        modes.replace('\n', ", "),
        after.replace('\n', ", ")
    ));
}

/// "the bridge restarts on the next refresh into a copy it can read": a
/// newer file by atomic rename; the copy follows, the bridge is restarted
/// exactly once, and its new worker holds the copy's current inode.
fn a_refresh_restarts_the_bridge_into_the_copy(c: &Container, shared: &mut Shared) {
    c.settled();
    let starts = c.bridge_starts();
    let before = c.show("bridge", "InvocationID");
    let old_inode = c.ok(&format!("stat -c %i {COPY}"));
    let v = creds(4, 4);
    c.write_creds(SRC, &v);
    let want = common::without(&v, &["mcpOAuth"]);
    assert!(
        wait_until(Duration::from_secs(20), || serde_json::from_str::<
            serde_json::Value,
        >(
            &c.ok(&format!("cat {COPY}"))
        )
        .ok()
            == Some(want.clone())),
        "the copy follows:\n{}",
        c.journal()
    );
    wait_starts(c, starts + 1);
    wait_worker_holds(c, COPY);
    c.settled();
    assert_eq!(
        c.bridge_starts(),
        starts + 1,
        "exactly one restart:\n{}",
        c.journal()
    );
    no_outage(c, shared, COPY);
    assert_ne!(c.show("bridge", "InvocationID"), before);
    assert_ne!(c.ok(&format!("stat -c %i {COPY}")), old_inode, "a new copy");
    assert_eq!(
        c.ok(&format!("stat -c '%a %U:%G' {SRC} {COPY}")),
        "600 root:root\n640 root:botuser",
        "the source stays 0600; the copy 0640"
    );
    shared.report.push(
        "- the next refresh: the copy follows, the bridge is restarted once, its worker holds the copy".to_string(),
    );
}

/// No token text anywhere it could leak.
fn no_token_leaks(c: &Container, _: &mut Shared) {
    assert_no_secret(&c.journal(), "journalctl -u cred-watch");
    assert_no_secret(&c.ok("journalctl --no-pager -o cat"), "journal");
    assert_no_secret(&c.ok("cat /var/lib/cred-watch/state.json"), "state.json");
    assert_no_secret(&c.ok("cred-watch status"), "cred-watch status");
    doctor(c, "");
}

/// `dpkg --purge cred-watch`: the state and the configuration go, the
/// copies stay (and the bridge keeps reading its copy).
fn purge_leaves_the_copies(c: &Container, shared: &mut Shared) {
    shared.copy_before_purge = c.ok(&format!("cat {COPY}"));
    let (code, out, err) = c.sh("dpkg --purge cred-watch");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("copies in /var/lib/claude-credentials are left in place"),
        "purge says so:\n{err}"
    );
    assert_eq!(c.show("cred-watch", "LoadState"), "not-found");
    assert_ne!(c.sh("test -e /var/lib/cred-watch").0, 0, "state removed");
    assert_ne!(
        c.sh("test -e /etc/cred-watch").0,
        0,
        "configuration removed"
    );
    assert_eq!(
        c.ok(&format!("cat {COPY}")),
        shared.copy_before_purge,
        "the copy is left"
    );
    assert_eq!(
        c.ok(&format!("stat -c '%a %U:%G' {COPY_DIR} {COPY}")),
        "755 root:root\n640 root:botuser"
    );
    wait_worker_holds(c, COPY);
    shared.report.push(
        "- purge: /var/lib/cred-watch and /etc/cred-watch gone, the copy left, the worker still holds it".to_string(),
    );
}

/// The README's procedure after the purge: botuser's own credentials in a
/// directory it owns (`install -d -o botuser -g botuser -m 700
/// /var/lib/bridge-claude`; its `/login` stood in for by writing its
/// credentials file as botuser, 0600 by rename, as the CLI does); the
/// lines of steps 4 and 6 replaced with
/// `Environment=CLAUDE_SECURESTORAGE_CONFIG_DIR=/var/lib/bridge-claude`
/// (`systemctl edit` writes the drop-in and reloads); `systemctl restart bridge`; then `rm -r
/// /var/lib/claude-credentials` and `groupdel claude-credentials`. The
/// worker is never logged out: it reads its own file throughout.
fn purge_removal_commands(c: &Container, shared: &mut Shared) {
    let logged_out_before = logged_out(c);
    assert_ne!(
        c.sh(&format!("runuser -u botuser -- test -r {SRC}")).0,
        0,
        "step 7 made the source unreadable to botuser (why removing the lines of steps 4 and 6 alone is not enough)"
    );

    c.ok(&format!(
        "install -d -o botuser -g botuser -m 700 {OWN_DIR}"
    ));
    let (code, out, err) = c.sh_input(
        &format!(
            "runuser -u botuser -- sh -c 'umask 077; cat > {OWN}.tmp && mv -f {OWN}.tmp {OWN}'"
        ),
        &creds(5, 5),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        c.ok(&format!("stat -c '%a %U:%G' {OWN_DIR} {OWN}")),
        "700 botuser:botuser\n600 botuser:botuser"
    );
    c.ok(&format!(
        "printf '[Service]\\nEnvironment=CLAUDE_SECURESTORAGE_CONFIG_DIR={OWN_DIR}\\n' > {OVERRIDE} && systemctl daemon-reload"
    ));
    let starts = c.bridge_starts();
    c.ok("systemctl restart bridge");
    wait_starts(c, starts + 1);
    wait_worker_holds(c, OWN);
    assert_eq!(c.show("bridge", "SupplementaryGroups"), "");

    c.ok(&format!("rm -r {COPY_DIR}"));
    c.ok("groupdel claude-credentials");
    assert_ne!(c.sh(&format!("test -e {COPY_DIR}")).0, 0);
    assert_ne!(c.sh("getent group claude-credentials").0, 0);
    assert_eq!(c.ok("systemctl is-active bridge"), "active");
    wait_worker_holds(c, OWN);
    assert_eq!(
        logged_out(c),
        logged_out_before,
        "the bridge was not logged out"
    );
    shared.report.push(format!(
        "- after the purge: bridge restarted on {OWN} (botuser's own, 600 botuser:botuser); its worker holds it; {COPY_DIR} and the group removed; never logged out"
    ));
}
