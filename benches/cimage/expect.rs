//! The job's image wait at its start, with and without the scheduler's queue as a source: the
//! testbed's one-node Slurm runs a job that fills the node and, behind it, a job whose script
//! names (`#CIMAGE image=`) an image behind a slow link; when the first ends, the second's
//! `cimage pull` reports how long its image took. With the Slurm source the image was pulled
//! while the job was pending; without it, the job waits for the whole pull.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::images::{push, Layer};
use crate::rig::{row, Daemon};
use crate::shaper::{Shape, Shaper};

/// Bytes of the image's layer (the parallel-fetch section's 512 MiB is not there yet).
const LAYER: usize = 256 << 20;

fn slurm(conf: &str, program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .env("SLURM_CONF", conf)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn sbatch(conf: &str, args: &[&str], script: &str, dir: &Path) -> String {
    let file = dir.join(format!("job-{:08x}.sh", rand::random::<u32>()));
    std::fs::write(&file, script).unwrap();
    let mut all = vec!["--parsable"];
    all.extend_from_slice(args);
    all.push(file.to_str().unwrap());
    let out = slurm(conf, "sbatch", &all);
    assert!(
        out.status.success(),
        "sbatch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

fn state(conf: &str, job: &str) -> String {
    let out = slurm(conf, "squeue", &["-h", "-j", job, "-o", "%T"]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn wait(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(
            Instant::now() < until,
            "bench: {what} did not happen within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One pass: the pending job's image wait at its start, in seconds.
fn job_image_wait(conf: &str, node: &str, d: &Daemon, image: &str, with_source: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let filler = sbatch(
        conf,
        &["-n", "2", "--time=5", "-o", "/dev/null"],
        "#!/bin/sh\nsleep 900\n",
        dir.path(),
    );
    wait("the filling job to run", 60, || {
        state(conf, &filler) == "RUNNING"
    });
    let out = dir.path().join("job.json");
    let script = format!(
        "#!/bin/sh\n#SBATCH -n 2\n#CIMAGE image={image}\nexec {} --socket {} pull -o json {image} > {}\n",
        env!("CARGO_BIN_EXE_cimage"),
        d.socket.display(),
        out.display()
    );
    let job = sbatch(conf, &["--time=5", "-o", "/dev/null"], &script, dir.path());
    if with_source {
        let cli = |args: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_cimage"))
                .arg("--socket")
                .arg(&d.socket)
                .args(args)
                .output()
                .unwrap()
        };
        wait("the expected image to be ready", 600, || {
            let o = cli(&["expected", "-o", "json"]);
            let v: serde_json::Value =
                serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null);
            v["expectations"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|e| e["image"] == image && e["state"] == "ready")
            })
        });
    } else {
        // Planned, and nobody acts on the plan.
        std::thread::sleep(Duration::from_secs(5));
    }
    let _ = node;
    slurm(conf, "scancel", &[&filler]);
    wait("the job to run and end", 900, || {
        state(conf, &job).is_empty()
    });
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("bench: the job's pull printed {text:?}: {e}"));
    v["elapsed_seconds"].as_f64().unwrap_or(f64::NAN)
}

pub(crate) async fn expect(
    cri: &str,
    registry: &str,
    env: &std::collections::HashMap<String, String>,
) {
    let (Some(conf), Some(node)) = (
        env.get("CIMAGE_TESTBED_SLURM_CONF"),
        env.get("CIMAGE_TESTBED_SLURM_NODE"),
    ) else {
        eprintln!("bench: the testbed has no Slurm; skipping the expectations section");
        return;
    };
    let testbed = Path::new(&env["CIMAGE_TESTBED_DIR"]).to_owned();
    // 8 MB/s per connection: a far registry, about 34 s for the layer.
    let shaper = Shaper::start(
        registry,
        Shape {
            per_connection: Some(8_000_000),
            ..Shape::none()
        },
    )
    .plain_http_for_containerd(&testbed);
    let mut waits = Vec::new();
    for with_source in [true, false] {
        let repo = format!("bench-expect-{:08x}", rand::random::<u32>());
        push(registry, &repo, "1", &[Layer::random(LAYER)], &["sh"]).await;
        let image = format!("{}/{repo}:1", shaper.addr);
        let extra = if with_source {
            format!("Queue:\n  Source: slurm\n  Interval: 1s\n  NodeName: {node}")
        } else {
            String::new()
        };
        let d = Daemon::start_with(cri, &shaper.addr, &extra);
        let (conf, node, image2) = (conf.clone(), node.clone(), image.clone());
        let socket_daemon = d;
        let (w, d) = tokio::task::spawn_blocking(move || {
            let w = job_image_wait(&conf, &node, &socket_daemon, &image2, with_source);
            (w, socket_daemon)
        })
        .await
        .unwrap();
        waits.push(w);
        let out = Command::new(env!("CARGO_BIN_EXE_cimage"))
            .arg("--socket")
            .arg(&d.socket)
            .args(["rm", &image])
            .output();
        drop(out);
    }
    row(
        &format!(
            "job's image wait at start, {} MiB, with the Slurm source",
            LAYER >> 20
        ),
        format!("{:.2} s", waits[0]),
        format!("{:.2} s", waits[1]),
        format!("-{:.1} s", waits[1] - waits[0]),
        "0 s with",
    );
}
