//! `cimage images` and `cimage inspect`: what the node holds.

use std::path::Path;

use cimage::api::pb;
use serde_json::Value;

use cimage::reference::ImageRef;

use crate::{check_image_arg, connect, human_size, rfc3339, when, Failure, Output};

/// Arguments of `cimage images`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only images of this repository (REPO) or this reference (REPO:TAG), e.g.
    /// 127.0.0.1:5000/app or busybox:1.
    filter: Option<String>,
    /// Print image ids only, one per line.
    #[arg(long, short)]
    quiet: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// Arguments of `cimage inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// Image reference, image id or manifest digest (sha256:…), or id prefix (6+ hex digits).
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

/// An image as `images -o json` and `inspect -o json` print it (keys in alphabetical order).
/// Serialised straight from the answer: a node's list can hold ten thousand images.
#[derive(serde::Serialize)]
pub struct ImageJson<'a> {
    digest: &'a str,
    digests: &'a [String],
    first_seen: Option<String>,
    id: &'a str,
    last_used: Option<String>,
    names: &'a [String],
    origin: &'a str,
    pinned: bool,
    size_bytes: u64,
    use_count: u64,
}

impl<'a> From<&'a pb::Image> for ImageJson<'a> {
    fn from(i: &'a pb::Image) -> Self {
        ImageJson {
            digest: digest(i),
            digests: &i.digests,
            first_seen: rfc3339(i.first_seen),
            id: &i.id,
            last_used: rfc3339(i.last_used),
            names: &i.names,
            origin: &i.origin,
            pinned: i.pinned,
            size_bytes: i.size,
            use_count: i.use_count,
        }
    }
}

/// An image as a JSON value (for documents that embed one).
pub fn image_json(i: &pb::Image) -> Value {
    serde_json::to_value(ImageJson::from(i)).expect("plain data serialises")
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

/// What `cimage images REPO[:TAG]` keeps: a repository, or one reference of it.
struct Filter {
    repo: String,
    tag: Option<String>,
}

impl Filter {
    fn parse(arg: &str) -> Result<Self, Failure> {
        let r = ImageRef::parse(arg).map_err(|e| Failure::usage(e.to_string()))?;
        // A tag given explicitly narrows to that reference; a bare repository keeps every tag.
        let last = arg.rsplit('/').next().unwrap_or(arg);
        let tagged = last.contains(':') || arg.contains('@');
        let full = r.to_string();
        let repo = full
            .split('@')
            .next()
            .map(|n| match n.rfind(':') {
                Some(c) if c > n.rfind('/').unwrap_or(0) => n[..c].to_owned(),
                _ => n.to_owned(),
            })
            .unwrap_or_default();
        Ok(Self {
            tag: tagged.then_some(full),
            repo,
        })
    }

    fn matches(&self, name: &str) -> bool {
        match &self.tag {
            Some(full) => name == full,
            None => name
                .strip_prefix(&self.repo)
                .is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@')),
        }
    }
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
    if let Some(f) = &args.filter {
        let wanted = Filter::parse(f)?;
        images.retain(|i| i.names.iter().any(|n| wanted.matches(n)));
    }
    if args.quiet {
        for i in &images {
            println!("{}", i.id);
        }
        return Ok(());
    }
    if args.output == Output::Json {
        use std::io::Write;
        let all: Vec<ImageJson> = images.iter().map(ImageJson::from).collect();
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        serde_json::to_writer(&mut out, &all)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
            .and_then(|()| out.flush())
            .map_err(|e| Failure::new(format!("writing output: {e}")))?;
        return Ok(());
    }
    println!(
        "{:<12}  {:>10}  {:>5}  {:<26}  {:<6}  {:<7}  NAMES",
        "ID", "SIZE", "USES", "LAST USED", "PINNED", "ORIGIN"
    );
    for i in &images {
        let names = if i.names.is_empty() {
            "<none>".to_owned()
        } else {
            i.names.join(",")
        };
        println!(
            "{:<12}  {:>10}  {:>5}  {:<26}  {:<6}  {:<7}  {}",
            short_id(&i.id),
            human_size(i.size),
            i.use_count,
            when(i.last_used),
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
            println!("first seen: {}", when(i.first_seen));
            println!("last used:  {}", when(i.last_used));
            println!("use count:  {}", i.use_count);
            println!("pinned:     {}", if i.pinned { "yes" } else { "no" });
            println!("origin:     {}", i.origin);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_repository_or_reference() {
        let by_repo = Filter::parse("127.0.0.1:5000/app").unwrap();
        assert!(by_repo.matches("127.0.0.1:5000/app:1"));
        assert!(by_repo.matches("127.0.0.1:5000/app:2"));
        assert!(!by_repo.matches("127.0.0.1:5000/apple:1"));
        let by_tag = Filter::parse("127.0.0.1:5000/app:2").unwrap();
        assert!(!by_tag.matches("127.0.0.1:5000/app:1"));
        assert!(by_tag.matches("127.0.0.1:5000/app:2"));
        let hub = Filter::parse("busybox").unwrap();
        assert!(hub.matches("docker.io/library/busybox:1"));
        assert!(Filter::parse("Bad:Ref:x").is_err());
    }
}
