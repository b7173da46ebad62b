//! cimage: the command-line client of cimaged.

mod auth;
mod exec;
mod expect;
mod gc;
mod images;
mod jobs;
mod man;
mod pin;
mod prewarm;
mod progress;
mod pull;
mod pulls;
mod rm;
mod run;
mod status;
mod tasks;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tonic::transport::Channel;

use cimage::api::pb::image_cache_client::ImageCacheClient;
use cimage::reference::ImageRef;

/// cimage: talk to cimaged, the node's image cache for containerized jobs.
///
/// Pull images under a pull policy, list and inspect what the node holds, run job steps in
/// containers, and (as root or a member of ImageCache.AdminGroup) remove and pin images.
#[derive(Parser, Debug)]
#[command(version, propagate_version = true, after_help = EXIT_TABLE)]
struct Cli {
    /// cimaged's API socket.
    #[arg(long, global = true, env = "CIMAGE_SOCKET", default_value = cimage::config::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// Output format for commands that print data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable text.
    Table,
    /// One JSON document on stdout.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make an image ready on this node under a pull policy, showing the pull as it moves.
    Pull(pull::Args),
    /// List the pulls in flight and queued: image, phase, bytes, requesters, age.
    Pulls(pulls::Args),
    /// List the images the node holds, with usage.
    Images(images::ListArgs),
    /// Show one image (by reference, id or id prefix).
    Inspect(images::InspectArgs),
    /// Remove an image from the node (admin).
    Rm(rm::Args),
    /// Pin an image so it is never evicted (admin).
    Pin(pin::Args),
    /// Unpin an image (admin).
    Unpin(pin::Args),
    /// Show whether cimaged, the runtime and the index are healthy.
    Status(status::Args),
    /// Run a job step in a container and follow it to its exit code.
    Run(Box<run::Args>),
    /// Run a command in a running step, as the step's user (owner and root only).
    Exec(exec::Args),
    /// List tasks (running ones; -a for all).
    Ps(tasks::PsArgs),
    /// Print a task's output (-f to follow).
    Logs(tasks::LogsArgs),
    /// Cancel a task: SIGTERM, then SIGKILL after the grace period.
    Cancel(tasks::CancelArgs),
    /// List jobs and their pods.
    Jobs(jobs::JobsArgs),
    /// End a job: cancel its running steps and remove its pod.
    EndJob(jobs::EndJobArgs),
    /// Evict images by the eviction rules (--dry-run: say what and why, change nothing).
    Gc(gc::GcArgs),
    /// Images by popularity (decayed use count).
    Top(gc::TopArgs),
    /// Scheduled pre-pulls.
    #[command(subcommand)]
    Prewarm(prewarm::Command),
    /// Say an image will be needed on this node by a time (--cancel: take that back).
    Expect(expect::ExpectArgs),
    /// List the images expected on this node: deadline, state, how early they were ready.
    Expected(expect::ExpectedArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (cimage.1 and cimage-COMMAND.1) into DIR.
    #[command(hide = true)]
    Man {
        /// Where the pages go.
        dir: PathBuf,
    },
}

/// How a command ended, as its exit status says. Every command uses these; `run` and `exec`
/// exit with the step's own code instead (125 when it could not be launched, 126 when cimaged
/// went away while it may still run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 1: the command failed.
    Failed = 1,
    /// 2: bad usage: an unknown flag, a malformed argument.
    Usage = 2,
    /// 3: not found, or not present under pull policy Never.
    NotFound = 3,
    /// 4: unavailable (a registry, the runtime or cimaged itself; try again), or `status`
    /// found cimaged unhealthy.
    Unavailable = 4,
    /// 5: permission denied (an admin call, another user's task, a registry's refusal).
    Denied = 5,
}

impl Exit {
    /// The `code` of a JSON error.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Failed => "failed",
            Exit::Usage => "usage",
            Exit::NotFound => "not_found",
            Exit::Unavailable => "unavailable",
            Exit::Denied => "permission_denied",
        }
    }
}

/// The exit-status table, as `--help` prints it.
const EXIT_TABLE: &str =
    "Exit status: 0 ok; 1 failed; 2 usage (a bad flag or argument); 3 not found, or \
not present under --policy Never; 4 unavailable (a registry, the runtime or cimaged: try again; \
also `status` when unhealthy); 5 permission denied. `run` exits with the step's code (125: not \
launched, 126: cimaged went away while the step may still run). With -o json a failure also \
prints {\"error\": {\"code\", \"exit\", \"message\"}} on stdout.";

/// A failure to report: one line on stderr (and a JSON error on stdout under `-o json`), and
/// its exit status.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong, in one line.
    pub message: String,
    /// The exit status it means.
    pub exit: Exit,
    /// The command's JSON already says it (no error document follows).
    pub in_output: bool,
}

impl Failure {
    /// A failure (exit 1).
    pub fn new(message: String) -> Self {
        Self {
            message,
            exit: Exit::Failed,
            in_output: false,
        }
    }

    /// Bad usage (exit 2).
    pub fn usage(message: String) -> Self {
        Self {
            message,
            exit: Exit::Usage,
            in_output: false,
        }
    }

    /// Something to try again later (exit 4).
    pub fn unavailable(message: String) -> Self {
        Self {
            message,
            exit: Exit::Unavailable,
            in_output: false,
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let exit = match s.code() {
            Code::NotFound => Exit::NotFound,
            Code::Unavailable | Code::DeadlineExceeded | Code::Aborted => Exit::Unavailable,
            Code::PermissionDenied | Code::Unauthenticated => Exit::Denied,
            Code::InvalidArgument => Exit::Usage,
            _ => Exit::Failed,
        };
        Failure {
            message: s.message().to_owned(),
            exit,
            in_output: false,
        }
    }
}

/// Connects to cimaged, failing with a message that says what to check.
pub async fn connect(socket: &Path) -> Result<ImageCacheClient<Channel>, Failure> {
    if let Err(e) = tokio::net::UnixStream::connect(socket).await {
        return Err(Failure::unavailable(format!(
            "cannot reach cimaged at {}: {e} (is cimaged running? use --socket or CIMAGE_SOCKET)",
            socket.display()
        )));
    }
    Ok(cimage::api::client(socket))
}

/// Checks an image argument locally so malformed input is refused before anything is contacted.
/// Image ids (`sha256:…`) and id prefixes (6+ hex digits) are accepted where `ids` is true; a
/// whole id, or a prefix of 12+ digits, names a local image everywhere
/// ([`cimage::reference::ImageId`]).
pub fn check_image_arg(arg: &str, ids: bool) -> Result<(), Failure> {
    if let Some(id) = cimage::reference::ImageId::parse(arg) {
        if ids || id.is_local() {
            return Ok(());
        }
    }
    ImageRef::parse(arg)
        .map(|_| ())
        .map_err(|e| Failure::usage(e.to_string()))
}

/// The API value of a pull policy given on the command line.
pub fn policy_pb(p: Option<cimage::policy::PullPolicy>) -> cimage::api::pb::PullPolicy {
    use cimage::api::pb::PullPolicy as Pb;
    use cimage::policy::PullPolicy;
    match p {
        None => Pb::Unspecified,
        Some(PullPolicy::Always) => Pb::Always,
        Some(PullPolicy::IfNotPresent) => Pb::IfNotPresent,
        Some(PullPolicy::Never) => Pb::Never,
    }
}

/// Bytes in binary units, e.g. `12.3 MiB` ([`cimage::units::format_size`]).
pub fn human_size(n: u64) -> String {
    cimage::units::format_size(n)
}

/// How long ago (or how far ahead) a time is, in its largest unit: `45s ago`, `3m ago`,
/// `in 12h`, `2d ago`.
pub fn relative(ms: i64, now_ms: i64) -> String {
    let d = (now_ms - ms) / 1000;
    let a = d.unsigned_abs();
    let span = match a {
        0..=59 => format!("{a}s"),
        60..=3599 => format!("{}m", a / 60),
        3600..=172_799 => format!("{}h", a / 3600),
        _ => format!("{}d", a / 86400),
    };
    if d >= 0 {
        format!("{span} ago")
    } else {
        format!("in {span}")
    }
}

/// Unix milliseconds as a table shows them: local time to the minute with how long ago, e.g.
/// `2026-11-28 14:03 (3m ago)`; `never` for 0.
pub fn when(ms: i64) -> String {
    use chrono::TimeZone;
    if ms <= 0 {
        return "never".into();
    }
    let now = chrono::Utc::now().timestamp_millis();
    match chrono::Local.timestamp_millis_opt(ms).single() {
        Some(t) => format!("{} ({})", t.format("%Y-%m-%d %H:%M"), relative(ms, now)),
        None => rfc3339(ms).unwrap_or_default(),
    }
}

/// Unix milliseconds as RFC 3339 UTC (`2026-11-27T17:04:03Z`); `None` for 0 (never) and for
/// times chrono cannot represent.
pub fn rfc3339(ms: i64) -> Option<String> {
    if ms <= 0 {
        return None;
    }
    let t = chrono::DateTime::from_timestamp_millis(ms)?;
    Some(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Output piped into `head` and the like: end quietly when the reader goes, as other
    // command-line tools do, instead of panicking on the broken pipe.
    // SAFETY: restoring the default disposition of one signal, before any thread writes.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let json = cli.command.prints_json();
    let result = match cli.command {
        Command::Run(a) => match run::run(&cli.socket, *a).await {
            Ok(code) => return ExitCode::from(code),
            Err(f) => {
                eprintln!("cimage: {}", f.message);
                return ExitCode::from(run::LAUNCH_FAILED);
            }
        },
        Command::Exec(a) => match exec::run(&cli.socket, a).await {
            Ok(code) => return ExitCode::from(code),
            Err(f) => {
                eprintln!("cimage: {}", f.message);
                return ExitCode::from(exec::EXEC_FAILED);
            }
        },
        Command::Ps(a) => tasks::ps(&cli.socket, a).await,
        Command::Logs(a) => tasks::logs(&cli.socket, a).await,
        Command::Cancel(a) => tasks::cancel(&cli.socket, a).await,
        Command::Jobs(a) => jobs::list(&cli.socket, a).await,
        Command::EndJob(a) => jobs::end(&cli.socket, a).await,
        Command::Gc(a) => gc::gc(&cli.socket, a).await,
        Command::Top(a) => gc::top(&cli.socket, a).await,
        Command::Prewarm(c) => prewarm::run(&cli.socket, c).await,
        Command::Expect(a) => expect::expect(&cli.socket, a).await,
        Command::Expected(a) => expect::list(&cli.socket, a).await,
        Command::Man { dir } => {
            use clap::CommandFactory;
            match man::write_pages(Cli::command(), &dir) {
                Ok(_) => Ok(()),
                Err(e) => Err(Failure::new(format!(
                    "writing manual pages into {}: {e}",
                    dir.display()
                ))),
            }
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "cimage", &mut std::io::stdout());
            Ok(())
        }
        Command::Pull(a) => pull::run(&cli.socket, a).await,
        Command::Pulls(a) => pulls::run(&cli.socket, a).await,
        Command::Images(a) => images::list(&cli.socket, a).await,
        Command::Inspect(a) => images::inspect(&cli.socket, a).await,
        Command::Rm(a) => rm::run(&cli.socket, a).await,
        Command::Pin(a) => pin::run(&cli.socket, a, true).await,
        Command::Unpin(a) => pin::run(&cli.socket, a, false).await,
        Command::Status(a) => status::run(&cli.socket, a).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if json && !f.in_output {
                println!(
                    "{}",
                    serde_json::json!({"error": {
                        "code": f.exit.name(),
                        "exit": f.exit as u8,
                        "message": f.message,
                    }})
                );
            }
            eprintln!("cimage: {}", f.message);
            ExitCode::from(f.exit as u8)
        }
    }
}

impl Command {
    /// Whether the command was asked for JSON (`-o json`): a failure is then reported on stdout
    /// as JSON too.
    fn prints_json(&self) -> bool {
        let o = match self {
            Command::Pull(a) => a.output,
            Command::Pulls(a) => a.output,
            Command::Images(a) => a.output,
            Command::Inspect(a) => a.output,
            Command::Status(a) => a.output,
            Command::Ps(a) => a.output,
            Command::Jobs(a) => a.output,
            Command::Gc(a) => a.output,
            Command::Top(a) => a.output,
            Command::Prewarm(c) => c.output(),
            Command::Expect(a) => a.output,
            Command::Expected(a) => a.output,
            _ => Output::Table,
        };
        o == Output::Json
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(rfc3339(0), None);
        assert_eq!(
            rfc3339(1_795_799_043_000).as_deref(),
            Some("2026-11-27T17:04:03Z")
        );
        assert_eq!(
            rfc3339(951_782_400_000).as_deref(),
            Some("2000-02-29T00:00:00Z")
        );
    }

    #[test]
    fn relative_ages() {
        let now = 1_000_000_000;
        assert_eq!(relative(now - 45_000, now), "45s ago");
        assert_eq!(relative(now - 180_000, now), "3m ago");
        assert_eq!(relative(now + 12 * 3_600_000, now), "in 12h");
        assert_eq!(relative(now - 3 * 86_400_000, now), "3d ago");
        assert_eq!(when(0), "never");
        assert!(when(now).ends_with("ago)"));
    }

    #[test]
    fn image_args() {
        assert!(check_image_arg("busybox:1", false).is_ok());
        assert!(check_image_arg("abcdef12", true).is_ok());
        assert!(
            check_image_arg("abcdef12", false).is_ok(),
            "also a valid repository name"
        );
        assert!(check_image_arg("Bad:Ref", true).is_err());
    }
}
