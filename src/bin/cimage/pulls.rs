//! `cimage pulls`: the pulls in flight and queued.

use std::path::Path;

use cimage::api::pb;
use serde_json::Value;

use crate::progress::progress_json;
use crate::{connect, human_size, Failure, Output};

/// Arguments of `cimage pulls`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Columns: IMAGE; PHASE (queued #N = Nth in line for a pull slot, resolving, \
downloading, unpacking); BYTES done / total of the layers (where the runtime reports them); \
RATE; WAITING = requests sharing the pull; AGE since the pull began. A user who is not an \
admin sees the pulls it waits on and those made without credentials."
)]
pub struct Args {
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// A span in the largest whole units: `45s`, `3m12s`, `2h5m`.
pub fn short_age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
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
            short_age(p.age_seconds),
            p.image
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_short() {
        assert_eq!(short_age(5.2), "5s");
        assert_eq!(short_age(192.0), "3m12s");
        assert_eq!(short_age(7500.0), "2h5m");
    }
}
