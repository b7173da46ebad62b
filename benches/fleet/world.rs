//! The fleet's world on one machine, every part its own process on loopback, stopped by pid when
//! dropped: the upstream registry (docker-registry) behind the link shaper (the far, slow side),
//! the site mirrors (the shipped nginx one; docker-registry in proxy mode, for comparison), N
//! node stacks (each its own containerd with its own root, state and socket, and its own
//! cimaged with its own state, sockets and metrics port, all from one shared config), and a
//! Prometheus scraping the N cimaged.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    pub fn spawn(what: &str, cmd: &mut Command, log: &Path) -> Proc {
        let f = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Proc {
            child,
            what: what.to_owned(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("fleet: {} did not stop on SIGTERM; killing it", self.what);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `ok` holds, or panics naming `what`.
pub fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(
            Instant::now() < until,
            "fleet: {what} did not happen within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain-HTTP docker-registry: the upstream, or a pull-through mirror of `proxy`.
pub struct Registry {
    pub addr: String,
    pub log: PathBuf,
    _proc: Proc,
}

impl Registry {
    pub fn start(dir: &Path, name: &str, proxy: Option<&str>) -> Registry {
        let d = dir.join(name);
        std::fs::create_dir_all(d.join("data")).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut conf = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            d.join("data").display()
        );
        if let Some(p) = proxy {
            conf.push_str(&format!("proxy:\n  remoteurl: {p}\n"));
        }
        std::fs::write(d.join("config.yml"), conf).unwrap();
        let log = dir.join(format!("{name}.log"));
        let proc = Proc::spawn(
            name,
            Command::new("docker-registry")
                .arg("serve")
                .arg(d.join("config.yml")),
            &log,
        );
        wait_for(&format!("{name} to listen"), 20, || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        Registry {
            addr,
            log,
            _proc: proc,
        }
    }
}

/// Which mirror the nodes pull through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The shipped nginx mirror (slices, cache lock).
    Nginx,
    /// docker-registry in proxy mode.
    RegistryProxy,
    /// No mirror: every node from the upstream.
    Upstream,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Nginx => "nginx mirror (contrib/mirror)",
            Via::RegistryProxy => "docker-registry proxy mode",
            Via::Upstream => "no mirror (upstream)",
        }
    }
}

/// One node: its containerd and its cimaged.
pub struct Node {
    pub dir: PathBuf,
    pub containerd_sock: PathBuf,
    pub socket: PathBuf,
    pub metrics_port: u16,
    containerd: Option<Proc>,
    cimaged: Option<Proc>,
}

impl Node {
    pub fn start(dir: &Path, i: usize) -> Node {
        let d = dir.join(format!("node{i}"));
        std::fs::create_dir_all(d.join("containerd/certs.d")).unwrap();
        let sock = d.join("containerd/containerd.sock");
        std::fs::write(
            d.join("containerd/config.toml"),
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
                root = d.join("containerd/root").display(),
                state = d.join("containerd/state").display(),
                sock = sock.display(),
                opt = d.join("containerd/opt").display(),
                certs = d.join("containerd/certs.d").display(),
            ),
        )
        .unwrap();
        let containerd = Proc::spawn(
            &format!("containerd of node {i}"),
            Command::new("containerd")
                .arg("--config")
                .arg(d.join("containerd/config.toml")),
            &d.join("containerd.log"),
        );
        wait_for(&format!("containerd of node {i}"), 30, || sock.exists());
        Node {
            socket: d.join("cimaged.sock"),
            containerd_sock: sock,
            metrics_port: free_port(),
            dir: d,
            containerd: Some(containerd),
            cimaged: None,
        }
    }

    /// Points containerd at `mirror` (or none) for pulls from `upstream`, as a site's
    /// hosts.toml does (read at each pull: no restart).
    pub fn route(&self, upstream: &str, mirror: Option<&str>) {
        let d = self.dir.join("containerd/certs.d").join(upstream);
        std::fs::create_dir_all(&d).unwrap();
        let mut t = format!("server = \"http://{upstream}\"\n");
        if let Some(m) = mirror {
            t.push_str(&format!(
                "[host.\"http://{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ));
        }
        t.push_str(&format!(
            "[host.\"http://{upstream}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
        std::fs::write(d.join("hosts.toml"), t).unwrap();
    }

    /// (Re)starts cimaged with the fleet's shared config (`shared`: the `ImageCache` lines every
    /// node has) and this node's own paths.
    pub fn run_cimaged(&mut self, shared: &str) {
        self.cimaged = None;
        let _ = std::fs::remove_file(&self.socket);
        let config = self.dir.join("cimaged.yaml");
        std::fs::write(
            &config,
            format!(
                "CraneBaseDir: {base}\nContainer:\n  Enabled: true\n  RuntimeEndpoint: {ctrd}\nImageCache:\n  Socket: {sock}\n  NodeKeyFile: {base}/node.key\n  MetricsAddr: 127.0.0.1:{port}\n  ImageService:\n    Socket: {base}/image.sock\n{shared}",
                base = self.dir.display(),
                ctrd = self.containerd_sock.display(),
                sock = self.socket.display(),
                port = self.metrics_port,
            ),
        )
        .unwrap();
        let proc = Proc::spawn(
            "cimaged",
            Command::new(env!("CARGO_BIN_EXE_cimaged"))
                .arg("--config")
                .arg(&config)
                .env("CIMAGE_LOG", "info"),
            &self.dir.join("cimaged.log"),
        );
        let socket = self.socket.clone();
        wait_for("cimaged to listen", 30, || socket.exists());
        self.cimaged = Some(proc);
    }

    /// Whether the node's runtime holds `image` (asked of containerd itself).
    pub fn holds(&self, image: &str) -> bool {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.containerd_sock)
            .args(["-n", "k8s.io", "images", "ls", "-q"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l == image)
            })
            .unwrap_or(false)
    }

    /// Whether the node's content store holds blob `digest` whole (fetched and committed,
    /// whether or not it is unpacked yet).
    pub fn has_blob(&self, digest: &str) -> bool {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.containerd_sock)
            .args(["-n", "k8s.io", "content", "ls", "-q"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l == digest)
            })
            .unwrap_or(false)
    }

    /// Runs the CLI against this node.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_cimage"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.cimaged = None;
        self.containerd = None;
        // Overlay mounts of the node's snapshots, if any were left.
        let prefix = format!("{}/", self.dir.display());
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let mut ours: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(&prefix))
                .collect();
            ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in ours {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
    }
}

/// A real Prometheus scraping the nodes' metrics every second.
pub struct Prometheus {
    pub addr: String,
    _proc: Proc,
}

impl Prometheus {
    pub fn start(dir: &Path, nodes: &[Node]) -> Prometheus {
        let d = dir.join("prometheus");
        std::fs::create_dir_all(d.join("data")).unwrap();
        let targets: Vec<String> = nodes
            .iter()
            .map(|n| format!("\"127.0.0.1:{}\"", n.metrics_port))
            .collect();
        std::fs::write(
            d.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: cimage\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", "),
                rules = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("contrib/prometheus/cimage-rules.yml")
                    .display()
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let proc = Proc::spawn(
            "prometheus",
            Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    d.join("prometheus.yml").display()
                ))
                .arg(format!("--storage.tsdb.path={}", d.join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--web.enable-lifecycle"),
            &dir.join("prometheus.log"),
        );
        wait_for("prometheus to answer", 60, || {
            http_get(&addr, "/-/ready").is_some_and(|b| b.contains("Ready"))
        });
        Prometheus { addr, _proc: proc }
    }

    /// An instant query's single number (None when the answer has no sample).
    pub fn value(&self, query: &str) -> Option<f64> {
        let q: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body = http_get(&self.addr, &format!("/api/v1/query?query={q}"))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

/// A GET on loopback; the body, or None.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_owned())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_owned()))
}

/// Established TCP connections to `port` on loopback now (the mirror's clients).
pub fn connections_to(port: u16) -> usize {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(t) = std::fs::read_to_string(table) else {
            continue;
        };
        for l in t.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local address "0100007F:PORT", state 01 = established
            if f.len() > 3 && f[3] == "01" && f[1].ends_with(&format!(":{port:04X}")) {
                n += 1;
            }
        }
    }
    n
}
