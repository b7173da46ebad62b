//! What every section of the benchmark uses: the daemon under test, the raw CRI client beside
//! it, timing helpers and the table row.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cimage::api::pb;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest, RemoveImageRequest};
use tonic::transport::Channel;

pub(crate) const REPS: usize = 5;

pub(crate) fn env_file() -> std::collections::HashMap<String, String> {
    let dir = std::env::var("CIMAGE_TESTBED_DIR").unwrap_or_else(|_| "/tmp/cimage-testbed".into());
    let path = Path::new(&dir).join("env");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => fail(format!(
            "cannot read the testbed's {}: {e}; run scripts/bench (or scripts/testbed up)",
            path.display()
        )),
    };
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Ends the benchmark with one line saying what is wrong with what it was given.
pub(crate) fn fail(message: String) -> ! {
    eprintln!("bench: {message}");
    std::process::exit(2)
}

/// The root filesystem named by `CIMAGE_BENCH_ROOTFS`, if set: it must be a regular, non-empty
/// tar file (a directory or an empty file left by an interrupted build is refused in one line).
/// Read before anything is measured, so a bad path costs nothing.
pub(crate) fn rootfs_tar() -> Option<(Vec<u8>, usize)> {
    let path = std::env::var("CIMAGE_BENCH_ROOTFS").ok()?;
    let bad = |why: &str| -> ! {
        fail(format!(
            "CIMAGE_BENCH_ROOTFS={path}: {why}; it must be a tar file of a root filesystem \
             (scripts/bench builds one with CIMAGE_BENCH_DEBIAN=1)"
        ))
    };
    match std::fs::metadata(&path) {
        Err(e) => bad(&e.to_string()),
        Ok(m) if m.is_dir() => bad("is a directory"),
        Ok(m) if !m.is_file() => bad("is not a regular file"),
        Ok(m) if m.len() == 0 => bad("is empty"),
        Ok(_) => {}
    }
    let tar = std::fs::read(&path).unwrap_or_else(|e| bad(&e.to_string()));
    let files = match tar::Archive::new(&tar[..]).entries() {
        Ok(entries) => entries
            .map(|e| e.map(|_| ()))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.len())
            .unwrap_or_else(|e| bad(&format!("is not a readable tar file ({e})"))),
        Err(e) => bad(&format!("is not a readable tar file ({e})")),
    };
    if files == 0 {
        bad("holds no files");
    }
    Some((tar, files))
}

pub(crate) fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

pub(crate) struct Daemon {
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
    pub(crate) socket: PathBuf,
    /// cimaged's CRI image endpoint.
    pub(crate) cri_socket: PathBuf,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub(crate) fn start(cri: &str, registry: &str) -> Self {
        Self::start_with(cri, registry, "")
    }

    /// A daemon with `extra` lines (`Key: value`) added to its `ImageCache` section.
    pub(crate) fn start_with(cri: &str, registry: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cimaged.sock");
        let cri_socket = dir.path().join("image.sock");
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "CraneBaseDir: {}\nContainer:\n  Enabled: true\n  RuntimeEndpoint: {cri}\nImageCache:\n  Socket: {}\n  MaxConcurrentPulls: 3\n  ImageService:\n    Socket: {}\n  Registries:\n    \"{registry}\":\n      Insecure: true\n{}",
                dir.path().display(),
                socket.display(),
                cri_socket.display(),
                extra
                    .lines()
                    .map(|l| format!("  {l}\n"))
                    .collect::<String>()
            ),
        )
        .unwrap();
        let log = dir.path().join("cimaged.log");
        let child = Self::spawn_with(&config, &log, &socket);
        Daemon {
            child,
            log,
            socket,
            cri_socket,
            config,
            _dir: dir,
        }
    }

    fn spawn_with(config: &Path, log: &Path, socket: &Path) -> Child {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cimaged"))
            .arg("--config")
            .arg(config)
            .env("CIMAGE_LOG", "warn,cimage::puller=debug,cimaged=info")
            .stderr(f)
            .spawn()
            .unwrap();
        for _ in 0..400 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child
    }

    /// Stops the daemon (SIGTERM) and waits for it.
    pub(crate) fn stop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }

    /// Starts the daemon again over the same state.
    pub(crate) fn respawn(&mut self) {
        self.child = Self::spawn_with(&self.config, &self.log, &self.socket);
    }

    /// How often `needle` is in the daemon's log (to wait for a line it writes once).
    pub(crate) fn occurrences(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(needle)
            .count()
    }

    /// The daemon's redb file.
    pub(crate) fn index_path(&self) -> PathBuf {
        self._dir.path().join("cimage/index.redb")
    }

    /// Resident memory now.
    pub(crate) fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    pub(crate) fn pull_calls(&self, image: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("calling PullImage") && l.contains(image))
            .count()
    }

    pub(crate) fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

pub(crate) struct Bench {
    pub(crate) cri: ImageServiceClient<Channel>,
    pub(crate) api: pb::image_cache_client::ImageCacheClient<Channel>,
}

impl Bench {
    pub(crate) async fn remove(&mut self, image: &str) {
        let _ = self
            .cri
            .remove_image(RemoveImageRequest { image: spec(image) })
            .await;
    }

    pub(crate) async fn raw_pull(&mut self, image: &str) -> Duration {
        let t = Instant::now();
        self.cri
            .pull_image(PullImageRequest {
                image: spec(image),
                auth: None,
                sandbox_config: None,
            })
            .await
            .expect("raw PullImage");
        t.elapsed()
    }

    pub(crate) async fn cimage_pull(
        &mut self,
        image: &str,
        policy: pb::PullPolicy,
    ) -> (Duration, String) {
        let t = Instant::now();
        let r = self
            .api
            .pull(pb::PullRequest {
                image: image.into(),
                policy: policy as i32,
                credentials: None,
            })
            .await
            .expect("cimage Pull")
            .into_inner();
        (t.elapsed(), r.action)
    }

    /// Median cold pull through cimage and through raw CRI, alternating which goes first.
    pub(crate) async fn cold(&mut self, image: &str) -> (Duration, Duration) {
        let (mut raw, mut via) = (Vec::new(), Vec::new());
        for rep in 0..REPS {
            for first_raw in [rep % 2 == 0, rep % 2 != 0] {
                self.remove(image).await;
                if first_raw {
                    raw.push(self.raw_pull(image).await);
                } else {
                    let (d, action) = self.cimage_pull(image, pb::PullPolicy::IfNotPresent).await;
                    assert_eq!(action, "pulled", "cold pull must pull");
                    via.push(d);
                }
            }
        }
        (percentile(&mut via, 0.5), percentile(&mut raw, 0.5))
    }
}

pub(crate) fn row(name: &str, cimage: String, raw: String, ratio: String, target: &str) {
    println!("{name:<44} {cimage:>16} {raw:>16} {ratio:>8}  {target}");
}
