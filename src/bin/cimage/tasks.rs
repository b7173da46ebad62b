//! `cimage ps`, `cimage logs`, `cimage cancel`: the tasks cimaged runs.

use std::io::Write;
use std::path::Path;

use cimage::api::pb;
use futures::StreamExt;
use serde_json::{json, Value};

use crate::{connect, rfc3339, when, Failure, Output};

/// Arguments of `cimage ps`.
#[derive(clap::Args, Debug)]
pub struct PsArgs {
    /// Show finished tasks too.
    #[arg(long, short)]
    all: bool,
    /// Only the tasks of this job (finished ones included).
    #[arg(long, value_name = "JOB")]
    job: Option<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// Arguments of `cimage logs`.
#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// Task id.
    task: String,
    /// Keep printing until the task finishes.
    #[arg(long, short)]
    follow: bool,
    /// Only the last N lines (then, with -f, what follows).
    #[arg(long, short = 'n', value_name = "N")]
    tail: Option<u32>,
}

/// Arguments of `cimage cancel`.
#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    /// Task id.
    task: String,
}

/// A task as JSON (what `ps -o json` prints).
pub fn task_json(t: &pb::Task) -> Value {
    json!({
        "id": t.id,
        "job": t.job,
        "step": t.step,
        "uid": t.uid,
        "image": t.image,
        "state": t.state,
        "exit_code": t.exit_code,
        "signal": (t.signal > 0).then_some(t.signal),
        "failure": (!t.failure_stage.is_empty()).then(|| json!({"stage": t.failure_stage, "message": t.failure_message})),
        "created": rfc3339(t.created),
        "started": rfc3339(t.started),
        "finished": rfc3339(t.finished),
        "container_id": (!t.container_id.is_empty()).then_some(&t.container_id),
        "log_path": t.log_path,
        "cleaned_up": t.cleaned_up,
    })
}

/// Runs `cimage ps`.
pub async fn ps(socket: &Path, args: PsArgs) -> Result<(), Failure> {
    connect(socket).await?;
    let mut c = cimage::api::launcher_client(socket);
    let tasks = c
        .list_tasks(pb::ListTasksRequest {
            all: args.all || args.job.is_some(),
        })
        .await?
        .into_inner()
        .tasks;
    let tasks: Vec<pb::Task> = match &args.job {
        Some(j) => {
            // A user's job ids are kept in a space of their own (`u<uid>.<id>`): the id as
            // the user wrote it names that one too.
            // SAFETY: getuid cannot fail.
            let own = format!("u{}.{j}", unsafe { libc::getuid() });
            tasks
                .into_iter()
                .filter(|t| &t.job == j || t.job == own)
                .collect()
        }
        None => tasks,
    };
    if args.output == Output::Json {
        println!("{}", Value::Array(tasks.iter().map(task_json).collect()));
        return Ok(());
    }
    println!(
        "{:<12}  {:<20}  {:>4}  {:<10}  {:>4}  {:>6}  {:<26}  IMAGE",
        "TASK", "JOB", "STEP", "STATE", "EXIT", "UID", "CREATED"
    );
    for t in &tasks {
        println!(
            "{:<12}  {:<20}  {:>4}  {:<10}  {:>4}  {:>6}  {:<26}  {}",
            t.id,
            t.job,
            t.step,
            t.state,
            t.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            t.uid,
            when(t.created),
            t.image
        );
    }
    Ok(())
}

/// Runs `cimage logs`.
pub async fn logs(socket: &Path, args: LogsArgs) -> Result<(), Failure> {
    connect(socket).await?;
    let mut c = cimage::api::launcher_client(socket);
    let mut stream = c
        .logs(pb::LogsRequest {
            task_id: args.task,
            follow: args.follow,
            tail: args.tail,
        })
        .await?
        .into_inner();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let r = if chunk.stderr {
            std::io::stderr().write_all(&chunk.data)
        } else {
            std::io::stdout().write_all(&chunk.data)
        };
        r.map_err(|e| Failure::new(format!("writing output: {e}")))?;
    }
    Ok(())
}

/// Runs `cimage cancel`.
pub async fn cancel(socket: &Path, args: CancelArgs) -> Result<(), Failure> {
    connect(socket).await?;
    let mut c = cimage::api::launcher_client(socket);
    let t = c
        .cancel(pb::TaskRef { task_id: args.task })
        .await?
        .into_inner();
    println!("cancelling task {} (job {} step {})", t.id, t.job, t.step);
    Ok(())
}
