//! `cred-watch doctor`: one line per check (ok / warn / fail) with the
//! reason and the fix, so an operator woken by "Invalid API key · Please
//! run /login" finds the cause with one command.

use crate::apply;
use crate::config::{Account, Settings, WatchSettings};
use crate::fsutil::{self, perm_bits, FsError};
use crate::source::{read_source, ReadOutcome};
use crate::state::{self, now_ms, State};
use crate::systemd::{UnitInfo, UnitQuery};
use crate::validate::{self, fmt_ms, Refusal, Secret, Validated};
use serde::Serialize;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Information, not a problem (e.g. a unit that authenticates another way).
    Info,
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
                Level::Info => "info",
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
        let mut units = Vec::new();
        systemd_ok &= check_units(
            &mut r,
            w,
            query,
            &mut units,
            valid.is_some(),
            state.watches.get(&w.name).and_then(|rec| rec.written_ms),
        );
        check_readers(&mut r, w, users, &units, valid.is_some());
        check_keeper_state(&mut r, w, &state);
    }
    if systemd_ok {
        check_path_units(&mut r, settings, query);
    }
    check_agent(&mut r, &state);
    r.0
}

/// Checks the units of a watch and adds the credentials of each loaded
/// service to `units`; false when systemd could not be asked.
fn check_units(
    r: &mut Report,
    w: &WatchSettings,
    query: &mut dyn UnitQuery,
    units: &mut Vec<UnitIdents>,
    source_valid: bool,
    written_ms: Option<i64>,
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
                check_unit(r, w, unit, &info, source_valid);
                if source_valid {
                    check_in_sync(r, w, unit, &info, written_ms);
                }
                if info.load_state == "loaded" && unit.ends_with(".service") {
                    let found = check_consumer(r, w, unit, &info, Role::Consumer, source_valid);
                    units.extend(found);
                }
            }
        }
    }
    asked & check_refresher(r, w, query, source_valid)
}

/// Restarts follow state: a running unit started before the credential it
/// should use was written holds an older one.
fn check_in_sync(
    r: &mut Report,
    w: &WatchSettings,
    unit: &str,
    info: &crate::systemd::UnitInfo,
    written_ms: Option<i64>,
) {
    let (Some(written), Some(since)) = (written_ms, info.active_since_ms) else {
        return;
    };
    let check = format!("{} in sync {unit}", w.name);
    if since < written {
        r.add(
            check,
            Level::Fail,
            format!(
                "started at {} before the credential it should use was written ({}): it holds an older one",
                fmt_ms(since),
                fmt_ms(written)
            ),
            Some("cred-watch sync (it restarts exactly the units that need it), or let the running agent do it"),
        );
    } else {
        r.ok(
            check,
            format!(
                "started after the credential it should use was written ({})",
                fmt_ms(written)
            ),
        );
    }
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
        v.fingerprint().short()
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
                    format!("differs from the validated source (fingerprint {})", v.fingerprint().short()),
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

/// The credentials tested for one unit (see [`unit_idents`]).
struct UnitIdents {
    unit: String,
    /// `User=`, `Group=`, `SupplementaryGroups=` as systemd sets them.
    configured: Ident,
    idents: Vec<Ident>,
}

/// Each `--user`, then each non-root user a unit's processes run as: can
/// it open the file readers need? Tested with the real credentials of the
/// units' processes under that user, else the group database's.
fn check_readers(
    r: &mut Report,
    w: &WatchSettings,
    users: &[String],
    units: &[UnitIdents],
    source_valid: bool,
) {
    let mut names: Vec<String> = users.to_vec();
    for id in units.iter().flat_map(|u| &u.idents) {
        if id.uid != 0 && !names.contains(&id.name) {
            names.push(id.name.clone());
        }
    }
    for name in &names {
        check_reader(r, w, name, units, source_valid);
    }
    if users.is_empty() {
        hint_root_units(r, w, units);
    }
}

fn check_reader(
    r: &mut Report,
    w: &WatchSettings,
    name: &str,
    units: &[UnitIdents],
    source_valid: bool,
) {
    let check = format!("{} reader {name}", w.name);
    let Some(account) = system_user(name) else {
        r.add(check, Level::Fail, format!("no such user {name:?}"), None);
        return;
    };
    let uid = account.uid.as_raw();
    let mut tested: Vec<(Option<&UnitIdents>, Ident)> = units
        .iter()
        .flat_map(|u| u.idents.iter().map(move |i| (Some(u), i)))
        .filter(|(_, i)| i.uid == uid)
        .map(|(u, i)| (u, i.clone()))
        .collect();
    if tested.is_empty() {
        match database_ident(&account) {
            Ok(id) => tested.push((None, id)),
            Err(why) => return r.add(check, Level::Fail, why, None),
        }
    }
    for target in reader_targets(w) {
        let mut fine = Vec::new();
        for (unit, id) in &tested {
            let t = Target {
                w,
                path: &target,
                source_valid,
                unit: unit.map(|u| u.unit.as_str()),
                configured: unit.map(|u| &u.configured),
                main: unit.and_then(|u| running_main(&u.idents)),
            };
            match can_read(id, &t) {
                Ok(()) => fine.push(id.who.as_str()),
                Err((why, fix)) => r.add(
                    check.clone(),
                    Level::Fail,
                    format!("{} cannot open {}: {why}", id.who, target.display()),
                    Some(&fix),
                ),
            }
        }
        if fine.len() == tested.len() {
            let msg = format!("{} can open {}", fine.join(", "), target.display());
            r.ok(check.clone(), msg);
        }
    }
}

/// Plain `doctor`: a unit all of whose processes run as root has no reader
/// to test; its workers may drop privileges once they run.
fn hint_root_units(r: &mut Report, w: &WatchSettings, units: &[UnitIdents]) {
    for u in units.iter().filter(|u| u.idents.iter().all(|i| i.uid == 0)) {
        let who: Vec<&str> = u.idents.iter().map(|i| i.who.as_str()).collect();
        r.add(
            format!("{} reader", w.name),
            Level::Info,
            format!(
                "{}: {} runs as root, which opens anything, so no reader is tested for it",
                u.unit,
                who.join(", ")
            ),
            Some(&format!(
                "if its workers drop privileges to another user, run `cred-watch doctor --user <worker user>`, or run doctor while {} runs its workers: it tests each process's real groups",
                u.unit
            )),
        );
    }
}

/// The passwd entry of a user named as in the configuration (a name or a
/// numeric uid), for its primary group.
fn system_user(name: &str) -> Option<nix::unistd::User> {
    let account = Account::user(name)?;
    nix::unistd::User::from_uid(account.id.into()).ok()?
}

/// Where a set of credentials comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// `User=`, `Group=`, `SupplementaryGroups=`: the unit's next start.
    Configured,
    /// The unit's running main process (`/proc/MAINPID/status`).
    Main,
    /// Another process of the unit under another uid (a worker that
    /// dropped privileges), from `/proc/PID/status`.
    Worker,
    /// `--user NAME` when no process of the units runs as NAME: the group
    /// database, as a new login (initgroups) gets it.
    Database,
}

/// The credentials the kernel checks for a process (or will).
#[derive(Debug, Clone)]
struct Ident {
    /// "User=bot", "root (no User=)", "PID 123 (worker, uid 1001)", …
    who: String,
    /// The user's name (its uid when it has none).
    name: String,
    uid: u32,
    gid: u32,
    /// The supplementary groups, exactly as the process has them.
    groups: Vec<u32>,
    pid: Option<u32>,
    origin: Origin,
}

impl Ident {
    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    fn same_creds(&self, other: &Ident) -> bool {
        let sorted = |g: &[u32]| {
            let mut g = g.to_vec();
            g.sort_unstable();
            g.dedup();
            g
        };
        (self.uid, self.gid) == (other.uid, other.gid)
            && sorted(&self.groups) == sorted(&other.groups)
    }
}

fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(uid.into()) {
        Ok(Some(u)) => u.name,
        _ => uid.to_string(),
    }
}

fn group_name(gid: u32) -> String {
    match nix::unistd::Group::from_gid(gid.into()) {
        Ok(Some(g)) => g.name,
        _ => gid.to_string(),
    }
}

/// The effective uid and gid and the supplementary groups of a running
/// process, from the `Uid:`, `Gid:` and `Groups:` lines of its status.
fn proc_creds(pid: u32) -> Option<(u32, u32, Vec<u32>)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::split_whitespace)
    };
    let uid = field("Uid:")?.nth(1)?.parse().ok()?;
    let gid = field("Gid:")?.nth(1)?.parse().ok()?;
    let groups = field("Groups:")?.filter_map(|g| g.parse().ok()).collect();
    Some((uid, gid, groups))
}

fn process_ident(pid: u32, origin: Origin) -> Option<Ident> {
    let (uid, gid, groups) = proc_creds(pid)?;
    Some(Ident {
        who: format!("PID {pid} ({}, uid {uid})", comm(pid)),
        name: user_name(uid),
        uid,
        gid,
        groups,
        pid: Some(pid),
        origin,
    })
}

/// The groups the group database gives `name` with primary group `gid`
/// (what initgroups sets, `gid` included).
fn database_groups(name: &str, gid: u32) -> Result<Vec<u32>, String> {
    let name = std::ffi::CString::new(name.as_bytes()).map_err(|e| e.to_string())?;
    Ok(nix::unistd::getgrouplist(&name, gid.into())
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|g| g.as_raw())
        .collect())
}

fn database_ident(user: &nix::unistd::User) -> Result<Ident, String> {
    let gid = user.gid.as_raw();
    Ok(Ident {
        who: format!(
            "{} (no process of the units runs as it: its groups from the group database)",
            user.name
        ),
        name: user.name.clone(),
        uid: user.uid.as_raw(),
        gid,
        groups: database_groups(&user.name, gid)?,
        pid: None,
        origin: Origin::Database,
    })
}

/// What systemd gives the unit's main process at its next start: `User=`
/// (root when unset), `Group=` (else the user's primary group), the
/// user's groups from the database (systemd's initgroups, for a non-root
/// user and group), then `SupplementaryGroups=`.
fn configured_ident(info: &UnitInfo) -> Result<(nix::unistd::User, Ident), String> {
    let name = if info.user.is_empty() {
        "root"
    } else {
        &info.user
    };
    let user = system_user(name).ok_or_else(|| format!("User={name} is not a known user"))?;
    let gid = match info.group.as_str() {
        "" => user.gid.as_raw(),
        group => {
            Account::group(group)
                .ok_or_else(|| format!("Group={group} is not a known group"))?
                .id
        }
    };
    let mut groups = if user.uid.is_root() || gid == 0 {
        Vec::new()
    } else {
        database_groups(&user.name, gid)?
    };
    for g in &info.supplementary_groups {
        let id = Account::group(g)
            .ok_or_else(|| format!("SupplementaryGroups={g} is not a known group"))?
            .id;
        if !groups.contains(&id) {
            groups.push(id);
        }
    }
    let who = match info.user.as_str() {
        "" => "root (no User=)".to_string(),
        name => format!("User={name}"),
    };
    let ident = Ident {
        who,
        name: user.name.clone(),
        uid: user.uid.as_raw(),
        gid,
        groups,
        pid: None,
        origin: Origin::Configured,
    };
    Ok((user, ident))
}

/// The credentials to test for a unit: while it runs, its main process's
/// and those of each of its processes under another uid (workers that drop
/// privileges), read from `/proc`; else what systemd will give it.
fn unit_idents(info: &UnitInfo, configured: &Ident) -> Vec<Ident> {
    let main = (info.main_pid != 0)
        .then(|| process_ident(info.main_pid, Origin::Main))
        .flatten();
    let Some(mut main) = main else {
        return vec![configured.clone()];
    };
    if main.same_creds(configured) {
        // It has exactly what systemd gives the unit: named as configured.
        main.who.clone_from(&configured.who);
    }
    let mut out = vec![main];
    for pid in &info.pids {
        let Some(p) = process_ident(*pid, Origin::Worker) else {
            continue;
        };
        if p.uid != out[0].uid && !out.iter().any(|o| o.same_creds(&p)) {
            out.push(p);
        }
    }
    out
}

/// What [`probe_as`] tries.
#[derive(Clone, Copy)]
enum Probe {
    /// open(O_RDONLY), as the CLI reads its credentials.
    Open,
    /// access(W_OK|X_OK) on a directory: could the user create entries
    /// there (the CLI's `mkdir .oauth_refresh.lock`)? Creates nothing.
    CreateEntries,
}

/// A file a reader needs, and what the fixes need to know about it.
struct Target<'a> {
    w: &'a WatchSettings,
    path: &'a Path,
    source_valid: bool,
    /// The unit whose process is tested (for the restart in a fix).
    unit: Option<&'a str>,
    /// That unit's configured credentials: a group they have and the
    /// running process lacks arrives with a restart.
    configured: Option<&'a Ident>,
    /// That unit's running main process, when it runs: what its workers
    /// can inherit now.
    main: Option<&'a Ident>,
}

/// Opens the target for real in a child process with `id`'s credentials;
/// on failure, why (naming the mode, directory or group that blocks it)
/// and the fix for that cause.
fn can_read(id: &Ident, t: &Target) -> Result<(), (String, String)> {
    match probe_as(id, t.path, Probe::Open) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(errno)) => Err(explain(id, t, errno)),
        Err(why) => Err((why, "run doctor as root".into())),
    }
}

/// Runs `probe` on `path` in a child process with exactly `id`'s
/// credentials (setgroups to its groups, not initgroups; setgid; setuid),
/// so modes, groups, ACLs, immutable files and read-only mounts all count.
/// `Err`: could not test; `Ok(Err(errno))`: the system call failed.
fn probe_as(
    id: &Ident,
    path: &Path,
    probe: Probe,
) -> Result<Result<(), nix::errno::Errno>, String> {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    use std::os::unix::ffi::OsStrExt;
    let me = nix::unistd::geteuid();
    if !me.is_root() && me.as_raw() != id.uid {
        return Err("cannot test as another user without root (run doctor as root)".into());
    }
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let groups: Vec<libc::gid_t> = id.groups.clone();
    // SAFETY: the child only makes raw system calls and _exits.
    match unsafe { fork() }.map_err(|e| e.to_string())? {
        ForkResult::Child => unsafe {
            if me.is_root()
                && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(id.gid) != 0
                    || libc::setuid(id.uid) != 0)
            {
                libc::_exit(100);
            }
            let done = match probe {
                Probe::Open => {
                    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC;
                    libc::open(cpath.as_ptr(), flags) >= 0
                }
                Probe::CreateEntries => libc::access(cpath.as_ptr(), libc::W_OK | libc::X_OK) == 0,
            };
            libc::_exit(if done {
                0
            } else {
                (*libc::__errno_location()).clamp(1, 99)
            });
        },
        ForkResult::Parent { child } => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => Ok(Ok(())),
            Ok(WaitStatus::Exited(_, 100)) => Err("could not switch to those credentials".into()),
            Ok(WaitStatus::Exited(_, errno)) => Ok(Err(nix::errno::Errno::from_raw(errno))),
            other => Err(format!("test process ended oddly: {other:?}")),
        },
    }
}

/// What keeps a process from opening a file, as the modes say.
#[derive(Debug, PartialEq, Eq)]
enum Block {
    /// This path on the way does not exist.
    Missing(PathBuf),
    /// A directory on the way without the search bit for the process
    /// (its mode and owner as "0700 root:root").
    Dir(PathBuf, String),
    /// The file is readable by its group (given), which the process lacks.
    NotInGroup(String, u32),
    /// The file's mode gives the process's class no read permission.
    Mode(String),
    /// The modes allow it: an ACL, a mount or a security module refuses.
    Other,
}

/// "0640 root:claude-credentials".
fn describe_stat(m: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{:04o} {}:{}",
        m.mode() & 0o7777,
        user_name(m.uid()),
        group_name(m.gid())
    )
}

/// The permission bits (rwx) that apply to `id` on a file.
fn class_bits(id: &Ident, m: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::MetadataExt;
    let mode = m.mode();
    if m.uid() == id.uid {
        (mode >> 6) & 7
    } else if id.in_group(m.gid()) {
        (mode >> 3) & 7
    } else {
        mode & 7
    }
}

/// Which part blocks `id` from opening `path`: each directory on the way
/// (search bit), then the file (read bit, through owner, group or others).
fn blocker(id: &Ident, path: &Path) -> Block {
    use std::os::unix::fs::MetadataExt;
    let dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    for dir in dirs.into_iter().rev() {
        let Ok(m) = std::fs::metadata(dir) else {
            return Block::Missing(dir.to_path_buf());
        };
        if id.uid != 0 && class_bits(id, &m) & 1 == 0 {
            return Block::Dir(dir.to_path_buf(), describe_stat(&m));
        }
    }
    let Ok(m) = std::fs::metadata(path) else {
        return Block::Missing(path.to_path_buf());
    };
    if id.uid == 0 || class_bits(id, &m) & 4 != 0 {
        Block::Other
    } else if m.uid() != id.uid && !id.in_group(m.gid()) && m.mode() & 0o040 != 0 {
        Block::NotInGroup(describe_stat(&m), m.gid())
    } else {
        Block::Mode(describe_stat(&m))
    }
}

/// The fix whenever the source itself is absent or refused: loosening
/// modes or search bits for it helps nobody.
const SOURCE_FIRST: &str =
    "fix the source first (see its line above); nothing else helps while it is absent or refused";

/// Why `id` cannot open the target, and the fix for that cause.
fn explain(id: &Ident, t: &Target, errno: nix::errno::Errno) -> (String, String) {
    let kind = file_kind(t.w, t.path);
    let subject = match kind {
        Some("the source") => "the source",
        Some(_) => "the copy",
        None => "the file",
    };
    let source_first = !t.source_valid && kind == Some("the source");
    let (why, fix) = match blocker(id, t.path) {
        Block::Missing(p) => {
            let fix = if t.source_valid && kind == Some("a copy") {
                "run `cred-watch sync` (and check that the agent is running)"
            } else {
                SOURCE_FIRST
            };
            (format!("{} does not exist", p.display()), fix.to_string())
        }
        Block::Dir(dir, meta) => (
            format!(
                "{} is {meta} and {} has no search bit there",
                dir.display(),
                id.who
            ),
            dir_fix(t, kind, &dir),
        ),
        Block::NotInGroup(meta, gid) => {
            let (cause, fix) = group_cause(id, t, gid);
            let why = format!(
                "{subject} is {meta} and {} is not in group {} (its groups: {}): {cause}",
                id.who,
                group_name(gid),
                group_list(id)
            );
            (why, fix)
        }
        Block::Mode(meta) => (
            format!("{subject} is {meta}: no read permission for {}", id.who),
            mode_fix(t, kind),
        ),
        Block::Other => (
            "the modes and groups allow it, so an ACL, a read-only mount or a security module (AppArmor, SELinux) refuses it".into(),
            format!("see `getfacl {}` and the audit log", t.path.display()),
        ),
    };
    let fix = if source_first {
        SOURCE_FIRST.into()
    } else {
        fix
    };
    (format!("{errno}: {why}"), fix)
}

fn group_list(id: &Ident) -> String {
    let mut all = vec![id.gid];
    all.extend(id.groups.iter().filter(|g| **g != id.gid));
    let names: Vec<String> = all.into_iter().map(group_name).collect();
    names.join(", ")
}

/// The fix for a directory on the way without the search bit.
fn dir_fix(t: &Target, kind: Option<&str>, dir: &Path) -> String {
    match (kind, &t.w.permissions) {
        (Some("the source"), Some(p)) if p.traverse => {
            "run `cred-watch sync` (traverse = true adds the search bits; check that the agent is running)".into()
        }
        (Some("the source"), _) => "set [watch.permissions] traverse = true (search bits only), or better copy to a shared place with a group".into(),
        _ => format!(
            "chmod o+x {} (every directory on the way must be searchable; cred-watch creates the copy's own directory root-owned 0755)",
            dir.display()
        ),
    }
}

/// The fix for a file whose mode gives the process no read permission.
fn mode_fix(t: &Target, kind: Option<&str>) -> String {
    match kind {
        Some("a copy") => format!(
            "set mode = \"0640\" and group = \"{}\" in [[watch.copy]], with the readers in that group",
            copy_group(t.w)
        ),
        Some(_) => "set [watch.permissions] file_mode = \"0644\", or better copy to a shared place with a group".into(),
        None => "read this watch's source or copy instead".into(),
    }
}

/// Why a process lacks a group the file needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GroupCause {
    /// It got its groups at its start, before the group was given.
    StartedBefore,
    /// It switched users without initgroups: it keeps inherited groups.
    NoInitgroups,
    /// The user is not in the group at all.
    NotMember,
}

/// `dropped`: the process switched to its uid itself (a worker);
/// `initgroups`: its groups look like the database's at some point (its
/// own gid among them); `now_has`: the database or the unit's
/// configuration gives that group now.
fn classify(running: bool, dropped: bool, initgroups: bool, now_has: bool) -> GroupCause {
    if dropped && !initgroups {
        GroupCause::NoInitgroups
    } else if running && now_has {
        GroupCause::StartedBefore
    } else {
        GroupCause::NotMember
    }
}

/// The cause, and the fix, of `id` lacking group `gid`.
fn group_cause(id: &Ident, t: &Target, gid: u32) -> (String, String) {
    let group = group_name(gid);
    let unit = t.unit.unwrap_or("the services that run as that user");
    let restart = format!("systemctl restart {unit}");
    if gid == 0 {
        let fix = format!(
            "give {} a group for its readers: group = \"{}\" and mode = \"0640\" in [[watch.copy]]; then usermod -aG {} {} and {restart}",
            t.path.display(),
            copy_group(t.w),
            copy_group(t.w),
            id.name
        );
        return ("it has no group for readers".into(), fix);
    }
    let db_has = database_groups(&id.name, id.gid).is_ok_and(|g| g.contains(&gid));
    let configured = t.configured.filter(|c| c.uid == id.uid);
    let supplementary = configured.is_some_and(|c| c.in_group(gid)) && !db_has;
    let dropped = match id.origin {
        Origin::Worker => true,
        Origin::Main => t.configured.is_some_and(|c| c.uid != id.uid),
        _ => false,
    };
    let initgroups = id.groups.contains(&id.gid);
    match classify(
        id.pid.is_some(),
        dropped,
        initgroups,
        db_has || supplementary,
    ) {
        GroupCause::StartedBefore if supplementary => (
            format!("it was started before SupplementaryGroups={group} was set"),
            restart,
        ),
        GroupCause::StartedBefore => (
            format!("it was started before `usermod -aG {group} {}`", id.name),
            restart,
        ),
        GroupCause::NoInitgroups => no_initgroups(id, t, gid, unit, &restart),
        GroupCause::NotMember => (
            format!("{} is not a member of {group}", id.name),
            format!("usermod -aG {group} {}, then {restart}", id.name),
        ),
    }
}

/// A process that dropped privileges without initgroups. Workers that keep
/// the groups they inherit get the unit's `SupplementaryGroups=`; workers
/// that clear them (setgroups to none, e.g. `setpriv --clear-groups`) get
/// no supplementary group at all, whatever the unit says: when the unit
/// already gives the group and the process still lacks it, only the
/// copy's group (their primary group) or initgroups reaches them.
fn no_initgroups(id: &Ident, t: &Target, gid: u32, unit: &str, restart: &str) -> (String, String) {
    let group = group_name(gid);
    let primary = group_name(id.gid);
    let primary_fix = format!(
        "group = \"{primary}\" in the [[watch.copy]] for {} (every worker user must have that primary group), then cred-watch check >/dev/null && systemctl reload cred-watch && {restart}",
        t.path.display()
    );
    let master_has = t.main.is_some_and(|m| m.in_group(gid));
    let unit_gives = t.configured.is_some_and(|c| c.in_group(gid));
    if master_has && id.groups.is_empty() {
        // The process that started it has the group, it has none at all.
        return (
            format!("{unit} starts its workers with no supplementary group at all (setgroups to none, e.g. setpriv --clear-groups), so the group {group} of its main process does not reach them"),
            format!("give the copy their primary group: {primary_fix}; or have {unit} start them with initgroups (setpriv --init-groups, runuser -u) after usermod -aG {group} {}", id.name),
        );
    }
    if unit_gives && !master_has && t.main.is_some() {
        return (
            format!("{unit} was started before it was given the group {group}, so its main process and its workers do not have it yet"),
            restart.to_string(),
        );
    }
    (
        format!("{unit} drops privileges without initgroups, so its workers keep only the groups they inherit"),
        format!("add SupplementaryGroups={group} to {unit} (systemctl edit {unit}: [Service] SupplementaryGroups={group}), then {restart}; if its workers clear their groups (setpriv --clear-groups), that does not reach them: set {primary_fix}"),
    )
}

/// The unit's running main process among the credentials tested.
fn running_main(idents: &[Ident]) -> Option<&Ident> {
    idents.first().filter(|i| i.origin == Origin::Main)
}

/// `source_valid`: the source is present and valid now. Without it, a
/// process holding a deleted file holds the last good token: restarting it
/// would make it read a missing or refused file.
fn check_unit(
    r: &mut Report,
    w: &WatchSettings,
    unit: &str,
    info: &crate::systemd::UnitInfo,
    source_valid: bool,
) {
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
    check_stale_handles(r, w, unit, info, source_valid);
}

/// Processes of `unit` that hold a deleted (replaced) credentials file.
fn check_stale_handles(
    r: &mut Report,
    w: &WatchSettings,
    unit: &str,
    info: &crate::systemd::UnitInfo,
    source_valid: bool,
) {
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
    } else if !source_valid {
        r.add(
            check,
            Level::Warn,
            format!(
                "{}: the workers hold the last good token, and the source is not valid now",
                stale.join("; ")
            ),
            Some(&format!(
                "do not restart {unit} until a valid file is back (fix the source first: see its line above)"
            )),
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

/// What the agent recorded about `[watch.refresh]` and the alert unit.
fn check_keeper_state(r: &mut Report, w: &WatchSettings, state: &State) {
    let rec = state.watches.get(&w.name).cloned().unwrap_or_default();
    if let Some(refresh) = &w.refresh {
        let check = format!("{} refresh {}", w.name, refresh.unit);
        let done = rec.refresh.clone().unwrap_or_default();
        match &done.last_error {
            Some(e) => r.add(
                check,
                Level::Fail,
                format!("failed {} time(s) in a row: {e}", done.failures),
                Some(&format!(
                    "journalctl -u {0}; try it by hand: systemctl start {0}; then cred-watch status",
                    refresh.unit
                )),
            ),
            None => r.ok(
                check,
                format!("{} refresh(es) so far, none failing", done.refreshes),
            ),
        }
    }
    if let Some(why) = &rec.alerted {
        r.add(
            format!("{} alert", w.name),
            Level::Warn,
            format!("an alert was raised: {why}"),
            Some("see the lines above; it clears once the watch is healthy"),
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

/// What a unit is to a watch: it reads a copy (a consumer), or it runs the
/// source's own CLI, the only one that may refresh (`[watch.refresh]`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Consumer,
    Refresher,
}

/// A unit's environment as systemd builds it: name → (value, where it is
/// set). Values are only compared, never printed.
type UnitEnv = std::collections::BTreeMap<String, (String, String)>;

/// The credentials a unit's CLI reads, and as whom.
struct Consumer<'a> {
    w: &'a WatchSettings,
    unit: &'a str,
    check: String,
    /// The account of `User=` (root when unset): its name and home.
    user: nix::unistd::User,
    /// `User=`, `Group=`, `SupplementaryGroups=` as systemd sets them.
    configured: Ident,
    /// What is tested: the running processes' real credentials, else
    /// `configured` (see [`unit_idents`]).
    idents: Vec<Ident>,
    path: PathBuf,
    /// Which variable chose the path, and where it is set.
    via: String,
    source_valid: bool,
}

impl Consumer<'_> {
    fn target(&self) -> Target<'_> {
        Target {
            w: self.w,
            path: &self.path,
            source_valid: self.source_valid,
            unit: Some(self.unit),
            configured: Some(&self.configured),
            main: running_main(&self.idents),
        }
    }
}

/// The credentials file name the CLI reads in its directory.
const CREDENTIALS_NAME: &str = ".credentials.json";
/// Where the README's topology puts the consumers' copy.
const SHARED_DIR: &str = "/var/lib/claude-credentials";

/// The refresh unit: it must read the source itself.
fn check_refresher(
    r: &mut Report,
    w: &WatchSettings,
    query: &mut dyn UnitQuery,
    source_valid: bool,
) -> bool {
    let Some(unit) = w.refresh.as_ref().map(|x| &x.unit) else {
        return true;
    };
    let check = format!("{} refresher {unit}", w.name);
    match query.unit(unit) {
        Err(e) => {
            let fix = Some("run on the host with systemd, as root");
            r.add(
                check,
                Level::Warn,
                format!("cannot ask systemd: {e:#}"),
                fix,
            );
            false
        }
        Ok(info) if info.load_state != "loaded" => {
            r.add(
                check,
                Level::Fail,
                format!("not known to systemd ({})", info.load_state),
                Some("install the refresh unit (see /usr/share/doc/cred-watch/examples/), or fix [watch.refresh] unit"),
            );
            true
        }
        Ok(info) => {
            if unit.ends_with(".service") {
                check_consumer(r, w, unit, &info, Role::Refresher, source_valid);
            }
            true
        }
    }
}

/// Resolves the credentials file the unit's CLI reads, and reports what the
/// unit's processes can do with it (their real credentials); then its
/// environment tokens. Returns the credentials tested, for the readers.
fn check_consumer(
    r: &mut Report,
    w: &WatchSettings,
    unit: &str,
    info: &UnitInfo,
    role: Role,
    source_valid: bool,
) -> Option<UnitIdents> {
    let check = match role {
        Role::Consumer => format!("{} consumer {unit}", w.name),
        Role::Refresher => format!("{} refresher {unit}", w.name),
    };
    let env = unit_env(r, &check, info);
    let found = match configured_ident(info) {
        Err(why) => {
            let fix =
                format!("fix User=/Group=/SupplementaryGroups= of {unit} (systemctl edit {unit})");
            r.add(check.clone(), Level::Fail, why, Some(&fix));
            None
        }
        Ok((user, configured)) => {
            let (path, via) = credentials_path(&env, &user.dir);
            let idents = unit_idents(info, &configured);
            let c = Consumer {
                w,
                unit,
                check: check.clone(),
                user,
                configured,
                idents,
                path,
                via,
                source_valid,
            };
            match role {
                Role::Consumer => consumer_file(r, &c),
                Role::Refresher => refresher_file(r, &c),
            }
            Some(UnitIdents {
                unit: unit.to_string(),
                configured: c.configured,
                idents: c.idents,
            })
        }
    };
    check_env_tokens(r, &check, &env);
    found
}

/// `Environment=`, then each `EnvironmentFile=` in order (later assignments
/// win), as systemd passes them to the unit's processes.
fn unit_env(r: &mut Report, check: &str, info: &UnitInfo) -> UnitEnv {
    let mut env = UnitEnv::new();
    for entry in &info.environment {
        if let Some((name, value)) = entry.split_once('=') {
            env.insert(name.into(), (value.into(), "Environment=".into()));
        }
    }
    for (path, ignore_errors) in &info.environment_files {
        match std::fs::read(path) {
            Ok(bytes) => {
                for (name, value) in parse_env_file(&String::from_utf8_lossy(&bytes)) {
                    env.insert(name, (value, format!("EnvironmentFile={path}")));
                }
            }
            Err(_) if *ignore_errors => {}
            Err(e) => r.add(
                check,
                Level::Fail,
                format!("EnvironmentFile={path}: {e}: systemd will not start the unit"),
                Some("create the file, or write EnvironmentFile=-PATH if it is optional"),
            ),
        }
    }
    env
}

/// The CLI's choice: `CLAUDE_SECURESTORAGE_CONFIG_DIR` (non-empty), else
/// `CLAUDE_CONFIG_DIR`, else `$HOME/.claude` (the passwd home when the unit
/// sets no HOME), then `.credentials.json`. Returns the path and the reason.
fn credentials_path(env: &UnitEnv, home: &Path) -> (PathBuf, String) {
    let set = |name: &str| {
        env.get(name)
            .filter(|(value, _)| !value.is_empty())
            .map(|(value, origin)| (PathBuf::from(value), format!("{name} from {origin}")))
    };
    let (dir, via) = set("CLAUDE_SECURESTORAGE_CONFIG_DIR")
        .or_else(|| set("CLAUDE_CONFIG_DIR"))
        .or_else(|| set("HOME").map(|(home, via)| (home.join(".claude"), via)))
        .unwrap_or_else(|| (home.join(".claude"), "the user's home".into()));
    (dir.join(CREDENTIALS_NAME), via)
}

/// "the source", "a copy", or `None` when the file is neither.
fn file_kind(w: &WatchSettings, path: &Path) -> Option<&'static str> {
    if path == w.source {
        Some("the source")
    } else if w.copies.iter().any(|c| c.dest == path) {
        Some("a copy")
    } else {
        None
    }
}

/// The credentials that stand for the unit's CLI: a root main process
/// with workers under other users is left out (with an info line), since
/// its workers run the CLI.
fn consumer_idents<'c>(r: &mut Report, c: &'c Consumer) -> Vec<&'c Ident> {
    let (root, others): (Vec<&Ident>, Vec<&Ident>) = c.idents.iter().partition(|i| i.uid == 0);
    if others.is_empty() || root.is_empty() {
        return c.idents.iter().collect();
    }
    for main in root {
        let workers: Vec<&str> = others.iter().map(|i| i.who.as_str()).collect();
        r.add(
            c.check.clone(),
            Level::Info,
            format!(
                "the main process (PID {}) runs as root: tested its processes under other users instead ({}), which run the CLI",
                main.pid.unwrap_or_default(),
                workers.join(", ")
            ),
            Some(&format!("if root itself runs the CLI, it can refresh and rotate the token: run {} as its own User=", c.unit)),
        );
    }
    others
}

/// A consumer must read this watch's source or copy, and must not be able
/// to create entries next to it (it would refresh and rotate the token).
fn consumer_file(r: &mut Report, c: &Consumer) {
    let kind = file_kind(c.w, &c.path);
    let (dir, _) = crate::config::split_file(&c.path);
    let tested = consumer_idents(r, c);
    let mut fine = true;
    for id in &tested {
        if let Err((why, fix)) = can_read(id, &c.target()) {
            fine = false;
            let mut msg = format!(
                "{} cannot read {} ({}): {why}; its CLI says \"Not logged in\"",
                id.who,
                c.path.display(),
                c.via
            );
            let fix = if kind.is_none() {
                msg.push_str("; that file is neither this watch's source nor a copy");
                topology_fix(c)
            } else {
                fix
            };
            r.add(c.check.clone(), Level::Fail, msg, Some(&fix));
        }
        fine &= cannot_create_entries(r, c, id, dir);
    }
    let who: Vec<&str> = tested.iter().map(|i| i.who.as_str()).collect();
    let who = who.join(" and ");
    match kind {
        None if fine => r.add(
            c.check.clone(),
            Level::Warn,
            format!(
                "{who} reads {} ({}), which is neither this watch's source nor a copy: cred-watch does not keep it fresh",
                c.path.display(),
                c.via
            ),
            Some(&topology_fix(c)),
        ),
        Some(kind) if fine => r.ok(
            c.check.clone(),
            format!(
                "{who} reads {kind} {} ({}) and cannot create entries in {}",
                c.path.display(),
                c.via,
                dir.display()
            ),
        ),
        _ => {}
    }
}

/// False (with a finding) when `id` could create entries in `dir`, where
/// its CLI takes the refresh lock, or when that cannot be tested.
fn cannot_create_entries(r: &mut Report, c: &Consumer, id: &Ident, dir: &Path) -> bool {
    match probe_as(id, dir, Probe::CreateEntries) {
        Ok(Err(_)) => return true,
        Ok(Ok(())) => {
            let msg = format!(
                "{} can create entries in {} (its CLI's mkdir .oauth_refresh.lock succeeds): it can refresh and rotate the single-use refresh token, and every other copy then dies",
                id.who,
                dir.display()
            );
            r.add(c.check.clone(), Level::Fail, msg, Some(&topology_fix(c)));
        }
        Err(why) => {
            let msg = format!(
                "cannot test whether {} can create entries in {}: {why}",
                id.who,
                dir.display()
            );
            r.add(c.check.clone(), Level::Warn, msg, None);
        }
    }
    false
}

/// The refresh unit's CLI must read (and may refresh) the source itself.
fn refresher_file(r: &mut Report, c: &Consumer) {
    let source_dir = crate::config::split_file(&c.w.source)
        .0
        .display()
        .to_string();
    let owner = std::fs::metadata(&c.w.source)
        .ok()
        .and_then(|m| {
            use std::os::unix::fs::MetadataExt;
            nix::unistd::User::from_uid(m.uid().into()).ok()?
        })
        .map_or("the source's owner".to_string(), |u| u.name);
    let mut fix = format!(
        "run {} as User={owner} without CLAUDE_CONFIG_DIR or CLAUDE_SECURESTORAGE_CONFIG_DIR, or set CLAUDE_SECURESTORAGE_CONFIG_DIR={source_dir} on it",
        c.unit
    );
    let path = c.path.display();
    let unreadable = c
        .idents
        .iter()
        .find_map(|id| can_read(id, &c.target()).err().map(|e| (id, e)));
    let (level, msg) = if c.path != c.w.source {
        let msg = format!(
            "the refresh unit's CLI does not read the source: {} reads {path} ({}), not {}",
            c.configured.who,
            c.via,
            c.w.source.display()
        );
        (Level::Fail, msg)
    } else if let Some((id, (why, cause_fix))) = unreadable {
        fix = cause_fix;
        let msg = format!(
            "{} cannot read the source {path} ({}): {why}",
            id.who, c.via
        );
        (Level::Fail, msg)
    } else {
        let msg = format!("{} reads the source {path} ({})", c.configured.who, c.via);
        return r.ok(c.check.clone(), msg);
    };
    r.add(c.check.clone(), level, msg, Some(&fix));
}

/// The directory of this watch's first copy that the CLI can find there.
fn shared_dir(w: &WatchSettings) -> Option<PathBuf> {
    w.copies
        .iter()
        .map(|c| crate::config::split_file(&c.dest))
        .find(|(_, name)| *name == CREDENTIALS_NAME)
        .map(|(dir, _)| dir.to_path_buf())
}

/// The group of this watch's copies, for the fixes.
fn copy_group(w: &WatchSettings) -> String {
    w.copies
        .iter()
        .find_map(|c| c.group.as_ref())
        .map_or("GROUP".to_string(), |g| g.name.clone())
}

/// The supported topology, as a fix for one unit.
fn topology_fix(c: &Consumer) -> String {
    let (group, unit) = (copy_group(c.w), c.unit);
    let (first, user) = if c.user.uid.is_root() {
        (
            format!("run {unit} as its own User= (root can create entries anywhere); "),
            "that user".to_string(),
        )
    } else {
        (String::new(), c.user.name.clone())
    };
    let set = |dir: &str| {
        format!("set Environment=CLAUDE_SECURESTORAGE_CONFIG_DIR={dir} on {unit} (systemctl edit {unit})")
    };
    match shared_dir(c.w) {
        Some(dir) => format!(
            "{first}{} to read this watch's copy; keep {} root-owned 0755 and the copy 0640 root:{group}, with {user} in {group}",
            set(&dir.display().to_string()),
            dir.display()
        ),
        None => format!(
            "{first}add a [[watch.copy]] dest = \"{SHARED_DIR}/{CREDENTIALS_NAME}\", mode = \"0640\", group = \"{group}\"; {}; keep {SHARED_DIR} root-owned 0755, with {user} in {group}",
            set(SHARED_DIR)
        ),
    }
}

/// The kind of an OAuth access token (never printed: the harness of every
/// test fails on its prefix).
const OAUTH_ACCESS_PREFIX: &str = "sk-ant-oat";

/// Tokens in the unit's environment: named, never shown.
fn check_env_tokens(r: &mut Report, check: &str, env: &UnitEnv) {
    if let Some((value, origin)) = env.get("ANTHROPIC_API_KEY") {
        if value.trim_start().starts_with(OAUTH_ACCESS_PREFIX) {
            r.add(
                check,
                Level::Fail,
                format!("ANTHROPIC_API_KEY (from {origin}) holds an OAuth access token; OAuth tokens are not API keys, so the CLI says \"Invalid API key · Fix external API key\""),
                Some(&format!("remove ANTHROPIC_API_KEY from {origin} (only a Console API key belongs there): the CLI then reads its credentials file")),
            );
        }
    }
    if let Some((_, origin)) = env
        .get("CLAUDE_CODE_OAUTH_TOKEN")
        .filter(|(value, _)| !value.is_empty())
    {
        r.add(
            check,
            Level::Info,
            format!("CLAUDE_CODE_OAUTH_TOKEN is set (from {origin}): the unit authenticates with an environment token, not the file; nothing refreshes that token and cred-watch does not update it"),
            None,
        );
    }
}

/// The states of systemd's environment-file parser (`parse_env_file`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum EnvState {
    PreKey,
    Key,
    PreValue,
    Value,
    ValueEscape,
    Single,
    Double,
    DoubleEscape,
    Comment,
    CommentEscape,
}

#[derive(Default)]
struct EnvParser {
    out: Vec<(String, String)>,
    key: String,
    value: String,
    /// Where the trailing blanks of an unquoted value start.
    blanks: Option<usize>,
}

impl EnvParser {
    fn push(&mut self, unquoted_end: bool) {
        if let (true, Some(at)) = (unquoted_end, self.blanks) {
            self.value.truncate(at);
        }
        let key = std::mem::take(&mut self.key).trim_end().to_string();
        let value = std::mem::take(&mut self.value);
        self.blanks = None;
        if !key.is_empty() {
            self.out.push((key, value));
        }
    }

    fn unquoted(&mut self, c: char) {
        if !blank(c) {
            self.blanks = None;
        } else if self.blanks.is_none() {
            self.blanks = Some(self.value.len());
        }
        self.value.push(c);
    }
}

fn blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// The assignments of an `EnvironmentFile=`, in order, read as systemd
/// does: `KEY=VALUE` lines, `#`/`;` comments, single and double quotes,
/// backslash escapes and continuation lines, blanks around a value dropped.
fn parse_env_file(text: &str) -> Vec<(String, String)> {
    let mut p = EnvParser::default();
    let mut s = EnvState::PreKey;
    for c in text.chars() {
        s = p.step(s, c);
    }
    use EnvState::*;
    if !matches!(s, PreKey | Key | Comment | CommentEscape) {
        p.push(s == Value);
    }
    p.out
}

fn newline(c: char) -> bool {
    c == '\n' || c == '\r'
}

impl EnvParser {
    /// One character before the value: keys and comments.
    fn step(&mut self, s: EnvState, c: char) -> EnvState {
        use EnvState::*;
        match s {
            PreKey if c == '#' || c == ';' => Comment,
            PreKey if blank(c) => PreKey,
            Key if newline(c) => {
                self.key.clear();
                PreKey
            }
            Key if c == '=' => PreValue,
            PreKey | Key => {
                self.key.push(c);
                Key
            }
            Comment if c == '\\' => CommentEscape,
            Comment | CommentEscape if newline(c) => PreKey,
            Comment | CommentEscape => Comment,
            _ => self.value_step(s, c),
        }
    }

    /// One character of a value.
    fn value_step(&mut self, s: EnvState, c: char) -> EnvState {
        use EnvState::*;
        match s {
            PreValue | Value if newline(c) => {
                self.push(s == Value);
                PreKey
            }
            PreValue if c == '\'' => Single,
            PreValue if c == '"' => Double,
            PreValue | Value if c == '\\' => {
                self.blanks = None;
                ValueEscape
            }
            PreValue if blank(c) => PreValue,
            PreValue | Value => {
                self.unquoted(c);
                Value
            }
            ValueEscape => {
                if !newline(c) {
                    self.value.push(c);
                }
                Value
            }
            Single if c == '\'' => PreValue,
            Double if c == '"' => PreValue,
            Double if c == '\\' => DoubleEscape,
            Single | Double => {
                self.value.push(c);
                s
            }
            DoubleEscape => {
                if "\"\\`$".contains(c) {
                    self.value.push(c);
                } else if c != '\n' {
                    self.value.extend(['\\', c]);
                }
                Double
            }
            PreKey | Key | Comment | CommentEscape => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_group_has_one_cause() {
        use GroupCause::*;
        // (running, dropped privileges itself, own gid among its groups, group given now)
        assert_eq!(classify(true, true, false, true), NoInitgroups);
        assert_eq!(classify(true, true, false, false), NoInitgroups);
        assert_eq!(classify(true, true, true, true), StartedBefore);
        assert_eq!(classify(true, false, true, true), StartedBefore);
        assert_eq!(classify(true, false, true, false), NotMember);
        assert_eq!(classify(false, false, true, true), NotMember);
        assert_eq!(classify(false, false, false, false), NotMember);
    }

    #[test]
    fn process_credentials_come_from_proc_status() {
        let me = std::process::id();
        let (uid, gid, groups) = proc_creds(me).unwrap();
        assert_eq!(uid, nix::unistd::geteuid().as_raw());
        assert_eq!(gid, nix::unistd::getegid().as_raw());
        let mut want: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = groups;
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want);
        assert!(proc_creds(u32::MAX).is_none());
    }

    #[test]
    fn the_blocking_part_is_named() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("d");
        let file = sub.join("f");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(&file, "x").unwrap();
        let set = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let m = std::fs::metadata(&file).unwrap();
        // Someone else: neither the owner nor in the file's group.
        let other = Ident {
            who: "x".into(),
            name: "x".into(),
            uid: m.uid() + 4242,
            gid: m.gid() + 4242,
            groups: vec![],
            pid: None,
            origin: Origin::Worker,
        };
        set(dir.path(), 0o755);
        set(&sub, 0o700);
        assert!(matches!(blocker(&other, &file), Block::Dir(d, _) if d == sub));
        set(&sub, 0o755);
        set(&file, 0o640);
        assert!(matches!(blocker(&other, &file), Block::NotInGroup(_, g) if g == m.gid()));
        let member = Ident {
            groups: vec![m.gid()],
            ..other.clone()
        };
        assert_eq!(blocker(&member, &file), Block::Other);
        set(&file, 0o600);
        assert!(matches!(blocker(&member, &file), Block::Mode(meta) if meta.starts_with("0600 ")));
        let gone = sub.join("none");
        assert_eq!(blocker(&other, &gone), Block::Missing(gone.clone()));
    }

    #[test]
    fn environment_files_are_read_as_systemd_reads_them() {
        let text = "# comment\n; another\n  A=1\nB = two words  \nC=\"quoted \\\"x\\\" \\$y \\n\"\nD='single # not a comment'\nE=a\\\n b\nF=\nNOVALUE\nA=last\n#G=1\\\nH=after\nI=end";
        let got = parse_env_file(text);
        let get = |k: &str| {
            got.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("A"), Some("last"));
        assert_eq!(get("B"), Some("two words"));
        assert_eq!(get("C"), Some("quoted \"x\" $y \\n"));
        assert_eq!(get("D"), Some("single # not a comment"));
        assert_eq!(get("E"), Some("a b"));
        assert_eq!(get("F"), Some(""));
        assert_eq!(get("NOVALUE"), None);
        assert_eq!(get("G"), None);
        assert_eq!(get("H"), Some("after"));
        assert_eq!(get("I"), Some("end"));
    }

    #[test]
    fn the_credentials_path_is_chosen_as_the_cli_does() {
        let mut env = UnitEnv::new();
        let home = Path::new("/home/bot");
        let at = |env: &UnitEnv| credentials_path(env, home).0;
        assert_eq!(at(&env), Path::new("/home/bot/.claude/.credentials.json"));
        env.insert("HOME".into(), ("/srv/bot".into(), "Environment=".into()));
        assert_eq!(at(&env), Path::new("/srv/bot/.claude/.credentials.json"));
        env.insert(
            "CLAUDE_CONFIG_DIR".into(),
            ("/etc/c".into(), "Environment=".into()),
        );
        assert_eq!(at(&env), Path::new("/etc/c/.credentials.json"));
        let secure = (
            "CLAUDE_SECURESTORAGE_CONFIG_DIR".to_string(),
            ("".into(), "x".into()),
        );
        env.insert(secure.0.clone(), secure.1);
        assert_eq!(
            at(&env),
            Path::new("/etc/c/.credentials.json"),
            "empty: unset"
        );
        env.insert(secure.0, ("/var/lib/c".into(), "EnvironmentFile=/e".into()));
        let (path, via) = credentials_path(&env, home);
        assert_eq!(path, Path::new("/var/lib/c/.credentials.json"));
        assert_eq!(
            via,
            "CLAUDE_SECURESTORAGE_CONFIG_DIR from EnvironmentFile=/e"
        );
    }
}
