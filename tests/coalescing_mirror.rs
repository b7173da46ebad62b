//! The shipped site mirror (`contrib/mirror/nginx.conf.template`, nginx with `slice` and
//! `proxy_cache_lock`) in front of a registry that redirects its blob GETs: three containerd
//! clients pulling one image at the same moment get the right bytes, and the registry serves
//! each blob once.

mod common;

use common::images::{push, Layer};
use common::nginx_mirror::{blob_responses, blob_size, mirror_dir, NginxMirror, Redirector};
use common::*;
use std::process::Command;

/// Namespaces of the testbed's containerd: each fetches for itself, as a node of its own would
/// (containerd shares no content between namespaces), and is removed with its images at the end.
struct Namespaces<'a> {
    tb: &'a Testbed,
    names: Vec<String>,
    image: String,
}

impl Namespaces<'_> {
    fn ctr(&self, ns: &str, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.tb.cri)
            .args(["-n", ns])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Namespaces<'_> {
    fn drop(&mut self) {
        for ns in &self.names {
            self.ctr(ns, &["images", "rm", "--sync", &self.image]);
            self.ctr(ns, &["content", "prune", "references"]);
            Command::new("ctr")
                .arg("--address")
                .arg(&self.tb.cri)
                .args(["namespaces", "rm", ns])
                .output()
                .ok();
        }
    }
}

#[test]
fn three_concurrent_pulls_through_the_site_mirror_fetch_each_blob_once_upstream() {
    let tb = Testbed::get();
    let repo = Testbed::unique_repo("coalesce");
    // 40 MiB: three slices of the mirror's 16 MiB.
    let pushed = block_on(push(
        &tb.upstream,
        &repo,
        "1",
        &[Layer::random(40 << 20), Layer::random(1 << 20)],
        &["sh"],
    ));
    let sizes: Vec<(String, u64)> = pushed
        .blobs
        .iter()
        .map(|d| (d.clone(), blob_size(&tb.upstream, &repo, d)))
        .collect();
    let redirector = Redirector::start(&tb.upstream);
    let cache = mirror_dir();
    let mirror = NginxMirror::start(cache.path(), &format!("http://{}", redirector.addr));
    let mark = log_mark(&tb.upstream_log);

    let image = format!("{}/{repo}:1", mirror.addr);
    let tag = &repo[repo.len() - 8..];
    let nss = Namespaces {
        tb: &tb,
        names: (0..3).map(|i| format!("coalesce-{tag}-{i}")).collect(),
        image: image.clone(),
    };
    let pulls: Vec<_> = nss
        .names
        .iter()
        .map(|ns| {
            let (cri, ns, image) = (tb.cri.clone(), ns.clone(), image.clone());
            std::thread::spawn(move || {
                Command::new("ctr")
                    .arg("--address")
                    .arg(&cri)
                    .args(["-n", &ns, "images", "pull", "--plain-http", &image])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for p in pulls {
        let out = p.join().unwrap();
        assert!(out.status.success(), "ctr pull failed: {}", stderr(&out));
    }
    // Each client fetched every blob from the mirror...
    let asked = mirror.client_requests();
    for (digest, _) in &sizes {
        let gets = asked
            .iter()
            .filter(|(r, s)| r.starts_with("GET ") && r.ends_with(digest.as_str()) && *s == 200)
            .count();
        assert_eq!(gets, 3, "client GETs of {digest} at the mirror: {asked:?}");
    }
    // ...through the registry's redirects, followed inside the mirror...
    assert!(
        redirector
            .redirects
            .load(std::sync::atomic::Ordering::SeqCst)
            >= sizes.len() as u64,
        "the mirror did not go through the redirecting front"
    );
    // ...and the registry served each blob's bytes once.
    for (digest, size) in &sizes {
        let served = blob_responses(&tb.upstream_log, mark, digest);
        let bytes: u64 = served.iter().map(|(_, b)| b).sum();
        assert!(
            served.iter().all(|(s, _)| *s == 200 || *s == 206),
            "{digest}: {served:?}"
        );
        assert_eq!(
            bytes, *size,
            "bytes served upstream for {digest}: {served:?}"
        );
    }
    // Each namespace holds the image with its content verified by containerd.
    for ns in &nss.names {
        let out = nss.ctr(ns, &["images", "check"]);
        assert!(stdout(&out).contains("complete"), "{}", stdout(&out));
    }

    // A range inside the second slice is served from the cache, byte for byte.
    let big = &sizes.iter().max_by_key(|(_, s)| *s).unwrap().0;
    let mark = log_mark(&tb.upstream_log);
    let part = |host: &str| {
        Command::new("curl")
            .args(["-sf", "-r", "17000000-17000999"])
            .arg(format!("http://{host}/v2/{repo}/blobs/{big}"))
            .output()
            .unwrap()
            .stdout
    };
    let cached = part(&mirror.addr);
    assert!(
        blob_responses(&tb.upstream_log, mark, big).is_empty(),
        "a cached slice went upstream again"
    );
    assert_eq!(cached.len(), 1000);
    assert_eq!(
        cached,
        part(&tb.upstream),
        "the mirror's range differs from the registry's"
    );
}
