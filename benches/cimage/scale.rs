//! A node with a large cache and a long history: 10,000 images in the runtime and 100,000
//! finished tasks in cimaged's store. The images are real containerd images, imported with
//! `ctr` from one OCI archive made here: 10,000 distinct configs over one shared layer, so they
//! are 10,000 image ids that cost a few MiB of disk. The tasks are seeded through the store
//! while cimaged is stopped. Measured side by side: the runtime's own `ListImages` and cimaged's
//! start-up (reconciliation and recovery), `cimage images -o json`, and idle memory.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::ListImagesRequest;
use sha2::{Digest, Sha256};

use cimage::launcher::store::{TaskRecord, TaskStore};

use crate::rig::*;

/// Images imported into the runtime.
const IMAGES: usize = 10_000;
/// Finished tasks seeded into the history.
const TASKS: usize = 100_000;
/// Samples of each listing.
const LISTINGS: usize = 11;

/// Adds a blob to an OCI layout archive; returns its digest.
fn blob(tar: &mut tar::Builder<Vec<u8>>, data: &[u8]) -> String {
    let hex = format!("{:x}", Sha256::digest(data));
    put(tar, &format!("blobs/sha256/{hex}"), data);
    format!("sha256:{hex}")
}

fn put(tar: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, path, data).unwrap();
}

/// An OCI layout archive of `n` images named `{prefix}{i}:1` that share one small layer;
/// with their image ids (config digests).
fn archive(prefix: &str, n: usize) -> (Vec<u8>, Vec<String>) {
    let mut layer = tar::Builder::new(Vec::new());
    put(&mut layer, "scale.txt", b"one layer for many images\n");
    let raw = layer.into_inner().unwrap();
    let diff_id = format!("sha256:{:x}", Sha256::digest(&raw));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    let gz = gz.finish().unwrap();

    let mut tar = tar::Builder::new(Vec::new());
    let layer_digest = blob(&mut tar, &gz);
    let mut manifests = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": {"bench.scale.index": i.to_string()}},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        })
        .to_string();
        let config_digest = blob(&mut tar, config.as_bytes());
        ids.push(config_digest.clone());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": gz.len(),
            }],
        })
        .to_string();
        let manifest_digest = blob(&mut tar, manifest.as_bytes());
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"io.containerd.image.name": format!("{prefix}{i}:1")},
        }));
    }
    put(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests}).to_string();
    put(&mut tar, "index.json", index.as_bytes());
    (tar.into_inner().unwrap(), ids)
}

/// `ctr` against the testbed's containerd, in the CRI namespace.
fn ctr(cri: &str, args: &[&str]) {
    let out = Command::new("ctr")
        .args(["-a", cri, "-n", "k8s.io"])
        .args(args)
        .output()
        .expect("ctr (from the containerd package)");
    assert!(
        out.status.success(),
        "ctr {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) async fn scale(cri: &str, registry: &str, run: &str) {
    let prefix = format!("{registry}/bench-scale-{run}/img");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("images.tar");
    let (tar, ids) = archive(&prefix, IMAGES);
    std::fs::write(&file, tar).unwrap();
    let t = Instant::now();
    ctr(
        cri,
        &["images", "import", "--no-unpack", file.to_str().unwrap()],
    );
    eprintln!(
        "bench: imported {IMAGES} images with ctr in {:?}",
        t.elapsed()
    );

    // The runtime's own listing.
    let mut raw = ImageServiceClient::new(cimage::cri::unix_channel(std::path::Path::new(cri)))
        .max_decoding_message_size(64 << 20);
    // containerd's CRI plugin learns of imported images from events, shortly after.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = raw
            .list_images(ListImagesRequest::default())
            .await
            .expect("the runtime's ListImages")
            .into_inner();
        if r.images.len() >= IMAGES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the runtime lists {} images",
            r.images.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut raw_list = Vec::new();
    let mut listed = 0;
    for _ in 0..LISTINGS {
        let t = Instant::now();
        let r = raw
            .list_images(ListImagesRequest::default())
            .await
            .expect("the runtime's ListImages")
            .into_inner();
        raw_list.push(t.elapsed());
        listed = r.images.len();
    }
    assert!(listed >= IMAGES, "the runtime lists {listed} images");

    // A daemon whose history holds TASKS past steps (pruning pushed past the run).
    let extra = "History:\n  Keep: 100000d\n  MaxTasks: 1000000";
    let mut daemon = Daemon::start_with(cri, registry, extra);
    let deadline = Instant::now() + Duration::from_secs(120);
    while daemon.occurrences("launcher recovered its tasks") == 0 {
        assert!(Instant::now() < deadline, "the daemon never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.stop();
    let store = cimage::store::Store::open(&daemon.index_path()).expect("the bench daemon's index");
    let tasks = TaskStore::open(&store).unwrap();
    let image = format!("{registry}/busybox:1");
    for chunk in (0..TASKS).collect::<Vec<_>>().chunks(10_000) {
        let batch: Vec<TaskRecord> = chunk
            .iter()
            .map(|&i| crate::history::past(i, &image))
            .collect();
        tasks.put_tasks(&batch).unwrap();
    }
    drop(tasks);
    drop(store);

    let marks = [
        "index reconciled with the runtime",
        "launcher recovered its tasks",
    ];
    let before: Vec<usize> = marks.iter().map(|m| daemon.occurrences(m)).collect();
    let t = Instant::now();
    daemon.respawn();
    let deadline = Instant::now() + Duration::from_secs(120);
    while marks
        .iter()
        .zip(&before)
        .any(|(m, n)| daemon.occurrences(m) == *n)
    {
        assert!(Instant::now() < deadline, "the daemon never got ready");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let startup = t.elapsed();

    // `cimage images -o json` as an admin would type it, beside the runtime's ListImages.
    let mut cli = Vec::new();
    let mut shown = 0;
    for _ in 0..LISTINGS {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_cimage"))
            .args(["images", "-o", "json"])
            .env("CIMAGE_SOCKET", &daemon.socket)
            .output()
            .unwrap();
        cli.push(t.elapsed());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        shown = v.as_array().map_or(0, |a| a.len());
    }
    assert!(shown >= IMAGES, "cimage images shows {shown} images");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = daemon.rss_kib();

    let list = percentile(&mut raw_list, 0.5);
    let cli = percentile(&mut cli, 0.5);
    row(
        "cimage images -o json, 10,000 images (p50)",
        format!("{:.1} ms", ms(cli)),
        format!("{:.1} ms", ms(list)),
        format!("{:+.1} ms", ms(cli) - ms(list)),
        "<= 50 ms",
    );
    row(
        "  start-up, 10,000 images + 100,000 tasks",
        format!("{:.0} ms", ms(startup)),
        format!("{:.0} ms", ms(list)),
        format!("{:+.0} ms", ms(startup) - ms(list)),
        "+<= 1 s beyond ListImages",
    );
    row(
        "  resident memory, idle, with that state",
        format!("{:.1} MiB", rss as f64 / 1024.0),
        "-".into(),
        "-".into(),
        "<= 50 MiB",
    );
    daemon.stop();

    // Leave the runtime as it was: the names, and the id references its CRI plugin added.
    let names: Vec<String> = (0..IMAGES)
        .map(|i| format!("{prefix}{i}:1"))
        .chain(ids)
        .collect();
    for chunk in names.chunks(1000) {
        let mut args = vec!["images", "rm"];
        args.extend(chunk.iter().map(String::as_str));
        ctr(cri, &args);
    }
}
