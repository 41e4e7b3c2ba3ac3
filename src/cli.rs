//! Command line: parses flags, sets up logging, dispatches, and turns errors
//! into exit codes (78 for any configuration error).

use crate::config::{self, ConfigError, Settings};
use crate::doubles::{FixtureUnits, Recorder, RECORD_ENV, UNITS_FIXTURE_ENV};
use crate::systemd::{ServiceManager, Systemd, SystemdQuery, UnitQuery};
use crate::EX_CONFIG;
use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;

/// `--version`: the package version and the commit it was built from
/// (see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("CRED_WATCH_GIT_COMMIT"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "cred-watch",
    version = VERSION,
    about = "Keeps OAuth credentials readable, copied and fresh for the services that use them"
)]
struct Cli {
    /// Main configuration file (default /etc/cred-watch/cred-watch.toml, or $CRED_WATCH_CONFIG).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent in the foreground (what the systemd unit runs).
    Run,
    /// Validate the configuration and print the effective configuration.
    Check,
    /// One reconcile pass, then exit (0 in sync or applied, 1 otherwise).
    Sync {
        /// Show what would change without changing anything.
        #[arg(long)]
        dry_run: bool,
        /// Only this watch.
        #[arg(long, value_name = "NAME")]
        watch: Option<String>,
    },
    /// Diagnose the host: config, sources, modes, copies, readers, units, stale handles.
    Doctor {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Also check that this user can read the credentials (repeatable).
        #[arg(long = "user", value_name = "NAME")]
        users: Vec<String>,
    },
    /// What the agent last did, from the state file.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (what the package installs).
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The completion script for `shell`, from the real command line.
fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    const BIN: &str = "cred-watch";
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), BIN, &mut out);
    if shell == clap_complete::Shell::Bash {
        // clap_complete escapes the `-` of the name in the subcommands'
        // case labels differently than in the state it matches them
        // against (clap-rs/clap#6421): no subcommand option would complete.
        let text = String::from_utf8_lossy(&out)
            .replace(&BIN.replace('-', "__subcmd__"), &BIN.replace('-', "__"));
        out = text.into_bytes();
    }
    out
}

/// Entry point: returns the process exit code.
pub fn run() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    if let Command::Completions { shell } = cli.command {
        use std::io::Write;
        return match std::io::stdout().write_all(&completions(shell)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("cred-watch: writing the completion script: {e}");
                1
            }
        };
    }
    crate::logging::init(log::LevelFilter::Info);
    let path = config::main_path(cli.config.as_deref());
    let settings = match config::load(&path) {
        Ok(s) => s,
        Err(e) => {
            if let Command::Doctor { json, .. } = cli.command {
                crate::doctor::print(&[crate::doctor::config_failure(&e)], json);
            }
            return config_error(&e);
        }
    };
    crate::logging::set_level(settings.agent.log_level.filter());
    exit_code(dispatch(cli.command, path, settings))
}

/// The service manager and the unit query, chosen once from the
/// environment and passed down to the commands that use them.
pub struct Backends {
    pub manager: Box<dyn ServiceManager>,
    pub query: Box<dyn UnitQuery>,
}

impl Backends {
    /// systemd over D-Bus, or the test doubles that the environment asks
    /// for (see [`crate::doubles`]): each double in use is logged as a
    /// warning, so a stray `Environment=` cannot silently stop restarts.
    pub fn from_env() -> Backends {
        let manager: Box<dyn ServiceManager> = match Recorder::from_env() {
            Some(recorder) => {
                log::warn!(
                    "{RECORD_ENV} is set: restarts are NOT sent to systemd, only recorded in {} \
                     (a test double: remove the variable from the environment)",
                    recorder.path.display()
                );
                Box::new(recorder)
            }
            None => Box::new(Systemd),
        };
        let query: Box<dyn UnitQuery> = match FixtureUnits::from_env() {
            Some(fixture) => {
                log::warn!(
                    "{UNITS_FIXTURE_ENV} is set: units are NOT asked of systemd, they are read \
                     from {} (a test double: remove the variable from the environment)",
                    fixture.path.display()
                );
                Box::new(fixture)
            }
            None => Box::new(SystemdQuery::default()),
        };
        Backends { manager, query }
    }
}

fn dispatch(command: Command, path: PathBuf, settings: Settings) -> anyhow::Result<i32> {
    match command {
        Command::Check => {
            print_effective(&settings);
            Ok(0)
        }
        Command::Run => crate::agent::run(path, settings, Backends::from_env().manager).map(|()| 0),
        Command::Sync { dry_run, watch } => {
            let manager = Backends::from_env().manager;
            crate::commands::sync(&settings, dry_run, watch.as_deref(), manager)
        }
        Command::Doctor { json, users } => {
            let mut query = Backends::from_env().query;
            let findings = crate::doctor::diagnose(&settings, &users, query.as_mut());
            Ok(crate::doctor::print(&findings, json))
        }
        Command::Status { json } => crate::commands::status(&settings, json),
        Command::Completions { .. } => unreachable!("handled before the configuration is read"),
    }
}

/// What `check` prints: the files read and the effective configuration.
fn print_effective(settings: &Settings) {
    let files: Vec<String> = settings
        .files
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    print!(
        "# effective configuration from {}\n{}",
        files.join(", "),
        settings.to_toml()
    );
}

/// The exit code for a command's result: 78 for a configuration error or
/// an unsafe state directory, else 1 with the error chain logged.
fn exit_code(result: anyhow::Result<i32>) -> i32 {
    let e = match result {
        Ok(code) => return code,
        Err(e) => e,
    };
    if let Some(ce) = e.downcast_ref::<ConfigError>() {
        return config_error(ce);
    }
    if let Some(se @ crate::state::StateError::Unsafe(_)) =
        e.downcast_ref::<crate::state::StateError>()
    {
        log::error!("unsafe state directory: {se}");
        return EX_CONFIG;
    }
    // The error chain, one cause per line.
    log::error!("{e}");
    for cause in e.chain().skip(1) {
        log::error!("  caused by: {cause}");
    }
    1
}

fn config_error(e: &ConfigError) -> i32 {
    log::error!("configuration error: {e}");
    EX_CONFIG
}
