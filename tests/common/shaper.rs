//! A link shaper on loopback: a TCP proxy that makes a registry on this machine look far away.
//! This kernel has no `netem`, so the shaping is done in user space, per connection and for all
//! connections together:
//!
//! - a one-way delay, in both directions (a request and its answer cost twice the delay), and
//!   one round trip before the first byte of a new connection (its handshake);
//! - a rate cap per connection (what a TCP window over a long path, or a per-connection limit of
//!   an object store, does);
//! - a rate cap over all connections together (the link).
//!
//! It knows nothing of HTTP: keep-alive, TLS and HTTP/2 pass unchanged. It counts the bytes sent
//! each way, the connections and the most open at once. Each direction of a connection is a
//! thread with a bounded queue between its reader and writer (4 MiB), so memory stays bounded
//! however fast the far side sends. It listens on 127.0.0.1 only and stops when dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the link behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    /// One-way delay, each direction.
    pub delay: Duration,
    /// Bytes per second per connection and direction (`None`: no cap).
    pub per_connection: Option<u64>,
    /// Bytes per second over all connections, per direction (`None`: no cap).
    pub total: Option<u64>,
}

impl Shape {
    /// A link that passes everything at once.
    pub fn none() -> Self {
        Self::default()
    }

    /// `delay` one way, `per_connection` and `total` in bytes per second.
    pub fn far(delay: Duration, per_connection: u64, total: u64) -> Self {
        Self {
            delay,
            per_connection: Some(per_connection),
            total: Some(total),
        }
    }
}

/// Chunks a direction moves at a time: small enough for smooth pacing at a few MB/s.
const CHUNK: usize = 16 << 10;
/// Chunks queued between a direction's reader and writer (4 MiB).
const QUEUE: usize = 256;

/// A pacing clock: each chunk reserves its slot after the previous one at the rate.
struct Pace {
    rate: u64,
    next: Instant,
}

impl Pace {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            next: Instant::now(),
        }
    }

    /// When `bytes` that are ready at `ready` leave, with the slot they take reserved. Slots
    /// follow the chunks' own times, not the writer's sleeps, so the delay and the rate add up
    /// as on a real link; an idle link does not save up (a burst after a pause starts when
    /// it is ready).
    fn reserve(&mut self, bytes: usize, ready: Instant) -> Instant {
        let start = self.next.max(ready);
        self.next = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        start
    }
}

struct Shared {
    upstream: String,
    shape: Mutex<Shape>,
    stop: AtomicBool,
    /// Bytes towards the clients (the registry's answers) and towards the upstream.
    down: AtomicU64,
    up: AtomicU64,
    connections: AtomicU64,
    open: AtomicU64,
    peak_open: AtomicU64,
    /// The link's clock per direction (0: towards the clients, 1: towards the upstream).
    link: [Mutex<Option<Pace>>; 2],
    sockets: Mutex<Vec<TcpStream>>,
}

/// A running shaper; stopped (every connection shut) and its hosts.toml removed when dropped.
pub struct Shaper {
    /// `127.0.0.1:PORT`: use it as the registry host of image references.
    pub addr: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    hosts: Option<PathBuf>,
}

impl Shaper {
    /// A shaper in front of `upstream` (`HOST:PORT` on loopback).
    pub fn start(upstream: &str, shape: Shape) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the shaper");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            shape: Mutex::new(shape),
            stop: AtomicBool::new(false),
            down: AtomicU64::new(0),
            up: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open: AtomicU64::new(0),
            peak_open: AtomicU64::new(0),
            link: [Mutex::new(None), Mutex::new(None)],
            sockets: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let s = Arc::clone(&s);
                        std::thread::spawn(move || connection(s, client));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Shaper {
            addr,
            shared,
            accept: Some(accept),
            hosts: None,
        }
    }

    /// Tells the testbed's containerd (its `certs.d` under `testbed_dir`) to reach the shaper's
    /// address over plain HTTP; the file goes when the shaper is dropped.
    pub fn plain_http_for_containerd(mut self, testbed_dir: &std::path::Path) -> Self {
        let dir = testbed_dir.join("containerd/certs.d").join(&self.addr);
        std::fs::create_dir_all(&dir).unwrap();
        let addr = &self.addr;
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{addr}\"\n[host.\"http://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
        self.hosts = Some(dir);
        self
    }

    /// Changes the shaping of what is sent from now on.
    pub fn reshape(&self, shape: Shape) {
        *self.shared.shape.lock().unwrap() = shape;
        for link in &self.shared.link {
            *link.lock().unwrap() = None;
        }
    }

    /// Bytes sent towards the clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.shared.down.load(Ordering::SeqCst)
    }

    /// Bytes sent towards the upstream so far.
    pub fn bytes_up(&self) -> u64 {
        self.shared.up.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The most connections open at once so far.
    pub fn peak_connections(&self) -> u64 {
        self.shared.peak_open.load(Ordering::SeqCst)
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for s in self.shared.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Some(dir) = self.hosts.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Counts a connection open while it lives.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn connection(s: Arc<Shared>, client: TcpStream) {
    s.connections.fetch_add(1, Ordering::SeqCst);
    let now_open = s.open.fetch_add(1, Ordering::SeqCst) + 1;
    s.peak_open.fetch_max(now_open, Ordering::SeqCst);
    let _open = Open(Arc::clone(&s));
    // The handshake of a far connection costs a round trip before anything moves.
    let delay = s.shape.lock().unwrap().delay;
    std::thread::sleep(delay * 2);
    let Ok(server) = TcpStream::connect(&s.upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    {
        let mut sockets = s.sockets.lock().unwrap();
        sockets.push(client.try_clone().unwrap());
        sockets.push(server.try_clone().unwrap());
    }
    let up = {
        let (s, from, to) = (
            Arc::clone(&s),
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
        );
        std::thread::spawn(move || direction(s, from, to, 1))
    };
    direction(Arc::clone(&s), server, client, 0);
    let _ = up.join();
}

/// Moves one direction, `from` → `to` (`which`: 0 towards the client, 1 towards the upstream),
/// through a delay line and the rate caps; ends both ways when either side closes.
fn direction(s: Arc<Shared>, mut from: TcpStream, to: TcpStream, which: usize) {
    let (tx, rx): (SyncSender<(Instant, Vec<u8>)>, Receiver<_>) = sync_channel(QUEUE);
    let writer = {
        let s = Arc::clone(&s);
        let to = to.try_clone().unwrap();
        std::thread::spawn(move || write_side(s, rx, to, which))
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

fn write_side(s: Arc<Shared>, rx: Receiver<(Instant, Vec<u8>)>, mut to: TcpStream, which: usize) {
    let mut own: Option<Pace> = None;
    while let Ok((read_at, chunk)) = rx.recv() {
        let shape = *s.shape.lock().unwrap();
        // The chunk leaves when both caps give it a slot, and arrives the delay later.
        let mut leaves = read_at;
        if let Some(rate) = shape.per_connection {
            let pace = own.get_or_insert_with(|| Pace::new(rate));
            pace.rate = rate;
            leaves = pace.reserve(chunk.len(), leaves);
        }
        if let Some(rate) = shape.total {
            let mut link = s.link[which].lock().unwrap();
            let pace = link.get_or_insert_with(|| Pace::new(rate));
            pace.rate = rate;
            leaves = pace.reserve(chunk.len(), leaves);
        }
        let at = leaves + shape.delay;
        let wait = at.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        if s.stop.load(Ordering::SeqCst) || to.write_all(&chunk).is_err() {
            break;
        }
        let counter = if which == 0 { &s.down } else { &s.up };
        counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
    }
}
