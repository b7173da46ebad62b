//! `cimage exec`: run a command in a running step.

use std::io::Write;
use std::path::Path;

use cimage::api::pb;

use crate::Failure;

/// Exit status of `cimage exec` when the command could not be run at all.
pub const EXEC_FAILED: u8 = 125;

/// Arguments of `cimage exec`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The command runs inside the step as the step's own process does: its \
host user and groups, its capabilities (none for a step as a user), no_new_privs and seccomp \
profile; CRI's exec has no user of its own. Only the step's owner and root may run one.\n\
Output is passed back when the command ends (each stream cut at 4 MiB).\n\
Exit status: the command's exit code; 125 when it could not be run (no such running task, not \
yours, the runtime failed).\n\
Example: cimage exec 3f2a9c1b7e44 -- ps aux"
)]
pub struct Args {
    /// Task id (from `cimage ps` or `cimage run -d`).
    task: String,
    /// Time limit for the command (e.g. 30s, 10m; at most 1h).
    #[arg(long, default_value = "60s", value_parser = |s: &str| cimage::units::parse_duration(s))]
    timeout: std::time::Duration,
    /// The command and its arguments (after --).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Runs `cimage exec`; returns the exit status to leave with.
pub async fn run(socket: &Path, args: Args) -> Result<u8, Failure> {
    crate::connect(socket).await?;
    let secs = args.timeout.as_secs();
    if !(1..=3600).contains(&secs) {
        return Err(Failure::usage(format!(
            "--timeout {} is out of range: give 1s to 1h",
            cimage::units::format_duration(args.timeout)
        )));
    }
    let mut c = cimage::api::launcher_client(socket);
    let r = c
        .exec(pb::ExecRequest {
            task_id: args.task,
            command: args.command,
            timeout_seconds: secs as u32,
        })
        .await?
        .into_inner();
    let write = |mut w: Box<dyn Write>, data: &[u8]| {
        w.write_all(data)
            .and_then(|()| w.flush())
            .map_err(|e| Failure::new(format!("writing output: {e}")))
    };
    write(Box::new(std::io::stdout()), &r.stdout)?;
    write(Box::new(std::io::stderr()), &r.stderr)?;
    if r.truncated {
        eprintln!("cimage: the command's output passed 4 MiB and was cut");
    }
    Ok(r.exit_code.clamp(0, 255) as u8)
}
