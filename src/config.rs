//! Configuration in two stages: strict raw structs per file (TOML, unknown
//! keys rejected), merged across drop-ins, then one `validate()` into checked
//! settings. Every error names the file, line and key, and never repeats the
//! file's text (it may be a credentials or system file): values are bounded
//! (modes at most 0777, durations at most 366 days, paths without `.`/`..`
//! components or repeated slashes) and refused with what is expected instead.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

pub const DEFAULT_CONFIG: &str = "/etc/cred-watch/cred-watch.toml";
pub const CONFIG_ENV: &str = "CRED_WATCH_CONFIG";

/// A configuration error: file, line (when known), key and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------- value types
//
// The messages of these deserializers never repeat the value they reject:
// the file may not be a configuration at all (a credentials file, a system
// file behind a symlink), so an error says what is expected instead.

/// The longest accepted duration, for every duration setting.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A duration written as "250ms", "30s", "10m"; at most [`MAX_DURATION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let d = humantime::parse_duration(s.trim()).map_err(|_| {
            serde::de::Error::custom(
                "invalid duration: expected a number with a unit, such as 250ms, 30s or 10m",
            )
        })?;
        if d > MAX_DURATION {
            return Err(serde::de::Error::custom(
                "duration too long: at most 366 days",
            ));
        }
        Ok(Dur(d))
    }
}

/// A file mode written as an octal string such as "0640", at most 0777.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mode = parse_mode(&s).ok_or_else(|| {
            serde::de::Error::custom(
                "invalid mode: expected an octal string of 3 or 4 digits 0-7, such as 0640",
            )
        })?;
        if mode > 0o777 {
            return Err(serde::de::Error::custom(
                "setuid, setgid and sticky bits are not allowed: a mode is at most 0777",
            ));
        }
        Ok(FileMode(mode))
    }
}

fn parse_mode(s: &str) -> Option<u32> {
    let ok = (3..=4).contains(&s.len()) && s.bytes().all(|b| (b'0'..=b'7').contains(&b));
    ok.then(|| u32::from_str_radix(s, 8).ok())
        .flatten()
        .filter(|m| *m <= 0o7777)
}

/// A watch name: `[a-z0-9_-]+`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct WatchName(pub String);

impl<'de> Deserialize<'de> for WatchName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(WatchName(s))
        } else {
            Err(serde::de::Error::custom(
                "invalid watch name: use [a-z0-9_-]+",
            ))
        }
    }
}

/// A path as written in the file: not empty, no NUL, no `.` or `..`
/// component and no repeated slash. A relative path still resolves against
/// the working directory (see `absolute`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct CfgPath(PathBuf);

impl<'de> Deserialize<'de> for CfgPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        check_path(&s).map_err(serde::de::Error::custom)?;
        Ok(CfgPath(PathBuf::from(s)))
    }
}

fn check_path(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        Err("a path cannot be empty")
    } else if s.contains('\0') {
        Err("a path cannot contain a NUL character")
    } else if s.contains("//") {
        Err("a path cannot contain repeated slashes")
    } else if s.split('/').any(|c| c == "." || c == "..") {
        Err("a path cannot contain . or .. components")
    } else {
        Ok(())
    }
}

/// A path that must name a file: a trailing slash names a directory.
fn names_file(p: &Path) -> bool {
    p.file_name().is_some() && !p.as_os_str().as_encoded_bytes().ends_with(b"/")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    ClaudeOauth,
    Json,
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartAction {
    Restart,
    TryRestart,
    ReloadOrRestart,
    /// Not a restart action a watch can choose: how `[watch.refresh]`
    /// starts its unit, through the same job machinery.
    #[serde(skip)]
    Start,
}

impl RestartAction {
    /// The org.freedesktop.systemd1.Manager method for this action.
    pub fn method(self) -> &'static str {
        match self {
            RestartAction::Restart => "RestartUnit",
            RestartAction::TryRestart => "TryRestartUnit",
            RestartAction::ReloadOrRestart => "ReloadOrRestartUnit",
            RestartAction::Start => "StartUnit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

// ---------------------------------------------------------------- raw stage

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    agent: Option<RawAgent>,
    #[serde(default)]
    watch: Vec<RawWatch>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    log_level: Option<LogLevel>,
    state_dir: Option<CfgPath>,
    settle: Option<Dur>,
    resync_interval: Option<Dur>,
    metrics_file: Option<CfgPath>,
    alert_unit: Option<AlertUnit>,
}

/// `[agent] alert_unit`: a unit name, `%i` standing for the watch's name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AlertUnit(String);

impl<'de> Deserialize<'de> for AlertUnit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if valid_unit_name(&s.replace("%i", "x")) {
            Ok(AlertUnit(s))
        } else {
            Err(serde::de::Error::custom(
                "expected a unit name such as \"cred-watch-alert@%i.service\" (%i: the watch's name)",
            ))
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    name: Spanned<WatchName>,
    source: Option<Spanned<CfgPath>>,
    format: Option<Format>,
    source_owner: Option<Spanned<String>>,
    deletion_grace: Option<Dur>,
    expiry_warning: Option<Dur>,
    allow_rollback: Option<bool>,
    max_lifetime: Option<Dur>,
    permissions: Option<RawPermissions>,
    copy: Option<Vec<RawCopy>>,
    refresh: Option<RawRefresh>,
    restart: Option<RawRestart>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPermissions {
    file_mode: Option<FileMode>,
    traverse: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCopy {
    dest: Spanned<CfgPath>,
    owner: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    mode: Option<FileMode>,
    dir_mode: Option<FileMode>,
    #[serde(default)]
    drop_keys: Vec<String>,
    keep_refresh_token: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    unit: Option<Spanned<String>>,
    ahead: Option<Spanned<Dur>>,
    timeout: Option<Dur>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    units: Option<Spanned<Vec<String>>>,
    action: Option<RestartAction>,
    timeout: Option<Dur>,
    min_interval: Option<Dur>,
}

/// Every key and value name the raw structs accept: the only words an error
/// message may put in backquotes (see `safe_message`).
#[rustfmt::skip]
const KNOWN_NAMES: &[&str] = &[
    "agent", "watch", "log_level", "state_dir", "settle", "resync_interval", "name",
    "source", "format", "source_owner", "deletion_grace", "expiry_warning",
    "allow_rollback", "max_lifetime", "permissions", "copy", "restart", "file_mode",
    "traverse", "dest", "owner", "group", "mode", "dir_mode", "drop_keys", "units",
    "action", "timeout", "min_interval", "refresh", "unit", "ahead",
    "keep_refresh_token", "metrics_file", "alert_unit", "claude-oauth", "json", "any", "try-restart",
    "reload-or-restart", "error", "warn", "info", "debug", "trace", "true", "false",
];

// ---------------------------------------------------------------- merge stage

/// Where a value came from (file index and byte span), to point errors at it
/// after merging: a value set by a drop-in points into the drop-in.
#[derive(Debug, Clone)]
struct Loc {
    file: usize,
    span: std::ops::Range<usize>,
}

#[derive(Debug, Clone)]
struct At<T> {
    value: T,
    loc: Loc,
}

impl<T> At<T> {
    fn new(spanned: Spanned<T>, file: usize) -> At<T> {
        let span = spanned.span();
        At {
            value: spanned.into_inner(),
            loc: Loc { file, span },
        }
    }
}

fn path_at(path: Spanned<CfgPath>, file: usize) -> At<PathBuf> {
    let path = At::new(path, file);
    At {
        value: path.value.0,
        loc: path.loc,
    }
}

struct Source {
    path: PathBuf,
    text: String,
}

struct Merged {
    agent: RawAgent,
    watches: Vec<MergedWatch>,
}

/// A watch after merging: the raw values with their origins.
struct MergedWatch {
    name: At<WatchName>,
    source: Option<At<PathBuf>>,
    format: Option<Format>,
    source_owner: Option<At<String>>,
    deletion_grace: Option<Dur>,
    expiry_warning: Option<Dur>,
    allow_rollback: Option<bool>,
    max_lifetime: Option<Dur>,
    permissions: Option<RawPermissions>,
    copy: Option<Vec<MergedCopy>>,
    restart: Option<MergedRestart>,
    refresh: Option<MergedRefresh>,
}

struct MergedCopy {
    dest: At<PathBuf>,
    owner: Option<At<String>>,
    group: Option<At<String>>,
    mode: Option<FileMode>,
    dir_mode: Option<FileMode>,
    drop_keys: Vec<String>,
    keep_refresh_token: Option<bool>,
}

struct MergedRefresh {
    unit: Option<At<String>>,
    ahead: Option<At<Dur>>,
    timeout: Option<Dur>,
}

impl MergedRefresh {
    fn new(r: RawRefresh, file: usize) -> MergedRefresh {
        MergedRefresh {
            unit: r.unit.map(|u| At::new(u, file)),
            ahead: r.ahead.map(|a| At::new(a, file)),
            timeout: r.timeout,
        }
    }

    fn or(self, old: MergedRefresh) -> MergedRefresh {
        MergedRefresh {
            unit: self.unit.or(old.unit),
            ahead: self.ahead.or(old.ahead),
            timeout: self.timeout.or(old.timeout),
        }
    }
}

struct MergedRestart {
    units: Option<At<Vec<String>>>,
    action: Option<RestartAction>,
    timeout: Option<Dur>,
    min_interval: Option<Dur>,
}

impl MergedWatch {
    fn new(w: RawWatch, file: usize) -> MergedWatch {
        MergedWatch {
            name: At::new(w.name, file),
            source: w.source.map(|s| path_at(s, file)),
            format: w.format,
            source_owner: w.source_owner.map(|o| At::new(o, file)),
            deletion_grace: w.deletion_grace,
            expiry_warning: w.expiry_warning,
            allow_rollback: w.allow_rollback,
            max_lifetime: w.max_lifetime,
            permissions: w.permissions,
            copy: w
                .copy
                .map(|cs| cs.into_iter().map(|c| MergedCopy::new(c, file)).collect()),
            restart: w.restart.map(|r| MergedRestart {
                units: r.units.map(|u| At::new(u, file)),
                action: r.action,
                timeout: r.timeout,
                min_interval: r.min_interval,
            }),
            refresh: w.refresh.map(|r| MergedRefresh::new(r, file)),
        }
    }

    /// A drop-in overrides the keys it sets, field by field; copies are
    /// replaced as a whole.
    fn override_with(&mut self, w: MergedWatch) {
        self.source = w.source.or(self.source.take());
        self.format = w.format.or(self.format);
        self.source_owner = w.source_owner.or(self.source_owner.take());
        self.deletion_grace = w.deletion_grace.or(self.deletion_grace);
        self.expiry_warning = w.expiry_warning.or(self.expiry_warning);
        self.allow_rollback = w.allow_rollback.or(self.allow_rollback);
        self.max_lifetime = w.max_lifetime.or(self.max_lifetime);
        self.permissions = match (w.permissions, self.permissions.take()) {
            (Some(new), Some(old)) => Some(RawPermissions {
                file_mode: new.file_mode.or(old.file_mode),
                traverse: new.traverse.or(old.traverse),
            }),
            (new, old) => new.or(old),
        };
        self.copy = w.copy.or(self.copy.take());
        self.restart = match (w.restart, self.restart.take()) {
            (Some(new), Some(old)) => Some(MergedRestart {
                units: new.units.or(old.units),
                action: new.action.or(old.action),
                timeout: new.timeout.or(old.timeout),
                min_interval: new.min_interval.or(old.min_interval),
            }),
            (new, old) => new.or(old),
        };
        self.refresh = match (w.refresh, self.refresh.take()) {
            (Some(new), Some(old)) => Some(new.or(old)),
            (new, old) => new.or(old),
        };
    }
}

impl MergedCopy {
    fn new(c: RawCopy, file: usize) -> MergedCopy {
        MergedCopy {
            dest: path_at(c.dest, file),
            owner: c.owner.map(|o| At::new(o, file)),
            group: c.group.map(|g| At::new(g, file)),
            mode: c.mode,
            dir_mode: c.dir_mode,
            drop_keys: c.drop_keys,
            keep_refresh_token: c.keep_refresh_token,
        }
    }
}

// ---------------------------------------------------------------- settings

/// Checked settings: what the agent runs with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    #[serde(skip)]
    pub files: Vec<PathBuf>,
    pub agent: AgentSettings,
    #[serde(rename = "watch")]
    pub watches: Vec<WatchSettings>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentSettings {
    pub log_level: LogLevel,
    pub state_dir: PathBuf,
    #[serde(serialize_with = "ser_dur")]
    pub settle: Duration,
    #[serde(serialize_with = "ser_dur")]
    pub resync_interval: Duration,
    /// Prometheus text file for node_exporter's textfile collector.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_file: Option<PathBuf>,
    /// Started once per problem; `%i` is the (escaped) watch name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert_unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WatchSettings {
    pub name: String,
    pub source: PathBuf,
    pub format: Format,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_owner: Option<Account>,
    #[serde(serialize_with = "ser_dur")]
    pub deletion_grace: Duration,
    #[serde(serialize_with = "ser_dur")]
    pub expiry_warning: Duration,
    pub allow_rollback: bool,
    /// Longest accepted distance from now to `expiresAt`.
    #[serde(serialize_with = "ser_dur")]
    pub max_lifetime: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub permissions: Option<PermissionSettings>,
    #[serde(rename = "copy", skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<CopySettings>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartSettings>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshSettings>,
}

impl WatchSettings {
    /// The directory that holds the source and the source's file name.
    pub fn source_dir_and_name(&self) -> (&Path, &std::ffi::OsStr) {
        split_file(&self.source)
    }

    /// The validation rules that depend on this watch's settings.
    pub fn policy(&self) -> crate::validate::Policy {
        crate::validate::Policy {
            allow_rollback: self.allow_rollback,
            max_lifetime: self.max_lifetime,
        }
    }
}

/// Splits a validated absolute file path into directory and name.
pub fn split_file(path: &Path) -> (&Path, &std::ffi::OsStr) {
    (
        path.parent().unwrap_or(Path::new("/")),
        path.file_name().unwrap_or_default(),
    )
}

/// A user or group resolved to its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub id: u32,
}

impl Account {
    /// A user by name or numeric uid, as in `User=`; `None` when unknown.
    pub fn user(name: &str) -> Option<Account> {
        Account::resolve(name, |n| {
            Some(nix::unistd::User::from_name(n).ok()??.uid.as_raw())
        })
    }

    /// A group by name or numeric gid, as in `Group=`; `None` when unknown.
    pub fn group(name: &str) -> Option<Account> {
        Account::resolve(name, |n| {
            Some(nix::unistd::Group::from_name(n).ok()??.gid.as_raw())
        })
    }

    fn resolve(name: &str, lookup: impl Fn(&str) -> Option<u32>) -> Option<Account> {
        let id = match name.parse::<u32>() {
            Ok(id) => id,
            Err(_) => lookup(name)?,
        };
        Some(Account {
            name: name.to_owned(),
            id,
        })
    }
}

impl Serialize for Account {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PermissionSettings {
    #[serde(serialize_with = "ser_mode")]
    pub file_mode: u32,
    pub traverse: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CopySettings {
    pub dest: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<Account>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<Account>,
    #[serde(serialize_with = "ser_mode")]
    pub mode: u32,
    /// Mode of the directories the agent creates for this copy.
    #[serde(serialize_with = "ser_mode")]
    pub dir_mode: u32,
    pub drop_keys: Vec<String>,
    /// Keep `claudeAiOauth.refreshToken` in the copy (off: a consumer can
    /// never refresh, so it can never rotate the single-use token).
    pub keep_refresh_token: bool,
}

impl CopySettings {
    /// What this copy leaves out of a source of `format`.
    pub fn shape(&self, format: Format) -> crate::validate::CopyShape<'_> {
        crate::validate::CopyShape {
            drop_keys: &self.drop_keys,
            strip_refresh_token: format == Format::ClaudeOauth && !self.keep_refresh_token,
        }
    }
}

/// `[watch.refresh]`: the unit that runs the source's own CLI.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefreshSettings {
    pub unit: String,
    #[serde(serialize_with = "ser_dur")]
    pub ahead: Duration,
    #[serde(serialize_with = "ser_dur")]
    pub timeout: Duration,
}

/// The CLI refreshes only when its token expires within 5 minutes.
pub const CLI_REFRESH_WINDOW: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestartSettings {
    pub units: Vec<String>,
    pub action: RestartAction,
    #[serde(serialize_with = "ser_dur")]
    pub timeout: Duration,
    #[serde(serialize_with = "ser_dur")]
    pub min_interval: Duration,
}

fn ser_dur<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn ser_mode<S: serde::Serializer>(m: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{m:04o}"))
}

/// "1m 30s" style, as accepted back by the parser.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        "0s".into()
    } else {
        humantime::format_duration(d).to_string()
    }
}

impl Settings {
    /// The effective configuration as TOML (what `cred-watch check` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }

    pub fn watch(&self, name: &str) -> Option<&WatchSettings> {
        self.watches.iter().find(|w| w.name == name)
    }
}

// ---------------------------------------------------------------- loading

/// The main configuration file: `--config`, else `$CRED_WATCH_CONFIG`, else
/// the default path.
pub fn main_path(cli: Option<&Path>) -> PathBuf {
    cli.map(Path::to_path_buf)
        .or_else(|| {
            std::env::var_os(CONFIG_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

/// Loads the main file and the drop-ins in `<main dir>/conf.d/*.toml`
/// (lexical order, later wins), then validates. The main file may be a
/// symlink (administrators do that); a drop-in never is.
pub fn load(main: &Path) -> Result<Settings, ConfigError> {
    let text = read_config_file(main, false)?;
    let mut sources = vec![Source {
        path: main.to_path_buf(),
        text,
    }];
    let dropin_dir = main.parent().unwrap_or(Path::new(".")).join("conf.d");
    for path in dropin_paths(&dropin_dir)? {
        let text = read_config_file(&path, true)?;
        sources.push(Source { path, text });
    }
    load_sources(&sources)
}

/// `*.toml` entries of the drop-in directory, sorted; directories are skipped.
fn dropin_paths(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let unreadable =
        |e: std::io::Error| plain_error(dir, format!("cannot read drop-in directory: {e}"));
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(unreadable(e)),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(unreadable)?;
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if path.extension().is_some_and(|e| e == "toml") && !is_dir {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// Configuration files are small: a bigger one is a mistake (`/dev/zero`,
/// a log file), not read into memory.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a configuration file without blocking on a FIFO; it must be a
/// regular file of at most [`MAX_CONFIG_BYTES`]. A drop-in is never a
/// symlink (`O_NOFOLLOW`); the main file may be one.
fn read_config_file(path: &Path, dropin: bool) -> Result<String, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let nofollow = if dropin { libc::O_NOFOLLOW } else { 0 };
    let what = if dropin {
        "a drop-in"
    } else {
        "the configuration"
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nofollow | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) if dropin => plain_error(
                path,
                "is a symbolic link: a drop-in must be a regular file (not followed)".into(),
            ),
            _ => plain_error(path, format!("cannot read: {e}")),
        })?;
    let regular = file.metadata().is_ok_and(|m| m.is_file());
    if !regular {
        return Err(plain_error(
            path,
            format!("is not a regular file: {what} must be one"),
        ));
    }
    let mut bytes = Vec::new();
    (&file)
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| plain_error(path, format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(plain_error(
            path,
            format!("is larger than 1 MiB: {what} cannot be that big"),
        ));
    }
    String::from_utf8(bytes).map_err(|_| plain_error(path, "is not UTF-8 text".into()))
}

/// Validates configuration text as if it were the main file at `path`
/// (no drop-ins); used by tests and the fuzzer.
pub fn parse_str(path: &Path, text: &str) -> Result<Settings, ConfigError> {
    load_sources(&[Source {
        path: path.to_path_buf(),
        text: text.to_owned(),
    }])
}

fn plain_error(path: &Path, message: String) -> ConfigError {
    ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: None,
        message,
    }
}

fn err_at(sources: &[Source], loc: &Loc, key: &str, message: String) -> ConfigError {
    let src = &sources[loc.file];
    ConfigError {
        file: src.path.clone(),
        line: Some(line_of(&src.text, loc.span.start)),
        key: Some(key.to_owned()),
        message,
    }
}

fn load_sources(sources: &[Source]) -> Result<Settings, ConfigError> {
    let mut merged = Merged {
        agent: RawAgent::default(),
        watches: Vec::new(),
    };
    for (index, src) in sources.iter().enumerate() {
        merge(&mut merged, parse_raw(src)?, index, src)?;
    }
    validate(merged, sources)
}

/// One file's raw structs. A syntax error is located by toml; an error in
/// a value or key is located by the deserializer's path to it.
fn parse_raw(src: &Source) -> Result<RawFile, ConfigError> {
    let document = toml::Deserializer::parse(&src.text).map_err(|e| syntax_error(src, &e))?;
    serde_path_to_error::deserialize(document).map_err(|e| schema_error(src, &e))
}

fn syntax_error(src: &Source, err: &toml::de::Error) -> ConfigError {
    let span = err.span();
    ConfigError {
        file: src.path.clone(),
        line: span.as_ref().map(|s| line_of(&src.text, s.start)),
        key: span.and_then(|s| syntax_key(&src.text, s.start)),
        message: safe_message(err.message()),
    }
}

fn schema_error(src: &Source, err: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let inner = err.inner();
    let unknown = inner.message().starts_with("unknown field");
    ConfigError {
        file: src.path.clone(),
        line: inner.span().map(|s| line_of(&src.text, s.start)),
        key: dotted_key(&src.text, err.path(), unknown),
        message: safe_message(inner.message()),
    }
}

/// The dotted key of a deserializer path, without sequence indices and
/// toml's span wrappers: `watch[0].copy[1].mode` is `watch.copy.mode`.
/// Every part is a name of the schema, except the last one of an unknown
/// key: that one is the file's text, named only when it and every key below
/// it are plain (else the key is its table's).
fn dotted_key(text: &str, path: &serde_path_to_error::Path, unknown: bool) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut keys: Vec<&str> = path
        .iter()
        .filter_map(|segment| match segment {
            Segment::Map { key } if !key.starts_with("$__serde_spanned_private") => {
                Some(key.as_str())
            }
            _ => None,
        })
        .collect();
    if unknown && (keys.join(".").len() > 64 || !unknown_key_is_plain(text, path)) {
        keys.pop();
    }
    plain_key(&keys.join("."))
}

/// True when the unknown key at the end of `path` and every key in its
/// value are plain (`[SECRET."x y"]` names no key at all).
fn unknown_key_is_plain(text: &str, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    use toml::de::{DeTable, DeValue};
    fn all_plain(value: &DeValue) -> bool {
        match value {
            DeValue::Table(t) => t
                .iter()
                .all(|(k, v)| plain_part(k.get_ref()) && all_plain(v.get_ref())),
            DeValue::Array(a) => a.iter().all(|v| all_plain(v.get_ref())),
            _ => true,
        }
    }
    let Some(Segment::Map { key }) = path.iter().next_back() else {
        return false;
    };
    let Ok(root) = DeTable::parse(text) else {
        return false;
    };
    let root = DeValue::Table(root.into_inner());
    let mut value = &root;
    for segment in path.iter() {
        let next = match segment {
            Segment::Map { key } => value.get(key.as_str()),
            Segment::Seq { index } => value.get(*index),
            _ => None,
        };
        let Some(next) = next else {
            return false;
        };
        value = next.get_ref();
    }
    plain_part(key) && all_plain(value)
}

/// toml's or serde's message, without anything that came from the file.
/// serde's messages that embed the rejected value or key are rewritten (the
/// key is named from the deserializer's path instead); any other message may
/// put only known names or punctuation in backquotes and no other quotes,
/// else it is replaced by a generic one.
fn safe_message(message: &str) -> String {
    let first = message.lines().next().unwrap_or_default().trim();
    // serde puts the file's text before its own ", expected ...".
    let expected = first.rsplit_once(", expected ").map(|(_, e)| {
        if e.starts_with("struct ") {
            "a table"
        } else if e.starts_with("enum ") {
            "a string"
        } else if e == "a sequence" {
            "an array"
        } else {
            e
        }
    });
    let with_expected = |what: &str| match expected {
        Some(e) => format!("{what}, expected {e}"),
        None => what.to_owned(),
    };
    let rewritten = if first.starts_with("unknown field") {
        with_expected("unknown key")
    } else if first.starts_with("unknown variant") {
        with_expected("unknown value")
    } else if first.starts_with("invalid type") {
        with_expected("wrong type of value")
    } else if first.starts_with("invalid value") {
        with_expected("invalid value")
    } else if first.starts_with("invalid length") {
        with_expected("wrong number of values")
    } else if first.starts_with("duplicate") {
        "duplicate key".to_owned()
    } else {
        first.to_owned()
    };
    if quotes_only_known_names(&rewritten) {
        rewritten
    } else {
        "invalid syntax or value (the file's text is not repeated here)".to_owned()
    }
}

/// True when every backquoted part is a known name or a punctuation token
/// and no other quote appears.
fn quotes_only_known_names(message: &str) -> bool {
    let parts: Vec<&str> = message.split('`').collect();
    let token = |q: &&str| {
        KNOWN_NAMES.contains(q)
            || (!q.is_empty() && q.len() <= 3 && q.bytes().all(|b| b.is_ascii_punctuation()))
    };
    parts.len() % 2 == 1
        && parts.iter().step_by(2).all(|p| !p.contains(['"', '\'']))
        && parts.iter().skip(1).step_by(2).all(token)
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The key of a syntax error: the document does not parse, so there is no
/// deserializer path, and the key is read from the enclosing `[table]`
/// header and the error's line (e.g. `watch.copy.mode`). The file may not be
/// a configuration at all, so only the schema's names are named: a header
/// or key made of anything else names no key.
fn syntax_key(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset.min(text.len()))?;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    if line.starts_with('[') {
        return header_key(line);
    }
    let key = known_key(line.split_once('=')?.0)?;
    let header = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['));
    match header {
        Some(header) => Some(format!("{}.{key}", header_key(header)?)),
        None => Some(key),
    }
}

/// `[a.b]` or `[[a.b]]` (perhaps unclosed or followed by a comment) as `a.b`.
fn header_key(line: &str) -> Option<String> {
    known_key(line.trim_start_matches('[').split(']').next()?)
}

/// A dotted key made only of the schema's names.
fn known_key(key: &str) -> Option<String> {
    plain_key(key).filter(|k| k.split('.').all(|part| KNOWN_NAMES.contains(&part)))
}

/// One bare key made of `[A-Za-z0-9_-]`, at most 64 characters.
fn plain_part(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A dotted bare key made of `[A-Za-z0-9_-]` parts, at most 64 characters.
fn plain_key(key: &str) -> Option<String> {
    let parts: Vec<&str> = key.split('.').map(str::trim).collect();
    let key = parts.join(".");
    (parts.iter().all(|p| plain_part(p)) && key.len() <= 64).then_some(key)
}

fn merge(merged: &mut Merged, raw: RawFile, index: usize, src: &Source) -> Result<(), ConfigError> {
    if let Some(agent) = raw.agent {
        let m = &mut merged.agent;
        m.log_level = agent.log_level.or(m.log_level);
        m.state_dir = agent.state_dir.or(m.state_dir.take());
        m.settle = agent.settle.or(m.settle);
        m.resync_interval = agent.resync_interval.or(m.resync_interval);
        m.metrics_file = agent.metrics_file.or(m.metrics_file.take());
        m.alert_unit = agent.alert_unit.or(m.alert_unit.take());
    }
    let mut seen: BTreeMap<WatchName, usize> = BTreeMap::new();
    for w in raw.watch {
        let w = MergedWatch::new(w, index);
        let line = line_of(&src.text, w.name.loc.span.start);
        if let Some(first) = seen.insert(w.name.value.clone(), line) {
            return Err(ConfigError {
                file: src.path.clone(),
                line: Some(line),
                key: Some("watch.name".into()),
                message: format!("duplicate watch name in the same file (first at line {first})"),
            });
        }
        match merged
            .watches
            .iter_mut()
            .find(|m| m.name.value == w.name.value)
        {
            Some(m) => m.override_with(w),
            None => merged.watches.push(w),
        }
    }
    Ok(())
}

fn absolute(p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        // Relative paths (handy for demos) are resolved against the working directory.
        std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p)
    }
}

/// A validated watch with the origins of its source and of each copy's dest.
struct Checked {
    watch: WatchSettings,
    source: Loc,
    dests: Vec<Loc>,
}

fn validate(merged: Merged, sources: &[Source]) -> Result<Settings, ConfigError> {
    let agent = agent_settings(merged.agent);
    let mut checked: Vec<Checked> = Vec::new();
    for w in merged.watches {
        let c = validate_watch(w, sources)?;
        if checked.iter().any(|o| o.watch.source == c.watch.source) {
            return Err(err_at(
                sources,
                &c.source,
                "watch.source",
                "this source is already watched by another watch".into(),
            ));
        }
        checked.push(c);
    }
    if checked.is_empty() {
        return Err(plain_error(
            &sources[0].path,
            "no [[watch]] is configured".into(),
        ));
    }
    check_destinations(&checked, sources)?;
    Ok(Settings {
        files: sources.iter().map(|s| s.path.clone()).collect(),
        agent,
        watches: checked.into_iter().map(|c| c.watch).collect(),
    })
}

fn agent_settings(a: RawAgent) -> AgentSettings {
    AgentSettings {
        log_level: a.log_level.unwrap_or(LogLevel::Info),
        state_dir: absolute(
            a.state_dir
                .map_or_else(|| PathBuf::from("/var/lib/cred-watch"), |p| p.0),
        ),
        settle: a.settle.map_or(Duration::from_millis(500), |d| d.0),
        resync_interval: a.resync_interval.map_or(Duration::ZERO, |d| d.0),
        metrics_file: a.metrics_file.map(|p| absolute(p.0)),
        alert_unit: a.alert_unit.map(|u| u.0),
    }
}

fn validate_watch(w: MergedWatch, sources: &[Source]) -> Result<Checked, ConfigError> {
    let name_loc = w.name.loc.clone();
    let at = |key: &str, message: &str| err_at(sources, &name_loc, key, message.into());
    let source = checked_source(w.source.clone(), sources, &name_loc)?;
    let format = w.format.unwrap_or(Format::ClaudeOauth);
    let source_owner = w
        .source_owner
        .map(|o| account(sources, &o, "watch.source_owner", Account::user))
        .transpose()?;
    let permissions = w.permissions.map(|p| PermissionSettings {
        file_mode: p.file_mode.map_or(0o644, |m| m.0),
        traverse: p.traverse.unwrap_or(false),
    });
    let mut copies = Vec::new();
    let mut dests = Vec::new();
    for c in w.copy.unwrap_or_default() {
        dests.push(c.dest.loc.clone());
        copies.push(validate_copy(c, format, sources)?);
    }
    let restart = w
        .restart
        .map(|r| validate_restart(r, sources, &name_loc))
        .transpose()?;
    let refresh = w
        .refresh
        .map(|r| validate_refresh(r, sources, &name_loc))
        .transpose()?;
    if permissions.is_none() && copies.is_empty() && restart.is_none() && refresh.is_none() {
        return Err(at("watch", "has no action: add at least one of [watch.permissions], [[watch.copy]], [watch.restart]"));
    }
    let watch = WatchSettings {
        name: w.name.value.0,
        source: absolute(source.value),
        format,
        source_owner,
        deletion_grace: w.deletion_grace.map_or(Duration::from_secs(30), |d| d.0),
        expiry_warning: w
            .expiry_warning
            .map_or(Duration::from_secs(30 * 60), |d| d.0),
        allow_rollback: w.allow_rollback.unwrap_or(false),
        max_lifetime: w
            .max_lifetime
            .map_or(Duration::from_secs(31 * 24 * 3600), |d| d.0),
        permissions,
        copies,
        restart,
        refresh,
    };
    Ok(Checked {
        watch,
        source: source.loc,
        dests,
    })
}

/// The watch's `source`: required, naming a file.
fn checked_source(
    source: Option<At<PathBuf>>,
    sources: &[Source],
    watch: &Loc,
) -> Result<At<PathBuf>, ConfigError> {
    let missing = || {
        err_at(
            sources,
            watch,
            "watch.source",
            "missing required key `source`".into(),
        )
    };
    let source = source.ok_or_else(missing)?;
    if !names_file(&source.value) {
        return Err(err_at(
            sources,
            &source.loc,
            "watch.source",
            "does not name a file".into(),
        ));
    }
    Ok(source)
}

fn validate_copy(
    c: MergedCopy,
    format: Format,
    sources: &[Source],
) -> Result<CopySettings, ConfigError> {
    let at = |key: &str, message: &str| err_at(sources, &c.dest.loc, key, message.into());
    if !names_file(&c.dest.value) {
        return Err(at("watch.copy.dest", "does not name a file"));
    }
    if format == Format::Any && !c.drop_keys.is_empty() {
        return Err(at(
            "watch.copy.drop_keys",
            "drop_keys needs format \"json\" or \"claude-oauth\"",
        ));
    }
    if format == Format::ClaudeOauth && c.drop_keys.iter().any(|k| k == "claudeAiOauth") {
        return Err(at(
            "watch.copy.drop_keys",
            "cannot drop claudeAiOauth: it is the credential",
        ));
    }
    let owner = c
        .owner
        .map(|o| account(sources, &o, "watch.copy.owner", Account::user))
        .transpose()?;
    let group = c
        .group
        .map(|g| account(sources, &g, "watch.copy.group", Account::group))
        .transpose()?;
    Ok(CopySettings {
        dest: absolute(c.dest.value),
        owner,
        group,
        mode: c.mode.map_or(0o640, |m| m.0),
        dir_mode: c.dir_mode.map_or(0o755, |m| m.0),
        drop_keys: c.drop_keys,
        keep_refresh_token: c.keep_refresh_token.unwrap_or(false),
    })
}

fn validate_restart(
    r: MergedRestart,
    sources: &[Source],
    watch: &Loc,
) -> Result<RestartSettings, ConfigError> {
    let key = "watch.restart.units";
    let units = r
        .units
        .ok_or_else(|| err_at(sources, watch, key, "missing required key `units`".into()))?;
    if units.value.is_empty() {
        return Err(err_at(
            sources,
            &units.loc,
            key,
            "must name at least one unit".into(),
        ));
    }
    if let Some(i) = units.value.iter().position(|u| !valid_unit_name(u)) {
        return Err(err_at(
            sources,
            &units.loc,
            key,
            format!("entry {} is not a unit name such as bridge.service", i + 1),
        ));
    }
    Ok(RestartSettings {
        units: units.value,
        action: r.action.unwrap_or(RestartAction::Restart),
        timeout: r.timeout.map_or(Duration::from_secs(90), |d| d.0),
        min_interval: r.min_interval.map_or(Duration::from_secs(10), |d| d.0),
    })
}

fn validate_refresh(
    r: MergedRefresh,
    sources: &[Source],
    watch: &Loc,
) -> Result<RefreshSettings, ConfigError> {
    let unit = r.unit.ok_or_else(|| {
        err_at(
            sources,
            watch,
            "watch.refresh.unit",
            "missing required key `unit`".into(),
        )
    })?;
    if !valid_unit_name(&unit.value) {
        return Err(err_at(
            sources,
            &unit.loc,
            "watch.refresh.unit",
            "is not a unit name such as claude-refresh.service".into(),
        ));
    }
    let ahead = match r.ahead {
        None => Duration::from_secs(4 * 60),
        Some(a) if a.value.0 >= CLI_REFRESH_WINDOW || a.value.0.is_zero() => {
            return Err(err_at(
                sources,
                &a.loc,
                "watch.refresh.ahead",
                "must be more than 0s and less than 5m: the CLI refreshes only when its token expires within 5 minutes, so a start earlier than that would refresh nothing".into(),
            ))
        }
        Some(a) => a.value.0,
    };
    Ok(RefreshSettings {
        unit: unit.value,
        ahead,
        timeout: r.timeout.map_or(Duration::from_secs(120), |d| d.0),
    })
}

/// Every copy destination is a file of its own: not the source of its
/// watch, not another watch's source, not another copy's destination.
fn check_destinations(checked: &[Checked], sources: &[Source]) -> Result<(), ConfigError> {
    let mut seen: Vec<&Path> = Vec::new();
    for c in checked {
        for (copy, loc) in c.watch.copies.iter().zip(&c.dests) {
            let problem = if copy.dest == c.watch.source {
                Some("a copy destination cannot be the source itself")
            } else if checked.iter().any(|o| o.watch.source == copy.dest) {
                Some("a copy destination cannot be the source of another watch")
            } else if seen.contains(&copy.dest.as_path()) {
                Some("a copy destination cannot be used by two copies")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(err_at(sources, loc, "watch.copy.dest", problem.into()));
            }
            seen.push(&copy.dest);
        }
    }
    Ok(())
}

/// A user or group name resolved to its id; the error does not repeat the name.
fn account(
    sources: &[Source],
    name: &At<String>,
    key: &str,
    resolve: fn(&str) -> Option<Account>,
) -> Result<Account, ConfigError> {
    let what = if key.ends_with("group") {
        "group"
    } else {
        "user"
    };
    let account = resolve(&name.value)
        .ok_or_else(|| err_at(sources, &name.loc, key, format!("unknown {what}")))?;
    // (uid_t)-1 tells chown "leave unchanged": an owner never given, so the
    // copy would never match and be rewritten forever.
    if account.id == u32::MAX {
        return Err(err_at(
            sources,
            &name.loc,
            key,
            format!("id 4294967295 means \"unchanged\" to the kernel, not a {what}"),
        ));
    }
    Ok(account)
}

fn valid_unit_name(u: &str) -> bool {
    let known = [
        ".service", ".socket", ".target", ".timer", ".path", ".mount", ".scope", ".slice",
    ];
    u.len() <= 255
        && known.iter().any(|s| u.ends_with(s) && u.len() > s.len())
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
settle = "250ms"

[[watch]]
name = "claude"
source = "/root/.claude/.credentials.json"

[watch.permissions]
file_mode = "0644"
traverse = true

[[watch.copy]]
dest = "/var/lib/claude-credentials/.credentials.json"
mode = "0640"
drop_keys = ["mcpOAuth"]

[watch.restart]
units = ["bridge.service"]
"#;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        parse_str(Path::new("/etc/cred-watch/cred-watch.toml"), text)
    }

    #[test]
    fn good_config_has_defaults() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.agent.settle, Duration::from_millis(250));
        assert_eq!(s.agent.state_dir, PathBuf::from("/var/lib/cred-watch"));
        let w = &s.watches[0];
        assert_eq!(w.format, Format::ClaudeOauth);
        assert_eq!(w.deletion_grace, Duration::from_secs(30));
        assert_eq!(w.expiry_warning, Duration::from_secs(1800));
        assert_eq!(w.copies[0].mode, 0o640);
        let r = w.restart.as_ref().unwrap();
        assert_eq!(
            (r.action, r.timeout, r.min_interval),
            (
                RestartAction::Restart,
                Duration::from_secs(90),
                Duration::from_secs(10)
            )
        );
        // The printed effective configuration parses back to the same settings.
        assert_eq!(parse(&s.to_toml()).unwrap().watches, s.watches);
    }

    fn expect_err(text: &str, line: usize, key: &str, needle: &str) {
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, Some(line), "{e}");
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
        assert!(e.message.contains(needle), "{e}");
        assert!(
            e.to_string()
                .starts_with("/etc/cred-watch/cred-watch.toml:"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        expect_err(
            &GOOD.replace("traverse = true", "travers = true"),
            11,
            "watch.permissions.travers",
            "unknown key, expected `file_mode` or `traverse`",
        );
    }

    #[test]
    fn bad_mode_and_duration() {
        expect_err(
            &GOOD.replace("\"0640\"", "\"0999\""),
            15,
            "watch.copy.mode",
            "invalid mode",
        );
        expect_err(
            &GOOD.replace("\"250ms\"", "\"fast\""),
            3,
            "agent.settle",
            "invalid duration",
        );
    }

    #[test]
    fn duplicate_name_and_no_action() {
        let dup = format!(
            "{GOOD}\n[[watch]]\nname = \"claude\"\nsource = \"/x/y\"\n[watch.permissions]\n"
        );
        expect_err(
            &dup,
            22,
            "watch.name",
            "duplicate watch name in the same file (first at line 6)",
        );
        expect_err(
            "[[watch]]\nname = \"a\"\nsource = \"/x/y\"\n",
            2,
            "watch",
            "no action",
        );
    }

    #[test]
    fn dropins_merge_by_name() {
        let sources = [
            Source {
                path: "/m.toml".into(),
                text: GOOD.into(),
            },
            Source {
                path: "/conf.d/10.toml".into(),
                text: "[[watch]]\nname = \"claude\"\n[watch.restart]\nmin_interval = \"1m\"\n"
                    .into(),
            },
        ];
        let s = load_sources(&sources).unwrap();
        let r = s.watches[0].restart.as_ref().unwrap();
        assert_eq!(r.min_interval, Duration::from_secs(60));
        assert_eq!(r.units, vec!["bridge.service".to_string()]);
        assert_eq!(s.watches[0].copies.len(), 1);
    }

    const SECRET: &str = "SECRETVALUE";

    fn assert_not_quoted(text: &str) {
        let e = parse(text).unwrap_err();
        let shown = e.to_string();
        for leak in [SECRET, "sk-ant", "root:", "SECRETHASH", "hunter2"] {
            assert!(!shown.contains(leak), "{shown}\nfrom:\n{text}");
        }
    }

    #[test]
    fn errors_never_quote_the_file() {
        let token = r#"{"claudeAiOauth":{"accessToken":"sk-ant-oat01-AAAA","refreshToken":"sk-ant-ort01-BBBB","expiresAt":1}}"#;
        let pretty =
            "{\n  \"claudeAiOauth\": {\n    \"accessToken\": \"sk-ant-oat01-AAAA\"\n  }\n}\n";
        for text in [
            token,
            pretty,
            "root:$6$SECRETHASH:19000:0:99999:7:::\n",
            "hunter2\n",
            "[hunter2 x\n",
            "PASSWORD=hunter2\n",
        ] {
            assert_not_quoted(text);
        }
        let valued = [
            (
                "name = \"claude\"",
                "name = \"claude\"\nformat = \"SECRETVALUE\"",
            ),
            ("\"250ms\"", "\"SECRETVALUE\""),
            ("traverse = true", "traverse = \"SECRETVALUE\""),
            ("mode = \"0640\"", "mode = \"SECRETVALUE\""),
            ("name = \"claude\"", "name = \"SECRETVALUE\""),
            (
                "name = \"claude\"",
                "name = \"claude\"\nsource_owner = \"SECRETVALUE\"",
            ),
            ("\"bridge.service\"", "\"SECRETVALUE\""),
            ("traverse = true", "\"SECRETVALUE x\" = true"),
            ("traverse = true", "traverse = 1\ntraverse = 2"),
            (
                "[watch.restart]",
                "[watch.restart]\naction = \"SECRETVALUE\"",
            ),
            ("[watch.restart]", "[SECRETVALUE.\"x y\"]"),
            ("drop_keys = [\"mcpOAuth\"]", "drop_keys = \"SECRETVALUE\""),
            (
                "drop_keys = [\"mcpOAuth\"]",
                "drop_keys = [\"a\"] = \"SECRETVALUE\"",
            ),
            (
                "drop_keys = [\"mcpOAuth\"]",
                "owner = \"SECRETVALUE`, expected `x\"",
            ),
        ];
        for (from, to) in valued {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD, "{from}");
            assert_not_quoted(&text);
        }
    }

    #[test]
    fn known_key_still_named_and_serde_lists_are_known() {
        // A plain unknown key is named by its key path, the expected names
        // come through (they are the schema's), and the value never does.
        for (section, line) in [
            ("", 2),
            ("[agent]\n", 3),
            ("[[watch]]\n", 3),
            ("[[watch]]\n[watch.permissions]\n", 4),
            ("[[watch]]\n[[watch.copy]]\n", 4),
            ("[[watch]]\n[watch.restart]\n", 4),
        ] {
            let text = format!("\n{section}zzz = \"SECRETVALUE\"\n");
            let e = parse(&text).unwrap_err();
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.key.as_deref().unwrap().ends_with("zzz"), "{e}");
            assert!(e.message.starts_with("unknown key, expected "), "{e}");
            assert!(e.message.contains("`"), "{e}");
            assert!(!e.to_string().contains(SECRET), "{e}");
        }
        for key in ["format", "log_level", "action"] {
            let text = GOOD
                .replace("[agent]", "[agent]\nlog_level = \"x\"")
                .replace("[watch.restart]", "[watch.restart]\naction = \"x\"")
                .replace("name = \"claude\"", "name = \"claude\"\nformat = \"x\"");
            let text = text.replace(&format!("{key} = \"x\""), &format!("{key} = \"zz\""));
            let e = parse(&text).unwrap_err();
            assert!(
                e.message.starts_with("unknown value, expected one of `"),
                "{e}"
            );
        }
    }

    #[test]
    fn syntax_key_names_only_the_schemas_names() {
        let text = "[watch.copy] # c\nmode = 1\n\"a b\" = 2\nroot:$6$x\n[[sk-ant-x y]]\nk=1\n\
                    [watch]\nPASSWORD=x\n";
        let at = |line: usize| {
            let offset: usize = text.lines().take(line - 1).map(|l| l.len() + 1).sum();
            syntax_key(text, offset)
        };
        assert_eq!(at(1).as_deref(), Some("watch.copy"));
        assert_eq!(at(2).as_deref(), Some("watch.copy.mode"));
        assert_eq!(at(3), None);
        assert_eq!(at(4), None);
        assert_eq!(at(5), None);
        assert_eq!(at(6), None, "a key under a header that is not plain");
        assert_eq!(at(7).as_deref(), Some("watch"));
        assert_eq!(at(8), None, "a plain key that is not the schema's");
        let long = format!("{} = 1\n", "a".repeat(65));
        assert_eq!(syntax_key(&long, 0), None);
    }

    #[test]
    fn key_paths_come_from_the_deserializer() {
        // A bad item of a multi-line array: the array's key, not the line's text.
        let text = GOOD.replace(
            "drop_keys = [\"mcpOAuth\"]",
            "drop_keys = [\n  \"mcpOAuth\",\n  1,\n]",
        );
        expect_err(&text, 18, "watch.copy.drop_keys", "wrong type of value");
        // The second copy of the second watch: indices are not named.
        let two = format!(
            "{GOOD}\n[[watch]]\nname = \"b\"\nsource = \"/b/c.json\"\n[[watch.copy]]\n\
             dest = \"/d/1.json\"\n[[watch.copy]]\ndest = \"/d/2.json\"\nmode = \"9\"\n"
        );
        expect_err(&two, 28, "watch.copy.mode", "invalid mode");
        // Dotted keys and inline tables are the same keys.
        expect_err(
            &GOOD.replace("[agent]\nsettle = \"250ms\"", "agent.settle = 5"),
            2,
            "agent.settle",
            "wrong type of value",
        );
        expect_err(
            &GOOD.replace("[agent]\nsettle = \"250ms\"", "agent = { settle = \"x\" }"),
            2,
            "agent.settle",
            "invalid duration",
        );
        // An unknown table is named when it is plain, its table when not.
        expect_err(
            &GOOD.replace("[agent]", "[agnet]"),
            2,
            "agnet",
            "unknown key, expected `agent` or `watch`",
        );
        let e =
            parse(&GOOD.replace("[watch.restart]", "[watch.restart]\n\"a b\" = 1")).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(19), Some("watch.restart")),
            "{e}"
        );
        let e = parse(&GOOD.replace("[watch.restart]", "[watch.SECRET.\"x y\"]")).unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(18), Some("watch")), "{e}");
        let long = "k".repeat(60);
        let e = parse(&GOOD.replace("[watch.restart]", &format!("[watch.restart]\n{long} = 1")))
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("watch.restart"), "{e}");
    }

    #[test]
    fn modes_above_0777_are_refused() {
        for (from, to, line, key) in [
            ("mode = \"0640\"", "mode = \"4755\"", 15, "watch.copy.mode"),
            (
                "mode = \"0640\"",
                "dir_mode = \"2755\"",
                15,
                "watch.copy.dir_mode",
            ),
            (
                "file_mode = \"0644\"",
                "file_mode = \"1644\"",
                10,
                "watch.permissions.file_mode",
            ),
            (
                "file_mode = \"0644\"",
                "file_mode = \"7777\"",
                10,
                "watch.permissions.file_mode",
            ),
        ] {
            expect_err(
                &GOOD.replace(from, to),
                line,
                key,
                "setuid, setgid and sticky bits",
            );
        }
        let s =
            parse(&GOOD.replace("mode = \"0640\"", "mode = \"0777\"\ndir_mode = \"777\"")).unwrap();
        assert_eq!(
            (s.watches[0].copies[0].mode, s.watches[0].copies[0].dir_mode),
            (0o777, 0o777)
        );
    }

    #[test]
    fn durations_over_366_days_are_refused() {
        let all = "[agent]\nsettle = \"D\"\nresync_interval = \"D\"\n[[watch]]\nname = \"a\"\n\
                   source = \"/s/f\"\ndeletion_grace = \"D\"\nexpiry_warning = \"D\"\n\
                   max_lifetime = \"D\"\n[watch.restart]\nunits = [\"a.service\"]\n\
                   timeout = \"D\"\nmin_interval = \"D\"\n";
        let ok = all.replace("\"D\"", "\"366d\"");
        let s = parse(&ok).unwrap();
        assert_eq!(s.watches[0].max_lifetime, MAX_DURATION);
        let keys = [
            (2, "agent.settle"),
            (3, "agent.resync_interval"),
            (7, "watch.deletion_grace"),
            (8, "watch.expiry_warning"),
            (9, "watch.max_lifetime"),
            (12, "watch.restart.timeout"),
            (13, "watch.restart.min_interval"),
        ];
        for (line, key) in keys {
            let lines: Vec<&str> = ok.lines().collect();
            for bad in [
                "367d",
                "366d 1s",
                "300000000000years",
                "18446744073709551615s",
            ] {
                let mut lines = lines.clone();
                let edited = lines[line - 1].replace("366d", bad);
                lines[line - 1] = &edited;
                let text = lines.join("\n");
                let e = parse(&text).unwrap_err();
                assert_eq!((e.line, e.key.as_deref()), (Some(line), Some(key)), "{e}");
                assert!(e.message.contains("duration"), "{e}");
                assert!(!e.to_string().contains(bad), "{e}");
            }
        }
    }

    #[test]
    fn paths_must_be_normalized() {
        let bad = [
            "/a//b", "/a/./b", "/a/../b", "/a/b/.", "/a/b/..", "./a", "../a", "a//b", "",
            "/a\u{0}b",
        ];
        for path in bad {
            let toml_path = path.replace('\0', "\\u0000");
            for (from, line, key) in [
                ("\"/root/.claude/.credentials.json\"", 7, "watch.source"),
                (
                    "\"/var/lib/claude-credentials/.credentials.json\"",
                    14,
                    "watch.copy.dest",
                ),
                ("settle = \"250ms\"", 3, "agent.state_dir"),
            ] {
                let to = if key == "agent.state_dir" {
                    format!("state_dir = \"{toml_path}\"")
                } else {
                    format!("\"{toml_path}\"")
                };
                let e = parse(&GOOD.replace(from, &to)).unwrap_err();
                assert_eq!(
                    (e.line, e.key.as_deref()),
                    (Some(line), Some(key)),
                    "{path:?}: {e}"
                );
                assert!(e.message.starts_with("a path cannot"), "{e}");
            }
        }
        for (path, line, key) in [("/a/", 7, "watch.source"), ("/", 7, "watch.source")] {
            let text = GOOD.replace(
                "\"/root/.claude/.credentials.json\"",
                &format!("\"{path}\""),
            );
            expect_err(&text, line, key, "does not name a file");
        }
        let text = GOOD.replace(
            "\"/var/lib/claude-credentials/.credentials.json\"",
            "\"/d/\"",
        );
        expect_err(&text, 14, "watch.copy.dest", "does not name a file");
        // Relative paths resolve against the working directory, as before.
        let s =
            parse(&GOOD.replace("\"/root/.claude/.credentials.json\"", "\"a/.b.json\"")).unwrap();
        assert_eq!(
            s.watches[0].source,
            std::env::current_dir().unwrap().join("a/.b.json")
        );
    }

    #[test]
    fn dest_cannot_be_a_source_or_another_dest() {
        let two = format!(
            "{GOOD}\n[[watch]]\nname = \"other\"\nsource = \"/home/o/.credentials.json\"\n\
             [[watch.copy]]\ndest = \"DEST\"\n"
        );
        // Line 25 is the second watch's dest.
        for (dest, message) in [
            ("/home/o/.credentials.json", "the source itself"),
            (
                "/root/.claude/.credentials.json",
                "the source of another watch",
            ),
            (
                "/var/lib/claude-credentials/.credentials.json",
                "used by two copies",
            ),
        ] {
            expect_err(&two.replace("DEST", dest), 25, "watch.copy.dest", message);
        }
        // The first watch's dest naming the second watch's source: its own line.
        let text = two.replace("DEST", "/elsewhere/x.json").replacen(
            "/var/lib/claude-credentials/.credentials.json",
            "/home/o/.credentials.json",
            1,
        );
        expect_err(&text, 14, "watch.copy.dest", "the source of another watch");
    }

    #[test]
    fn errors_from_a_dropin_point_into_the_dropin() {
        let sources = [
            Source {
                path: "/m.toml".into(),
                text: GOOD.into(),
            },
            Source {
                path: "/conf.d/10.toml".into(),
                text: "[[watch]]\nname = \"claude\"\n\n[[watch.copy]]\ndest = \"/root/.claude/.credentials.json\"\n".into(),
            },
        ];
        let e = load_sources(&sources).unwrap_err();
        assert_eq!(e.file, PathBuf::from("/conf.d/10.toml"), "{e}");
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(5), Some("watch.copy.dest")),
            "{e}"
        );
    }

    #[test]
    fn max_lifetime_and_dir_mode_merge_and_are_printed() {
        let sources = [
            Source {
                path: "/m.toml".into(),
                text: GOOD.replace(
                    "name = \"claude\"",
                    "name = \"claude\"\nmax_lifetime = \"60d\"",
                ),
            },
            Source {
                path: "/conf.d/10.toml".into(),
                text: "[[watch]]\nname = \"claude\"\nmax_lifetime = \"7d\"\n[[watch.copy]]\n\
                       dest = \"/srv/c.json\"\ndir_mode = \"0750\"\n"
                    .into(),
            },
        ];
        let s = load_sources(&sources).unwrap();
        let w = &s.watches[0];
        assert_eq!(w.max_lifetime, Duration::from_secs(7 * 24 * 3600));
        assert_eq!((w.copies.len(), w.copies[0].dir_mode), (1, 0o750));
        let printed = s.to_toml();
        assert!(printed.contains("max_lifetime = \"7days\""), "{printed}");
        assert!(printed.contains("dir_mode = \"0750\""), "{printed}");
        assert!(printed.contains("restart"), "{printed}");
        assert_eq!(parse(&printed).unwrap().watches, s.watches);
        // Defaults are printed too.
        let printed = parse(GOOD).unwrap().to_toml();
        assert!(
            printed.contains("max_lifetime = \"1month 13h 26m 24s\""),
            "{printed}"
        );
        assert!(printed.contains("dir_mode = \"0755\""), "{printed}");
    }

    #[test]
    fn dropins_are_read_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("cred-watch.toml");
        std::fs::write(&main, GOOD).unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        let secret = dir.path().join("shadow");
        std::fs::write(&secret, "root:$6$SECRETHASH:19000:0:99999:7:::\n").unwrap();
        let link = dir.path().join("conf.d/10-link.toml");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let e = load(&main).unwrap_err();
        assert_eq!((e.file.as_path(), e.line), (link.as_path(), None), "{e}");
        assert!(e.message.contains("symbolic link"), "{e}");
        assert!(!e.to_string().contains("SECRETHASH"), "{e}");
        // The main file may be a symlink.
        std::fs::remove_file(&link).unwrap();
        let main_link = dir.path().join("main-link.toml");
        std::os::unix::fs::symlink(&main, &main_link).unwrap();
        assert!(load(&main_link).is_ok());
        // A FIFO drop-in is refused without blocking.
        nix::unistd::mkfifo(
            &dir.path().join("conf.d/20.toml"),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        let e = load(&main).unwrap_err();
        assert!(e.message.contains("not a regular file"), "{e}");
    }

    /// What the fuzz target checks, over its corpus: no panic, a printed
    /// configuration loads back, and an error's message repeats no long word
    /// of the input and its key is a plain key.
    #[test]
    fn fuzz_corpus_errors_never_quote_the_input() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config");
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let bytes = std::fs::read(entry.path()).unwrap();
            let Ok(text) = std::str::from_utf8(&bytes) else {
                continue;
            };
            match parse(text) {
                Ok(s) => assert_eq!(parse(&s.to_toml()).unwrap().watches, s.watches),
                Err(e) => {
                    let words = text.split(|c: char| !c.is_ascii_alphanumeric());
                    for word in words.filter(|w| w.len() >= 16) {
                        assert!(!e.message.contains(word), "{e}\n{text}");
                    }
                    let key = e.key.as_deref().unwrap_or("k");
                    assert!(plain_key(key).is_some_and(|k| k == key), "{e}");
                }
            }
        }
    }
}
