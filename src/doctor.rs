//! `cred-watch doctor`: one line per check (ok / warn / fail) with the
//! reason and the fix, so an operator woken by "Invalid API key · Please
//! run /login" finds the cause with one command.

use crate::apply;
use crate::config::{Account, Settings, WatchSettings};
use crate::fsutil::{self, perm_bits, FsError};
use crate::source::{read_source, ReadOutcome};
use crate::state::{self, now_ms, State};
use crate::systemd::UnitQuery;
use crate::validate::{self, fmt_ms, Refusal, Secret, Validated};
use serde::Serialize;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: String,
    pub status: Level,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

struct Report(Vec<Finding>);

impl Report {
    fn add(
        &mut self,
        check: impl Into<String>,
        status: Level,
        message: impl Into<String>,
        fix: Option<&str>,
    ) {
        self.0.push(Finding {
            check: check.into(),
            status,
            message: message.into(),
            fix: fix.map(String::from),
        });
    }
    fn ok(&mut self, check: impl Into<String>, message: impl Into<String>) {
        self.add(check, Level::Ok, message, None);
    }
}

/// Prints the findings; returns the exit code (1 when anything failed).
pub fn print(findings: &[Finding], json: bool) -> i32 {
    if json {
        let healthy = !findings.iter().any(|f| f.status == Level::Fail);
        let out = serde_json::json!({ "healthy": healthy, "checks": findings });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        for f in findings {
            let tag = match f.status {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "fail",
            };
            match &f.fix {
                Some(fix) => println!("{tag} {}: {} — fix: {fix}", f.check, f.message),
                None => println!("{tag} {}: {}", f.check, f.message),
            }
        }
    }
    i32::from(findings.iter().any(|f| f.status == Level::Fail))
}

/// The finding for a configuration that does not load.
pub fn config_failure(err: &crate::config::ConfigError) -> Finding {
    Finding {
        check: "config".into(),
        status: Level::Fail,
        message: err.to_string(),
        fix: Some("correct that line, then run `cred-watch check`".into()),
    }
}

fn left(ms: i64) -> String {
    crate::config::format_duration(Duration::from_secs((ms.max(0) / 1000) as u64))
}

/// Runs every check.
pub fn diagnose(settings: &Settings, users: &[String], query: &mut dyn UnitQuery) -> Vec<Finding> {
    let mut r = Report(Vec::new());
    let files: Vec<String> = settings
        .files
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    r.ok(
        "config",
        format!(
            "{} watch(es) from {}",
            settings.watches.len(),
            files.join(", ")
        ),
    );
    let state = state::load(&settings.agent.state_dir).unwrap_or_else(|e| {
        let (level, fix) = match e {
            state::StateError::Unsafe(_) => (
                Level::Fail,
                Some("make state_dir a directory owned by root with mode 0700 or 0755, holding a regular state.json (or none)"),
            ),
            state::StateError::Corrupt { .. } | state::StateError::Io(_) => (Level::Warn, None),
        };
        r.add("state", level, e.to_string(), fix);
        State::default()
    });
    let mut systemd_ok = true;
    for w in &settings.watches {
        let valid = check_source(&mut r, w, &state);
        check_permissions(&mut r, w);
        check_copies(&mut r, w, valid.as_ref());
        let mut readers: Vec<String> = users.to_vec();
        systemd_ok &= check_units(&mut r, w, query, &mut readers);
        check_readers(&mut r, w, &readers);
    }
    if systemd_ok {
        check_path_units(&mut r, settings, query);
    }
    check_agent(&mut r, &state);
    r.0
}

/// Checks the units of a watch and adds their `User=` to `readers`; false
/// when systemd could not be asked.
fn check_units(
    r: &mut Report,
    w: &WatchSettings,
    query: &mut dyn UnitQuery,
    readers: &mut Vec<String>,
) -> bool {
    let mut asked = true;
    for unit in w.restart.iter().flat_map(|x| &x.units) {
        match query.unit(unit) {
            Err(e) => {
                asked = false;
                r.add(
                    format!("{} unit {unit}", w.name),
                    Level::Warn,
                    format!("cannot ask systemd: {e:#}"),
                    Some("run on the host with systemd, as root"),
                );
            }
            Ok(info) => {
                check_unit(r, w, unit, &info);
                if !info.user.is_empty() && info.user != "root" && !readers.contains(&info.user) {
                    readers.push(info.user.clone());
                }
            }
        }
    }
    asked
}

/// The fix for a source that is absent: only its owner's CLI writes it.
const LOGIN_FIX: &str = "log in again with the CLI as the user that owns it (`claude` then /login)";

fn check_source(r: &mut Report, w: &WatchSettings, state: &State) -> Option<(Secret, Validated)> {
    let check = format!("{} source", w.name);
    let bytes = read_for_check(r, &check, w)?;
    let last = state.watches.get(&w.name).and_then(|rec| rec.applied());
    match validate::validate(w.format, &bytes.0, now_ms(), last.as_ref(), w.policy()) {
        Err(refusal) => {
            r.add(
                check,
                Level::Fail,
                format!("{}: {refusal}", w.source.display()),
                Some(refusal_fix(&refusal)),
            );
            None
        }
        Ok(v) => {
            report_valid(r, check, w, &v);
            Some((bytes, v))
        }
    }
}

/// The source's bytes, read as the agent reads them; `None` once a finding
/// says why they cannot be.
fn read_for_check(r: &mut Report, check: &str, w: &WatchSettings) -> Option<Secret> {
    let (dir_path, name) = w.source_dir_and_name();
    let dir = match fsutil::open_dir(dir_path) {
        Ok(fd) => fd,
        Err(FsError::Missing(p)) => {
            let why = format!(
                "{} is absent ({} does not exist)",
                w.source.display(),
                p.display()
            );
            r.add(check, Level::Fail, why, Some(LOGIN_FIX));
            return None;
        }
        Err(e) => {
            let fix = "use the real path (no symlinks) in the configuration";
            r.add(check, Level::Fail, e.to_string(), Some(fix));
            return None;
        }
    };
    let owner = w.source_owner.as_ref().map(|a| a.id);
    let (level, why, fix) = match read_source(dir.as_fd(), dir_path, name, owner) {
        Ok(ReadOutcome::Ok(file)) => return Some(file.bytes),
        Err(e) => (Level::Fail, e.to_string(), None),
        Ok(ReadOutcome::Absent) => (
            Level::Fail,
            format!("{} is absent", w.source.display()),
            Some(LOGIN_FIX),
        ),
        Ok(ReadOutcome::Busy(why)) => (
            Level::Warn,
            format!("{} {why}", w.source.display()),
            Some("a writer is at work: run doctor again in a moment"),
        ),
        Ok(ReadOutcome::Refused(why)) => (
            Level::Fail,
            format!("{} {why}", w.source.display()),
            Some("remove it and let the CLI write a regular file (cred-watch never follows links)"),
        ),
    };
    r.add(check, level, why, fix);
    None
}

fn refusal_fix(refusal: &Refusal) -> &'static str {
    match refusal {
        Refusal::Expired(_) => {
            "nothing refreshed the token: run the CLI (it refreshes on use) or /login"
        }
        Refusal::Rollback { .. } => {
            "an older file was put back: run /login, or set allow_rollback = true if intended"
        }
        Refusal::TooFarAhead { .. } | Refusal::NotADate(_) => {
            "an implausible expiresAt: run /login, or raise max_lifetime if this is intended"
        }
        _ => "the file is broken: run /login with the CLI to rewrite it",
    }
}

/// The finding for a valid source: its fingerprint, its expiry (a warning
/// inside `expiry_warning`) and the validator's warnings.
fn report_valid(r: &mut Report, check: String, w: &WatchSettings, v: &Validated) {
    let mut msg = format!(
        "{} valid, fingerprint {}",
        w.source.display(),
        v.fingerprint.short()
    );
    let mut level = Level::Ok;
    let mut fix = None;
    if let Some(exp) = v.expires_at {
        let remaining = exp.saturating_sub(now_ms());
        msg.push_str(&format!(
            ", expiresAt {} (in {})",
            fmt_ms(exp),
            left(remaining)
        ));
        if remaining < crate::clock::ms(w.expiry_warning) {
            level = Level::Warn;
            fix = Some("nothing has refreshed it yet: use the CLI once (it refreshes) or /login");
        }
    }
    for warning in &v.warnings {
        msg.push_str(&format!("; {warning}"));
    }
    r.add(check, level, msg, fix);
}

fn check_permissions(r: &mut Report, w: &WatchSettings) {
    let Some(p) = &w.permissions else { return };
    let check = format!("{} permissions", w.name);
    let sync = Some("run `cred-watch sync` (and check that the agent is running)");
    match std::fs::symlink_metadata(&w.source) {
        Ok(m) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = m.permissions().mode() & 0o7777;
            if mode == p.file_mode {
                r.ok(
                    check.clone(),
                    format!("{} mode {mode:04o}", w.source.display()),
                );
            } else {
                r.add(
                    check.clone(),
                    Level::Fail,
                    format!(
                        "{} mode {mode:04o}, expected {:04o}",
                        w.source.display(),
                        p.file_mode
                    ),
                    sync,
                );
            }
        }
        Err(_) => return,
    }
    if p.traverse {
        let (dir, _) = w.source_dir_and_name();
        match fsutil::DirChain::open(dir).and_then(|chain| apply::add_traverse(&chain, true)) {
            Ok(missing) if missing.is_empty() => {
                r.ok(format!("{} traverse", w.name), "every ancestor has g+x,o+x")
            }
            Ok(missing) => r.add(
                format!("{} traverse", w.name),
                Level::Fail,
                format!("search bits missing: {}", missing.join(", ")),
                sync,
            ),
            Err(e) => r.add(
                format!("{} traverse", w.name),
                Level::Fail,
                e.to_string(),
                None,
            ),
        }
    }
}

fn check_copies(r: &mut Report, w: &WatchSettings, valid: Option<&(Secret, Validated)>) {
    for copy in &w.copies {
        let check = format!("{} copy {}", w.name, copy.dest.display());
        let sync = Some("run `cred-watch sync` (and check that the agent is running)");
        let (dir_path, name) = crate::config::split_file(&copy.dest);
        // The same checks the agent makes before it writes there.
        let current = fsutil::open_private_dir(dir_path, None, true)
            .and_then(|d| fsutil::read_entry(d.as_fd(), dir_path, name, crate::source::MAX_SIZE));
        let (st, bytes) = match current {
            Ok(Some(found)) => found,
            Ok(None) | Err(FsError::Missing(_)) => {
                r.add(check, Level::Fail, "missing", sync);
                continue;
            }
            Err(e) => {
                r.add(
                    check,
                    Level::Fail,
                    e.to_string(),
                    Some("cred-watch writes only regular files, in directories that only root can change: fix the path or its owner/mode"),
                );
                continue;
            }
        };
        if let Some((raw, v)) = valid {
            let want = validate::copy_payload(&raw.0, v, copy.shape(w.format));
            if bytes != want.0 {
                r.add(
                    check,
                    Level::Fail,
                    format!("differs from the validated source (fingerprint {})", v.fingerprint.short()),
                    Some("run `cred-watch sync`; if a consumer writes here, stop it: its refresh rotates the single-use refresh token"),
                );
                continue;
            }
        }
        let mode = perm_bits(&st);
        let owner_ok = copy.owner.as_ref().is_none_or(|o| o.id == st.st_uid);
        let group_ok = copy.group.as_ref().is_none_or(|g| g.id == st.st_gid);
        let meta = format!("uid {} gid {} mode {mode:04o}", st.st_uid, st.st_gid);
        if mode != copy.mode || !owner_ok || !group_ok {
            r.add(
                check,
                Level::Fail,
                format!("{meta}, expected {}", describe_meta(copy)),
                sync,
            );
        } else if valid.is_some() {
            r.ok(check, format!("identical to the source, {meta}"));
        } else {
            r.add(
                check,
                Level::Warn,
                format!("present ({meta}), but the source is not valid to compare"),
                None,
            );
        }
    }
}

fn describe_meta(copy: &crate::config::CopySettings) -> String {
    let mut s = Vec::new();
    if let Some(o) = &copy.owner {
        s.push(format!("owner {}", o.name));
    }
    if let Some(g) = &copy.group {
        s.push(format!("group {}", g.name));
    }
    s.push(format!("mode {:04o}", copy.mode));
    s.join(", ")
}

/// The file readers of this watch need: the copies, else the source.
fn reader_targets(w: &WatchSettings) -> Vec<PathBuf> {
    if w.copies.is_empty() {
        vec![w.source.clone()]
    } else {
        w.copies.iter().map(|c| c.dest.clone()).collect()
    }
}

fn check_readers(r: &mut Report, w: &WatchSettings, users: &[String]) {
    for user in users {
        let check = format!("{} reader {user}", w.name);
        let Some(account) = system_user(user) else {
            r.add(check, Level::Fail, format!("no such user {user:?}"), None);
            continue;
        };
        for target in reader_targets(w) {
            match can_read(&account, &target) {
                Ok(()) => r.ok(check.clone(), format!("can open {}", target.display())),
                Err(why) => {
                    let fix = if w.copies.is_empty() {
                        "set [watch.permissions] traverse = true and file_mode = \"0644\", or better copy to a shared place with a group"
                    } else {
                        "give the copy a group the user is in (`group =`, mode 0640) and make its directory searchable"
                    };
                    r.add(
                        check.clone(),
                        Level::Fail,
                        format!("cannot open {}: {why}", target.display()),
                        Some(fix),
                    );
                }
            }
        }
    }
}

/// The passwd entry of a user named as in the configuration (a name or a
/// numeric uid), for its primary group.
fn system_user(name: &str) -> Option<nix::unistd::User> {
    let account = Account::user(name)?;
    nix::unistd::User::from_uid(account.id.into()).ok()?
}

/// Opens `path` for real in a child process running as `user` (its groups
/// included), so modes, groups and ACLs all count.
fn can_read(user: &nix::unistd::User, path: &Path) -> Result<(), String> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    use std::os::unix::ffi::OsStrExt;
    let me = nix::unistd::geteuid();
    if !me.is_root() && me != user.uid {
        return Err("cannot test as another user without root (run doctor as root)".into());
    }
    let name = std::ffi::CString::new(user.name.as_bytes()).map_err(|e| e.to_string())?;
    let groups: Vec<libc::gid_t> = if me.is_root() {
        nix::unistd::getgrouplist(&name, user.gid)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|g| g.as_raw())
            .collect()
    } else {
        Vec::new()
    };
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    // SAFETY: the child only makes raw system calls and _exits.
    match unsafe { fork() }.map_err(|e| e.to_string())? {
        ForkResult::Child => unsafe {
            if me.is_root()
                && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                libc::_exit(100);
            }
            let fd = libc::open(
                cpath.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            );
            libc::_exit(if fd >= 0 {
                0
            } else {
                (*libc::__errno_location()).min(99)
            });
        },
        ForkResult::Parent { child } => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => Ok(()),
            Ok(WaitStatus::Exited(_, 100)) => Err("could not switch to that user".into()),
            Ok(WaitStatus::Exited(_, errno)) => {
                let err = nix::errno::Errno::from_raw(errno);
                Err(match blocking_ancestor(path) {
                    Some(hint) => format!("{err}; {hint}"),
                    None => err.to_string(),
                })
            }
            other => Err(format!("test process ended oddly: {other:?}")),
        },
    }
}

/// A hint: the first ancestor without o+x, the usual culprit (e.g. /root 0700).
fn blocking_ancestor(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    path.ancestors()
        .skip(1)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .find_map(|dir| {
            let mode = std::fs::metadata(dir).ok()?.permissions().mode() & 0o7777;
            (mode & 0o001 == 0)
                .then(|| format!("{} is {mode:04o} (no search bit for others)", dir.display()))
        })
}

fn check_unit(r: &mut Report, w: &WatchSettings, unit: &str, info: &crate::systemd::UnitInfo) {
    let check = format!("{} unit {unit}", w.name);
    if info.load_state != "loaded" {
        r.add(
            check,
            Level::Fail,
            format!("not known to systemd ({})", info.load_state),
            Some("fix [watch.restart] units, or install the unit"),
        );
        return;
    }
    if info.active_state != "active" {
        r.add(
            check.clone(),
            Level::Fail,
            info.active_state.clone(),
            Some(&format!("systemctl start {unit}; journalctl -u {unit}")),
        );
    } else {
        r.ok(check.clone(), "known and active");
    }
    let mut paths: Vec<PathBuf> = vec![w.source.clone()];
    paths.extend(w.copies.iter().map(|c| c.dest.clone()));
    let mut stale = Vec::new();
    for pid in &info.pids {
        for held in deleted_files(*pid) {
            if paths.iter().any(|p| p == &held) {
                stale.push(format!(
                    "PID {pid} ({}) holds the deleted {}",
                    comm(*pid),
                    held.display()
                ));
            }
        }
    }
    let check = format!("{} stale handles {unit}", w.name);
    if stale.is_empty() {
        r.ok(
            check,
            format!("no process of {unit} holds a deleted credentials file"),
        );
    } else {
        r.add(
            check,
            Level::Fail,
            format!("{}: it still uses an old token", stale.join("; ")),
            Some(&format!(
                "systemctl restart {unit} (and let cred-watch restart it on changes)"
            )),
        );
    }
}

fn comm(pid: u32) -> String {
    crate::state::process_name(pid).unwrap_or_else(|| "?".into())
}

/// Files a process holds open that have been deleted (or replaced by rename).
pub fn deleted_files(pid: u32) -> Vec<PathBuf> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            target
                .to_str()
                .and_then(|t| t.strip_suffix(" (deleted)"))
                .map(PathBuf::from)
        })
        .collect()
}

fn check_path_units(r: &mut Report, settings: &Settings, query: &mut dyn UnitQuery) {
    let units = match query.enabled_path_units() {
        Ok(u) => u,
        Err(e) => {
            r.add(
                "path units",
                Level::Warn,
                format!("cannot list .path units: {e:#}"),
                None,
            );
            return;
        }
    };
    let mut found = false;
    for w in &settings.watches {
        let (dir, _) = w.source_dir_and_name();
        for (unit, paths) in &units {
            if paths
                .iter()
                .any(|p| Path::new(p) == w.source || Path::new(p) == dir)
            {
                found = true;
                r.add(
                    format!("{} old path unit", w.name),
                    Level::Warn,
                    format!(
                        "{unit} is still enabled and watches {}: migration not finished",
                        w.source.display()
                    ),
                    Some(&format!("systemctl disable --now {unit} (and its service)")),
                );
            }
        }
    }
    if !found {
        r.ok(
            "path units",
            "no enabled .path unit watches a configured source",
        );
    }
}

fn check_agent(r: &mut Report, state: &State) {
    let running = state.agent.running_pid();
    let last = match (
        state.agent.last_reconcile_ms,
        &state.agent.last_reconcile_result,
    ) {
        (Some(ms), Some(result)) => format!(
            "last reconcile {} ago: {result}",
            left(now_ms().saturating_sub(ms))
        ),
        _ => "no reconcile recorded".into(),
    };
    match running {
        Some(pid) => {
            let healthy = state
                .agent
                .last_reconcile_result
                .as_deref()
                .is_some_and(|r| r.starts_with("ok"));
            let level = if healthy { Level::Ok } else { Level::Warn };
            r.add(
                "agent",
                level,
                format!("running (pid {pid}); {last}"),
                (!healthy).then_some("see the lines above and `journalctl -u cred-watch`"),
            );
        }
        None => r.add(
            "agent",
            Level::Warn,
            format!("not running; {last}"),
            Some("systemctl enable --now cred-watch"),
        ),
    }
    let pending: Vec<&String> = state
        .units
        .iter()
        .filter(|(_, u)| u.pending)
        .map(|(n, _)| n)
        .collect();
    if !pending.is_empty() {
        let names: Vec<&str> = pending.iter().map(|s| s.as_str()).collect();
        r.add(
            "agent restarts",
            Level::Warn,
            format!("restart pending for {}", names.join(", ")),
            Some("see `cred-watch status` for the last result"),
        );
    }
}
