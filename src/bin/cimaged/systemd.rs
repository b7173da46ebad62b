//! The two pieces of systemd's protocol cimaged speaks, both without a library:
//!
//! - **socket activation**: a socket unit can hold the CRI image socket before cimaged runs
//!   (so Craned's connections wait instead of failing while cimaged starts or restarts); the
//!   listening descriptors arrive from fd 3 on, counted by `LISTEN_FDS` for the pid in
//!   `LISTEN_PID`;
//! - **readiness**: with `Type=notify`, `READY=1` is sent to `NOTIFY_SOCKET` once every socket
//!   is served, and `STOPPING=1` when shutdown begins.

use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;

/// The first descriptor systemd passes.
const LISTEN_FDS_START: i32 = 3;

/// The listening unix socket systemd passed for `path`, if it passed one.
pub fn activated(path: &Path) -> Option<UnixListener> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    let n: i32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + n.clamp(0, 64) {
        // SAFETY: sockaddr_un is plain old data, filled by getsockname for a descriptor
        // systemd handed us.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: as above; the length is the struct's.
        let rc = unsafe {
            libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len)
        };
        if rc != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
            continue;
        }
        let bytes: Vec<u8> = addr
            .sun_path
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        if Path::new(std::ffi::OsStr::from_bytes(&bytes)) == path {
            // Not for the helpers and tools cimaged runs: closed on exec. (LISTEN_PID names
            // this process, so a child never takes the variables as its own.)
            // SAFETY: fcntl on a descriptor this process owns.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            // SAFETY: systemd passed this descriptor to this process to own.
            let l = unsafe { UnixListener::from_raw_fd(fd) };
            l.set_nonblocking(true).ok()?;
            return Some(l);
        }
    }
    None
}

/// Tells systemd `state` (e.g. `READY=1`), if it asked to be told.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(d) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = socket.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| d.send_to_addr(state.as_bytes(), &a))
    } else {
        d.send_to(state.as_bytes(), Path::new(&socket))
    };
    if let Err(e) = sent {
        tracing::warn!("cannot tell systemd {state}: {e}");
    }
}
