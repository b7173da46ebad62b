//! The shipped site mirror (`contrib/mirror/nginx.conf.template`) run for a test: filled with
//! `envsubst` exactly as its header says, started as `nginx -c FILE -g 'daemon off;'`, stopped
//! by its pid when dropped. Also a registry front that answers every request with a redirect to
//! the real registry, as Docker Hub and object-store backed registries answer blob GETs, and a
//! reader of docker-registry's log that tells what the registry served.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running nginx site mirror.
pub struct NginxMirror {
    /// `127.0.0.1:PORT`: the registry host that clients name.
    pub addr: String,
    /// Its cache, logs and pid file.
    pub dir: PathBuf,
    /// Its access log (inner fetches are the lines from client `unix:`).
    pub access_log: PathBuf,
    child: Child,
}

impl NginxMirror {
    /// Fills the template for `upstream` (`http://HOST:PORT`) with a cache under `dir` and starts
    /// nginx on a free loopback port; waits until it answers.
    /// nginx's workers run as an unprivileged user (`nobody` when the master is root and the
    /// config names none), so `dir` and every directory above it must be searchable by others:
    /// [`mirror_dir`] makes one that is.
    pub fn start(dir: &Path, upstream: &str) -> Self {
        let template =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/mirror/nginx.conf.template");
        std::fs::create_dir_all(dir).unwrap();
        for d in dir.ancestors() {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d).unwrap().permissions().mode();
            assert!(
                mode & 0o001 != 0,
                "{}: mode {:o} keeps nginx's workers out of the mirror's cache {}",
                d.display(),
                mode & 0o7777,
                dir.display()
            );
        }
        let port = super::free_port();
        let addr = format!("127.0.0.1:{port}");
        // No name is resolved in the tests: redirects name 127.0.0.1.
        std::fs::write(dir.join("resolver.conf"), "resolver 127.0.0.1 ipv6=off;\n").unwrap();
        let filled = Command::new("envsubst")
            .arg("$UPSTREAM $LISTEN $CACHE_DIR")
            .env("UPSTREAM", upstream)
            .env("LISTEN", &addr)
            .env("CACHE_DIR", dir)
            .stdin(std::fs::File::open(&template).unwrap())
            .output()
            .expect("running envsubst (package gettext-base)");
        assert!(filled.status.success(), "envsubst failed");
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, &filled.stdout).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting nginx (package nginx-light)");
        let mut m = NginxMirror {
            addr,
            dir: dir.to_owned(),
            access_log: dir.join("access.log"),
            child,
        };
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&m.addr).is_err() {
            if let Ok(Some(status)) = m.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = m.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("nginx exited at start ({status}): {err}");
            }
            assert!(Instant::now() < until, "nginx did not listen on {}", m.addr);
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    /// Requests from clients (not the mirror's inner fetches) in its access log:
    /// (`METHOD PATH`, status).
    pub fn client_requests(&self) -> Vec<(String, u16)> {
        let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with("unix:"))
            .filter_map(|l| {
                let start = l.find("] \"")? + 3;
                let rest = &l[start..];
                let end = rest.find(" HTTP/")?;
                let status = rest[end..].split('"').nth(1)?.split_whitespace().next()?;
                Some((rest[..end].to_owned(), status.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for NginxMirror {
    fn drop(&mut self) {
        // nginx's master ends its workers on SIGTERM.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory under the system's temporary directory that nginx's unprivileged workers
/// can reach (a test's own temporary directories are private to root).
pub fn mirror_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("cimage-mirror.")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A front that answers every request with `307` to the same path at the real registry.
pub struct Redirector {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Redirects sent.
    pub redirects: Arc<AtomicU64>,
    /// The path of each request redirected, in order.
    pub paths: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Redirector {
    /// Redirects to `registry` (`HOST:PORT`, plain HTTP).
    pub fn start(registry: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, redirects) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let paths: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let (s, r, p, target) = (
            Arc::clone(&stop),
            Arc::clone(&redirects),
            Arc::clone(&paths),
            registry.to_owned(),
        );
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (r, p, target) = (Arc::clone(&r), Arc::clone(&p), target.clone());
                        std::thread::spawn(move || redirect(conn, &target, &r, &p));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Redirector {
            addr,
            redirects,
            paths,
            stop,
            accept: Some(accept),
        }
    }
}

impl Drop for Redirector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn redirect(
    conn: TcpStream,
    target: &str,
    count: &AtomicU64,
    paths: &std::sync::Mutex<Vec<String>>,
) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut writer = conn;
    // Keep-alive: one answer per request head, until the client closes.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" || header == "\n" {
                break;
            }
        }
        count.fetch_add(1, Ordering::SeqCst);
        paths.lock().unwrap().push(path.clone());
        let answer = format!(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{target}{path}\r\nContent-Length: 0\r\n\r\n"
        );
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// What docker-registry's log (from byte `mark` on) says it served for blob `digest`: the status
/// and body bytes of every completed request for it.
pub fn blob_responses(log: &Path, mark: u64, digest: &str) -> Vec<(u16, u64)> {
    let bytes = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes[(mark as usize).min(bytes.len())..]).into_owned();
    // The path ends at the digest; a mirror's request may add a query (`?ns=…`).
    let (ended, queried) = (format!("/blobs/{digest}\""), format!("/blobs/{digest}?"));
    let field = |l: &str, name: &str| -> Option<u64> {
        let at = l.find(name)? + name.len();
        l[at..].split_whitespace().next()?.parse().ok()
    };
    text.lines()
        .filter(|l| {
            l.contains("msg=\"response completed\"") && (l.contains(&ended) || l.contains(&queried))
        })
        .filter_map(|l| {
            Some((
                field(l, "http.response.status=")? as u16,
                field(l, "http.response.written=").unwrap_or(0),
            ))
        })
        .collect()
}

/// Blob sizes at `registry` (`HOST:PORT`, plain HTTP) for `repo`, asked with HEAD.
pub fn blob_size(registry: &str, repo: &str, digest: &str) -> u64 {
    let out = Command::new("curl")
        .args([
            "-sfI",
            &format!("http://{registry}/v2/{repo}/blobs/{digest}"),
        ])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout);
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no size for {digest} at {registry}: {head}"))
}
