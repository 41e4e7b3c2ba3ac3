//! End-to-end against the real Claude Code CLI (the pinned npm release,
//! tests/e2e/claude-cli.sh) and a real systemd: the CLI refreshes for real
//! against a local HTTPS mock of the token and profile endpoints
//! (tests/e2e/mock_token_server.py: single-use refresh tokens,
//! `invalid_grant` on reuse, a request log naming each caller's uid). The
//! mock runs on the host inside the container's private network namespace;
//! the container's own /etc/hosts points the two names at 127.0.0.1 and
//! the CLI trusts the mock's throw-away CA through NODE_EXTRA_CA_CERTS.
//! Nothing leaves the machine and the host's /etc/hosts is never touched.
//!
//! The source belongs to `alice` (the CLI's own user); the consumer
//! `bridge.service` runs the CLI as `bob` on cred-watch's copy
//! (`CLAUDE_SECURESTORAGE_CONFIG_DIR`), as the README's topology says.
//! Assertions use observable facts only: the mock's log, file modes, the
//! SHA-256 of tokens (never their text), start counts, the journal.
mod common;
#[path = "e2e/container.rs"]
mod container;
#[path = "e2e/steps.rs"]
mod steps;
use container::{now_ms, wait_until, Container};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use steps::{put_back, steps, OnFailure};

const CLI_VERSION: &str = "2.1.330";
const SRC: &str = "/home/alice/.claude/.credentials.json";
const COPY_DIR: &str = "/var/lib/claude-credentials";
const COPY: &str = "/var/lib/claude-credentials/.credentials.json";
/// What every CLI run needs here: the mock's CA. No update checks.
const CLI_ENV: &str = "NODE_EXTRA_CA_CERTS=/mnt/mock/ca.pem DISABLE_AUTOUPDATER=1";

fn config(refresh: bool) -> String {
    let refresh = if refresh {
        "\n[watch.refresh]\nunit = \"claude-refresh.service\"\nahead = \"4m\"\ntimeout = \"1m\"\n"
    } else {
        ""
    };
    format!(
        r#"[agent]
settle = "200ms"

[[watch]]
name = "claude"
source = "{SRC}"
source_owner = "alice"
# The mock's tokens live 250 s: warn only in the last minute.
expiry_warning = "1m"

[[watch.copy]]
dest = "{COPY}"
owner = "root"
group = "claude-credentials"
mode = "0640"

[watch.restart]
units = ["bridge.service"]
min_interval = "1s"
timeout = "30s"
{refresh}"#
    )
}

/// The consumer: at each start it runs the real CLI as `bob` on the copy
/// (one JSON line of `claude auth status` per start), then holds the copy
/// open as a worker would.
const BRIDGE_UNIT: &str = "[Unit]\nDescription=bridge: the real CLI as a consumer of the copy\n[Service]\nUser=bob\nSupplementaryGroups=claude-credentials\nEnvironment=HOME=/home/bob CLAUDE_SECURESTORAGE_CONFIG_DIR=/var/lib/claude-credentials NODE_EXTRA_CA_CERTS=/mnt/mock/ca.pem DISABLE_AUTOUPDATER=1\nExecStartPre=+/bin/sh -c 'echo start >> /run/bridge.starts'\nExecStart=/usr/local/bin/bridge-worker\nRuntimeDirectory=bridge\nRuntimeDirectoryPreserve=yes\n";
const BRIDGE_WORKER: &str = "#!/bin/sh\nout=$(claude auth status 2>&1)\nprintf '%s\\n' \"$out\" | tr -d '\\n' >> /run/bridge/status.log\necho >> /run/bridge/status.log\nexec sleep infinity 3< /var/lib/claude-credentials/.credentials.json\n";

/// The failure cred-watch prevents, set up the old way: a script copies the
/// source, refresh token and all, into the consumer's own (writable)
/// credentials directory, and the consumer runs the CLI there, again and
/// again as a consumer does (one `claude auth status` may exit before its
/// background refresh is sent).
const CARELESS_UNIT: &str = "[Unit]\nDescription=a consumer set up without cred-watch's rules\n[Service]\nUser=bob\nEnvironment=HOME=/home/bob NODE_EXTRA_CA_CERTS=/mnt/mock/ca.pem DISABLE_AUTOUPDATER=1\nExecStartPre=+/bin/sh -c 'install -d -o bob -g bob -m 700 /home/bob/.claude && install -o bob -g bob -m 600 /home/alice/.claude/.credentials.json /home/bob/.claude/.credentials.json'\nExecStart=/bin/sh -c 'while :; do claude auth status > /dev/null 2>&1; sleep 1; done'\n";

/// The mock token server, running in the container's network namespace.
struct Mock {
    child: Child,
    dir: PathBuf,
}

impl Mock {
    fn start(c: &Container, dir: &Path) -> Mock {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/mock_token_server.py");
        let child = Command::new("nsenter")
            .args(["-t", &c.leader.to_string(), "-n", "python3"])
            .arg(script)
            .arg("--dir")
            .arg(dir)
            .args(["--expires-in", "250", "--seed-expires-in", "240"])
            .stdin(Stdio::null())
            .spawn()
            .expect("python3");
        let mock = Mock {
            child,
            dir: dir.to_path_buf(),
        };
        assert!(
            wait_until(Duration::from_secs(30), || dir.join("ready").exists()),
            "the mock token server did not start"
        );
        mock
    }

    /// The request log, one JSON object per request.
    fn log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Requests of `kind` with `result` (any when None) from `uid` (any
    /// when None), among the first `from` entries skipped.
    fn count(&self, from: usize, kind: &str, result: Option<&str>, uid: Option<u32>) -> usize {
        self.log()
            .iter()
            .skip(from)
            .filter(|e| e["kind"] == kind)
            .filter(|e| result.is_none_or(|r| e["result"] == r))
            .filter(|e| uid.is_none_or(|u| e["uid"] == u))
            .count()
    }

    /// The log for a failure message: time, kind, result, uid per line.
    fn summary(&self) -> String {
        let log = self.log();
        let t0 = log.first().and_then(|e| e["t_ms"].as_i64()).unwrap_or(0);
        log.iter()
            .map(|e| {
                format!(
                    "  +{:.1}s {} {} uid {}",
                    (e["t_ms"].as_i64().unwrap_or(0) - t0) as f64 / 1000.0,
                    e["kind"].as_str().unwrap_or("?"),
                    e["result"].as_str().unwrap_or(""),
                    e["uid"]
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The short hashes of the access tokens issued after entry `from`.
    fn issued(&self, from: usize) -> Vec<String> {
        self.log()
            .iter()
            .skip(from)
            .filter_map(|e| e["issued"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first 12 hex digits of the SHA-256 of a token: the mock's name for it.
fn sha12(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// What the tests need to know of a credentials file, without its tokens.
#[derive(Debug, PartialEq)]
struct Seen {
    access: String,
    expires_at: i64,
    has_refresh: bool,
}

fn seen(c: &Container, inside: &str) -> Option<Seen> {
    let text = std::fs::read_to_string(c.host_path(inside)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let o = &v["claudeAiOauth"];
    let access = o["accessToken"].as_str()?;
    Some(Seen {
        access: if access.is_empty() {
            String::new()
        } else {
            sha12(access)
        },
        expires_at: o["expiresAt"].as_i64()?,
        has_refresh: o["refreshToken"].as_str().is_some_and(|r| !r.is_empty()),
    })
}

/// What steps hand on to later ones.
#[derive(Default)]
struct Shared {
    mock: Option<Mock>,
    alice: u32,
    bob: u32,
    report: Vec<String>,
}

impl Shared {
    fn mock(&self) -> &Mock {
        self.mock.as_ref().expect("the mock runs")
    }
}

type Step = steps::Step<Shared>;

const STEPS: &[(&str, &[&str], Step)] = steps![
    installed_and_logged_in;
    the_real_cli_refreshes_and_the_copy_follows after installed_and_logged_in;
    a_consumer_on_the_copy_never_refreshes after the_real_cli_refreshes_and_the_copy_follows;
    the_keeper_refreshes_five_windows_in_a_row after installed_and_logged_in;
    a_consumer_that_can_refresh_breaks_the_chain after installed_and_logged_in;
    no_token_leaks after installed_and_logged_in;
];

#[test]
fn e2e_with_the_real_claude_cli() {
    let Some((rootfs, deb_dir, cli)) = prerequisites() else {
        return;
    };
    let mock_dir = tempfile::Builder::new()
        .prefix("cred-watch-mock-")
        .tempdir()
        .unwrap();
    // The CLI users read the CA in there (the seed file is 0600).
    std::fs::set_permissions(
        mock_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let c = Container::boot_with(
        "cred-watch-cli",
        &rootfs,
        &[
            (&deb_dir, "/mnt/deb"),
            (&cli, "/opt/claude-code"),
            (mock_dir.path(), "/mnt/mock"),
        ],
    );
    let mut shared = Shared {
        mock: Some(Mock::start(&c, mock_dir.path())),
        ..Shared::default()
    };
    let failed = steps::run(&c, STEPS, &mut shared);
    steps::finish(
        &shared.report,
        "e2e-claude-cli-report.md",
        &failed,
        STEPS.len(),
    );
}

/// The .deb, the rootfs, the pinned CLI, python3 and openssl on the host.
fn prerequisites() -> Option<(PathBuf, PathBuf, PathBuf)> {
    const SUITE: &str = "e2e_claude_cli";
    let (rootfs, deb_dir) = container::prerequisites(SUITE)?;
    let cli = match std::env::var("CRED_WATCH_E2E_CLAUDE").ok().as_deref() {
        // tests/run.sh found the package registry unreachable: the one
        // case where this suite may skip, even in CI.
        Some("unreachable") => {
            eprintln!("{SUITE}: skipped: the package registry cannot be reached to install @anthropic-ai/claude-code@{CLI_VERSION}");
            return None;
        }
        Some(dir) if Path::new(dir).join("node_modules/.bin/claude").exists() => PathBuf::from(dir),
        _ => {
            return container::missing(
                SUITE,
                "no Claude Code CLI (tests/e2e/claude-cli.sh installs it)",
            )
        }
    };
    for (tool, args) in [
        ("openssl", &["version"][..]),
        ("python3", &["-c", "import ssl"]),
    ] {
        let ok = Command::new(tool)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return container::missing(SUITE, &format!("`{tool} {}` fails", args.join(" ")));
        }
    }
    Some((rootfs, deb_dir, cli))
}

fn uid(c: &Container, user: &str) -> u32 {
    c.ok(&format!("id -u {user}")).parse().unwrap()
}

/// The package installed, the CLI on the PATH, the two names pointed at the
/// mock, `alice` logged in (the mock's seed: a token 4 minutes from
/// expiry), cred-watch running, and the consumer started on the copy.
fn installed_and_logged_in(c: &Container, shared: &mut Shared) {
    c.ok("dpkg -i /mnt/deb/cred-watch_*.deb >/dev/null");
    c.ok("echo '127.0.0.1 platform.claude.com api.anthropic.com' >> /etc/hosts");
    c.ok("ln -s /opt/claude-code/node_modules/.bin/claude /usr/local/bin/claude");
    let version = c.ok("claude --version");
    assert!(version.starts_with(CLI_VERSION), "{version}");
    c.ok("groupadd claude-credentials && useradd -m alice && useradd -m bob");
    shared.alice = uid(c, "alice");
    shared.bob = uid(c, "bob");
    c.ok(&format!(
        "install -d -o alice -g alice -m 700 /home/alice/.claude && install -o alice -g alice -m 600 /mnt/mock/seed.json {SRC}"
    ));
    c.sh_input("cat > /etc/cred-watch/cred-watch.toml", &config(false));
    c.ok("cred-watch check >/dev/null");
    c.ok("systemctl enable --now cred-watch");
    assert!(
        wait_until(Duration::from_secs(10), || seen(c, COPY).is_some()),
        "no copy:\n{}",
        c.journal()
    );
    c.sh_input(
        "cat > /usr/local/bin/bridge-worker && chmod 755 /usr/local/bin/bridge-worker",
        BRIDGE_WORKER,
    );
    c.ok(&format!("cat > /etc/systemd/system/bridge.service <<'EOF'\n{BRIDGE_UNIT}EOF\nsystemctl daemon-reload && systemctl start bridge"));
    c.settled();
    assert_eq!(c.bridge_starts(), 1, "started after the copy: in sync");
    let status = bridge_status(c);
    assert_eq!(status.len(), 1);
    assert_eq!(status[0]["loggedIn"], true, "{}", status[0]);
}

/// One `claude auth status` result per start of the bridge.
fn bridge_status(c: &Container) -> Vec<serde_json::Value> {
    std::fs::read_to_string(c.host_path("/run/bridge/status.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|_| serde_json::json!({ "unparsed": l.len() }))
        })
        .collect()
}

/// Scenario 1: `claude auth status` as the source's owner, its token 4
/// minutes from expiry: the CLI refreshes, cred-watch updates the copy
/// (without the refresh token, mode 0640), and the bridge restarts once.
fn the_real_cli_refreshes_and_the_copy_follows(c: &Container, shared: &mut Shared) {
    let t = Instant::now();
    let mock = shared.mock();
    let from = mock.log().len();
    let starts = c.bridge_starts();
    let before = c.show("bridge", "InvocationID");
    let src = seen(c, SRC).expect("the source");
    assert!(
        src.expires_at - now_ms() < 300_000,
        "inside the CLI's window"
    );
    // `claude auth status`, run again if it exited before its background
    // refresh was sent (the shipped helper; see packaging/claude-refresh).
    let said = c.ok(&format!(
        "runuser -u alice -- env HOME=/home/alice {CLI_ENV} /usr/libexec/cred-watch/claude-refresh claude"
    ));
    assert!(said.contains("refreshed the token"), "{said}");
    assert_eq!(
        mock.count(from, "refresh", Some("ok"), Some(shared.alice)),
        1,
        "{:?}",
        mock.log()
    );
    let issued = mock.issued(from);
    let want = issued.last().expect("a token was issued").clone();
    assert!(
        wait_until(Duration::from_secs(10), || seen(c, COPY)
            .is_some_and(|s| s.access == want)),
        "the copy does not carry the new token:\n{}",
        c.journal()
    );
    let copy = seen(c, COPY).unwrap();
    assert!(!copy.has_refresh, "the copy has no refresh token");
    assert_eq!(seen(c, SRC).unwrap().access, want);
    assert_eq!(
        c.ok(&format!("stat -c '%U:%G %a' {COPY} {SRC}")),
        "root:claude-credentials 640\nalice:alice 600"
    );
    assert!(
        wait_until(Duration::from_secs(10), || c.bridge_starts() == starts + 1),
        "{}",
        c.journal()
    );
    c.settled();
    assert_eq!(c.bridge_starts(), starts + 1, "exactly one restart");
    assert_ne!(c.show("bridge", "InvocationID"), before);
    shared.report.push(format!(
        "- the real CLI refreshes (`claude auth status` as the owner, {}): {} refresh, {} invalid_grant, {} bridge restart, {:.1} s",
        said.trim_start_matches("claude-refresh: the CLI "),
        mock.count(from, "refresh", Some("ok"), None),
        mock.count(from, "refresh", Some("invalid_grant"), None),
        c.bridge_starts() - starts,
        t.elapsed().as_secs_f64()
    ));
}

/// Scenario 3: the consumer runs the real CLI on the copy, its token inside
/// the CLI's 5-minute refresh window, five times (one run may exit before
/// a refresh it would make is sent): logged in, and the mock never sees a
/// refresh request from it.
fn a_consumer_on_the_copy_never_refreshes(c: &Container, shared: &mut Shared) {
    let mock = shared.mock();
    let copy = seen(c, COPY).expect("the copy");
    assert!(
        copy.expires_at - now_ms() < 300_000,
        "inside the CLI's window"
    );
    let from = mock.log().len();
    let out = c.ok(&format!(
        "systemd-run --wait --pipe -q -p User=bob -p SupplementaryGroups=claude-credentials -E HOME=/home/bob -E CLAUDE_SECURESTORAGE_CONFIG_DIR={COPY_DIR} {} sh -c 'for i in 1 2 3 4; do claude auth status >/dev/null 2>&1; done; claude auth status'",
        CLI_ENV.split(' ').map(|e| format!("-E {e}")).collect::<Vec<_>>().join(" ")
    ));
    let status: serde_json::Value = serde_json::from_str(&out).expect("auth status JSON");
    assert_eq!(status["loggedIn"], true, "{status}");
    // The bridge's first CLI run fetched bob's profile (later runs use the
    // CLI's cache): proof that the mock tells bob's requests apart.
    assert!(
        mock.count(0, "profile", None, Some(shared.bob)) >= 1,
        "{:?}",
        mock.log()
    );
    assert_eq!(
        mock.count(from, "refresh", None, None),
        0,
        "{}",
        mock.summary()
    );
    assert_eq!(mock.count(0, "refresh", None, Some(shared.bob)), 0);
    for s in bridge_status(c) {
        assert_eq!(s["loggedIn"], true, "{s}");
    }
    // It could not even take the CLI's lock there, nor rewrite the copy.
    assert_eq!(c.ok(&format!("ls -A {COPY_DIR}")), ".credentials.json");
    assert_eq!(seen(c, COPY).unwrap(), copy);
    // doctor agrees: the consumer reads a copy and cannot refresh.
    let (_, out) = steps::doctor(c, "");
    let line = steps::line_with(&out, "", "consumer bridge.service")
        .unwrap_or_else(|| panic!("no consumer line:\n{out}"));
    assert!(line.starts_with("ok"), "{line}\n{out}");
    shared.report.push(format!(
        "- a consumer on the copy (CLAUDE_SECURESTORAGE_CONFIG_DIR, token inside the 5-minute window, `claude auth status` 5 times): logged in, {} refresh requests from it in the whole run, {} profile requests",
        mock.count(0, "refresh", None, Some(shared.bob)),
        mock.count(0, "profile", None, Some(shared.bob)),
    ));
}

/// Counts the refresh unit's runs (a drop-in, as root, outside the CLI).
const REFRESH_COUNTER: &str = "[Service]\nEnvironment=NODE_EXTRA_CA_CERTS=/mnt/mock/ca.pem DISABLE_AUTOUPDATER=1\nExecStartPre=+/bin/sh -c 'echo run >> /run/refresh.runs'\n";

/// Scenario 2: the keeper. Tokens live 250 s and `ahead` is 4 minutes, so
/// each window lasts about 10 s. The shipped example unit (User= and paths
/// set for alice) refreshes through the real CLI at least 5 times in a row:
/// each refresh comes from alice's CLI, none is refused, the bridge
/// restarts once per refresh, and the copy is valid at every sample.
fn the_keeper_refreshes_five_windows_in_a_row(c: &Container, shared: &mut Shared) {
    let _restore = OnFailure(|| {
        c.sh_input("cat > /etc/cred-watch/cred-watch.toml", &config(false));
        put_back(c, "systemctl reload cred-watch");
    });
    let t = Instant::now();
    let mock = shared.mock();
    c.ok("sed -e 's/^User=root/User=alice/' -e 's|^Environment=HOME=/root|Environment=HOME=/home/alice|' -e 's|^ReadWritePaths=/root/.claude|ReadWritePaths=/home/alice/.claude|' /usr/share/doc/cred-watch/examples/claude-refresh.service > /etc/systemd/system/claude-refresh.service");
    c.ok(&format!("mkdir -p /etc/systemd/system/claude-refresh.service.d && cat > /etc/systemd/system/claude-refresh.service.d/e2e.conf <<'EOF'\n{REFRESH_COUNTER}EOF\nsystemctl daemon-reload"));
    let from = mock.log().len();
    let starts = c.bridge_starts();

    // Sample the copy as a reader would, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let copy_path = c.host_path(COPY);
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut samples, mut bad, mut hashes) = (0u32, Vec::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let text = std::fs::read_to_string(&copy_path).unwrap_or_default();
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                let o = &v["claudeAiOauth"];
                let access = o["accessToken"].as_str().unwrap_or_default();
                let valid = access.starts_with("sk-ant-oat01-")
                    && o["expiresAt"].as_i64().is_some_and(|e| e > now_ms())
                    && o.get("refreshToken").is_none();
                samples += 1;
                if !valid {
                    bad.push(format!("sample {samples}: {} bytes", text.len()));
                } else if hashes.last() != Some(&sha12(access)) {
                    hashes.push(sha12(access));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (samples, bad, hashes)
        })
    };

    c.sh_input("cat > /etc/cred-watch/cred-watch.toml", &config(true));
    c.ok("systemctl reload cred-watch");
    let five = wait_until(Duration::from_secs(150), || {
        mock.count(from, "refresh", None, None) >= 5
    });
    // Stop the keeper, let a refresh in flight finish, and wait until the
    // agent has handled everything.
    c.sh_input("cat > /etc/cred-watch/cred-watch.toml", &config(false));
    c.ok("systemctl reload cred-watch");
    assert!(wait_until(Duration::from_secs(90), || {
        c.sh("systemctl is-active claude-refresh").1.trim() != "activating"
    }));
    c.settled();
    stop.store(true, Ordering::Relaxed);
    let (samples, bad, hashes) = sampler.join().unwrap();
    let log = format!(
        "mock:\n{}\n{}",
        mock.summary(),
        c.ok("journalctl --no-pager -o short-precise -u cred-watch -u claude-refresh -u bridge | tail -n 150")
    );
    assert!(five, "fewer than 5 refreshes in 150 s: {log}");

    let refreshes = mock.count(from, "refresh", None, None);
    let runs: usize = c
        .ok("cat /run/refresh.runs 2>/dev/null | wc -l")
        .parse()
        .unwrap();
    let restarts = c.bridge_starts() - starts;
    assert_eq!(
        mock.count(from, "refresh", Some("ok"), Some(shared.alice)),
        refreshes,
        "every refresh from alice's CLI, none refused: {log}"
    );
    assert_eq!(
        runs, refreshes,
        "one refresh per run of the refresh unit: {log}"
    );
    assert_eq!(restarts, refreshes, "one bridge restart per refresh: {log}");
    assert!(bad.is_empty(), "the copy was not valid: {bad:?}");
    assert!(samples > 100, "{samples} samples");
    let issued = mock.issued(from);
    assert!(
        hashes.iter().all(|h| issued.contains(h) || h == &hashes[0]),
        "the copy carried a token the mock never issued"
    );
    assert_eq!(
        hashes.last(),
        issued.last(),
        "the copy ends on the newest token"
    );
    for s in bridge_status(c) {
        assert_eq!(s["loggedIn"], true, "{s}");
    }
    // How often `claude auth status` exited before its refresh was sent.
    let attempts: Vec<String> = c
        .ok("journalctl --no-pager -o cat -u claude-refresh | grep -o 'refreshed the token (attempt [0-9]*' | grep -o '[0-9]*$' || true")
        .lines()
        .map(str::to_string)
        .collect();
    shared.report.push(format!(
        "- the keeper (tokens of 250 s, ahead 4m): {refreshes} refreshes by the refresh unit ({runs} runs, CLI attempts per run: {}), {} invalid_grant, {restarts} bridge restarts, {samples} samples of the copy all valid, {} consumer refreshes, {:.1} s",
        attempts.join(" "),
        mock.count(from, "refresh", Some("invalid_grant"), None),
        mock.count(0, "refresh", None, Some(shared.bob)),
        t.elapsed().as_secs_f64()
    ));
}

/// Scenario 4, side by side: the same consumer set up without cred-watch's
/// rules (a writable credentials directory and the refresh token) rotates
/// the chain, and the source's next refresh gets `invalid_grant`; the CLI
/// then blanks the source, which cred-watch refuses, keeping the last good
/// copy. `doctor` flags that unit before any of it happens.
fn a_consumer_that_can_refresh_breaks_the_chain(c: &Container, shared: &mut Shared) {
    let t = Instant::now();
    let mock = shared.mock();
    c.ok(&format!("cat > /etc/systemd/system/careless.service <<'EOF'\n{CARELESS_UNIT}EOF\nsystemctl daemon-reload"));
    // doctor, on the configuration that names it, before it ever runs.
    let named = config(false).replace(
        "units = [\"bridge.service\"]",
        "units = [\"bridge.service\", \"careless.service\"]",
    );
    c.sh_input("cat > /tmp/careless.toml", &named);
    let (code, out) = steps::doctor(c, "--config /tmp/careless.toml");
    let line = steps::line_with(&out, "", "consumer careless.service")
        .unwrap_or_else(|| panic!("no line for careless.service:\n{out}"));
    assert!(line.starts_with("fail"), "{line}\n{out}");
    assert_ne!(code, 0, "doctor fails\n{out}");
    assert_eq!(mock.count(0, "refresh", None, Some(shared.bob)), 0);

    let from = mock.log().len();
    let copy = seen(c, COPY).expect("the copy");
    let starts = c.bridge_starts();
    c.ok("systemctl start careless");
    assert!(
        wait_until(Duration::from_secs(30), || mock.count(
            from,
            "refresh",
            Some("ok"),
            Some(shared.bob)
        ) >= 1),
        "the careless consumer did not refresh:\n{}",
        mock.summary()
    );
    c.ok("systemctl stop careless");
    // The source's own refresh, as the keeper would start it: refused, and
    // the unit fails saying why.
    let (code, _, _) = c.sh("systemctl start claude-refresh.service");
    assert_ne!(code, 0, "the refresh unit fails");
    let said = c.ok("journalctl --no-pager -o cat -u claude-refresh");
    assert!(
        said.contains("its refresh was refused): log in again as alice"),
        "{said}"
    );
    assert_eq!(
        mock.count(from, "refresh", Some("invalid_grant"), Some(shared.alice)),
        1,
        "{:?}",
        mock.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || seen(c, SRC)
            .is_some_and(|s| s.access.is_empty() && !s.has_refresh)),
        "the CLI blanks the source after invalid_grant"
    );
    c.settled();
    assert!(
        c.journal().contains("refused"),
        "cred-watch refuses the blanked file:\n{}",
        c.journal()
    );
    assert_eq!(seen(c, COPY).unwrap(), copy, "the last good copy stays");
    assert_eq!(c.bridge_starts(), starts, "no restart for a refused file");
    shared.report.push(format!(
        "- side by side, a consumer with a writable directory and the refresh token: doctor said `{}` before it ran; it refreshed {} time(s), then the source's refresh got {} invalid_grant and the CLI blanked the source; cred-watch refused it and kept the last good copy, {:.1} s",
        line.split_whitespace().next().unwrap_or_default(),
        mock.count(from, "refresh", Some("ok"), Some(shared.bob)),
        mock.count(from, "refresh", Some("invalid_grant"), None),
        t.elapsed().as_secs_f64()
    ));
}

/// No token text anywhere it could leak, and none in the journal at all.
fn no_token_leaks(c: &Container, _: &mut Shared) {
    common::assert_no_secret(&c.journal(), "journalctl -u cred-watch");
    common::assert_no_secret(&c.ok("journalctl --no-pager -o cat"), "journal");
    common::assert_no_secret(&c.ok("cat /var/lib/cred-watch/state.json"), "state.json");
    common::assert_no_secret(&c.ok("cred-watch status"), "cred-watch status");
    common::assert_no_secret(
        &c.ok("systemctl show cred-watch bridge claude-refresh"),
        "systemctl show",
    );
}
