//! `cimage gc` and `cimage top`: eviction and popularity.

use std::path::Path;

use cimage::api::pb;
use serde_json::{json, Value};

use crate::images::image_json;
use crate::{connect, human_size, Failure, Output};

/// Arguments of `cimage gc`.
#[derive(clap::Args, Debug)]
pub struct GcArgs {
    /// Say what would be evicted and why, and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// Arguments of `cimage top`.
#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// How many images.
    #[arg(long, short = 'n', default_value_t = 20)]
    limit: u32,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

fn name(i: &Option<pb::Image>) -> String {
    i.as_ref()
        .map(|i| i.names.first().cloned().unwrap_or_else(|| i.id.clone()))
        .unwrap_or_default()
}

/// Runs `cimage gc`.
pub async fn gc(socket: &Path, args: GcArgs) -> Result<(), Failure> {
    connect(socket).await?;
    let mut c = cimage::api::maintenance_client(socket);
    let r = c
        .gc(pb::GcRequest {
            dry_run: args.dry_run,
        })
        .await?
        .into_inner();
    if args.output == Output::Json {
        let ev: Vec<Value> = r
            .evicted
            .iter()
            .map(|e| json!({"image": e.image.as_ref().map(image_json), "reason": e.reason}))
            .collect();
        let pr: Vec<Value> = r
            .protected
            .iter()
            .map(|p| json!({"image": p.image.as_ref().map(image_json), "why": p.why}))
            .collect();
        println!(
            "{}",
            json!({
                "dry_run": r.dry_run,
                "enabled": r.enabled,
                "evicted": ev,
                "protected": pr,
                "shortfall": (!r.shortfall.is_empty()).then_some(&r.shortfall),
                "fs_size_bytes": r.fs_total,
                "fs_used_bytes": r.fs_used,
                "fs_used_percent": crate::status::df_percent(r.fs_used, r.fs_total),
            })
        );
        return Ok(());
    }
    if !r.enabled {
        println!("eviction is off (ImageCache.Eviction.Enabled: false)");
        return Ok(());
    }
    if r.fs_total > 0 {
        println!(
            "image filesystem: {} used of {} ({}%, as df counts)",
            human_size(r.fs_used),
            human_size(r.fs_total),
            crate::status::df_percent(r.fs_used, r.fs_total)
        );
    }
    let verb = if r.dry_run { "would evict" } else { "evicted" };
    if r.evicted.is_empty() {
        println!("nothing to evict");
    }
    for e in &r.evicted {
        let size = e.image.as_ref().map(|i| i.size).unwrap_or(0);
        println!(
            "{verb} {} ({}): {}",
            name(&e.image),
            human_size(size),
            e.reason
        );
    }
    for p in &r.protected {
        println!("kept {}: {}", name(&p.image), p.why);
    }
    if !r.shortfall.is_empty() {
        println!("cannot meet the targets: {}", r.shortfall);
    }
    Ok(())
}

/// Runs `cimage top`.
pub async fn top(socket: &Path, args: TopArgs) -> Result<(), Failure> {
    connect(socket).await?;
    let mut c = cimage::api::maintenance_client(socket);
    let r = c
        .top(pb::TopRequest { limit: args.limit })
        .await?
        .into_inner();
    if args.output == Output::Json {
        let all: Vec<Value> = r
            .images
            .iter()
            .map(|i| {
                json!({"image": i.image.as_ref().map(image_json), "score": i.score, "absent": i.absent})
            })
            .collect();
        println!("{}", Value::Array(all));
        return Ok(());
    }
    println!(
        "{:>4}  {:>8}  {:>5}  {:<7}  NAME",
        "RANK", "SCORE", "USES", "HERE"
    );
    for (n, i) in r.images.iter().enumerate() {
        println!(
            "{:>4}  {:>8.2}  {:>5}  {:<7}  {}",
            n + 1,
            i.score,
            i.image.as_ref().map(|i| i.use_count).unwrap_or(0),
            if i.absent { "absent" } else { "yes" },
            name(&i.image)
        );
    }
    Ok(())
}
