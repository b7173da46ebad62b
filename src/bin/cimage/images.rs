//! `cimage images` and `cimage inspect`: what the node holds.

use std::path::Path;

use cimage::api::pb;
use serde_json::{json, Value};

use crate::{check_image_arg, connect, human_size, rfc3339, Failure, Output};

/// Arguments of `cimage images`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// Arguments of `cimage inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Image reference, image id (sha256:…) or id prefix (6+ hex digits).
    image: String,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// The manifest digest of an image: the part after `@` of its first digest reference.
fn digest(i: &pb::Image) -> &str {
    i.digests
        .first()
        .and_then(|d| d.split_once('@'))
        .map(|(_, d)| d)
        .unwrap_or("")
}

/// An image as JSON (the shape `images -o json` and `inspect -o json` print).
pub fn image_json(i: &pb::Image) -> Value {
    json!({
        "id": i.id,
        "digest": digest(i),
        "names": i.names,
        "digests": i.digests,
        "size": i.size,
        "first_seen": rfc3339(i.first_seen),
        "last_used": rfc3339(i.last_used),
        "use_count": i.use_count,
        "pinned": i.pinned,
        "origin": i.origin,
    })
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

/// Runs `cimage images`.
pub async fn list(socket: &Path, args: ListArgs) -> Result<(), Failure> {
    let mut client = connect(socket).await?;
    let mut images = client
        .list_images(pb::ListImagesRequest {})
        .await?
        .into_inner()
        .images;
    images.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.id.cmp(&b.id)));
    if args.output == Output::Json {
        let all: Vec<Value> = images.iter().map(image_json).collect();
        println!("{}", Value::Array(all));
        return Ok(());
    }
    println!(
        "{:<12}  {:>10}  {:>5}  {:<20}  {:<6}  {:<7}  NAMES",
        "ID", "SIZE", "USES", "LAST USED", "PINNED", "ORIGIN"
    );
    for i in &images {
        let names = if i.names.is_empty() {
            "<none>".to_owned()
        } else {
            i.names.join(",")
        };
        println!(
            "{:<12}  {:>10}  {:>5}  {:<20}  {:<6}  {:<7}  {}",
            short_id(&i.id),
            human_size(i.size),
            i.use_count,
            rfc3339(i.last_used).unwrap_or_else(|| "never".into()),
            if i.pinned { "yes" } else { "no" },
            i.origin,
            names
        );
    }
    Ok(())
}

/// Runs `cimage inspect`.
pub async fn inspect(socket: &Path, args: InspectArgs) -> Result<(), Failure> {
    check_image_arg(&args.image, true)?;
    let mut client = connect(socket).await?;
    let i = client
        .inspect_image(pb::InspectImageRequest { image: args.image })
        .await?
        .into_inner();
    match args.output {
        Output::Json => println!("{}", image_json(&i)),
        Output::Table => {
            println!("id:         {}", i.id);
            println!("names:      {}", i.names.join(", "));
            println!("digests:    {}", i.digests.join(", "));
            println!("size:       {} ({} bytes)", human_size(i.size), i.size);
            println!(
                "first seen: {}",
                rfc3339(i.first_seen).unwrap_or_else(|| "-".into())
            );
            println!(
                "last used:  {}",
                rfc3339(i.last_used).unwrap_or_else(|| "never".into())
            );
            println!("use count:  {}", i.use_count);
            println!("pinned:     {}", if i.pinned { "yes" } else { "no" });
            println!("origin:     {}", i.origin);
        }
    }
    Ok(())
}
