//! `cimage pulls`: the pulls in flight and queued.

use std::path::Path;

use cimage::api::pb;
use serde_json::Value;

use crate::progress::progress_json;
use crate::{connect, human_size, Failure, Output};

/// Arguments of `cimage pulls`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Columns: IMAGE; PHASE (queued #N = Nth in line for a pull slot, queued = \
waiting for its user's share of the slots (MaxPullsPerUser), resolving, downloading, \
unpacking); BYTES done / total of the layers (where the runtime reports them); RATE; \
WAITING = requests sharing the pull; AGE since the pull began. A user who is not an admin \
sees the pulls it waits on and those made without credentials."
)]
pub struct Args {
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// Runs `cimage pulls`.
pub async fn run(socket: &Path, args: Args) -> Result<(), Failure> {
    let mut client = connect(socket).await?;
    let pulls = client
        .list_pulls(pb::ListPullsRequest {})
        .await?
        .into_inner()
        .pulls;
    if args.output == Output::Json {
        println!(
            "{}",
            Value::Array(pulls.iter().map(progress_json).collect())
        );
        return Ok(());
    }
    if pulls.is_empty() {
        println!("no pulls in flight");
        return Ok(());
    }
    println!(
        "{:<14}  {:>23}  {:>11}  {:>7}  {:>6}  IMAGE",
        "PHASE", "BYTES", "RATE", "WAITING", "AGE"
    );
    for p in &pulls {
        let phase = match (p.phase.as_str(), p.queue_position) {
            ("queued", n) if n > 0 => format!("queued #{n}"),
            (ph, _) if p.attempt > 1 => format!("{ph} (try {})", p.attempt),
            (ph, _) => ph.to_owned(),
        };
        let bytes = if p.bytes_known && p.total_bytes > 0 {
            format!(
                "{} / {}",
                human_size(p.done_bytes),
                human_size(p.total_bytes)
            )
        } else {
            "-".to_owned()
        };
        let rate = if p.phase == "downloading" && p.rate_bytes_per_second > 0.0 {
            format!("{}/s", human_size(p.rate_bytes_per_second as u64))
        } else {
            "-".to_owned()
        };
        println!(
            "{:<14}  {:>23}  {:>11}  {:>7}  {:>6}  {}",
            phase,
            bytes,
            rate,
            p.requesters,
            cimage::units::format_span(std::time::Duration::from_secs(p.age_seconds as u64)),
            p.image
        );
    }
    Ok(())
}
