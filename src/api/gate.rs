//! Who may hold how many connections to the API socket, and for how long without a word.
//!
//! Every accepted connection is counted against its peer's uid (from `SO_PEERCRED`); past the
//! uid's cap it is closed at once, so no one user can take the daemon's file descriptors or its
//! accept loop from the others. A connection that sends nothing for the idle limit is closed (the
//! CLI keeps long, quiet streams such as `run` of a silent step alive with HTTP/2 pings). The
//! limits of what one uid's requests may hold ([`super::budget`]) travel in the same [`Limits`],
//! and an admitted connection knows whether its peer is an admin, for its stream limit.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use super::abuse::Refusal;
use super::peer::Caller;

/// Per-uid limits of the API socket.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections one ordinary uid may hold at once.
    pub per_user: usize,
    /// Connections root and the admin group may hold at once.
    pub per_admin: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle: Duration,
    /// Bytes an ordinary uid's requests may hold before they have arrived whole.
    pub request_bytes_per_user: u64,
    /// The same for root and the admin group.
    pub request_bytes_per_admin: u64,
    /// A request that has not arrived whole this long after its headers is ended.
    pub request_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // The file's defaults (`MaxConnectionsPerUser`, …), named once in `config`.
            per_user: crate::config::DEFAULT_MAX_CONNECTIONS_PER_USER,
            per_admin: crate::config::DEFAULT_MAX_CONNECTIONS_PER_ADMIN,
            idle: crate::config::DEFAULT_CONNECTION_IDLE_TIMEOUT,
            request_bytes_per_user: crate::config::DEFAULT_MAX_REQUEST_BYTES_PER_USER,
            request_bytes_per_admin: crate::config::DEFAULT_MAX_REQUEST_BYTES_PER_ADMIN,
            request_read_timeout: crate::config::DEFAULT_REQUEST_READ_TIMEOUT,
        }
    }
}

/// A connection the gate turned away, and whose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The peer's uid, when it could be read.
    pub uid: Option<u32>,
    /// Why.
    pub reason: Refusal,
}

/// Counts open connections per uid.
pub struct Gate {
    limits: Limits,
    is_admin: Box<dyn Fn(&Caller) -> bool + Send + Sync>,
    open: Arc<Mutex<HashMap<u32, usize>>>,
}

impl Gate {
    /// A gate with these limits; `is_admin(caller)` says who gets the admin cap.
    pub fn new(limits: Limits, is_admin: impl Fn(&Caller) -> bool + Send + Sync + 'static) -> Self {
        Self {
            limits,
            is_admin: Box::new(is_admin),
            open: Default::default(),
        }
    }

    /// Admits a connection, or refuses it (`None`) when its uid holds its cap already or its
    /// peer cannot be identified. The peer's identity is read here, once, and travels with the
    /// connection to every request on it.
    pub fn admit(&self, stream: UnixStream) -> Option<Gated> {
        self.try_admit(stream).ok()
    }

    /// As [`Gate::admit`], saying whose connection was refused and why.
    pub fn try_admit(&self, stream: UnixStream) -> Result<Gated, Refused> {
        let caller = Caller::of_stream(&stream).map_err(|_| Refused {
            uid: stream.peer_cred().ok().map(|c| c.uid()),
            reason: Refusal::UnidentifiedPeer,
        })?;
        let admin = (self.is_admin)(&caller);
        let cap = if admin {
            self.limits.per_admin
        } else {
            self.limits.per_user
        };
        {
            let mut open = self.open.lock().unwrap();
            let n = open.entry(caller.uid).or_insert(0);
            if *n >= cap {
                return Err(Refused {
                    uid: Some(caller.uid),
                    reason: Refusal::OverConnectionCap,
                });
            }
            *n += 1;
        }
        Ok(Gated {
            inner: stream,
            slot: Slot {
                uid: caller.uid,
                open: Arc::clone(&self.open),
            },
            caller,
            admin,
            idle: self.limits.idle,
            deadline: Box::pin(tokio::time::sleep(self.limits.idle)),
        })
    }

    /// The limits this gate was made with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Connections open now for `uid`.
    pub fn open_for(&self, uid: u32) -> usize {
        self.open.lock().unwrap().get(&uid).copied().unwrap_or(0)
    }
}

/// A connection's place in its uid's count, given back when the connection closes.
struct Slot {
    uid: u32,
    open: Arc<Mutex<HashMap<u32, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap();
        if let Some(n) = open.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// An admitted connection: the unix stream, its slot, and its idle deadline.
pub struct Gated {
    inner: UnixStream,
    caller: Caller,
    /// The caller may use admin calls (root or the admin group), so it gets the admin limits.
    admin: bool,
    slot: Slot,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Gated {
    /// Who is on the other end, as the kernel said when the connection was accepted.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Whether the caller gets the admin limits.
    pub fn is_admin(&self) -> bool {
        self.admin
    }
}

impl AsyncRead for Gated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connection of uid {} idle too long", self.slot.uid),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Gated {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for Gated {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.caller.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_uid_holds_at_most_its_cap_and_slots_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let gate = Gate::new(
            Limits {
                per_user: 2,
                per_admin: 2,
                idle: Duration::from_secs(60),
                ..Limits::default()
            },
            |_| false,
        );
        let mut held = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(UnixStream::connect(&path).await.unwrap());
            let (s, _) = listener.accept().await.unwrap();
            held.push(gate.admit(s));
        }
        let me = unsafe { libc::getuid() };
        assert!(held[0].is_some() && held[1].is_some() && held[2].is_none());
        assert_eq!(gate.open_for(me), 2);
        held.clear();
        assert_eq!(gate.open_for(me), 0, "closing gives the slots back");
    }

    #[tokio::test]
    async fn a_refusal_says_whose_and_why_and_admins_are_known_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let limits = Limits {
            per_user: 1,
            per_admin: 1,
            ..Limits::default()
        };
        let me = unsafe { libc::getuid() };
        let gate = Gate::new(limits, move |c| c.uid == me);
        let _c1 = UnixStream::connect(&path).await.unwrap();
        let (s, _) = listener.accept().await.unwrap();
        let first = gate.try_admit(s).unwrap();
        assert!(first.is_admin());
        assert_eq!(first.caller().uid, me);
        let _c2 = UnixStream::connect(&path).await.unwrap();
        let (s, _) = listener.accept().await.unwrap();
        assert_eq!(
            gate.try_admit(s).err(),
            Some(Refused {
                uid: Some(me),
                reason: Refusal::OverConnectionCap
            })
        );
    }

    #[tokio::test]
    async fn a_connection_that_says_nothing_is_closed_after_the_idle_limit() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let gate = Gate::new(
            Limits {
                idle: Duration::from_millis(50),
                ..Limits::default()
            },
            |_| false,
        );
        let _client = UnixStream::connect(&path).await.unwrap();
        let (s, _) = listener.accept().await.unwrap();
        let mut g = gate.admit(s).unwrap();
        let mut buf = [0u8; 8];
        let e = tokio::time::timeout(Duration::from_secs(5), g.read(&mut buf))
            .await
            .expect("the idle limit ends the read")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
