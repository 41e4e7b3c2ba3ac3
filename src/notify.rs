//! sd_notify: READY/RELOADING/STOPPING/STATUS/WATCHDOG to `$NOTIFY_SOCKET`.
//! A no-op outside systemd.

use std::os::unix::net::{SocketAddr, UnixDatagram};

pub struct Notifier {
    sock: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let sock = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
            let addr = match bytes.strip_prefix(b"@") {
                Some(name) => {
                    <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(name)
                        .ok()?
                }
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        Notifier { sock }
    }

    /// Sends `state` (e.g. "READY=1\nSTATUS=..."); failures are logged, not fatal.
    pub fn send(&self, state: &str) {
        if let Some((sock, addr)) = &self.sock {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                log::debug!("sd_notify failed: {e}");
            }
        }
    }

    pub fn status(&self, status: &str) {
        // One line: systemd shows STATUS= verbatim.
        self.send(&format!("STATUS={}", status.replace('\n', " ")));
    }
}

/// The watchdog interval requested by systemd, if any (`WATCHDOG_USEC`, for this PID).
pub fn watchdog_interval() -> Option<std::time::Duration> {
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}
