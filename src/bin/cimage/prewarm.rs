//! `cimage prewarm`: scheduled pre-pulls.

use std::path::Path;

use cimage::api::pb;
use cimage::units::parse_duration;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::{check_image_arg, connect, human_size, rfc3339, when, Failure, Output};

/// Subcommands of `cimage prewarm`.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Add (or replace) a schedule (admin).
    Add(AddArgs),
    /// List schedules with their next fire time.
    Ls(LsArgs),
    /// Remove a schedule added with `prewarm add` (admin).
    Rm(NameArgs),
    /// Run a schedule now, with live progress per image (admin).
    Run(NameArgs),
    /// Show a schedule's runs.
    History(HistoryArgs),
}

impl Command {
    /// The output format asked for (table for subcommands without one).
    pub fn output(&self) -> Output {
        match self {
            Command::Ls(a) => a.output,
            Command::History(a) => a.output,
            _ => Output::Table,
        }
    }
}

/// Arguments of `cimage prewarm add`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  cimage prewarm add nightly --cron '0 3 * * *' --tz Europe/Berlin --top 10\n  cimage prewarm add base --cron '*/30 * * * *' --image busybox:1 --image python:3.12 --jitter 5m"
)]
pub struct AddArgs {
    /// Schedule name.
    name: String,
    /// Crontab expression: minute hour day-of-month month day-of-week (or 6 fields, seconds first).
    #[arg(long)]
    cron: String,
    /// IANA time zone the expression is read in (default UTC).
    #[arg(long = "tz")]
    tz: Option<String>,
    /// Image to keep warm (repeatable).
    #[arg(long = "image")]
    images: Vec<String>,
    /// Also keep the N most popular images warm.
    #[arg(long)]
    top: Option<u32>,
    /// Random delay up to this long before each run (e.g. 5m).
    #[arg(long, value_parser = |s: &str| parse_duration(s))]
    jitter: Option<std::time::Duration>,
    /// Images pulled at once (default 2).
    #[arg(long)]
    concurrency: Option<u32>,
    /// After a restart, run once if a fire was missed while cimaged was down.
    #[arg(long)]
    catch_up: bool,
}

/// Arguments naming a schedule.
#[derive(clap::Args, Debug)]
pub struct NameArgs {
    /// Schedule name.
    name: String,
}

/// Arguments of `cimage prewarm ls`.
#[derive(clap::Args, Debug)]
pub struct LsArgs {
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    output: Output,
}

/// Arguments of `cimage prewarm history`.
#[derive(clap::Args, Debug)]
pub struct HistoryArgs {
    /// Schedule name.
    name: String,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    output: Output,
}

fn run_json(r: &pb::Run) -> Value {
    json!({
        "schedule": r.schedule,
        "trigger": r.trigger,
        "scheduled_for": rfc3339(r.scheduled_for),
        "started": rfc3339(r.started),
        "finished": rfc3339(r.finished),
        "jitter_seconds": r.jitter_ms as f64 / 1000.0,
        "outcome": r.outcome,
        "images": r.images.iter().map(|i| json!({
            "image": i.image,
            "outcome": i.outcome,
            "error": (!i.error.is_empty()).then_some(&i.error),
            "pulled_bytes": i.bytes,
            "elapsed_seconds": i.seconds,
        })).collect::<Vec<_>>(),
    })
}

fn print_image(i: &pb::ImageResult) {
    if i.error.is_empty() {
        println!(
            "  {:<10} {} ({}, {:.2}s)",
            i.outcome,
            i.image,
            human_size(i.bytes),
            i.seconds
        );
    } else {
        println!("  {:<10} {}: {}", i.outcome, i.image, i.error);
    }
}

/// Runs `cimage prewarm …`.
pub async fn run(socket: &Path, cmd: Command) -> Result<(), Failure> {
    connect(socket).await?;
    let mut c = cimage::api::maintenance_client(socket);
    match cmd {
        Command::Add(a) => {
            for i in &a.images {
                check_image_arg(i, false)?;
            }
            let info = c
                .add_schedule(pb::Schedule {
                    name: a.name,
                    cron: a.cron,
                    time_zone: a.tz.unwrap_or_default(),
                    images: a.images,
                    top: a.top.unwrap_or(0),
                    jitter_ms: a.jitter.map(|j| j.as_millis() as u64).unwrap_or(0),
                    concurrency: a.concurrency.unwrap_or(0),
                    catch_up: a.catch_up,
                    from_config: false,
                })
                .await?
                .into_inner();
            let s = info.schedule.unwrap_or_default();
            println!(
                "added schedule {}; next run {}",
                s.name,
                when(info.next_fire)
            );
        }
        Command::Ls(a) => {
            let all = c
                .list_schedules(pb::ListSchedulesRequest {})
                .await?
                .into_inner()
                .schedules;
            if a.output == Output::Json {
                let v: Vec<Value> = all
                    .iter()
                    .map(|i| {
                        let s = i.schedule.clone().unwrap_or_default();
                        json!({
                            "name": s.name, "cron": s.cron,
                            "time_zone": if s.time_zone.is_empty() { "UTC" } else { s.time_zone.as_str() },
                            "images": s.images, "top": (s.top > 0).then_some(s.top),
                            "jitter_seconds": s.jitter_ms as f64 / 1000.0, "concurrency": s.concurrency,
                            "catch_up": s.catch_up, "from_config": s.from_config,
                            "next_fire": rfc3339(i.next_fire), "running": i.running,
                            "last_run": i.last_run.as_ref().map(run_json),
                        })
                    })
                    .collect();
                println!("{}", Value::Array(v));
                return Ok(());
            }
            println!(
                "{:<20}  {:<18}  {:<14}  {:<26}  {:<8}  WHAT",
                "NAME", "CRON", "ZONE", "NEXT RUN", "LAST"
            );
            for i in &all {
                let s = i.schedule.clone().unwrap_or_default();
                let mut what = s.images.join(",");
                if s.top > 0 {
                    what = format!(
                        "top {}{}{what}",
                        s.top,
                        if what.is_empty() { "" } else { " + " }
                    );
                }
                println!(
                    "{:<20}  {:<18}  {:<14}  {:<26}  {:<8}  {}{}",
                    s.name,
                    s.cron,
                    if s.time_zone.is_empty() {
                        "UTC"
                    } else {
                        &s.time_zone
                    },
                    when(i.next_fire),
                    if i.running {
                        "running".to_string()
                    } else {
                        i.last_run
                            .as_ref()
                            .map(|r| r.outcome.clone())
                            .unwrap_or_else(|| "-".into())
                    },
                    what,
                    if s.from_config { " (config)" } else { "" }
                );
            }
        }
        Command::Rm(a) => {
            c.remove_schedule(pb::ScheduleRef {
                name: a.name.clone(),
            })
            .await?;
            println!("removed schedule {}", a.name);
        }
        Command::Run(a) => {
            let mut stream = c
                .run_schedule(pb::ScheduleRef {
                    name: a.name.clone(),
                })
                .await?
                .into_inner();
            println!("running schedule {} ...", a.name);
            let mut view = crate::progress::PullView::new(Output::Table);
            while let Some(p) = stream.next().await {
                let p = match p {
                    Ok(p) => p,
                    Err(s) => {
                        view.clear();
                        return Err(s.into());
                    }
                };
                match p.progress {
                    Some(pb::run_progress::Progress::Started(image)) => {
                        view.note(&format!("  {image}: started"));
                    }
                    Some(pb::run_progress::Progress::Pulling(p)) => view.update(&p),
                    Some(pb::run_progress::Progress::Image(i)) => {
                        view.finish(&i.image);
                        print_image(&i);
                    }
                    Some(pb::run_progress::Progress::Done(r)) => {
                        view.clear();
                        let bytes: u64 = r.images.iter().map(|i| i.bytes).sum();
                        println!(
                            "run {}: {} images, {} pulled",
                            r.outcome,
                            r.images.len(),
                            human_size(bytes)
                        );
                        if r.outcome == "failed" || r.outcome == "partial" {
                            return Err(Failure::new(format!(
                                "pre-warm run of {} was {}",
                                a.name, r.outcome
                            )));
                        }
                    }
                    None => {}
                }
            }
        }
        Command::History(a) => {
            let runs = c
                .schedule_history(pb::ScheduleRef { name: a.name })
                .await?
                .into_inner()
                .runs;
            if a.output == Output::Json {
                println!("{}", Value::Array(runs.iter().map(run_json).collect()));
                return Ok(());
            }
            for r in &runs {
                println!(
                    "{}  {:<8} {:<8} jitter {}",
                    when(r.started),
                    r.trigger,
                    r.outcome,
                    cimage::units::format_span(std::time::Duration::from_millis(r.jitter_ms))
                );
                for i in &r.images {
                    print_image(i);
                }
            }
        }
    }
    Ok(())
}
