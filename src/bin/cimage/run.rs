//! `cimage run`: launch a job step in a container and follow it to its exit code.

use std::io::Write;
use std::path::Path;

use cimage::api::pb;
use cimage::launcher::request::{MountRequest, UserRef, UserRequest};
use cimage::policy::PullPolicy;
use cimage::units::parse_time_limit;
use futures::StreamExt;

use crate::{check_image_arg, Failure};

/// Exit status of `cimage run` when the task could not be run at all (as `docker run` does).
pub const LAUNCH_FAILED: u8 = 125;

/// Arguments of `cimage run`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The container is always removed when the step ends (--rm is the default); its \
output stays readable with `cimage logs`.\n\
Exit status: the task's exit code (128+N when killed by signal N; a step killed for passing \
--memory is reported OutOfMemory); 125 when the task could not be launched or cimaged failed; \
126 when cimaged went away while the step may still run.\n\
Examples:\n  cimage run 127.0.0.1:5000/busybox:1 -e GREETING=hi -- sh -c 'echo $GREETING'\n  \
cimage run --cpus 2 --memory 4GiB -v /scratch/me:/data python:3.12 python3 train.py"
)]
pub struct Args {
    /// Image to run (or give it with --image; then every positional word is the command).
    #[arg(value_name = "IMAGE", required_unless_present = "image")]
    image_arg: Option<String>,
    /// Image to run, as an option (the first positional word then starts the command).
    #[arg(long)]
    image: Option<String>,
    /// Job id; steps of one job share a pod (PID and IPC namespaces) until `cimage end-job`.
    /// Without it, the step is a one-off job whose pod goes with it. A user's job ids (not
    /// root's or the admin group's) are kept apart as `u<uid>.<id>`.
    #[arg(long)]
    job: Option<String>,
    /// Step number within the job (default: the job's next).
    #[arg(long)]
    step: Option<u32>,
    /// Pull policy: Always, IfNotPresent or Never (default by tag).
    #[arg(long, value_parser = |s: &str| s.parse::<PullPolicy>())]
    policy: Option<PullPolicy>,
    /// Environment variable K=V (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Read environment variables from a file: K=V per line; a bare K takes the value from this
    /// shell's environment; blank lines and lines starting with # are skipped (repeatable;
    /// --env wins).
    #[arg(long = "env-file", value_name = "FILE")]
    env_files: Vec<std::path::PathBuf>,
    /// A name for the step (shown as container label io.cimage.name).
    #[arg(long)]
    name: Option<String>,
    /// CPU limit in CPUs (e.g. 0.5, 2): a CFS quota and shares in proportion.
    #[arg(long, value_name = "N")]
    cpus: Option<f64>,
    /// Memory limit in binary units, as docker, Slurm and Kubernetes read them: 512m, 4G, 32Mi,
    /// 1GiB (k, m, g, t in either case, Ki…Ti, KiB…TiB; a bare number is bytes; MB and GB are
    /// refused as ambiguous). Past it the kernel kills the step, reported as OutOfMemory.
    #[arg(long, value_name = "SIZE", value_parser = |s: &str| cimage::units::parse_memory(s))]
    memory: Option<u64>,
    /// CPUs the step may run on, as a cpuset list (e.g. 0-3,8).
    #[arg(long, value_name = "LIST")]
    cpuset_cpus: Option<String>,
    /// The cgroup the job's pod goes under (an absolute cgroup path, or a .slice name with
    /// containerd's systemd cgroup driver); set by a job's first step. Root, the admin group,
    /// or within ImageCache.Launcher.AllowedCgroupParents.
    #[arg(long, value_name = "PATH")]
    cgroup_parent: Option<String>,
    /// Remove the container when the step ends: always the case (accepted for docker habits).
    #[arg(long)]
    rm: bool,
    /// Working directory inside the container.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Host user to run as, USER[:GID] with USER a name or a uid (default: yourself; only root
    /// may choose another user). The step gets that user's host groups and nothing more; a step
    /// as a user other than root runs with no_new_privs and no capabilities.
    #[arg(long, short = 'u', value_parser = |s: &str| s.parse::<UserRequest>())]
    user: Option<UserRequest>,
    /// Host mount SRC:DST[:ro] (repeatable; -v/--volume as docker and podman spell it); SRC
    /// must lie under ImageCache.Launcher.AllowedMountPrefixes.
    #[arg(long = "mount", short = 'm', visible_alias = "volume", visible_short_alias = 'v', value_parser = |s: &str| s.parse::<MountRequest>())]
    mounts: Vec<MountRequest>,
    /// Device by host path (/dev/...) or CDI name (vendor.com/class=name) (repeatable).
    #[arg(long = "device")]
    devices: Vec<String>,
    /// Mount the container's root filesystem read-only.
    #[arg(long)]
    read_only: bool,
    /// Time limit, as Slurm's --time takes it: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM,
    /// D-HH:MM:SS, or 90s / 1h30m; UNLIMITED for none (the default). Past it the task is stopped
    /// and reported ExceededTimeLimit.
    #[arg(long, alias = "time", value_name = "LIMIT", value_parser = |s: &str| parse_time_limit(s).map(TimeLimit))]
    timeout: Option<TimeLimit>,
    /// Print the task id and return at once; follow with `cimage logs -f ID`.
    #[arg(long, short = 'd')]
    detach: bool,
    /// Print lifecycle events (sandbox, image with its pull as it moves, container, exit) on
    /// stderr.
    #[arg(long = "events")]
    verbose: bool,
    #[command(flatten)]
    auth: crate::auth::AuthArgs,
    /// Command and arguments (after --); default: the image's.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not K=V")),
    }
}

/// Exit status when the daemon went away while the step may still run (as docker's 126 is
/// "the container could not be run to its end by the tool").
pub const DAEMON_GONE: u8 = 126;

/// A parsed `--timeout`: `None` is UNLIMITED.
#[derive(Debug, Clone, Copy)]
pub struct TimeLimit(Option<std::time::Duration>);

/// Reads `--env-file`s: K=V lines, bare K from this process's environment, # comments.
fn env_files(files: &[std::path::PathBuf]) -> Result<Vec<(String, String)>, Failure> {
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| Failure::usage(format!("cannot read env file {}: {e}", f.display())))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = match line.split_once('=') {
                Some((k, v)) => (k.trim_end().to_owned(), v.to_owned()),
                None => {
                    let k = line.trim_end();
                    (k.to_owned(), std::env::var(k).unwrap_or_default())
                }
            };
            if k.is_empty() {
                return Err(Failure::usage(format!(
                    "env file {} line {}: no variable name",
                    f.display(),
                    n + 1
                )));
            }
            out.push((k, v));
        }
    }
    Ok(out)
}

/// Runs `cimage run`; returns the exit status to leave with.
pub async fn run(socket: &Path, mut args: Args) -> Result<u8, Failure> {
    // `--image X` makes every positional word part of the command.
    let image = match args.image.take() {
        Some(i) => {
            if let Some(first) = args.image_arg.take() {
                args.command.insert(0, first);
            }
            i
        }
        None => args.image_arg.take().unwrap_or_default(),
    };
    check_image_arg(&image, false)?;
    if let Some(c) = args.cpus.filter(|c| !(c.is_finite() && *c > 0.0)) {
        return Err(Failure::usage(format!(
            "--cpus {c} is not a CPU count: give more than 0 (e.g. 0.5 or 2)"
        )));
    }
    // The file's variables first, so that --env overrides them.
    let mut env = env_files(&args.env_files)?;
    env.append(&mut args.env);
    let policy = crate::policy_pb(args.policy);
    crate::connect(socket).await?;
    let mut client = cimage::api::launcher_client(socket);
    let req = pb::LaunchRequest {
        credentials: args.auth.credentials(&image)?,
        job: args.job.unwrap_or_default(),
        step: args.step,
        image,
        policy: policy as i32,
        command: args.command,
        cpus: args.cpus.unwrap_or(0.0),
        memory_bytes: args.memory.unwrap_or(0),
        cpuset_cpus: args.cpuset_cpus.unwrap_or_default(),
        cgroup_parent: args.cgroup_parent.unwrap_or_default(),
        name: args.name.unwrap_or_default(),
        env: env
            .into_iter()
            .map(|(name, value)| pb::EnvVar { name, value })
            .collect(),
        workdir: args.workdir.unwrap_or_default(),
        uid: args.user.as_ref().and_then(|u| match u.user {
            UserRef::Uid(uid) => Some(uid),
            UserRef::Name(_) => None,
        }),
        user_name: match args.user.as_ref().map(|u| &u.user) {
            Some(UserRef::Name(n)) => n.clone(),
            _ => String::new(),
        },
        gid: args.user.as_ref().and_then(|u| u.gid),
        mounts: args
            .mounts
            .into_iter()
            .map(|m| pb::MountRequest {
                source: m.source.display().to_string(),
                target: m.target,
                readonly: m.readonly,
            })
            .collect(),
        devices: args.devices,
        readonly_rootfs: args.read_only,
        // At most a year, so the milliseconds fit.
        timeout_ms: args
            .timeout
            .and_then(|t| t.0)
            .map(|t| t.as_millis() as u64)
            .unwrap_or(0),
    };
    let mut stream = client.launch(req).await?.into_inner();
    let mut task_id = String::new();
    let mut exit: Option<u8> = None;
    let mut failure: Option<String> = None;
    let mut interrupts = 0;
    let mut view = crate::progress::PullView::new(crate::Output::Table);
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| Failure::new(format!("cannot handle SIGINT: {e}")))?;
    loop {
        let next = tokio::select! {
            n = stream.next() => n,
            _ = sigint.recv() => {
                interrupts += 1;
                if interrupts > 1 || task_id.is_empty() {
                    return Ok(130);
                }
                eprintln!("cimage: cancelling task {task_id} (Ctrl-C again to stop waiting)");
                let mut c = cimage::api::launcher_client(socket);
                if let Err(s) = c.cancel(pb::TaskRef { task_id: task_id.clone() }).await {
                    eprintln!("cimage: {}", s.message());
                }
                continue;
            }
        };
        let Some(ev) = next else { break };
        let ev = match ev {
            Ok(ev) => ev,
            // The daemon went away (or is shutting down) while the step may still run.
            Err(s) if !task_id.is_empty() => {
                let _ = std::io::stdout().flush();
                eprintln!(
                    "cimage: cimaged went away while task {task_id} was running ({}); the step \
                     may still be running: follow it with `cimage logs -f {task_id}` once cimaged \
                     is back",
                    s.message()
                );
                return Ok(DAEMON_GONE);
            }
            Err(s) => return Err(s.into()),
        };
        use pb::task_event::Event as E;
        let verbose = |what: String| {
            if args.verbose {
                eprintln!("[cimage] {what}");
            }
        };
        match ev.event {
            Some(E::Accepted(a)) => {
                task_id = ev.task_id.clone();
                if args.detach {
                    println!("{task_id}");
                    return Ok(0);
                }
                verbose(format!(
                    "task {task_id} accepted: job {} step {}",
                    a.job, a.step
                ));
            }
            Some(E::SandboxReady(s)) => verbose(format!("SandboxReady {}", s.sandbox_id)),
            Some(E::ImagePulling(p)) if args.verbose => view.update(&p),
            Some(E::ImagePulling(_)) => {}
            Some(E::ImageReady(i)) => {
                view.clear();
                verbose(format!("ImageReady {} ({})", i.image, i.action))
            }
            Some(E::ContainerCreated(c)) => verbose(format!("ContainerCreated {}", c.container_id)),
            Some(E::Started(_)) => verbose("Started".into()),
            Some(E::Output(o)) => {
                let r = if o.stderr {
                    std::io::stderr().write_all(&o.data)
                } else {
                    std::io::stdout().write_all(&o.data)
                };
                r.map_err(|e| Failure::new(format!("writing output: {e}")))?;
            }
            Some(E::Exited(x)) => {
                let sig = if x.signal > 0 {
                    format!(", killed by signal {}", x.signal)
                } else {
                    String::new()
                };
                verbose(format!("Exited {} ({}{sig})", x.exit_code, x.reason));
                if x.reason == "ExceededTimeLimit" {
                    eprintln!("cimage: task {task_id} exceeded its time limit and was stopped");
                }
                if x.reason == "OutOfMemory" {
                    eprintln!(
                        "cimage: task {task_id} was killed for passing its memory limit (OutOfMemory)"
                    );
                }
                exit = Some(x.exit_code.clamp(0, 255) as u8);
            }
            Some(E::Failed(f)) => {
                view.clear();
                failure = Some(format!(
                    "task {} failed at {}: {}",
                    ev.task_id, f.stage, f.message
                ));
            }
            Some(E::CleanedUp(_)) => {
                verbose("CleanedUp".into());
                break;
            }
            None => {}
        }
    }
    let _ = std::io::stdout().flush();
    if let Some(f) = failure {
        eprintln!("cimage: {f}");
        return Ok(exit.unwrap_or(LAUNCH_FAILED));
    }
    match exit {
        Some(code) => Ok(code),
        None => {
            eprintln!(
                "cimage: lost contact with cimaged before task {task_id} finished; the step may \
                 still be running: see `cimage ps -a` once cimaged is back"
            );
            Ok(DAEMON_GONE)
        }
    }
}
