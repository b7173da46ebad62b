//! `cimage status`: is cimaged healthy, and can it reach the runtime?

use std::path::Path;

use cimage::api::pb;
use serde_json::json;

use crate::{connect, human_size, rfc3339, when, Failure, Output};

/// Arguments of `cimage status`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// Percent used as `df` prints it: used over used + available, rounded up.
pub fn df_percent(used: u64, size: u64) -> u64 {
    if size == 0 {
        0
    } else {
        (used as u128 * 100).div_ceil(size as u128) as u64
    }
}

/// Runs `cimage status`; fails with exit 4 (unavailable) when the runtime or the index is
/// unhealthy.
pub async fn run(socket: &Path, args: Args) -> Result<(), Failure> {
    let mut client = connect(socket).await?;
    let s = client.status(pb::StatusRequest {}).await?.into_inner();
    // The scheduler's queue, when a source is configured: unhealthy says so here, and nothing
    // else (cimaged itself is healthy without it).
    let source = cimage::api::expectations_client(socket)
        .list_expected(pb::ListExpectedRequest {})
        .await
        .ok()
        .and_then(|r| r.into_inner().source);
    let healthy = s.runtime_ok && s.index_ok;
    let fs_known = s.image_fs_size_bytes > 0;
    match args.output {
        Output::Json => println!(
            "{}",
            json!({
                "version": s.version,
                "healthy": healthy,
                "runtime_ok": s.runtime_ok,
                "runtime_error": (!s.runtime_ok).then_some(&s.runtime_message),
                "index_ok": s.index_ok,
                "images": s.images,
                "image_fs": fs_known.then(|| json!({
                    "mountpoint": s.image_fs_mountpoint,
                    "used_bytes": s.image_fs_used_bytes,
                    "size_bytes": s.image_fs_size_bytes,
                    "used_percent": df_percent(s.image_fs_used_bytes, s.image_fs_size_bytes),
                })),
                "eviction": {
                    "enabled": s.eviction_enabled,
                    "high_percent": s.eviction_enabled.then_some(s.high_percent),
                    "low_percent": s.eviction_enabled.then_some(s.low_percent),
                },
                "pulls_in_flight": s.pulls_in_flight,
                "pulls_queued": s.pulls_queued,
                "last_reconcile": rfc3339(s.last_reconcile),
                "schedules": s.schedules.iter().map(|f| json!({
                    "name": f.name,
                    "next_fire": rfc3339(f.next_fire),
                })).collect::<Vec<_>>(),
                "metrics_addr": (!s.metrics_addr.is_empty()).then_some(&s.metrics_addr),
                "queue_source": source.as_ref().map(|q| json!({
                    "name": q.name,
                    "healthy": q.healthy,
                    "last_ok": rfc3339(q.last_ok_ms),
                    "error": (!q.error.is_empty()).then_some(&q.error),
                    "planned": q.planned,
                })),
                "history": {
                    "tasks_recorded": s.tasks_recorded,
                    "tasks_live": s.tasks_live,
                    "tasks_pruned": s.tasks_pruned,
                    "max_tasks": s.history_max_tasks,
                    "keep_seconds": s.history_keep_seconds,
                },
                "instance": s.instance,
            })
        ),
        Output::Table => {
            let ok = |b: bool| if b { "ok" } else { "FAILING" };
            println!(
                "cimaged {}: {}",
                s.version,
                if healthy { "healthy" } else { "UNHEALTHY" }
            );
            println!(
                "runtime:          {} ({})",
                ok(s.runtime_ok),
                s.runtime_message
            );
            println!("index:            {} ({} images)", ok(s.index_ok), s.images);
            if fs_known {
                println!(
                    "image filesystem: {} used of {} ({}%, as df counts){}",
                    human_size(s.image_fs_used_bytes),
                    human_size(s.image_fs_size_bytes),
                    df_percent(s.image_fs_used_bytes, s.image_fs_size_bytes),
                    if s.image_fs_mountpoint.is_empty() {
                        String::new()
                    } else {
                        format!(" at {}", s.image_fs_mountpoint)
                    }
                );
            } else {
                println!("image filesystem: unknown (cannot read its usage)");
            }
            if s.eviction_enabled {
                println!(
                    "eviction:         on: above {}% evicts down to {}%",
                    s.high_percent, s.low_percent
                );
            } else {
                println!("eviction:         off");
            }
            println!(
                "pulls:            {} in flight, {} queued",
                s.pulls_in_flight, s.pulls_queued
            );
            println!("last reconciled:  {}", when(s.last_reconcile));
            println!(
                "task history:     {} records ({} live), {} pruned since start; kept {}, at most {}",
                s.tasks_recorded,
                s.tasks_live,
                s.tasks_pruned,
                cimage::units::format_duration(std::time::Duration::from_secs_f64(
                    s.history_keep_seconds
                )),
                s.history_max_tasks
            );
            if s.schedules.is_empty() {
                println!("schedules:        none");
            }
            for f in &s.schedules {
                println!("schedule {}: next {}", f.name, when(f.next_fire));
            }
            match s.metrics_addr.as_str() {
                "" => println!("metrics:          off"),
                a => println!("metrics:          http://{a}/metrics"),
            }
            match &source {
                None => println!("queue source:     none"),
                Some(q) if q.healthy => println!(
                    "queue source:     {}: ok, {} job(s) planned here (last look {})",
                    q.name,
                    q.planned,
                    when(q.last_ok_ms)
                ),
                Some(q) => println!(
                    "queue source:     {}: UNHEALTHY: {} (last good look {})",
                    q.name,
                    q.error,
                    when(q.last_ok_ms)
                ),
            }
        }
    }
    if healthy {
        Ok(())
    } else {
        Err(Failure {
            in_output: true,
            ..Failure::unavailable("cimaged is unhealthy (see above)".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_as_df_rounds_up() {
        assert_eq!(df_percent(0, 100), 0);
        assert_eq!(df_percent(1, 100), 1);
        assert_eq!(df_percent(271, 1000), 28);
        assert_eq!(df_percent(5, 0), 0);
    }
}
