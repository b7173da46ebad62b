//! `cimage pin` / `cimage unpin`: keep an image out of eviction (admin).

use std::path::Path;

use cimage::api::pb;

use crate::{check_image_arg, connect, Failure};

/// Arguments of `cimage pin` and `cimage unpin`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image reference, image id (sha256:…) or id prefix (6+ hex digits).
    image: String,
}

/// Runs `cimage pin` (`pinned` true) or `cimage unpin`.
pub async fn run(socket: &Path, args: Args, pinned: bool) -> Result<(), Failure> {
    check_image_arg(&args.image, true)?;
    let mut client = connect(socket).await?;
    let i = client
        .set_pinned(pb::SetPinnedRequest {
            image: args.image.clone(),
            pinned,
        })
        .await?
        .into_inner();
    println!(
        "{} {} ({})",
        if pinned { "pinned" } else { "unpinned" },
        args.image,
        i.id
    );
    Ok(())
}
