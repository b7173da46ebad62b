//! `cimage rm`: remove an image from the node (admin).

use std::path::Path;

use cimage::api::pb;

use crate::{check_image_arg, connect, Failure};

/// Arguments of `cimage rm`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Images by reference, image id or manifest digest (sha256:…), or id prefix (6+ hex
    /// digits).
    #[arg(required = true)]
    images: Vec<String>,
}

/// Runs `cimage rm`: every argument is checked before anything is removed; each image is
/// removed in turn, and the command fails (with the first failure's status) if any could not
/// be.
pub async fn run(socket: &Path, args: Args) -> Result<(), Failure> {
    for image in &args.images {
        check_image_arg(image, true)?;
    }
    let mut client = connect(socket).await?;
    let mut first: Option<Failure> = None;
    for image in &args.images {
        match client
            .remove_image(pb::RemoveImageRequest {
                image: image.clone(),
            })
            .await
        {
            Ok(r) => println!("removed {image} ({})", r.into_inner().image_id),
            Err(s) => {
                let f = Failure::from(s);
                if args.images.len() > 1 {
                    eprintln!("cimage: {}", f.message);
                }
                first.get_or_insert(f);
            }
        }
    }
    match first {
        None => Ok(()),
        Some(f) if args.images.len() == 1 => Err(f),
        Some(f) => Err(Failure {
            message: "some images could not be removed (see above)".into(),
            ..f
        }),
    }
}
