//! `cimage jobs` and `cimage end-job`: jobs and their pods.

use std::path::Path;

use cimage::api::pb;
use serde_json::{json, Value};

use crate::{connect, rfc3339, when, Failure, Output};

/// Arguments of `cimage jobs`.
#[derive(clap::Args, Debug)]
pub struct JobsArgs {
    /// Ended jobs still kept in history too (default: jobs not yet ended).
    #[arg(long, short)]
    all: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// Arguments of `cimage end-job`.
#[derive(clap::Args, Debug)]
pub struct EndJobArgs {
    /// Job id.
    job: String,
}

fn job_json(j: &pb::Job) -> Value {
    json!({
        "id": j.id,
        "uid": j.uid,
        "one_off": j.one_off,
        "sandbox_id": (!j.sandbox_id.is_empty()).then_some(&j.sandbox_id),
        "created": rfc3339(j.created),
        "ended": rfc3339(j.ended),
        "tasks": j.tasks,
        "running": j.running,
    })
}

/// Runs `cimage jobs`.
pub async fn list(socket: &Path, args: JobsArgs) -> Result<(), Failure> {
    connect(socket).await?;
    let mut c = cimage::api::launcher_client(socket);
    let jobs = c
        .list_jobs(pb::ListJobsRequest { all: args.all })
        .await?
        .into_inner()
        .jobs;
    if args.output == Output::Json {
        println!("{}", Value::Array(jobs.iter().map(job_json).collect()));
        return Ok(());
    }
    println!(
        "{:<24}  {:>6}  {:<7}  {:>5}  {:>7}  {:<26}  POD",
        "JOB", "UID", "STATE", "STEPS", "RUNNING", "CREATED"
    );
    for j in &jobs {
        println!(
            "{:<24}  {:>6}  {:<7}  {:>5}  {:>7}  {:<26}  {}",
            j.id,
            j.uid,
            if j.ended > 0 { "ended" } else { "active" },
            j.tasks.len(),
            j.running,
            when(j.created),
            if j.sandbox_id.is_empty() {
                "-"
            } else {
                &j.sandbox_id[..j.sandbox_id.len().min(12)]
            }
        );
    }
    Ok(())
}

/// Runs `cimage end-job`.
pub async fn end(socket: &Path, args: EndJobArgs) -> Result<(), Failure> {
    connect(socket).await?;
    let mut c = cimage::api::launcher_client(socket);
    let j = c
        .end_job(pb::EndJobRequest { job: args.job })
        .await?
        .into_inner();
    println!("ended job {} ({} steps)", j.id, j.tasks.len());
    Ok(())
}
