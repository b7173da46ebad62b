//! Shared helpers for the integration tests. They run against the real testbed started by
//! `scripts/testbed up` (containerd with its CRI plugin, runc, docker-registry on loopback), and
//! start the real `cimaged` and `cimage` binaries.
#![allow(dead_code)]

pub mod h2raw;
pub mod images;
pub mod nginx_mirror;
pub mod proxy;
pub mod shaper;
pub mod token;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The running testbed's endpoints (from `$CIMAGE_TESTBED_DIR/env`).
#[derive(Clone, Debug)]
pub struct Testbed {
    /// State directory.
    pub dir: PathBuf,
    /// containerd's socket.
    pub cri: PathBuf,
    /// `127.0.0.1:PORT`.
    pub registry: String,
    /// docker-registry's log (access log included).
    pub registry_log: PathBuf,
    /// The private registry (basic auth over TLS), `127.0.0.1:PORT`.
    pub private_registry: String,
    /// The CA that signed the private registry's certificate.
    pub ca: PathBuf,
    /// Test accounts of the private registry: (user, password).
    pub alice: (String, String),
    /// A second account.
    pub bob: (String, String),
    /// An upstream registry with a pull-through mirror in front (plain HTTP).
    pub upstream: String,
    /// The upstream's log.
    pub upstream_log: PathBuf,
    /// The mirror of `upstream`.
    pub mirror: String,
    /// The mirror's log.
    pub mirror_log: PathBuf,
    /// The registry with bearer-token auth (plain HTTP).
    pub token_registry: String,
    /// Where its token issuer must listen (run by the tests).
    pub token_issuer: String,
    /// The issuer's signing key (PKCS#8 PEM) and certificate.
    pub token_key: PathBuf,
    /// The issuer's certificate, which the registry trusts.
    pub token_cert: PathBuf,
}

impl Testbed {
    /// Reads the testbed's env file; panics with instructions when the testbed is not up.
    pub fn get() -> Self {
        let dir =
            std::env::var("CIMAGE_TESTBED_DIR").unwrap_or_else(|_| "/tmp/cimage-testbed".into());
        let env_file = Path::new(&dir).join("env");
        let text = std::fs::read_to_string(&env_file).unwrap_or_else(|e| {
            panic!(
                "the integration tests need the testbed: {} is unreadable ({e}). Run `scripts/testbed up` as root first (or the README's test command, which does).",
                env_file.display()
            )
        });
        let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| {
            vars.get(k)
                .unwrap_or_else(|| panic!("{k} missing in {}", env_file.display()))
                .to_string()
        };
        Self {
            dir: PathBuf::from(get("CIMAGE_TESTBED_DIR")),
            cri: PathBuf::from(get("CIMAGE_TESTBED_CRI")),
            registry: get("CIMAGE_TESTBED_REGISTRY"),
            registry_log: PathBuf::from(get("CIMAGE_TESTBED_REGISTRY_LOG")),
            private_registry: get("CIMAGE_TESTBED_PRIVATE_REGISTRY"),
            ca: PathBuf::from(get("CIMAGE_TESTBED_CA")),
            alice: ("alice".into(), get("CIMAGE_TESTBED_ALICE_PASSWORD")),
            bob: ("bob".into(), get("CIMAGE_TESTBED_BOB_PASSWORD")),
            upstream: get("CIMAGE_TESTBED_UPSTREAM"),
            upstream_log: PathBuf::from(get("CIMAGE_TESTBED_UPSTREAM_LOG")),
            mirror: get("CIMAGE_TESTBED_MIRROR"),
            mirror_log: PathBuf::from(get("CIMAGE_TESTBED_MIRROR_LOG")),
            token_registry: get("CIMAGE_TESTBED_TOKEN_REGISTRY"),
            token_issuer: get("CIMAGE_TESTBED_TOKEN_ISSUER"),
            token_key: PathBuf::from(get("CIMAGE_TESTBED_TOKEN_KEY")),
            token_cert: PathBuf::from(get("CIMAGE_TESTBED_TOKEN_CERT")),
        }
    }

    /// Runs `scripts/testbed ARGS` against this testbed.
    pub fn script(&self, args: &[&str]) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/testbed");
        let out = Command::new(script)
            .args(args)
            .env("CIMAGE_TESTBED_DIR", &self.dir)
            .output()
            .expect("running scripts/testbed");
        assert!(
            out.status.success(),
            "testbed {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A mark in the registry's log; [`Testbed::registry_requests_since`] reads what came after.
    pub fn registry_log_mark(&self) -> u64 {
        std::fs::metadata(&self.registry_log)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Access-log requests (`METHOD PATH`) since `mark` whose path mentions `repo`.
    pub fn registry_requests_since(&self, mark: u64, repo: &str) -> Vec<String> {
        requests_in_log(&self.registry_log, mark, repo)
    }
}

/// The size of a log now (a mark for [`requests_in_log`]).
pub fn log_mark(log: &Path) -> u64 {
    std::fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

/// Access-log requests (`METHOD PATH`) in `log` since `mark` whose path mentions `repo`.
pub fn requests_in_log(log: &Path, mark: u64, repo: &str) -> Vec<String> {
    {
        let bytes = std::fs::read(log).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes[(mark as usize).min(bytes.len())..]).into_owned();
        let needle = format!("/v2/{repo}/");
        text.lines()
            .filter_map(|l| {
                // Access-log lines: 127.0.0.1 - - [date] "GET /v2/x/manifests/1 HTTP/1.1" 200 …
                let start = l.find("] \"")? + 3;
                let rest = &l[start..];
                let req = &rest[..rest.find(" HTTP/")?];
                req.contains(&needle).then(|| req.to_owned())
            })
            .collect()
    }
}

impl Testbed {
    /// Pushes an image made of `layers` to the plain registry, as `REPO:1` in a repository no
    /// other test uses (named after `prefix`).
    pub fn push_new(&self, prefix: &str, layers: &[images::Layer]) -> images::Pushed {
        let repo = Self::unique_repo(prefix);
        block_on(images::push(&self.registry, &repo, "1", layers, &["sh"]))
    }

    /// A repository name no other test uses.
    pub fn unique_repo(prefix: &str) -> String {
        format!("t-{prefix}-{:08x}", rand::random::<u32>())
    }
}

/// A cimaged process of the test's own, with its own socket and index, over the shared runtime.
pub struct Daemon {
    pub testbed: Testbed,
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub extra_config: String,
    /// Extra environment for cimaged.
    pub env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts cimaged with the testbed's runtime and registry, plus `extra` lines appended under
    /// `ImageCache:` (indented by two spaces).
    pub fn start(extra: &str) -> Self {
        Self::start_with_env(extra, &[])
    }

    /// As [`Daemon::start`], with extra environment variables for cimaged.
    pub fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Self {
        let testbed = Testbed::get();
        let dir = tempfile::Builder::new()
            .prefix("cimaged-test-")
            .tempdir()
            .unwrap();
        // Let unprivileged test callers reach the socket directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(dir.path().join("scratch")).unwrap();
        let mut d = Daemon {
            testbed,
            dir,
            child: None,
            extra_config: extra.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.write_config();
        d.spawn();
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("cimaged.sock")
    }

    /// The CRI image endpoint this daemon serves.
    pub fn cri_socket(&self) -> PathBuf {
        self.dir.path().join("image.sock")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("cimaged.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn write_config(&self) {
        // `Launcher.KEY: value` lines go into the Launcher section the base config has, and
        // `ImageService.KEY: value` lines into the ImageService section made below.
        let (launcher, rest): (Vec<&str>, Vec<&str>) = self
            .extra_config
            .lines()
            .partition(|l| l.starts_with("Launcher."));
        let (service, rest): (Vec<&str>, Vec<&str>) = rest
            .into_iter()
            .partition(|l| l.starts_with("ImageService."));
        let launcher: String = launcher
            .iter()
            .map(|l| format!("    {}\n", &l["Launcher.".len()..]))
            .collect();
        let mut extra: String = rest.iter().map(|l| format!("  {l}\n")).collect();
        // Each daemon serves the CRI image endpoint on a socket of its own.
        if !self.extra_config.contains("ImageService:") {
            extra.push_str(&format!(
                "  ImageService:\n    Socket: {}\n",
                self.cri_socket().display()
            ));
            for l in service {
                extra.push_str(&format!("    {}\n", &l["ImageService.".len()..]));
            }
        }
        // Daemons share one containerd; only tests about eviction may evict.
        if !self.extra_config.contains("Eviction:") {
            extra.push_str("  Eviction:\n    Enabled: false\n");
        }
        // A test that brings its own Registries section must list the plain registry too.
        if !self.extra_config.contains("Registries:") {
            extra.push_str(&format!(
                "  Registries:\n    \"{}\":\n      Insecure: true\n",
                self.testbed.registry
            ));
        }
        // A test may set its own retries.
        let retries = if self.extra_config.contains("PullRetries:") {
            ""
        } else {
            "  PullRetries: 2\n"
        };
        let text = format!(
            "CraneBaseDir: {base}\nContainer:\n  Enabled: true\n  RuntimeEndpoint: {cri}\nImageCache:\n  Socket: {sock}\n  StateDir: state/\n  NodeKeyFile: {base}/node.key\n{retries}  Launcher:\n    AllowedMountPrefixes: [{base}/scratch]\n    StopGracePeriod: 3s\n{launcher}{extra}",
            base = self.dir.path().display(),
            cri = self.testbed.cri.display(),
            sock = self.socket().display(),
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// Starts the process and waits until it answers `cimage status`.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cimaged"));
        cmd.arg("--config")
            .arg(self.config_path())
            .env("CIMAGE_LOG", "info,cimage=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        // An empty CIMAGE_LOG from a test means none at all: the daemon's own default, as a
        // node runs it.
        if self
            .env
            .iter()
            .any(|(k, v)| k == "CIMAGE_LOG" && v.is_empty())
        {
            cmd.env_remove("CIMAGE_LOG");
        }
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting cimaged");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.socket().exists() && self.cli(&["status"]).status.success() {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("cimaged exited with {st} during start-up:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "cimaged did not become ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the daemon (no chance to clean up), as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Runs the CLI against this daemon as root.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(None, args)
    }

    /// Runs the CLI as root with `input` on its standard input (for --password-stdin).
    pub fn cli_stdin(&self, args: &[&str], input: &str) -> Output {
        self.cli_as_stdin(None, args, input)
    }

    /// Runs the CLI as `uid:gid` (None: as the test process) with `input` on standard input.
    pub fn cli_as_stdin(&self, ids: Option<(u32, u32)>, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cimage"));
        cmd.args(args)
            .env("CIMAGE_SOCKET", self.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = ids {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().expect("running cimage");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs the CLI as `uid:gid` (None: as the test process).
    pub fn cli_as(&self, ids: Option<(u32, u32)>, args: &[&str]) -> Output {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cimage"));
        cmd.args(args)
            .env("CIMAGE_SOCKET", self.socket())
            .stdin(Stdio::null());
        if let Some((uid, gid)) = ids {
            // std drops root's supplementary groups when it switches to another uid.
            cmd.uid(uid).gid(gid);
        }
        cmd.output().expect("running cimage")
    }

    /// `cimage pull IMAGE --policy P -o json`, asserting success; returns the JSON.
    pub fn pull_json(&self, image: &str, policy: Option<&str>) -> serde_json::Value {
        let mut args = vec!["pull", image, "-o", "json"];
        if let Some(p) = policy {
            args.extend(["--policy", p]);
        }
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "cimage {args:?} failed: {}\n{}",
            stderr(&out),
            self.log()
        );
        serde_json::from_slice(&out.stdout).expect("pull -o json prints one JSON object")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM first so the daemon removes its socket; SIGKILL if it does not stop.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// This daemon's instance id (the `io.cimage.instance` label on its pods and containers).
impl Daemon {
    pub fn instance(&self) -> String {
        let out = self.cli(&["status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status -o json");
        v["instance"].as_str().unwrap().to_owned()
    }
}

/// Pod sandboxes in the runtime carrying all of `labels` (raw CRI, an independent witness).
pub fn cri_pods(testbed: &Testbed, labels: &[(&str, &str)]) -> Vec<String> {
    use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
    let selector = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    block_on(async {
        let mut c = RuntimeServiceClient::new(cimage::cri::unix_channel(&testbed.cri));
        c.list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest {
            filter: Some(k8s_cri::v1::PodSandboxFilter {
                label_selector: selector,
                ..Default::default()
            }),
        })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items
        .into_iter()
        .map(|p| p.id)
        .collect()
    })
}

/// Container ids `ctr -n k8s.io containers ls -q` lists (pod sandboxes included).
pub fn ctr_containers(testbed: &Testbed) -> Vec<String> {
    ctr_k8s(testbed, &["containers", "ls", "-q"])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What `ctr -n k8s.io images ls -q` lists: an independent witness of the runtime's contents.
pub fn ctr_images(testbed: &Testbed) -> Vec<String> {
    ctr_k8s(testbed, &["images", "ls", "-q"])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// What `ctr -n k8s.io ARGS` prints against the testbed's containerd (its standard output;
/// empty when it fails).
pub fn ctr_k8s(testbed: &Testbed, args: &[&str]) -> String {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(&testbed.cri)
        .args(["-n", "k8s.io"])
        .args(args)
        .output()
        .expect("running ctr");
    stdout(&out)
}

/// A runtime for async helpers (image pushes) inside synchronous tests.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Asserts that no secret appears in the daemon's log or in any file under its directory (the
/// index included).
pub fn assert_no_secret(d: &Daemon, secrets: &[&str]) {
    fn files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut all = Vec::new();
    files(d.dir.path(), &mut all);
    let log = d.log();
    for secret in secrets {
        assert!(!log.contains(secret), "a secret is in cimaged's log");
        for f in &all {
            let bytes = std::fs::read(f).unwrap_or_default();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a secret is in {}",
                f.display()
            );
        }
    }
}

/// The testbed's busybox image.
pub fn busybox(tb: &Testbed) -> String {
    format!("{}/busybox:1", tb.registry)
}

/// `cimage run` with `args` before `--` and `cmd` after; returns the output.
pub fn run(d: &Daemon, args: &[&str], cmd: &[&str]) -> std::process::Output {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.push("--");
    all.extend_from_slice(cmd);
    d.cli(&all)
}

/// The pods of `job` that this daemon made.
pub fn job_pods(d: &Daemon, job: &str) -> Vec<String> {
    let instance = d.instance();
    cri_pods(
        &d.testbed,
        &[("io.cimage.instance", &instance), ("io.cimage.job", job)],
    )
}

/// Registries sections for a daemon that pulls through a proxy at `proxy` (cimaged reads
/// manifests over plain HTTP there too).
pub fn proxied_registries(tb: &Testbed, proxy: &str) -> String {
    format!(
        "Registries:\n  \"{}\":\n    Insecure: true\n  \"{proxy}\":\n    Insecure: true",
        tb.registry
    )
}

/// One GET of a blob in a registry's access log.
#[derive(Debug)]
pub struct BlobGet {
    /// The answer's status.
    pub status: u16,
    /// Bytes of its body.
    pub bytes: u64,
    /// The client's `User-Agent`.
    pub agent: String,
}

/// The GETs of blob `digest` in the access log `log` since `mark`.
pub fn blob_gets(log: &Path, mark: u64, digest: &str) -> Vec<BlobGet> {
    let bytes = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes[(mark as usize).min(bytes.len())..]).into_owned();
    text.lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} ")))
        .filter_map(|l| {
            // 127.0.0.1 - - [date] "GET /v2/r/blobs/sha256:… HTTP/1.1" 206 8388608 "" "agent"
            let after = &l[l.find(" HTTP/1.1\" ")? + 11..];
            let mut w = after.split_whitespace();
            let status = w.next()?.parse().ok()?;
            let bytes = w.next()?.parse().ok()?;
            let agent = after.rsplit('"').nth(1)?.to_owned();
            Some(BlobGet {
                status,
                bytes,
                agent,
            })
        })
        .collect()
}

/// The size of blob `digest` in the testbed registry under `root` (its storage directory).
pub fn stored_size(root: &Path, digest: &str) -> u64 {
    let hex = digest.trim_start_matches("sha256:");
    let path = root.join(format!(
        "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len()
}

/// A free loopback port for the metrics endpoint.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The metrics page.
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of one series on the metrics page (0 when absent).
pub fn series(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Compiles a C program statically (so an image needs no C library) and returns the binary.
pub fn static_c(source: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (src, bin) = (dir.path().join("prog.c"), dir.path().join("prog"));
    std::fs::write(&src, source).unwrap();
    let out = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("cc (gcc) is needed; scripts/testbed install adds it");
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::read(bin).unwrap()
}

/// The runtime's images (raw CRI, no cimaged): their total size and their ids.
pub fn runtime_images(tb: &Testbed) -> (u64, Vec<String>) {
    use k8s_cri::v1 as cri;
    block_on(async {
        let mut c =
            cri::image_service_client::ImageServiceClient::new(cimage::cri::unix_channel(&tb.cri));
        let images = c
            .list_images(cri::ListImagesRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .images;
        (
            images.iter().map(|i| i.size).sum(),
            images.into_iter().map(|i| i.id).collect(),
        )
    })
}
