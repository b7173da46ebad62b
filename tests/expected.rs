//! Expected images against the real Slurm, containerd and registry: the testbed's one-node Slurm
//! cluster plans a pending job on this node, cimaged's Slurm source sees the `#CIMAGE` line of
//! its script and pulls the image (from a registry made slow by the link shaper) while the job
//! that fills the node still runs, and the job's own `cimage run` finds the image cached. The
//! same job without the source waits for the pull. Also: a cancelled job drops its expectation,
//! an expectation late while pulling says so, expectations survive a restart, a Slurm that does
//! not answer makes the source unhealthy and nothing else, and a site's command is a source too.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::images::{push, Layer};
use common::shaper::{Shape, Shaper};
use common::*;
use serde_json::Value;

/// The testbed's Slurm: its slurm.conf and this node's name.
struct Slurm {
    conf: PathBuf,
    node: String,
}

impl Slurm {
    fn get(tb: &Testbed) -> Self {
        let env = std::fs::read_to_string(tb.dir.join("env")).unwrap();
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing from the testbed's env: scripts/testbed up"))
                .to_owned()
        };
        Slurm {
            conf: get("CIMAGE_TESTBED_SLURM_CONF").into(),
            node: get("CIMAGE_TESTBED_SLURM_NODE"),
        }
    }

    fn cmd(&self, program: &str, args: &[&str]) -> std::process::Output {
        Command::new(program)
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"))
    }

    /// Submits a batch script; returns the job id.
    fn sbatch(&self, args: &[&str], script: &str, dir: &Path) -> String {
        let file = dir.join(format!("job-{:08x}.sh", rand::random::<u32>()));
        std::fs::write(&file, script).unwrap();
        let mut all = vec!["--parsable"];
        all.extend_from_slice(args);
        all.push(file.to_str().unwrap());
        let out = self.cmd("sbatch", &all);
        assert!(out.status.success(), "sbatch: {}", stderr(&out));
        stdout(&out).trim().split(';').next().unwrap().to_owned()
    }

    /// The job's state (PENDING, RUNNING, …), or "" once it has left the queue.
    fn state(&self, job: &str) -> String {
        let out = self.cmd("squeue", &["-h", "-j", job, "-o", "%T"]);
        stdout(&out).trim().to_owned()
    }

    fn cancel(&self, job: &str) {
        self.cmd("scancel", &[job]);
    }
}

/// Cancels jobs when dropped, so a failed test leaves the shared cluster empty.
struct Jobs<'a>(&'a Slurm, Vec<String>);

impl Drop for Jobs<'_> {
    fn drop(&mut self) {
        for j in &self.1 {
            self.0.cancel(j);
        }
    }
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(
            Instant::now() < until,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn expected(d: &Daemon) -> Value {
    let out = d.cli(&["expected", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).unwrap()
}

fn expectation_of(d: &Daemon, image: &str) -> Option<Value> {
    expected(d)["expectations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["image"] == image)
        .cloned()
}

/// An image of `bytes` random bytes behind a shaper that sends `rate` bytes a second per
/// connection, so its pull takes a few seconds; with the config lines that let cimaged and
/// containerd reach it.
fn slow_image(tb: &Testbed, prefix: &str, bytes: usize, rate: u64) -> (Shaper, String, String) {
    let shaper = Shaper::start(
        &tb.registry,
        Shape {
            per_connection: Some(rate),
            ..Shape::none()
        },
    )
    .plain_http_for_containerd(&tb.dir);
    let repo = Testbed::unique_repo(prefix);
    block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[Layer::busybox(), Layer::random(bytes)],
        &["/bin/busybox", "true"],
    ));
    let image = format!("{}/{repo}:1", shaper.addr);
    let registries = format!(
        "Registries:\n  \"{}\":\n    Insecure: true\n  \"{}\":\n    Insecure: true",
        tb.registry, shaper.addr
    );
    (shaper, image, registries)
}

/// The batch script of a job that runs a step from `image` through cimaged at `socket`.
fn job_script(image: &str, socket: &Path) -> String {
    format!(
        "#!/bin/sh\n#SBATCH -n 2\n#CIMAGE image={image}\nexec {} --socket {} run --events {image} -- /bin/busybox true\n",
        env!("CARGO_BIN_EXE_cimage"),
        socket.display()
    )
}

/// Runs one pass of the scenario: a job fills the node, a second job using `image` waits behind
/// it, the first ends, the second runs. Returns the second job's output and whether the image
/// was on the node while the second job was still pending.
fn scenario(slurm: &Slurm, d: &Daemon, image: &str, with_source: bool) -> String {
    let dir = d.dir.path();
    let mut jobs = Jobs(slurm, Vec::new());
    let filler = slurm.sbatch(
        &["-n", "2", "--time=2", "-o", "/dev/null"],
        "#!/bin/sh\nsleep 300\n",
        dir,
    );
    jobs.1.push(filler.clone());
    wait_for("the filling job to run", 60, || {
        slurm.state(&filler) == "RUNNING"
    });
    let out = dir.join("job.out");
    let job = slurm.sbatch(
        &["--time=1", "-o", out.to_str().unwrap()],
        &job_script(image, &d.socket()),
        dir,
    );
    jobs.1.push(job.clone());
    if with_source {
        // The source sees the plan and pulls while the node is still full.
        wait_for("the expectation to be ready", 120, || {
            expectation_of(d, image).is_some_and(|e| e["state"] == "ready")
        });
        let e = expectation_of(d, image).unwrap();
        assert_eq!(e["job"], job.as_str());
        assert_eq!(e["source"], "slurm");
        assert_eq!(
            slurm.state(&job),
            "PENDING",
            "the image was ready before its job started"
        );
    } else {
        // Planned, but nobody acts on the plan.
        std::thread::sleep(Duration::from_secs(3));
        assert!(expected(d)["expectations"].as_array().unwrap().is_empty());
    }
    slurm.cancel(&filler);
    wait_for("the job to run and end", 180, || {
        slurm.state(&job).is_empty()
    });
    std::fs::read_to_string(&out).unwrap_or_default()
}

#[test]
fn a_job_planned_here_finds_its_image_pulled_before_it_starts() {
    let tb = Testbed::get();
    let slurm = Slurm::get(&tb);
    // 16 MiB at 2 MB/s: about 8 s of pull.
    let (_shaper, image, registries) = slow_image(&tb, "expected-slurm", 16 << 20, 2_000_000);
    let port = free_port();
    let d = Daemon::start_with_env(
        &format!(
            "{registries}\nMetricsAddr: 127.0.0.1:{port}\nQueue:\n  Source: slurm\n  Interval: 1s\n  NodeName: {}",
            slurm.node
        ),
        &[("SLURM_CONF", slurm.conf.to_str().unwrap())],
    );

    // A pending job planned here and then cancelled: its expectation goes with it.
    {
        let mut jobs = Jobs(&slurm, Vec::new());
        let filler = slurm.sbatch(
            &["-n", "2", "--time=2", "-o", "/dev/null"],
            "#!/bin/sh\nsleep 300\n",
            d.dir.path(),
        );
        jobs.1.push(filler.clone());
        wait_for("the filling job to run", 60, || {
            slurm.state(&filler) == "RUNNING"
        });
        let other = format!(
            "{}/{}:1",
            tb.registry,
            Testbed::unique_repo("expected-cancelled")
        );
        // (sbatch refuses pyxis's --container-image where pyxis is not installed, as here: the
        // comment names the image instead.)
        let comment = format!("--comment=image={other}");
        let job = slurm.sbatch(
            &["-n", "2", "--time=1", "-o", "/dev/null", &comment],
            "#!/bin/sh\ntrue\n",
            d.dir.path(),
        );
        jobs.1.push(job.clone());
        wait_for("the planned job's expectation", 60, || {
            expectation_of(&d, &other).is_some()
        });
        slurm.cancel(&job);
        wait_for("the cancelled job's expectation to end", 60, || {
            expectation_of(&d, &other).is_none()
        });
    }

    let out = scenario(&slurm, &d, &image, true);
    assert!(
        out.contains(&format!("ImageReady {image} (cached)")),
        "the job's step should find its image cached:\n{out}"
    );
    // The job's first request found the image ready: one lead observed, nothing late.
    wait_for("the lead to be counted", 30, || {
        series(&scrape(port), "cimage_expect_lead_seconds_count") >= 1.0
    });
    assert_eq!(series(&scrape(port), "cimage_expect_late_total"), 0.0);
    // The job has left the queue: its expectation ended.
    wait_for("the expectation to end with its job", 30, || {
        expectation_of(&d, &image).is_none()
    });

    // The same without the source: the job's step waits for the pull.
    let (_shaper2, image2, registries2) = slow_image(&tb, "expected-none", 16 << 20, 2_000_000);
    let plain = Daemon::start(&registries2);
    let out = scenario(&slurm, &plain, &image2, false);
    assert!(
        out.contains(&format!("ImageReady {image2} (pulled)")),
        "without the source the step pulls at its start:\n{out}"
    );
}

#[test]
fn an_expectation_late_while_pulling_says_so_and_survives_a_restart() {
    let tb = Testbed::get();
    // 12 MiB at 1 MB/s: its deadline in 2 s passes while it pulls.
    let (_shaper, image, registries) = slow_image(&tb, "expected-late", 12 << 20, 1_000_000);
    let mut d = Daemon::start(&registries);
    let out = d.cli(&["expect", &image, "--in", "2s", "--job", "late-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the expectation to be late while it pulls", 60, || {
        expectation_of(&d, &image).is_some_and(|e| e["state"] == "late")
    });
    wait_for("the pull to end", 120, || {
        expectation_of(&d, &image).is_some_and(|e| e["state"] == "ready")
    });
    let out = d.cli(&["expect", "127.0.0.1:1/x:1", "--in", "1h", "--job", "kept"]);
    assert!(out.status.success(), "{}", stderr(&out));
    d.kill9();
    d.spawn();
    let e = expectation_of(&d, &image).expect("kept across the restart");
    assert_eq!(e["state"], "ready");
    assert_eq!(e["job"], "late-1");
    assert!(expectation_of(&d, "127.0.0.1:1/x:1").is_some());
    let out = d.cli(&["expect", "--cancel", "--job", "kept"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(expectation_of(&d, "127.0.0.1:1/x:1").is_none());
}

#[test]
fn a_slurm_that_does_not_answer_makes_the_source_unhealthy_and_nothing_else() {
    let tb = Testbed::get();
    let slurm = Slurm::get(&tb);
    // The same cluster, but a controller port nobody listens on.
    let dead = tempfile::tempdir().unwrap();
    let conf = std::fs::read_to_string(&slurm.conf).unwrap();
    let conf: String = conf
        .lines()
        .map(|l| match l.starts_with("SlurmctldPort=") {
            true => format!("SlurmctldPort={}\n", free_port()),
            false => format!("{l}\n"),
        })
        .collect();
    let dead_conf = dead.path().join("slurm.conf");
    std::fs::write(&dead_conf, conf).unwrap();
    let d = Daemon::start_with_env(
        "Queue:\n  Source: slurm\n  Interval: 1s\n  Timeout: 3s",
        &[("SLURM_CONF", dead_conf.to_str().unwrap())],
    );
    wait_for("the source to be unhealthy", 60, || {
        let s = &expected(&d)["source"];
        s["name"] == "slurm" && s["healthy"] == false && s["error"].is_string()
    });
    let text = stdout(&d.cli(&["expected"]));
    assert!(text.contains("queue source slurm: UNHEALTHY"), "{text}");
    // cimage status says so too, and cimaged itself stays healthy.
    let status = d.cli(&["status"]);
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(
        stdout(&status).contains("queue source:     slurm: UNHEALTHY"),
        "{}",
        stdout(&status)
    );
    // Everything else works: a pull, and an expectation said by hand.
    assert_eq!(d.pull_json(&busybox(&tb), None)["image"], busybox(&tb));
    let out = d.cli(&["expect", &busybox(&tb), "--in", "10m"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the hand-made expectation to be ready", 60, || {
        expectation_of(&d, &busybox(&tb)).is_some_and(|e| e["state"] == "ready")
    });
}

#[test]
fn a_sites_command_is_a_queue_source() {
    let tb = Testbed::get();
    let image = busybox(&tb).replace("busybox:1", "app:1");
    let dir = tempfile::tempdir().unwrap();
    let answer = dir.path().join("answer");
    let script = dir.path().join("planned");
    std::fs::write(&script, format!("#!/bin/sh\ncat {}\n", answer.display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let start = chrono::Utc::now() + chrono::Duration::minutes(30);
    std::fs::write(
        &answer,
        format!(
            "{{\"job\": \"site-7\", \"image\": \"{image}\", \"start\": \"{}\"}}\n",
            start.to_rfc3339()
        ),
    )
    .unwrap();
    let d = Daemon::start(&format!(
        "Queue:\n  Source: command\n  Interval: 1s\n  Command: [{}]",
        script.display()
    ));
    wait_for("the command's job to be expected and ready", 60, || {
        expectation_of(&d, &image).is_some_and(|e| e["state"] == "ready" && e["job"] == "site-7")
    });
    assert_eq!(expected(&d)["source"]["healthy"], true);
    // The job leaves the command's answer: its expectation ends.
    std::fs::write(&answer, "").unwrap();
    wait_for("the expectation to end", 60, || {
        expectation_of(&d, &image).is_none()
    });
    // An answer it cannot read makes the source unhealthy, saying which line.
    std::fs::write(&answer, "{\"job\": \"x\"}\n").unwrap();
    wait_for("the source to be unhealthy", 60, || {
        expected(&d)["source"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("line 1"))
    });
}

#[test]
fn a_scheduler_job_fans_a_pull_out_to_its_nodes() {
    // The fleet's other way to pre-warm: one task per node through the scheduler (here the
    // testbed's one node), each making the image ready on its node with `cimage pull`.
    let tb = Testbed::get();
    let slurm = Slurm::get(&tb);
    let d = Daemon::start("");
    let image = busybox(&tb);
    let out = slurm.cmd(
        "srun",
        &[
            "--nodes=1",
            "--ntasks-per-node=1",
            "--time=2",
            env!("CARGO_BIN_EXE_cimage"),
            "--socket",
            d.socket().to_str().unwrap(),
            "pull",
            "-o",
            "json",
            &image,
        ],
    );
    assert!(out.status.success(), "srun: {}", stderr(&out));
    let v: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(v["image"], image.as_str());
}
