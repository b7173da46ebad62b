//! `cimage status`: is cimaged healthy, and can it reach the runtime?

use std::path::Path;

use cimage::api::pb;
use serde_json::json;

use crate::{connect, rfc3339, Failure, Output};

/// Arguments of `cimage status`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// Runs `cimage status`; fails (exit 1) when the runtime or the index is unhealthy.
pub async fn run(socket: &Path, args: Args) -> Result<(), Failure> {
    let mut client = connect(socket).await?;
    let s = client.status(pb::StatusRequest {}).await?.into_inner();
    match args.output {
        Output::Json => println!(
            "{}",
            json!({
                "version": s.version,
                "runtime_ok": s.runtime_ok,
                "runtime": s.runtime_message,
                "index_ok": s.index_ok,
                "images": s.images,
                "last_reconcile": rfc3339(s.last_reconcile),
                "instance": s.instance,
            })
        ),
        Output::Table => {
            println!("cimaged {}", s.version);
            println!(
                "runtime: {} ({})",
                if s.runtime_ok { "ok" } else { "FAILING" },
                s.runtime_message
            );
            println!(
                "index:   {} ({} images)",
                if s.index_ok { "ok" } else { "FAILING" },
                s.images
            );
            println!(
                "last reconciled: {}",
                rfc3339(s.last_reconcile).unwrap_or_else(|| "not yet".into())
            );
        }
    }
    if s.runtime_ok && s.index_ok {
        Ok(())
    } else {
        Err(Failure::unavailable("cimaged is unhealthy (see above)".into()))
    }
}
