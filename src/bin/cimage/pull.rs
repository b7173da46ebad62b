//! `cimage pull`: make an image ready under a pull policy.

use std::path::Path;

use cimage::api::pb;
use cimage::policy::PullPolicy;
use serde_json::json;

use crate::progress::PullView;
use crate::{check_image_arg, connect, human_size, Failure, Output};
use futures::StreamExt;

/// Arguments of `cimage pull`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image reference, e.g. 127.0.0.1:5000/app:1 or busybox@sha256:….
    image: String,
    /// Always (check the registry, pull if the tag moved), IfNotPresent, or Never. Default:
    /// Always for :latest or untagged references, IfNotPresent otherwise.
    #[arg(long, value_parser = |s: &str| s.parse::<PullPolicy>())]
    policy: Option<PullPolicy>,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
    #[command(flatten)]
    auth: crate::auth::AuthArgs,
}

/// Runs `cimage pull`: the pull's progress on stderr while it moves, the result on stdout.
pub async fn run(socket: &Path, args: Args) -> Result<(), Failure> {
    check_image_arg(&args.image, false)?;
    let policy = crate::policy_pb(args.policy);
    let mut client = connect(socket).await?;
    let mut stream = client
        .pull_stream(pb::PullRequest {
            credentials: args.auth.credentials(&args.image)?,
            image: args.image.clone(),
            policy: policy as i32,
        })
        .await?
        .into_inner();
    let mut view = PullView::new(args.output);
    let mut done = None;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(s) => {
                view.clear();
                return Err(s.into());
            }
        };
        match ev.event {
            Some(pb::pull_event::Event::Progress(p)) => view.update(&p),
            Some(pb::pull_event::Event::Done(r)) => done = Some(r),
            None => {}
        }
    }
    view.clear();
    let Some(r) = done else {
        return Err(Failure::new(format!(
            "cimaged ended the pull of {} without a result",
            args.image
        )));
    };
    match args.output {
        Output::Json => println!(
            "{}",
            json!({
                "image": r.image,
                "manifest_digest": (!r.digest.is_empty()).then_some(&r.digest),
                "image_id": r.image_id,
                "action": r.action,
                "policy": r.policy,
                "elapsed_seconds": r.seconds,
                "size_bytes": r.size,
                "stale": r.stale,
            })
        ),
        Output::Table => {
            println!(
                "{} {} ({}) in {:.3}s under policy {}",
                r.action,
                r.image,
                human_size(r.size),
                r.seconds,
                r.policy
            );
            if !r.digest.is_empty() {
                println!("  manifest digest: {}", r.digest);
            }
            println!("  image id:        {}", r.image_id);
        }
    }
    if r.stale {
        eprintln!(
            "cimage: the registry could not be reached: served the node's copy of {} unchecked",
            r.image
        );
    }
    Ok(())
}
