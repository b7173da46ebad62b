//! `cimage rm`: remove an image from the node (admin).

use std::path::Path;

use cimage::api::pb;

use crate::{check_image_arg, connect, Failure};

/// Arguments of `cimage rm`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image reference, image id (sha256:…) or id prefix (6+ hex digits).
    image: String,
}

/// Runs `cimage rm`.
pub async fn run(socket: &Path, args: Args) -> Result<(), Failure> {
    check_image_arg(&args.image, true)?;
    let mut client = connect(socket).await?;
    let r = client
        .remove_image(pb::RemoveImageRequest {
            image: args.image.clone(),
        })
        .await?
        .into_inner();
    println!("removed {} ({})", args.image, r.image_id);
    Ok(())
}
