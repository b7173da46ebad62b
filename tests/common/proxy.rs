//! An HTTP proxy on loopback in front of a testbed registry, for registries that misbehave. It
//! takes one request per connection (answers say `Connection: close`), and for each request
//! whose path contains a rule's pattern it applies that rule's fault: a delay, a slow link, an
//! error status (with `Retry-After`), a connection closed or stalled mid-body, a corrupted body,
//! an oversized manifest, a redirect loop, a `Range` header dropped. Over everything it can pace what it sends to a set
//! rate and stop sending after a number of bytes, in all or on each connection (a registry that
//! hangs mid-blob, or one whose every connection hangs after a while). containerd
//! reaches it as a registry of its own through a hosts.toml the proxy writes for its address
//! (and removes when dropped).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Testbed;

/// What the proxy does to a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Waits this long before passing the request on.
    Delay(Duration),
    /// Sends the answer at this many bytes per second.
    Throttle(u64),
    /// Answers this status itself, with `Retry-After: N` (seconds) when given.
    Status { code: u16, retry_after: Option<u32> },
    /// Passes the answer's head and this many bytes of its body, then closes the connection.
    CloseAfter(u64),
    /// Passes the answer's head and this many bytes of its body, then sends nothing more and
    /// keeps the connection open.
    StallAfter(u64),
    /// Passes the answer with one byte of its body changed (same length).
    Corrupt,
    /// Answers `200` with a manifest media type and a body of this many bytes.
    Oversized(u64),
    /// Answers `307` back to the same path.
    RedirectLoop,
    /// Passes the request on without its `Range` header (a registry that ignores ranges).
    StripRange,
}

struct Rule {
    pattern: String,
    fault: Fault,
    /// Requests it still applies to (u64::MAX: all).
    left: u64,
    /// Requests it applied to.
    hits: u64,
}

struct Shared {
    upstream: String,
    /// Bytes per second towards the client (0: unpaced).
    rate: u64,
    /// Bytes sent towards the client so far, over all connections.
    sent: AtomicU64,
    /// Past this many bytes sent, nothing more is sent (u64::MAX: never).
    stall_at: AtomicU64,
    /// Past this many bytes sent on one connection, nothing more is sent on it (u64::MAX:
    /// never).
    stall_each: AtomicU64,
    stop: AtomicBool,
    /// When pacing began (the first byte sent).
    start: Mutex<Option<Instant>>,
    /// Every socket, to shut them down at the end.
    sockets: Mutex<Vec<TcpStream>>,
    rules: Mutex<Vec<Rule>>,
    /// `METHOD PATH` of every request, in order.
    requests: Mutex<Vec<String>>,
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
            stall_each: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
            start: Mutex::new(None),
            sockets: Mutex::new(Vec::new()),
            rules: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
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

    /// From now, every connection sends at most `bytes` bytes towards its client (the answer's
    /// head included), then nothing more, and stays open: a registry whose every connection
    /// hangs, however often the client reconnects or resumes.
    pub fn stall_each_connection_after(&self, bytes: u64) {
        self.shared.stall_each.store(bytes, Ordering::SeqCst);
    }

    /// Bytes sent towards the clients so far.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// Applies `fault` to the next `times` requests (0: to all) whose path contains
    /// `pattern`. The first matching rule with requests left applies.
    pub fn fault(&self, pattern: &str, fault: Fault, times: u64) {
        self.shared.rules.lock().unwrap().push(Rule {
            pattern: pattern.to_owned(),
            fault,
            left: if times == 0 { u64::MAX } else { times },
            hits: 0,
        });
    }

    /// Removes every rule: from now on requests pass untouched.
    pub fn heal(&self) {
        self.shared.rules.lock().unwrap().clear();
    }

    /// How many requests the rules with `pattern` applied to.
    pub fn hits(&self, pattern: &str) -> u64 {
        let rules = self.shared.rules.lock().unwrap();
        rules
            .iter()
            .filter(|r| r.pattern == pattern)
            .map(|r| r.hits)
            .sum()
    }

    /// `METHOD PATH` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
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

/// Reads an HTTP head (up to the blank line); returns it and what came after it.
fn read_head(sock: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Some((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > 64 << 10 {
            return None;
        }
        match sock.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The head with `Connection: close` in place of any `Connection` header.
fn closing(head: &str) -> String {
    let mut out: Vec<&str> = head
        .trim_end()
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    out.push("Connection: close");
    format!("{}\r\n\r\n", out.join("\r\n"))
}

/// The pace of one answer: the proxy-wide rate (counted over every connection), or a rate of
/// its own (a throttle fault, counted from its first byte).
#[derive(Clone, Copy)]
struct Pace {
    rate: u64,
    own: Option<(Instant, u64)>,
    /// Bytes sent on this connection so far.
    sent: u64,
}

/// Sends `data` towards the client under its pace and the proxy-wide stall; false once the
/// client is gone or the proxy stops.
fn send(s: &Shared, client: &mut TcpStream, mut data: &[u8], pace: &mut Pace) -> bool {
    let rate = pace.rate;
    while !data.is_empty() {
        if s.stop.load(Ordering::SeqCst) {
            return false;
        }
        let room = s
            .stall_at
            .load(Ordering::SeqCst)
            .saturating_sub(s.sent.load(Ordering::SeqCst))
            .min(
                s.stall_each
                    .load(Ordering::SeqCst)
                    .saturating_sub(pace.sent),
            );
        if room == 0 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        // Paced writes go in small pieces so the rate holds within a blob.
        let piece = if rate > 0 { 16 << 10 } else { 64 << 10 };
        let n = data.len().min(room as usize).min(piece);
        if client.write_all(&data[..n]).is_err() {
            return false;
        }
        data = &data[n..];
        pace.sent += n as u64;
        let total = s.sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        if rate > 0 {
            let (start, total) = match &mut pace.own {
                Some((start, own)) => {
                    *own += n as u64;
                    (*start, *own)
                }
                None => (
                    *s.start.lock().unwrap().get_or_insert_with(Instant::now),
                    total,
                ),
            };
            let due = start + Duration::from_secs_f64(total as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
    }
    true
}

/// The fault for a request to `path`, if a rule with requests left matches.
fn fault_for(s: &Shared, path: &str) -> Option<Fault> {
    let mut rules = s.rules.lock().unwrap();
    let r = rules
        .iter_mut()
        .find(|r| r.left > 0 && path.contains(&r.pattern))?;
    if r.left != u64::MAX {
        r.left -= 1;
    }
    r.hits += 1;
    Some(r.fault.clone())
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        307 => "Temporary Redirect",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Fault",
    }
}

/// Waits until the proxy stops, holding a connection open.
fn hold(s: &Shared) {
    while !s.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One client connection: one request, faulted or passed to the registry.
fn connection(s: Arc<Shared>, mut client: TcpStream) {
    let _ = client.set_nonblocking(false);
    s.sockets.lock().unwrap().extend(client.try_clone().ok());
    let Some((head, mut body)) = read_head(&mut client) else {
        return;
    };
    let mut words = head.split_whitespace();
    let (method, path) = (
        words.next().unwrap_or("").to_owned(),
        words.next().unwrap_or("").to_owned(),
    );
    s.requests.lock().unwrap().push(format!("{method} {path}"));
    let fault = fault_for(&s, &path);
    let mut pace = Pace {
        rate: s.rate,
        own: None,
        sent: 0,
    };
    match &fault {
        Some(Fault::Status { code, retry_after }) => {
            let extra = retry_after
                .map(|n| format!("Retry-After: {n}\r\n"))
                .unwrap_or_default();
            let answer = format!(
                "HTTP/1.1 {code} {}\r\n{extra}Content-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                reason(*code)
            );
            send(&s, &mut client, answer.as_bytes(), &mut pace);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        Some(Fault::RedirectLoop) => {
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            send(&s, &mut client, answer.as_bytes(), &mut pace);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        Some(Fault::Oversized(size)) => {
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
            );
            if send(&s, &mut client, answer.as_bytes(), &mut pace) && method != "HEAD" {
                let filler = vec![b' '; 64 << 10];
                let mut left = *size;
                while left > 0 {
                    let n = left.min(filler.len() as u64) as usize;
                    if !send(&s, &mut client, &filler[..n], &mut pace) {
                        break;
                    }
                    left -= n as u64;
                }
            }
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        Some(Fault::Delay(d)) => std::thread::sleep(*d),
        Some(Fault::Throttle(r)) => {
            pace = Pace {
                rate: *r,
                own: Some((Instant::now(), 0)),
                sent: pace.sent,
            }
        }
        _ => {}
    }
    // Pass the request on, with its body if it has one.
    let Ok(mut upstream) = TcpStream::connect(&s.upstream) else {
        return;
    };
    s.sockets.lock().unwrap().extend(upstream.try_clone().ok());
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while body.len() < length {
        let mut chunk = vec![0u8; (length - body.len()).min(64 << 10)];
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let head = match fault {
        Some(Fault::StripRange) => head
            .lines()
            .filter(|l| !l.to_ascii_lowercase().starts_with("range:"))
            .collect::<Vec<_>>()
            .join("\r\n"),
        _ => head,
    };
    if upstream.write_all(closing(&head).as_bytes()).is_err() || upstream.write_all(&body).is_err()
    {
        return;
    }
    let Some((answer, mut rest)) = read_head(&mut upstream) else {
        return;
    };
    if !send(&s, &mut client, closing(&answer).as_bytes(), &mut pace) {
        return;
    }
    // The body: what came with the head, then the rest until the registry closes.
    let limit = match fault {
        Some(Fault::CloseAfter(n)) | Some(Fault::StallAfter(n)) => n,
        _ => u64::MAX,
    };
    let mut passed = 0u64;
    let mut corrupt = fault == Some(Fault::Corrupt);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let mut data = if rest.is_empty() {
            match upstream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf[..n].to_vec(),
            }
        } else {
            std::mem::take(&mut rest)
        };
        if corrupt && !data.is_empty() {
            let i = data.len() / 2;
            data[i] ^= 0xff;
            corrupt = false;
        }
        let room = limit.saturating_sub(passed) as usize;
        let cut = data.len() > room;
        data.truncate(room);
        if !send(&s, &mut client, &data, &mut pace) {
            return;
        }
        passed += data.len() as u64;
        if cut {
            if matches!(fault, Some(Fault::StallAfter(_))) {
                hold(&s);
            }
            break;
        }
    }
    let _ = client.shutdown(Shutdown::Both);
}
