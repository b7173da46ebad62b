//! A raw HTTP/2 client for the tests that send what a well-behaved client never would: frames
//! written by hand (requests held one byte short, resets in a loop, a CONTINUATION that announces
//! 16 MiB), over a unix socket connected as any uid ([`Connector`]).
//!
//! It keeps the protocol's duties that keep a connection alive (SETTINGS and PING answered, flow
//! control windows followed when sending DATA) and records what the server said: its settings,
//! the streams it ended or reset, GOAWAY, end of stream.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::Notify;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
/// SETTINGS_MAX_CONCURRENT_STREAMS.
pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
const INITIAL_WINDOW_SIZE: u16 = 0x4;
/// HTTP/2 error codes.
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame: 9-byte header and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK literal without indexing, its name given by static index `index` (< 15) or, with
/// index 0, spelled out.
fn literal(out: &mut Vec<u8>, index: u8, name: &str, value: &str) {
    out.push(index);
    if index == 0 {
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
    }
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

/// The header block of a gRPC call to `path` (nothing the server would index, no Huffman).
pub fn grpc_request_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http (static 3 and 6)
    literal(&mut b, 4, "", path); // :path
    literal(&mut b, 1, "", "localhost"); // :authority
    literal(&mut b, 0, "content-type", "application/grpc");
    literal(&mut b, 0, "te", "trailers");
    b
}

/// A gRPC message prefix announcing `len` bytes (uncompressed).
pub fn grpc_prefix(len: u32) -> Vec<u8> {
    let mut p = vec![0u8];
    p.extend(len.to_be_bytes());
    p
}

/// What the server has said on a connection.
#[derive(Debug, Default)]
pub struct Seen {
    /// The server's SETTINGS, in order.
    pub settings: Vec<(u16, u32)>,
    /// Streams the server ended (END_STREAM) or reset.
    pub ended: HashSet<u32>,
    /// RST_STREAM codes by stream.
    pub resets: HashMap<u32, u32>,
    /// The error code of the server's GOAWAY.
    pub goaway: Option<u32>,
    /// PING acknowledgements received.
    pub ping_acks: u64,
    /// The server closed the connection (or reading failed).
    pub closed: bool,
    initial_window: i64,
    connection_window: i64,
    /// Per stream: window updates received minus DATA bytes sent.
    stream_delta: HashMap<u32, i64>,
}

impl Seen {
    /// The server's value of a setting, if it sent one.
    pub fn setting(&self, id: u16) -> Option<u32> {
        self.settings
            .iter()
            .rev()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| *v)
    }

    fn window(&self, stream: u32) -> i64 {
        let s = self.initial_window + self.stream_delta.get(&stream).copied().unwrap_or(0);
        s.min(self.connection_window)
    }
}

/// One raw client connection.
pub struct Raw {
    write: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    seen: Arc<(Mutex<Seen>, Notify)>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Raw {
    /// Sends the preface and empty SETTINGS on `stream`, and starts reading the server's frames.
    /// Waits for the server's first SETTINGS unless `wait_settings` is false.
    pub async fn start(stream: std::os::unix::net::UnixStream, wait_settings: bool) -> Self {
        stream.set_nonblocking(true).unwrap();
        let (mut read, write) = UnixStream::from_std(stream).unwrap().into_split();
        let write = Arc::new(tokio::sync::Mutex::new(write));
        let seen = Arc::new((
            Mutex::new(Seen {
                initial_window: 65_535,
                connection_window: 65_535,
                ..Seen::default()
            }),
            Notify::new(),
        ));
        {
            let mut w = write.lock().await;
            let mut hello = PREFACE.to_vec();
            hello.extend(frame(SETTINGS, 0, 0, &[]));
            // A big window for the server's answers, so it never waits on us.
            hello.extend(frame(WINDOW_UPDATE, 0, 0, &(1u32 << 30).to_be_bytes()));
            let _ = w.write_all(&hello).await;
        }
        let (w, s) = (Arc::clone(&write), Arc::clone(&seen));
        let reader = tokio::spawn(async move {
            let mut head = [0u8; 9];
            loop {
                if read.read_exact(&mut head).await.is_err() {
                    break;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let (kind, flags) = (head[3], head[4]);
                let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                if read.read_exact(&mut payload).await.is_err() {
                    break;
                }
                if let Some(bytes) = Self::on_frame(&s, kind, flags, id, &payload) {
                    // Never wait on our own writes here: the server may be waiting for us to
                    // read before it reads what we write.
                    let w = Arc::clone(&w);
                    tokio::spawn(async move {
                        let _ = w.lock().await.write_all(&bytes).await;
                    });
                }
                s.1.notify_waiters();
            }
            s.0.lock().unwrap().closed = true;
            s.1.notify_waiters();
        });
        let raw = Raw {
            write,
            seen,
            reader,
        };
        if wait_settings {
            raw.wait(|s| !s.settings.is_empty() || s.closed).await;
        }
        raw
    }

    /// Records a frame of the server's; what to answer, if anything.
    fn on_frame(
        s: &(Mutex<Seen>, Notify),
        kind: u8,
        flags: u8,
        id: u32,
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        let mut seen = s.0.lock().unwrap();
        match kind {
            SETTINGS if flags & ACK == 0 => {
                for pair in payload.chunks_exact(6) {
                    let key = u16::from_be_bytes([pair[0], pair[1]]);
                    let value = u32::from_be_bytes([pair[2], pair[3], pair[4], pair[5]]);
                    if key == INITIAL_WINDOW_SIZE {
                        seen.initial_window = value as i64;
                    }
                    seen.settings.push((key, value));
                }
                return Some(frame(SETTINGS, ACK, 0, &[]));
            }
            PING if flags & ACK == 0 => return Some(frame(PING, ACK, 0, payload)),
            PING => seen.ping_acks += 1,
            WINDOW_UPDATE if payload.len() == 4 => {
                let inc = (u32::from_be_bytes(payload.try_into().unwrap()) & 0x7fff_ffff) as i64;
                if id == 0 {
                    seen.connection_window += inc;
                } else {
                    *seen.stream_delta.entry(id).or_insert(0) += inc;
                }
            }
            RST_STREAM if payload.len() == 4 => {
                seen.ended.insert(id);
                seen.resets
                    .insert(id, u32::from_be_bytes(payload.try_into().unwrap()));
            }
            GOAWAY if payload.len() >= 8 => {
                seen.goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
            HEADERS | DATA if flags & END_STREAM != 0 => {
                seen.ended.insert(id);
            }
            _ => {}
        }
        None
    }

    /// Waits until `done` holds for what the server has said.
    pub async fn wait(&self, done: impl Fn(&Seen) -> bool) {
        loop {
            let notified = self.seen.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done(&self.seen.0.lock().unwrap()) {
                return;
            }
            notified.await;
        }
    }

    /// Reads what the server has said.
    pub fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.0.lock().unwrap())
    }

    /// Writes raw bytes; false when the connection is gone.
    pub async fn write(&self, bytes: &[u8]) -> bool {
        self.write.lock().await.write_all(bytes).await.is_ok()
    }

    /// Sends one frame; false when the connection is gone.
    pub async fn send(&self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> bool {
        self.write(&frame(kind, flags, stream, payload)).await
    }

    /// Opens stream `id` as a gRPC call to `path` (HEADERS, END_HEADERS, no END_STREAM).
    pub async fn open(&self, id: u32, path: &str) -> bool {
        self.send(HEADERS, END_HEADERS, id, &grpc_request_block(path))
            .await
    }

    /// Sends `bytes` as DATA on stream `id` within the server's flow-control windows; stops
    /// early (false) when the server ends or resets the stream, or the connection ends.
    pub async fn send_data(&self, id: u32, mut bytes: &[u8], end_stream: bool) -> bool {
        while !bytes.is_empty() {
            self.wait(|s| {
                s.ended.contains(&id) || s.goaway.is_some() || s.closed || s.window(id) > 0
            })
            .await;
            let n = {
                let mut s = self.seen.0.lock().unwrap();
                if s.ended.contains(&id) || s.goaway.is_some() || s.closed {
                    return false;
                }
                let n = (s.window(id).min(16_384) as usize).min(bytes.len());
                s.connection_window -= n as i64;
                *s.stream_delta.entry(id).or_insert(0) -= n as i64;
                n
            };
            let last = n == bytes.len();
            let flags = if last && end_stream { END_STREAM } else { 0 };
            if !self.send(DATA, flags, id, &bytes[..n]).await {
                return false;
            }
            bytes = &bytes[n..];
        }
        true
    }

    /// Sends a PING and waits for its acknowledgement: the server has read everything sent
    /// before it. False when the connection ended first.
    pub async fn ping(&self) -> bool {
        let before = self.seen(|s| s.ping_acks);
        if !self.send(PING, 0, 0, &[7; 8]).await {
            return false;
        }
        self.wait(|s| s.ping_acks > before || s.closed).await;
        self.seen(|s| s.ping_acks > before)
    }
}

/// A child process that connects to a unix socket as another uid and hands each connection
/// back (`SO_PEERCRED` records the connecting process, so the server sees that uid).
pub struct Connector {
    control: std::os::unix::net::UnixStream,
    child: libc::pid_t,
}

impl Connector {
    /// Forks the child, which drops to `uid:gid` (no supplementary groups).
    pub fn as_user(socket: &Path, uid: u32, gid: u32) -> Self {
        let path = socket.as_os_str().as_bytes();
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        assert!(path.len() < addr.sun_path.len());
        for (i, b) in path.iter().enumerate() {
            addr.sun_path[i] = *b as libc::c_char;
        }
        let (parent, child_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let ctl = child_end.as_raw_fd();
        // SAFETY: after the fork the child makes only system calls, on memory prepared before.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            unsafe { Self::child(ctl, &addr, uid, gid) }
        }
        drop(child_end);
        Connector {
            control: parent,
            child: pid,
        }
    }

    /// The child's loop: one connection per byte read on the control socket, sent back with
    /// SCM_RIGHTS; ends with the control socket.
    unsafe fn child(ctl: i32, addr: &libc::sockaddr_un, uid: u32, gid: u32) -> ! {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
            libc::_exit(2);
        }
        let mut byte = [0u8; 1];
        let mut control = [0u64; 4];
        loop {
            if libc::read(ctl, byte.as_mut_ptr().cast(), 1) != 1 {
                libc::_exit(0);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            let ok = fd >= 0
                && libc::connect(
                    fd,
                    (addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                ) == 0;
            byte[0] = ok as u8;
            let mut iov = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: 1,
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if ok {
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(4) as _;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
                *(libc::CMSG_DATA(cmsg) as *mut i32) = fd;
            }
            if libc::sendmsg(ctl, &msg, 0) != 1 {
                libc::_exit(3);
            }
            if fd >= 0 {
                libc::close(fd);
            }
        }
    }

    /// A new connection to the socket, made as the child's uid; None when the connect failed
    /// (e.g. the listen queue is full).
    pub fn connect(&self) -> Option<std::os::unix::net::UnixStream> {
        use std::io::Write;
        (&self.control).write_all(&[1]).unwrap();
        let mut byte = [0u8; 1];
        let mut control = [0u64; 4];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: the buffers outlive the call; the kernel fills at most their sizes.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = libc::recvmsg(self.control.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            assert_eq!(n, 1, "the connector child is gone");
            if byte[0] == 0 {
                return None;
            }
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            assert!(!cmsg.is_null() && (*cmsg).cmsg_type == libc::SCM_RIGHTS);
            let fd = *(libc::CMSG_DATA(cmsg) as *const i32);
            Some(std::os::unix::net::UnixStream::from(OwnedFd::from_raw_fd(
                fd,
            )))
        }
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        let _ = self.control.shutdown(std::net::Shutdown::Both);
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(self.child, std::ptr::null_mut(), 0) };
    }
}

/// Resident memory of a process (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
