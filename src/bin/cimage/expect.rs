//! `cimage expect` and `cimage expected`: say an image will be needed on this node by a time,
//! cancel that, and list what is expected with its state.

use std::path::Path;
use std::time::Duration;

use cimage::api::pb;
use serde_json::{json, Value};

use crate::{check_image_arg, connect, rfc3339, when, Failure, Output};

/// Arguments of `cimage expect`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  cimage expect registry.example.com/app:1 --in 30m --job 4242\n  \
cimage expect registry.example.com/app:1 --by 2026-12-06T09:00:00Z\n  \
cimage expect --cancel --job 4242"
)]
pub struct ExpectArgs {
    /// Image reference (with --cancel: the image whose expectations to cancel).
    image: Option<String>,
    /// When it must be ready: RFC 3339 (2026-12-06T09:00:00Z) or local time
    /// (2026-12-06 09:00).
    #[arg(long, value_name = "TIME", conflicts_with = "within")]
    by: Option<String>,
    /// How soon it must be ready (90s, 30m, 2h).
    #[arg(long = "in", value_name = "DURATION")]
    within: Option<String>,
    /// The job that will need it.
    #[arg(long)]
    job: Option<String>,
    /// Cancel the expectations of IMAGE, or of --job, instead.
    #[arg(long, conflicts_with_all = ["by", "within"])]
    cancel: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
    #[command(flatten)]
    auth: crate::auth::AuthArgs,
}

/// Arguments of `cimage expected`.
#[derive(clap::Args, Debug)]
pub struct ExpectedArgs {
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// A deadline from `--by` (RFC 3339, or local `YYYY-MM-DD HH:MM[:SS]`) or `--in`, in Unix ms.
fn deadline(by: Option<&str>, within: Option<&str>, now_ms: i64) -> Result<i64, Failure> {
    use chrono::TimeZone;
    match (by, within) {
        (Some(t), _) => {
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(t) {
                return Ok(t.timestamp_millis());
            }
            ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"]
                .iter()
                .find_map(|f| chrono::NaiveDateTime::parse_from_str(t, f).ok())
                .and_then(|n| chrono::Local.from_local_datetime(&n).earliest())
                .map(|t| t.timestamp_millis())
                .ok_or_else(|| {
                    Failure::usage(format!(
                        "--by {t:?} is not a time: give RFC 3339 (2026-12-06T09:00:00Z) or a local time (2026-12-06 09:00)"
                    ))
                })
        }
        (None, Some(d)) => cimage::units::parse_duration(d)
            .map(|d: Duration| now_ms + d.as_millis() as i64)
            .map_err(|e| Failure::usage(format!("--in {d:?}: {e}"))),
        (None, None) => Err(Failure::usage(
            "say when the image is needed: --by TIME or --in DURATION".into(),
        )),
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn expectation_json(e: &pb::Expectation) -> Value {
    json!({
        "image": e.image,
        "job": (!e.job.is_empty()).then_some(&e.job),
        "deadline": rfc3339(e.deadline_ms),
        "source": e.source,
        "owner_uid": e.owner_uid,
        "state": e.state,
        "reason": (!e.reason.is_empty()).then_some(&e.reason),
        "ready": rfc3339(e.ready_ms),
        "first_request": rfc3339(e.first_request_ms),
        "found_ready": (e.first_request_ms > 0).then_some(e.found_ready),
        "lead_seconds": e.has_lead.then(|| e.lead_ms as f64 / 1000.0),
        "job_running": e.running,
        "created": rfc3339(e.created_ms),
    })
}

/// Runs `cimage expect` (or `cimage expect --cancel`).
pub async fn expect(socket: &Path, args: ExpectArgs) -> Result<(), Failure> {
    if args.cancel {
        return cancel(socket, args).await;
    }
    let Some(image) = args.image.as_deref() else {
        return Err(Failure::usage("name the image that will be needed".into()));
    };
    check_image_arg(image, false)?;
    let deadline_ms = deadline(args.by.as_deref(), args.within.as_deref(), now_ms())?;
    let credentials = args.auth.credentials(image)?;
    connect(socket).await?;
    let e = cimage::api::expectations_client(socket)
        .expect(pb::ExpectRequest {
            image: image.to_owned(),
            deadline_ms,
            job: args.job.clone().unwrap_or_default(),
            credentials,
        })
        .await?
        .into_inner();
    match args.output {
        Output::Json => println!("{}", expectation_json(&e)),
        Output::Table => println!(
            "expected: {} by {}{} ({})",
            e.image,
            when(e.deadline_ms),
            if e.job.is_empty() {
                String::new()
            } else {
                format!(" for job {}", e.job)
            },
            e.state
        ),
    }
    Ok(())
}

async fn cancel(socket: &Path, args: ExpectArgs) -> Result<(), Failure> {
    use pb::cancel_expected_request::Target;
    let target = match (&args.image, &args.job) {
        (Some(i), None) => {
            check_image_arg(i, false)?;
            Target::Image(i.clone())
        }
        (None, Some(j)) => Target::Job(j.clone()),
        _ => {
            return Err(Failure::usage(
                "--cancel takes an image or --job ID, not both".into(),
            ))
        }
    };
    connect(socket).await?;
    let r = cimage::api::expectations_client(socket)
        .cancel_expected(pb::CancelExpectedRequest {
            target: Some(target),
        })
        .await?
        .into_inner();
    match args.output {
        Output::Json => println!(
            "{}",
            json!({"cancelled": r.cancelled.iter().map(expectation_json).collect::<Vec<_>>()})
        ),
        Output::Table => {
            for e in &r.cancelled {
                let job = if e.job.is_empty() { "-" } else { &e.job };
                println!("cancelled: {} (job {job})", e.image);
            }
        }
    }
    Ok(())
}

/// A signed span in its largest unit: `12m`, `-40s`.
fn span(ms: i64) -> String {
    let sign = if ms < 0 { "-" } else { "" };
    let s = ms.unsigned_abs() / 1000;
    match s {
        0..=59 => format!("{sign}{s}s"),
        60..=3599 => format!("{sign}{}m", s / 60),
        3600..=172_799 => format!("{sign}{}h", s / 3600),
        _ => format!("{sign}{}d", s / 86400),
    }
}

/// Runs `cimage expected`.
pub async fn list(socket: &Path, args: ExpectedArgs) -> Result<(), Failure> {
    connect(socket).await?;
    let r = cimage::api::expectations_client(socket)
        .list_expected(pb::ListExpectedRequest {})
        .await?
        .into_inner();
    if args.output == Output::Json {
        let source = r.source.as_ref().map(|s| {
            json!({
                "name": s.name,
                "healthy": s.healthy,
                "last_ok": rfc3339(s.last_ok_ms),
                "error": (!s.error.is_empty()).then_some(&s.error),
                "planned": s.planned,
            })
        });
        println!(
            "{}",
            json!({
                "source": source,
                "expectations": r.expectations.iter().map(expectation_json).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    if let Some(s) = &r.source {
        match s.healthy {
            true => println!(
                "queue source {}: healthy, {} job(s) planned here (last look {})",
                s.name,
                s.planned,
                when(s.last_ok_ms)
            ),
            false => println!(
                "queue source {}: UNHEALTHY: {} (last good look {})",
                s.name,
                s.error,
                when(s.last_ok_ms)
            ),
        }
    }
    if r.expectations.is_empty() {
        println!("no images expected");
        return Ok(());
    }
    println!(
        "{:<44} {:<10} {:<28} {:<8} {:<8} {:<7} REASON",
        "IMAGE", "JOB", "DEADLINE", "SOURCE", "STATE", "LEAD"
    );
    for e in &r.expectations {
        let lead = match (e.has_lead, e.first_request_ms > 0, e.found_ready) {
            (true, _, _) => span(e.lead_ms),
            (false, true, false) => "waited".into(),
            _ => "-".into(),
        };
        let state = if e.state == "no_room" {
            "no room"
        } else {
            &e.state
        };
        println!(
            "{:<44} {:<10} {:<28} {:<8} {:<8} {:<7} {}",
            e.image,
            if e.job.is_empty() { "-" } else { &e.job },
            when(e.deadline_ms),
            e.source,
            state,
            lead,
            e.reason
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_read_from_either_flag_and_bad_ones_are_refused() {
        let now = 1_800_000_000_000;
        assert_eq!(deadline(None, Some("30m"), now).unwrap(), now + 1_800_000);
        assert_eq!(
            deadline(Some("2027-01-15T08:00:00Z"), None, now).unwrap(),
            chrono::DateTime::parse_from_rfc3339("2027-01-15T08:00:00Z")
                .unwrap()
                .timestamp_millis()
        );
        assert!(deadline(Some("2027-01-15 08:00"), None, now).is_ok());
        let e = deadline(Some("tomorrow"), None, now).unwrap_err();
        assert!(e.message.contains("--by \"tomorrow\""), "{}", e.message);
        let e = deadline(None, Some("soon"), now).unwrap_err();
        assert!(e.message.contains("--in \"soon\""), "{}", e.message);
        assert!(deadline(None, None, now).is_err());
        assert_eq!(span(-40_000), "-40s");
        assert_eq!(span(720_000), "12m");
    }
}
