//! Configuration in two stages: strict raw structs per file (TOML, unknown
//! keys rejected), merged across drop-ins, then one `validate()` into checked
//! settings. Every error names the file, line and key.

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

/// A duration written as "250ms", "30s", "10m".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|_| serde::de::Error::custom(format!("invalid duration {s:?}: expected a number with a unit, such as \"250ms\", \"30s\" or \"10m\"")))
    }
}

/// A file mode written as an octal string such as "0640".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_mode(&s).map(FileMode).ok_or_else(|| {
            serde::de::Error::custom(format!("invalid mode {s:?}: expected an octal string of 3 or 4 digits 0-7, such as \"0640\""))
        })
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
            Err(serde::de::Error::custom(format!(
                "invalid watch name {s:?}: use [a-z0-9_-]+"
            )))
        }
    }
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
}

impl RestartAction {
    /// The org.freedesktop.systemd1.Manager method for this action.
    pub fn method(self) -> &'static str {
        match self {
            RestartAction::Restart => "RestartUnit",
            RestartAction::TryRestart => "TryRestartUnit",
            RestartAction::ReloadOrRestart => "ReloadOrRestartUnit",
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
    state_dir: Option<PathBuf>,
    settle: Option<Dur>,
    resync_interval: Option<Dur>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    name: Spanned<WatchName>,
    source: Option<PathBuf>,
    format: Option<Format>,
    source_owner: Option<Spanned<String>>,
    deletion_grace: Option<Dur>,
    expiry_warning: Option<Dur>,
    allow_rollback: Option<bool>,
    max_lifetime: Option<Dur>,
    permissions: Option<RawPermissions>,
    copy: Option<Vec<RawCopy>>,
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
    dest: Spanned<PathBuf>,
    owner: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    mode: Option<FileMode>,
    dir_mode: Option<FileMode>,
    #[serde(default)]
    drop_keys: Vec<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    units: Option<Spanned<Vec<String>>>,
    action: Option<RestartAction>,
    timeout: Option<Dur>,
    min_interval: Option<Dur>,
}

/// Where a value came from, to point errors at it after merging.
#[derive(Debug, Clone)]
struct Origin {
    file: usize,
    span: std::ops::Range<usize>,
}

struct Source {
    path: PathBuf,
    text: String,
}

struct Merged {
    agent: RawAgent,
    watches: Vec<(RawWatch, Origin)>,
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
}

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
/// (lexical order, later wins), then validates.
pub fn load(main: &Path) -> Result<Settings, ConfigError> {
    let mut paths = vec![main.to_path_buf()];
    let dropin_dir = main.parent().unwrap_or(Path::new(".")).join("conf.d");
    match std::fs::read_dir(&dropin_dir) {
        Ok(entries) => {
            let mut dropins: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "toml") && p.is_file())
                .collect();
            dropins.sort();
            paths.extend(dropins);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(plain_error(
                &dropin_dir,
                format!("cannot read drop-in directory: {e}"),
            ))
        }
    }
    let mut sources = Vec::new();
    for path in &paths {
        let text = std::fs::read_to_string(path)
            .map_err(|e| plain_error(path, format!("cannot read: {e}")))?;
        sources.push(Source {
            path: path.clone(),
            text,
        });
    }
    load_sources(&sources)
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

fn load_sources(sources: &[Source]) -> Result<Settings, ConfigError> {
    let mut merged = Merged {
        agent: RawAgent::default(),
        watches: Vec::new(),
    };
    for (index, src) in sources.iter().enumerate() {
        let raw: RawFile = toml::from_str(&src.text).map_err(|e| toml_error(src, &e))?;
        merge(&mut merged, raw, index, src)?;
    }
    validate(merged, sources)
}

fn toml_error(src: &Source, err: &toml::de::Error) -> ConfigError {
    let span = err.span();
    let (line, key) = match &span {
        Some(span) => (
            Some(line_of(&src.text, span.start)),
            key_at(&src.text, span.start),
        ),
        None => (None, None),
    };
    ConfigError {
        file: src.path.clone(),
        line,
        key,
        message: err.message().trim().to_owned(),
    }
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The dotted key at a byte offset: the enclosing `[table]` header plus the
/// key on that line, e.g. `watch.copy.mode`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let header = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let trimmed = line.trim();
    if trimmed.starts_with('[') {
        return Some(
            trimmed
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_owned(),
        );
    }
    let key = trimmed
        .split('=')
        .next()
        .map(str::trim)
        .filter(|k| !k.is_empty() && !k.starts_with('#'))?;
    Some(match header {
        Some(h) => format!("{h}.{key}"),
        None => key.to_owned(),
    })
}

fn merge(merged: &mut Merged, raw: RawFile, index: usize, src: &Source) -> Result<(), ConfigError> {
    if let Some(agent) = raw.agent {
        let m = &mut merged.agent;
        m.log_level = agent.log_level.or(m.log_level);
        m.state_dir = agent.state_dir.or(m.state_dir.take());
        m.settle = agent.settle.or(m.settle);
        m.resync_interval = agent.resync_interval.or(m.resync_interval);
    }
    let mut seen: BTreeMap<WatchName, ()> = BTreeMap::new();
    for w in raw.watch {
        let origin = Origin {
            file: index,
            span: w.name.span(),
        };
        if seen.insert(w.name.get_ref().clone(), ()).is_some() {
            return Err(ConfigError {
                file: src.path.clone(),
                line: Some(line_of(&src.text, origin.span.start)),
                key: Some("watch.name".into()),
                message: format!(
                    "duplicate watch name {:?} in the same file",
                    w.name.get_ref().0
                ),
            });
        }
        match merged
            .watches
            .iter_mut()
            .find(|(m, _)| m.name.get_ref() == w.name.get_ref())
        {
            // A drop-in overrides the keys it sets, field by field.
            Some((m, _)) => {
                m.source = w.source.or(m.source.take());
                m.format = w.format.or(m.format);
                m.source_owner = w.source_owner.or(m.source_owner.take());
                m.deletion_grace = w.deletion_grace.or(m.deletion_grace);
                m.expiry_warning = w.expiry_warning.or(m.expiry_warning);
                m.allow_rollback = w.allow_rollback.or(m.allow_rollback);
                m.max_lifetime = w.max_lifetime.or(m.max_lifetime);
                m.permissions = match (w.permissions, m.permissions.take()) {
                    (Some(new), Some(old)) => Some(RawPermissions {
                        file_mode: new.file_mode.or(old.file_mode),
                        traverse: new.traverse.or(old.traverse),
                    }),
                    (new, old) => new.or(old),
                };
                m.copy = w.copy.or(m.copy.take());
                m.restart = match (w.restart, m.restart.take()) {
                    (Some(new), Some(old)) => Some(RawRestart {
                        units: new.units.or(old.units),
                        action: new.action.or(old.action),
                        timeout: new.timeout.or(old.timeout),
                        min_interval: new.min_interval.or(old.min_interval),
                    }),
                    (new, old) => new.or(old),
                };
            }
            None => merged.watches.push((w, origin)),
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

fn validate(merged: Merged, sources: &[Source]) -> Result<Settings, ConfigError> {
    let err_at =
        |file: usize, span: &std::ops::Range<usize>, key: &str, message: String| ConfigError {
            file: sources[file].path.clone(),
            line: Some(line_of(&sources[file].text, span.start)),
            key: Some(key.to_owned()),
            message,
        };
    let a = merged.agent;
    let agent = AgentSettings {
        log_level: a.log_level.unwrap_or(LogLevel::Info),
        state_dir: absolute(
            a.state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/cred-watch")),
        ),
        settle: a.settle.map_or(Duration::from_millis(500), |d| d.0),
        resync_interval: a.resync_interval.map_or(Duration::ZERO, |d| d.0),
    };
    let mut watches = Vec::new();
    for (w, origin) in merged.watches {
        let name = w.name.into_inner().0;
        let at = |key: &str, message: String| {
            err_at(
                origin.file,
                &origin.span,
                key,
                format!("watch {name:?}: {message}"),
            )
        };
        let source = absolute(
            w.source
                .ok_or_else(|| at("watch.source", "missing required key `source`".into()))?,
        );
        if source.file_name().is_none() || source.to_string_lossy().ends_with('/') {
            return Err(at(
                "watch.source",
                format!("{} does not name a file", source.display()),
            ));
        }
        let format = w.format.unwrap_or(Format::ClaudeOauth);
        let source_owner = match w.source_owner {
            Some(o) => Some(resolve_user(o.get_ref()).ok_or_else(|| {
                err_at(
                    origin.file,
                    &o.span(),
                    "watch.source_owner",
                    format!("unknown user {:?}", o.get_ref()),
                )
            })?),
            None => None,
        };
        let permissions = w.permissions.map(|p| PermissionSettings {
            file_mode: p.file_mode.map_or(0o644, |m| m.0),
            traverse: p.traverse.unwrap_or(false),
        });
        let mut copies = Vec::new();
        for c in w.copy.unwrap_or_default() {
            let dest_span = c.dest.span();
            let dest = absolute(c.dest.into_inner());
            if dest.file_name().is_none() {
                return Err(err_at(
                    origin.file,
                    &dest_span,
                    "watch.copy.dest",
                    format!("{} does not name a file", dest.display()),
                ));
            }
            if dest == source {
                return Err(err_at(
                    origin.file,
                    &dest_span,
                    "watch.copy.dest",
                    "a copy destination cannot be the source itself".into(),
                ));
            }
            if format == Format::Any && !c.drop_keys.is_empty() {
                return Err(err_at(
                    origin.file,
                    &dest_span,
                    "watch.copy.drop_keys",
                    "drop_keys needs format \"json\" or \"claude-oauth\"".into(),
                ));
            }
            if format == Format::ClaudeOauth && c.drop_keys.iter().any(|k| k == "claudeAiOauth") {
                return Err(err_at(
                    origin.file,
                    &dest_span,
                    "watch.copy.drop_keys",
                    "cannot drop claudeAiOauth: it is the credential".into(),
                ));
            }
            let owner = match c.owner {
                Some(o) => Some(resolve_user(o.get_ref()).ok_or_else(|| {
                    err_at(
                        origin.file,
                        &o.span(),
                        "watch.copy.owner",
                        format!("unknown user {:?}", o.get_ref()),
                    )
                })?),
                None => None,
            };
            let group = match c.group {
                Some(g) => Some(resolve_group(g.get_ref()).ok_or_else(|| {
                    err_at(
                        origin.file,
                        &g.span(),
                        "watch.copy.group",
                        format!("unknown group {:?}", g.get_ref()),
                    )
                })?),
                None => None,
            };
            copies.push(CopySettings {
                dest,
                owner,
                group,
                mode: c.mode.map_or(0o640, |m| m.0),
                dir_mode: c.dir_mode.map_or(0o755, |m| m.0),
                drop_keys: c.drop_keys,
            });
        }
        let restart = match w.restart {
            Some(r) => {
                let units = r.units.ok_or_else(|| {
                    at("watch.restart.units", "missing required key `units`".into())
                })?;
                let span = units.span();
                let units = units.into_inner();
                if units.is_empty() {
                    return Err(err_at(
                        origin.file,
                        &span,
                        "watch.restart.units",
                        "must name at least one unit".into(),
                    ));
                }
                if let Some(bad) = units.iter().find(|u| !valid_unit_name(u)) {
                    return Err(err_at(
                        origin.file,
                        &span,
                        "watch.restart.units",
                        format!("invalid unit name {bad:?} (expected e.g. \"bridge.service\")"),
                    ));
                }
                Some(RestartSettings {
                    units,
                    action: r.action.unwrap_or(RestartAction::Restart),
                    timeout: r.timeout.map_or(Duration::from_secs(90), |d| d.0),
                    min_interval: r.min_interval.map_or(Duration::from_secs(10), |d| d.0),
                })
            }
            None => None,
        };
        if permissions.is_none() && copies.is_empty() && restart.is_none() {
            return Err(at("watch", "has no action: add at least one of [watch.permissions], [[watch.copy]], [watch.restart]".into()));
        }
        if let Some(other) = watches.iter().find(|o: &&WatchSettings| o.source == source) {
            return Err(at(
                "watch.source",
                format!(
                    "{} is already watched by {:?}",
                    source.display(),
                    other.name
                ),
            ));
        }
        watches.push(WatchSettings {
            name,
            source,
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
        });
    }
    if watches.is_empty() {
        return Err(plain_error(
            &sources[0].path,
            "no [[watch]] is configured".into(),
        ));
    }
    let all_dests: Vec<&PathBuf> = watches
        .iter()
        .flat_map(|w| w.copies.iter().map(|c| &c.dest))
        .collect();
    for (i, d) in all_dests.iter().enumerate() {
        if all_dests[..i].contains(d) || watches.iter().any(|w| &&w.source == d) {
            return Err(plain_error(
                &sources[0].path,
                format!(
                    "copy destination {} is used twice (or is another watch's source)",
                    d.display()
                ),
            ));
        }
    }
    Ok(Settings {
        files: sources.iter().map(|s| s.path.clone()).collect(),
        agent,
        watches,
    })
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

fn resolve_user(name: &str) -> Option<Account> {
    let id = match name.parse::<u32>() {
        Ok(id) => id,
        Err(_) => nix::unistd::User::from_name(name)
            .ok()
            .flatten()?
            .uid
            .as_raw(),
    };
    Some(Account {
        name: name.to_owned(),
        id,
    })
}

fn resolve_group(name: &str) -> Option<Account> {
    let id = match name.parse::<u32>() {
        Ok(id) => id,
        Err(_) => nix::unistd::Group::from_name(name)
            .ok()
            .flatten()?
            .gid
            .as_raw(),
    };
    Some(Account {
        name: name.to_owned(),
        id,
    })
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
            "unknown field",
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
        expect_err(&dup, 22, "watch.name", "duplicate");
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
}
