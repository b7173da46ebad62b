//! Builds small OCI images in memory and pushes them to the testbed registry with oci-client.
//! Each image can carry a layer of random bytes so that it is cold (no blob shared with any other
//! image) — what pull-counting tests and the benchmark need — and symlinks and `VOLUME`s in its
//! config, which is what hostile images use to move a mount elsewhere.

use std::io::Write;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{IMAGE_CONFIG_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

/// The path that marks a [`Layer::tarball`]: no file of a real layer has it.
const TARBALL: &str = "\0tarball";

/// One layer: a tar of (path, contents, mode) entries; a mode of type symlink (`0o120777`)
/// makes a symlink to the path in contents.
pub struct Layer(pub Vec<(String, Vec<u8>, u32)>);

impl Layer {
    /// busybox-static as /bin/busybox plus the applets the tests use, and /etc/passwd.
    pub fn busybox() -> Self {
        let bb = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static) is needed");
        let mut entries = vec![("bin/busybox".to_owned(), bb, 0o755)];
        entries.push((
            "etc/passwd".into(),
            b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
            0o644,
        ));
        entries.push(("etc/group".into(), b"root:x:0:\n".to_vec(), 0o644));
        Layer(entries)
    }

    /// A file of `bytes` random bytes, which makes the layer unique.
    pub fn random(bytes: usize) -> Self {
        let mut data = vec![0u8; bytes];
        rand::fill(&mut data[..]);
        Layer(vec![(
            format!("data/{:016x}", rand::random::<u64>()),
            data,
            0o644,
        )])
    }

    /// A symlink at `path` (no leading slash) to `target`, as an entry of a [`Layer`].
    pub fn symlink(path: &str, target: &str) -> (String, Vec<u8>, u32) {
        (path.to_owned(), target.as_bytes().to_vec(), 0o120777)
    }

    /// A layer that is this tar archive as it is (a root filesystem made elsewhere).
    pub fn tarball(tar: Vec<u8>) -> Self {
        Layer(vec![(TARBALL.to_owned(), tar, 0)])
    }

    fn tar(&self, symlinks: bool) -> Vec<u8> {
        if let [(path, data, _)] = &self.0[..] {
            if path == TARBALL {
                return data.clone();
            }
        }
        let mut b = tar::Builder::new(Vec::new());
        for (path, data, mode) in &self.0 {
            if mode & 0o170000 == 0o120000 {
                // A symlink: its contents name the target.
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                h.set_mtime(0);
                let target = String::from_utf8(data.clone()).unwrap();
                b.append_link(&mut h, path, target).unwrap();
                continue;
            }
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, path, &data[..]).unwrap();
        }
        if symlinks && self.0.iter().any(|(p, _, _)| p == "bin/busybox") {
            for applet in [
                "sh", "sleep", "echo", "cat", "id", "pwd", "ps", "env", "true", "false", "ls",
                "kill", "wc", "head", "seq", "printf", "date", "test", "grep", "touch", "mkdir",
            ] {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                h.set_mtime(0);
                b.append_link(&mut h, format!("bin/{applet}"), "busybox")
                    .unwrap();
            }
        }
        b.into_inner().unwrap()
    }
}

/// The result of a push.
pub struct Pushed {
    /// `127.0.0.1:5000/repo:tag`.
    pub reference: String,
    /// The repository it was pushed to.
    pub repo: String,
    /// Manifest digest.
    pub digest: String,
    /// Digests of the layer and config blobs.
    pub blobs: Vec<String>,
    /// Bytes of the layer and config blobs as stored (what the runtime reports as its size).
    pub size: u64,
    /// Bytes of the layer blobs alone (what a pull's progress counts).
    pub layer_bytes: u64,
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Pushes an image made of `layers` to `registry` (plain HTTP) as `repo:tag`.
pub async fn push(registry: &str, repo: &str, tag: &str, layers: &[Layer], cmd: &[&str]) -> Pushed {
    push_with(registry, repo, tag, layers, cmd, None).await
}

/// Where and how to push to a private registry: credentials, and HTTPS with this CA if given
/// (plain HTTP otherwise).
pub struct Private<'a> {
    /// PEM CA file, for an HTTPS registry.
    pub ca: Option<&'a std::path::Path>,
    /// User name.
    pub username: &'a str,
    /// Password.
    pub password: &'a str,
}

/// Pushes as [`push`] does, to a private registry when `private` is given.
pub async fn push_with(
    registry: &str,
    repo: &str,
    tag: &str,
    layers: &[Layer],
    cmd: &[&str],
    private: Option<Private<'_>>,
) -> Pushed {
    push_image(registry, repo, tag, layers, cmd, &[], private).await
}

/// Pushes as [`push`] does, with `volumes` as the config's `Volumes` (what a Dockerfile's
/// `VOLUME` lines make; containerd's CRI creates them for each container unless told not to).
pub async fn push_with_volumes(
    registry: &str,
    repo: &str,
    layers: &[Layer],
    cmd: &[&str],
    volumes: &[&str],
) -> Pushed {
    push_image(registry, repo, "1", layers, cmd, volumes, None).await
}

async fn push_image(
    registry: &str,
    repo: &str,
    tag: &str,
    layers: &[Layer],
    cmd: &[&str],
    volumes: &[&str],
    private: Option<Private<'_>>,
) -> Pushed {
    let mut oci_layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut blobs = Vec::new();
    let mut size = 0u64;
    let mut layer_bytes = 0u64;
    for l in layers {
        let raw = l.tar(true);
        diff_ids.push(sha(&raw));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let gz = gz.finish().unwrap();
        blobs.push(sha(&gz));
        size += gz.len() as u64;
        layer_bytes += gz.len() as u64;
        oci_layers.push(ImageLayer::new(
            gz,
            IMAGE_LAYER_GZIP_MEDIA_TYPE.to_string(),
            None,
        ));
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut image_config =
        serde_json::json!({ "Env": ["PATH=/bin"], "Cmd": cmd, "WorkingDir": "/" });
    if !volumes.is_empty() {
        // The OCI form: a map from each path to an empty object.
        let v: serde_json::Map<String, serde_json::Value> = volumes
            .iter()
            .map(|p| (p.to_string(), serde_json::json!({})))
            .collect();
        image_config["Volumes"] = serde_json::Value::Object(v);
    }
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": image_config,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config = serde_json::to_vec(&config).unwrap();
    blobs.push(sha(&config));
    size += config.len() as u64;
    let (client, auth) = match &private {
        None => (
            Client::new(ClientConfig {
                protocol: ClientProtocol::Http,
                ..Default::default()
            }),
            RegistryAuth::Anonymous,
        ),
        Some(p) => (
            Client::new(match p.ca {
                Some(ca) => ClientConfig {
                    protocol: ClientProtocol::Https,
                    extra_root_certificates: vec![oci_client::client::Certificate {
                        encoding: oci_client::client::CertificateEncoding::Pem,
                        data: std::fs::read(ca).expect("reading the testbed CA"),
                    }],
                    ..Default::default()
                },
                None => ClientConfig {
                    protocol: ClientProtocol::Http,
                    ..Default::default()
                },
            }),
            RegistryAuth::Basic(p.username.into(), p.password.into()),
        ),
    };
    let reference: Reference = format!("{registry}/{repo}:{tag}").parse().unwrap();
    client
        .push(
            &reference,
            &oci_layers,
            Config::new(config, IMAGE_CONFIG_MEDIA_TYPE.to_string(), None),
            &auth,
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("pushing {reference}: {e}"));
    let digest = client
        .fetch_manifest_digest(&reference, &auth)
        .await
        .unwrap();
    Pushed {
        reference: reference.whole(),
        repo: repo.to_owned(),
        digest,
        blobs,
        size,
        layer_bytes,
    }
}
