//! A Debian rootfs booted with systemd-nspawn (see TESTING.md): boot,
//! run commands inside through nsenter, clean poweroff on drop. Shared by
//! the end-to-end tests and the benchmarks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

pub struct Container {
    nspawn: Child,
    pub leader: i32,
}

impl Container {
    pub fn boot(name: &str, rootfs: &Path, deb_dir: &Path) -> Container {
        Container::boot_with(name, rootfs, &[(deb_dir, "/mnt/deb")])
    }

    /// Boots with host directories bound read-only at the given places.
    pub fn boot_with(name: &str, rootfs: &Path, binds: &[(&Path, &str)]) -> Container {
        let nspawn = Command::new("systemd-nspawn")
            .args(["-q", "-D"])
            .arg(rootfs)
            .args([
                "-M",
                name,
                "--boot",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--volatile=overlay",
                "--console=pipe",
            ])
            .args(
                binds
                    .iter()
                    .map(|(host, inside)| format!("--bind-ro={}:{inside}", host.display())),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn");
        let pid = nspawn.id();
        let mut leader = None;
        let end = Instant::now() + Duration::from_secs(30);
        while leader.is_none() && Instant::now() < end {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            leader = children
                .split_whitespace()
                .find(|c| {
                    std::fs::read_to_string(format!("/proc/{c}/comm"))
                        .is_ok_and(|s| s.trim() == "systemd")
                })
                .and_then(|c| c.parse().ok());
            std::thread::sleep(Duration::from_millis(50));
        }
        let c = Container {
            nspawn,
            leader: leader.expect("container's systemd did not start"),
        };
        // The bus comes up a moment after PID 1.
        assert!(
            wait_until(Duration::from_secs(60), || {
                let (code, out, _) = c.sh("systemctl is-system-running --wait 2>/dev/null");
                code == 0 || out.trim() == "degraded"
            }),
            "container did not finish booting"
        );
        c
    }

    pub fn sh_input(&self, script: &str, input: &str) -> (i32, String, String) {
        use std::io::Write;
        let mut child = Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "sh", "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn sh(&self, script: &str) -> (i32, String, String) {
        self.sh_input(script, "")
    }

    /// Runs `script`, asserting success; returns trimmed stdout.
    pub fn ok(&self, script: &str) -> String {
        let (code, out, err) = self.sh(script);
        assert_eq!(code, 0, "`{script}` failed:\n{out}\n{err}");
        out.trim().to_string()
    }

    /// What the CLI does: temp file 0600 in the same directory, then rename.
    pub fn write_creds(&self, path: &str, content: &str) {
        let script = format!("set -e; umask 077; mkdir -p \"$(dirname {path})\"; cat > {path}.tmp.$$; mv -f {path}.tmp.$$ {path}");
        let (code, out, err) = self.sh_input(&script, content);
        assert_eq!(code, 0, "{out}{err}");
    }

    pub fn bridge_starts(&self) -> usize {
        self.ok("cat /run/bridge.starts 2>/dev/null | wc -l")
            .parse()
            .unwrap()
    }

    /// Proof that the agent (the `cred-watch` service) has handled every
    /// change made so far and owes no restart: SIGUSR1 makes it reconcile
    /// every watch and record the time in its state; once the state shows a
    /// reconcile after the signal and bridge.service not pending, every
    /// restart of it owed has been done (other units, such as one that does
    /// not exist and is retried forever, are not waited for). Then the bridge's current start is on record (it
    /// appends to /run/bridge.starts before it execs `sleep`). Counting
    /// restarts after this needs no "wait and hope" delay.
    pub fn settled(&self) {
        let pid = self.show("cred-watch", "MainPID");
        let asked = now_ms();
        self.ok(&format!("kill -USR1 {pid}"));
        let state = self.host_path("/var/lib/cred-watch/state.json");
        let mut last = String::new();
        let done = wait_until(Duration::from_secs(60), || {
            last = std::fs::read_to_string(&state).unwrap_or_default();
            serde_json::from_str::<serde_json::Value>(&last).is_ok_and(|s| {
                s["agent"]["last_reconcile_ms"]
                    .as_i64()
                    .is_some_and(|t| t >= asked)
                    && s["units"]["bridge.service"]["pending"] != true
            })
        });
        assert!(
            done,
            "no reconcile after SIGUSR1, or a restart still owed:\n{last}\n{}",
            self.journal()
        );
        assert!(
            wait_until(Duration::from_secs(30), || {
                let main = self.show("bridge", "MainPID");
                self.sh(&format!("cat /proc/{main}/comm")).1.trim() == "sleep"
            }),
            "the bridge is not running:\n{}",
            self.ok("systemctl status bridge --no-pager || true")
        );
    }

    pub fn show(&self, unit: &str, prop: &str) -> String {
        self.ok(&format!("systemctl show -p {prop} --value {unit}"))
    }

    pub fn journal(&self) -> String {
        self.ok("journalctl -u cred-watch --no-pager -o cat")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM to nspawn is a clean poweroff.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

impl Container {
    /// A path inside the container, reachable from the host.
    pub fn host_path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.leader))
    }
}

/// Whether CI made the end-to-end suites mandatory (`CRED_WATCH_E2E=required`).
pub fn required() -> bool {
    std::env::var("CRED_WATCH_E2E").is_ok_and(|v| v == "required")
}

/// Skips the suite with a message, or fails when the suites are required.
pub fn missing<T>(suite: &str, why: &str) -> Option<T> {
    assert!(!required(), "end-to-end tests required but {why}");
    eprintln!("{suite}: skipped: {why} (run tests/run.sh as root)");
    None
}

/// The rootfs and the directory of the built .deb, when this host can boot
/// them: root, systemd-nspawn, tests/e2e/rootfs.sh and the package built.
pub fn prerequisites(suite: &str) -> Option<(PathBuf, PathBuf)> {
    if unsafe { libc::geteuid() } != 0 {
        return missing(suite, "not root");
    }
    let Some(rootfs) = rootfs() else {
        return missing(suite, "no rootfs (tests/e2e/rootfs.sh builds it)");
    };
    let Some(deb_dir) = deb_dir() else {
        return missing(
            suite,
            "no .deb in target/debian (packaging/deb/build.sh builds it)",
        );
    };
    if Command::new("systemd-nspawn")
        .arg("--version")
        .output()
        .is_err()
    {
        return missing(suite, "systemd-nspawn is not installed");
    }
    Some((rootfs, deb_dir))
}

/// The cached rootfs, if it has been built (tests/e2e/rootfs.sh).
pub fn rootfs() -> Option<PathBuf> {
    let p = PathBuf::from(
        std::env::var("CRED_WATCH_E2E_ROOTFS")
            .unwrap_or_else(|_| "/var/cache/cred-watch-e2e/bookworm".into()),
    );
    p.join(".cred-watch-complete").exists().then_some(p)
}

/// The directory holding the built .deb, if any.
pub fn deb_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    let has = std::fs::read_dir(&d)
        .ok()?
        .flatten()
        .any(|e| e.path().extension().is_some_and(|x| x == "deb"));
    has.then_some(d)
}
