//! A TCP proxy on loopback in front of a testbed registry: it paces what the registry sends to
//! a set rate (a slow link) and can stop sending altogether after a number of bytes (a registry
//! that hangs mid-blob). containerd reaches it as a registry of its own through a hosts.toml
//! the proxy writes for its address (and removes when dropped).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Testbed;

struct Shared {
    upstream: String,
    /// Bytes per second towards the client (0: unpaced).
    rate: u64,
    /// Bytes sent towards the client so far, over all connections.
    sent: AtomicU64,
    /// Past this many bytes sent, nothing more is sent (u64::MAX: never).
    stall_at: AtomicU64,
    stop: AtomicBool,
    /// When pacing began (the first byte sent).
    start: Mutex<Option<Instant>>,
    /// Every socket, to shut them down at the end.
    sockets: Mutex<Vec<TcpStream>>,
}

/// A running proxy; stopped and its hosts.toml removed when dropped.
pub struct Proxy {
    /// `127.0.0.1:PORT`: use it as the registry host of image references.
    pub addr: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    hosts_dir: PathBuf,
}

impl Proxy {
    /// A proxy to `upstream` (`127.0.0.1:PORT` of a plain-HTTP registry) sending at most
    /// `bytes_per_sec` towards its clients (0: as fast as it comes).
    pub fn start(testbed: &Testbed, upstream: &str, bytes_per_sec: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            rate: bytes_per_sec,
            sent: AtomicU64::new(0),
            stall_at: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
            start: Mutex::new(None),
            sockets: Mutex::new(Vec::new()),
        });
        // containerd talks plain HTTP to it only when told so.
        let hosts_dir = testbed.dir.join("containerd/certs.d").join(&addr);
        std::fs::create_dir_all(&hosts_dir).unwrap();
        std::fs::write(
            hosts_dir.join("hosts.toml"),
            format!(
                "server = \"http://{addr}\"\n[host.\"http://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
        let s = Arc::clone(&shared);
        let accept = std::thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let s = Arc::clone(&s);
                        std::thread::spawn(move || connection(s, client));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Proxy {
            addr,
            shared,
            accept: Some(accept),
            hosts_dir,
        }
    }

    /// From now, after `bytes` more bytes towards the clients, sends nothing more (connections
    /// stay open).
    pub fn stall_after(&self, bytes: u64) {
        let now = self.shared.sent.load(Ordering::SeqCst);
        self.shared.stall_at.store(now + bytes, Ordering::SeqCst);
    }

    /// Bytes sent towards the clients so far.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for s in self.shared.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        let _ = std::fs::remove_dir_all(&self.hosts_dir);
    }
}

/// One client connection: requests go up as they come, answers come down paced.
fn connection(s: Arc<Shared>, client: TcpStream) {
    let Ok(upstream) = TcpStream::connect(&s.upstream) else {
        return;
    };
    let _ = client.set_nonblocking(false);
    {
        let mut socks = s.sockets.lock().unwrap();
        socks.extend(client.try_clone().ok());
        socks.extend(upstream.try_clone().ok());
    }
    let (mut c_read, mut u_write) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let up = std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match c_read.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if u_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = u_write.shutdown(Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let mut buf = [0u8; 16 * 1024];
    loop {
        if s.stop.load(Ordering::SeqCst) {
            break;
        }
        // Stalled: hold the connection open and send nothing.
        let room = s
            .stall_at
            .load(Ordering::SeqCst)
            .saturating_sub(s.sent.load(Ordering::SeqCst));
        if room == 0 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let want = buf.len().min(room as usize);
        let n = match u_read.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if c_write.write_all(&buf[..n]).is_err() {
            break;
        }
        let total = s.sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        if s.rate > 0 {
            let start = *s.start.lock().unwrap().get_or_insert_with(Instant::now);
            let due = start + Duration::from_secs_f64(total as f64 / s.rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
    }
    let _ = c_write.shutdown(Shutdown::Both);
    let _ = up.join();
}
