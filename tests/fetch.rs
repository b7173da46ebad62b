//! cimage's own range fetch of big layers (`ImageCache.ParallelFetch`) against the real
//! containerd and docker-registry: a big layer comes in `206` ranges from cimage and never
//! whole from containerd, each of its bytes once, and the image runs; a registry that ignores
//! `Range` still pulls (one stream); a corrupt range is fetched again; basic auth over TLS;
//! a runtime without containerd's content API pulls through plain `PullImage`; and nothing of
//! cimage's fetch (lease, ingest) outlives the pull or a `kill -9`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::images::{push, push_with, Layer, Private};
use common::proxy::{Fault, Proxy};
use common::shaper::{Shape, Shaper};
use common::*;

const MIB: usize = 1 << 20;

/// `ctr -n k8s.io leases ls` of the testbed's containerd.
fn leases(tb: &Testbed) -> String {
    ctr_k8s(tb, &["leases", "ls"])
}

/// The lines of [`leases`] that are cimage's leases for pulls of `repo` (their label
/// `cimage.io/fetch` names the image): the tests run side by side on one containerd, and one of
/// them leaves a lease to expire.
fn leases_of(tb: &Testbed, repo: &str) -> String {
    leases(tb)
        .lines()
        .filter(|l| l.contains("cimage.io/fetch=") && l.contains(repo))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `ctr -n k8s.io content active` of the testbed's containerd: the ingests under way.
fn ingests(tb: &Testbed) -> String {
    ctr_k8s(tb, &["content", "active"])
}

/// Waits until `what` holds, up to `limit` (the states are the runtime's own; no timing is
/// asserted).
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes an image from the runtime so that the next test starts cold.
fn remove(d: &Daemon, image: &str) {
    let _ = d.cli(&["rm", image]);
}

#[test]
fn a_big_layer_comes_in_ranges_each_byte_once_and_the_image_runs() {
    let tb = Testbed::get();
    let shaper = Shaper::start(
        &tb.registry,
        Shape::far(Duration::from_millis(2), 40_000_000, 400_000_000),
    )
    .plain_http_for_containerd(&tb.dir);
    let repo = Testbed::unique_repo("fetch-ranges");
    let pushed = block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[
            Layer::busybox(),
            Layer::random(96 * MIB),
            Layer::random(64 << 10),
        ],
        &["/bin/busybox", "true"],
    ));
    let big = pushed.blobs[1].clone();
    let size = stored_size(&tb.dir.join("registry"), &big);
    assert!(size > 96 * MIB as u64);
    let d = Daemon::start(&proxied_registries(&tb, &shaper.addr));
    let image = format!("{}/{repo}:1", shaper.addr);
    let mark = tb.registry_log_mark();
    let j = d.pull_json(&image, None);
    assert_eq!(j["action"], "pulled", "{j}");

    let gets = blob_gets(&tb.registry_log, mark, &big);
    assert!(
        gets.iter()
            .all(|g| g.status == 206 && g.agent.starts_with("cimage/")),
        "only cimage's ranges fetch the big layer: {gets:?}"
    );
    assert!(gets.len() > 1, "in several ranges: {gets:?}");
    assert_eq!(
        gets.iter().map(|g| g.bytes).sum::<u64>(),
        size,
        "each byte once: {gets:?}"
    );
    assert!(
        shaper.peak_connections() > 2,
        "several connections at once ({})",
        shaper.peak_connections()
    );
    // The small layers are the runtime's.
    let small = blob_gets(&tb.registry_log, mark, &pushed.blobs[2]);
    assert!(
        small.iter().all(|g| g.agent.starts_with("containerd")),
        "{small:?}"
    );

    let out = run(&d, &[&image], &["/bin/busybox", "true"]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    assert!(leases_of(&tb, &repo).is_empty(), "{}", leases(&tb));
    assert!(!ingests(&tb).contains(&big), "{}", ingests(&tb));
    remove(&d, &image);
}

#[test]
fn a_registry_that_ignores_range_still_pulls_in_one_stream() {
    let tb = Testbed::get();
    let proxy = Proxy::start(&tb, &tb.registry, 0);
    let repo = Testbed::unique_repo("fetch-norange");
    let pushed = block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[Layer::busybox(), Layer::random(40 * MIB)],
        &["/bin/busybox", "true"],
    ));
    let big = pushed.blobs[1].clone();
    proxy.fault("/blobs/", Fault::StripRange, 0);
    let d = Daemon::start(&proxied_registries(&tb, &proxy.addr));
    let image = format!("{}/{repo}:1", proxy.addr);
    let mark = tb.registry_log_mark();
    let j = d.pull_json(&image, None);
    assert_eq!(j["action"], "pulled", "{j}");
    let gets = blob_gets(&tb.registry_log, mark, &big);
    assert_eq!(gets.len(), 1, "one stream: {gets:?}");
    assert_eq!(gets[0].status, 200);
    assert!(gets[0].agent.starts_with("cimage/"), "{gets:?}");
    assert!(leases_of(&tb, &repo).is_empty(), "{}", leases(&tb));
    remove(&d, &image);
}

#[test]
fn a_corrupt_range_is_fetched_again() {
    let tb = Testbed::get();
    let proxy = Proxy::start(&tb, &tb.registry, 0);
    let repo = Testbed::unique_repo("fetch-corrupt");
    let pushed = block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[Layer::busybox(), Layer::random(40 * MIB)],
        &["/bin/busybox", "true"],
    ));
    let big = pushed.blobs[1].clone();
    proxy.fault(&big, Fault::Corrupt, 1);
    let d = Daemon::start(&proxied_registries(&tb, &proxy.addr));
    let image = format!("{}/{repo}:1", proxy.addr);
    let mark = tb.registry_log_mark();
    let j = d.pull_json(&image, None);
    assert_eq!(j["action"], "pulled", "{j}");
    let gets = blob_gets(&tb.registry_log, mark, &big);
    let size = stored_size(&tb.dir.join("registry"), &big);
    assert!(
        gets.iter().all(|g| g.agent.starts_with("cimage/")),
        "{gets:?}\n{}",
        d.log()
    );
    assert_eq!(
        gets.iter().map(|g| g.bytes).sum::<u64>(),
        2 * size,
        "fetched twice, by cimage: {gets:?}\n{}",
        d.log()
    );
    assert!(d.log().contains("does not match its digest"), "{}", d.log());
    let out = run(&d, &[&image], &["/bin/busybox", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    remove(&d, &image);
}

#[test]
fn a_blob_corrupt_every_time_fails_the_pull_naming_registry_and_digest() {
    let tb = Testbed::get();
    let proxy = Proxy::start(&tb, &tb.registry, 0);
    let repo = Testbed::unique_repo("fetch-corrupt2");
    let pushed = block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[Layer::busybox(), Layer::random(40 * MIB)],
        &["/bin/busybox", "true"],
    ));
    let big = pushed.blobs[1].clone();
    // Every read of the blob is corrupted (each range, both passes).
    proxy.fault(&big, Fault::Corrupt, 0);
    let d = Daemon::start(&proxied_registries(&tb, &proxy.addr));
    let image = format!("{}/{repo}:1", proxy.addr);
    let out = d.cli(&["pull", &image]);
    assert!(!out.status.success(), "{}", d.log());
    let err = stderr(&out);
    assert!(
        err.lines().last().is_some_and(|l| l.starts_with("cimage: ")
            && l.contains(&big)
            && l.contains(&proxy.addr)),
        "{err:?}"
    );
    wait_for(Duration::from_secs(30), "the ingest to go", || {
        !ingests(&tb).contains(&big)
    });
    assert!(leases_of(&tb, &repo).is_empty(), "{}", leases(&tb));
    // The next pull of the same image succeeds.
    proxy.heal();
    let j = d.pull_json(&image, None);
    assert_eq!(j["action"], "pulled", "{j}");
    remove(&d, &image);
}

#[test]
fn basic_auth_over_tls_fetches_in_ranges() {
    let tb = Testbed::get();
    let repo = Testbed::unique_repo("fetch-private");
    let p = block_on(push_with(
        &tb.private_registry,
        &repo,
        "1",
        &[Layer::busybox(), Layer::random(40 * MIB)],
        &["/bin/busybox", "true"],
        Some(Private {
            ca: Some(&tb.ca),
            username: &tb.alice.0,
            password: &tb.alice.1,
        }),
    ));
    let big = p.blobs[1].clone();
    let d = Daemon::start(&format!(
        "Registries:\n  \"{}\":\n    Insecure: true\n  \"{}\":\n    CaFile: {}",
        tb.registry,
        tb.private_registry,
        tb.ca.display()
    ));
    let log = tb.dir.join("registry-private.log");
    let mark = log_mark(&log);
    let (user, pw) = &tb.alice;
    let out = d.cli_stdin(
        &[
            "pull",
            &p.reference,
            "--username",
            user,
            "--password-stdin",
            "-o",
            "json",
        ],
        &format!("{pw}\n"),
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), d.log());
    let gets = blob_gets(&log, mark, &big);
    assert!(
        !gets.is_empty()
            && gets
                .iter()
                .all(|g| g.status == 206 && g.agent.starts_with("cimage/")),
        "{gets:?}"
    );
    assert_no_secret(&d, &[pw]);
    remove(&d, &p.reference);
}

#[test]
fn a_runtime_without_the_content_api_pulls_through_plain_pull_image() {
    let tb = Testbed::get();
    // The other cimaged pulls plainly: what reaches the registry is containerd's own fetch.
    let upstream = Daemon::start("ParallelFetch:\n    Enabled: false");
    let repo = Testbed::unique_repo("fetch-nocontent");
    let pushed = block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[Layer::busybox(), Layer::random(40 * MIB)],
        &["/bin/busybox", "true"],
    ));
    let big = pushed.blobs[1].clone();
    // This daemon's runtime is the other cimaged's CRI image socket: CRI, and no content API.
    let d = Daemon::start(&format!(
        "ParallelFetch:\n    Enabled: true\nImageService.Upstream: {}",
        upstream.cri_socket().display()
    ));
    let mark = tb.registry_log_mark();
    let j = d.pull_json(&pushed.reference, None);
    assert_eq!(j["action"], "pulled", "{j}");
    let gets = blob_gets(&tb.registry_log, mark, &big);
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert!(
        gets[0].status == 200 && gets[0].agent.starts_with("containerd"),
        "{gets:?}"
    );
    assert!(
        d.log().contains("does not answer containerd's content API"),
        "{}",
        d.log()
    );
    remove(&d, &pushed.reference);
}

/// A pull whose cimaged is killed mid-fetch: the registry behind a slow shaper, a 48 MiB layer.
struct Killed {
    tb: Testbed,
    shaper: Shaper,
    repo: String,
    /// The big layer's digest.
    big: String,
    image: String,
    daemon: Daemon,
}

/// Pushes an image with a 48 MiB layer, starts a pull of it through a daemon with
/// `PullTimeout: {pull_timeout}`, and kills the daemon (`kill -9`) once cimage's ingest of the
/// layer shows; `check` looks at the runtime (given the repository) while the fetch still runs.
fn kill_mid_fetch<T>(
    prefix: &str,
    pull_timeout: &str,
    check: impl FnOnce(&Testbed, &str) -> T,
) -> (Killed, T) {
    let tb = Testbed::get();
    let shaper = Shaper::start(
        &tb.registry,
        Shape::far(Duration::from_millis(2), 2_000_000, 8_000_000),
    )
    .plain_http_for_containerd(&tb.dir);
    let repo = Testbed::unique_repo(prefix);
    let pushed = block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[Layer::busybox(), Layer::random(48 * MIB)],
        &["/bin/busybox", "true"],
    ));
    let big = pushed.blobs[1].clone();
    let mut daemon = Daemon::start(&format!(
        "PullTimeout: {pull_timeout}\n{}",
        proxied_registries(&tb, &shaper.addr)
    ));
    let image = format!("{}/{repo}:1", shaper.addr);
    let mut pull = Command::new(env!("CARGO_BIN_EXE_cimage"))
        .args(["pull", &image])
        .env("CIMAGE_SOCKET", daemon.socket())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "cimage's ingest of the big layer",
        || ingests(&tb).contains(&big),
    );
    let seen = check(&tb, &repo);
    daemon.kill9();
    let _ = pull.wait();
    let killed = Killed {
        tb,
        shaper,
        repo,
        big,
        image,
        daemon,
    };
    (killed, seen)
}

#[test]
fn kill_9_mid_fetch_leaves_nothing_that_blocks_the_next_pull() {
    let (k, ()) = kill_mid_fetch("fetch-kill", "20s", |tb, repo| {
        assert!(!leases_of(tb, repo).is_empty(), "{}", leases(tb));
    });
    let Killed {
        tb,
        shaper,
        repo,
        image,
        daemon: mut d,
        ..
    } = k;
    shaper.reshape(Shape::none());
    d.spawn();
    // The lease of the killed daemon goes (at start-up, or by its expiry).
    wait_for(Duration::from_secs(60), "the lease to go", || {
        leases_of(&tb, &repo).is_empty()
    });
    let j = d.pull_json(&image, None);
    assert_eq!(j["action"], "pulled", "{j}");
    let out = run(&d, &[&image], &["/bin/busybox", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(leases_of(&tb, &repo).is_empty(), "{}", leases(&tb));
    remove(&d, &image);
}

#[test]
fn the_lease_of_a_killed_daemon_goes_by_its_expiry_alone() {
    // The lease is made to outlive the pull's deadline by 10 s: 15 s here.
    let (k, ours) = kill_mid_fetch("fetch-expiry", "5s", |tb, repo| {
        let mine = leases_of(tb, repo);
        let ours: Vec<String> = mine
            .lines()
            .map(|l| l.split_whitespace().next().unwrap().to_owned())
            .collect();
        assert_eq!(ours.len(), 1, "one lease for the pull: {}", leases(tb));
        assert!(mine.contains("containerd.io/gc.expire="), "{mine}");
        (ours, Instant::now())
    });
    let (ours, killed_at) = ours;
    let Killed {
        tb,
        shaper,
        big,
        image,
        ..
    } = k;
    // Not restarted: no daemon deletes that lease. Past its expiry, the runtime's next
    // garbage collection (run here by a synchronous image removal) removes it.
    std::thread::sleep(Duration::from_secs(16).saturating_sub(killed_at.elapsed()));
    shaper.reshape(Shape::none());
    let other = Daemon::start(&proxied_registries(&tb, &shaper.addr));
    let small = tb.push_new("fetch-expiry-gc", &[Layer::random(1024)]);
    assert_eq!(other.pull_json(&small.reference, None)["action"], "pulled");
    // (Checked: a removal that failed would leave the garbage collection unrun.)
    ctr_k8s(&tb, &["images", "rm", "--sync", &small.reference]);
    assert!(
        !ctr_images(&tb).contains(&small.reference),
        "the synchronous removal failed"
    );
    let left = leases(&tb);
    assert!(
        !ours.iter().any(|id| left.contains(id.as_str())),
        "the expired lease is still there: {left}"
    );
    // Nothing of it blocks the next pull, by another daemon.
    let j = other.pull_json(&image, None);
    assert_eq!(j["action"], "pulled", "{j}\n{}", other.log());
    let out = run(&other, &[&image], &["/bin/busybox", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!ingests(&tb).contains(&big), "{}", ingests(&tb));
    remove(&other, &image);
}

#[test]
fn a_range_answered_429_waits_its_retry_after_and_the_blob_still_comes_in_ranges() {
    let tb = Testbed::get();
    let proxy = Proxy::start(&tb, &tb.registry, 0);
    let repo = Testbed::unique_repo("fetch-429");
    let pushed = block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[Layer::busybox(), Layer::random(40 * MIB)],
        &["/bin/busybox", "true"],
    ));
    let big = pushed.blobs[1].clone();
    let size = stored_size(&tb.dir.join("registry"), &big);
    // The first two reads of the big layer (cimage's first range, opened before any other)
    // are told to come back in a second.
    let pattern = format!("/blobs/{big}");
    proxy.fault(
        &pattern,
        Fault::Status {
            code: 429,
            retry_after: Some(1),
        },
        2,
    );
    let d = Daemon::start(&proxied_registries(&tb, &proxy.addr));
    let image = format!("{}/{repo}:1", proxy.addr);
    let mark = tb.registry_log_mark();
    let t = Instant::now();
    let j = d.pull_json(&image, None);
    assert_eq!(j["action"], "pulled", "{j}\n{}", d.log());
    assert_eq!(proxy.hits(&pattern), 2);
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "both Retry-After waited ({:?})",
        t.elapsed()
    );
    let gets = blob_gets(&tb.registry_log, mark, &big);
    assert!(
        gets.len() > 1
            && gets
                .iter()
                .all(|g| g.status == 206 && g.agent.starts_with("cimage/")),
        "cimage's ranges after the waits, none by the runtime: {gets:?}"
    );
    assert_eq!(gets.iter().map(|g| g.bytes).sum::<u64>(), size, "{gets:?}");
    remove(&d, &image);
}

#[test]
fn big_layers_are_read_in_ranges_through_the_registrys_mirror() {
    let tb = Testbed::get();
    // The registry as the node names it, and a mirror of it (both in front of the testbed's).
    let named = Proxy::start(&tb, &tb.registry, 0);
    let mirror = Proxy::start(&tb, &tb.registry, 0);
    let repo = Testbed::unique_repo("fetch-mirror");
    let pushed = block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[Layer::busybox(), Layer::random(40 * MIB)],
        &["/bin/busybox", "true"],
    ));
    let big = pushed.blobs[1].clone();
    let d = Daemon::start(&format!(
        "Registries:\n  \"{}\":\n    Insecure: true\n  \"{n}\":\n    Insecure: true\n    Mirrors: [\"{m}\"]\n  \"{m}\":\n    Insecure: true",
        tb.registry,
        n = named.addr,
        m = mirror.addr
    ));
    let image = format!("{}/{repo}:1", named.addr);
    let j = d.pull_json(&image, None);
    assert_eq!(j["action"], "pulled", "{j}\n{}", d.log());
    let of_big = |p: &Proxy| {
        p.requests()
            .into_iter()
            .filter(|r| r.starts_with("GET ") && r.contains(&big))
            .count()
    };
    assert!(
        of_big(&mirror) > 1,
        "the big layer's ranges went to the mirror: {:?}",
        mirror.requests()
    );
    assert_eq!(
        of_big(&named),
        0,
        "and none to the registry: {:?}",
        named.requests()
    );
    let out = run(&d, &[&image], &["/bin/busybox", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    remove(&d, &image);
}

#[test]
fn a_blob_redirected_to_another_host_is_read_there_in_ranges() {
    let tb = Testbed::get();
    // Every request to this front is answered 307 to the same path at the registry (another
    // host:port): as a registry that sends blob GETs on to object storage.
    let front = common::nginx_mirror::Redirector::start(&tb.registry);
    let hosts = tb.dir.join("containerd/certs.d").join(&front.addr);
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"http://{a}\"\n[host.\"http://{a}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            a = front.addr
        ),
    )
    .unwrap();
    let repo = Testbed::unique_repo("fetch-redirect");
    let pushed = block_on(push(
        &tb.registry,
        &repo,
        "1",
        &[Layer::busybox(), Layer::random(40 * MIB)],
        &["/bin/busybox", "true"],
    ));
    let big = pushed.blobs[1].clone();
    let size = stored_size(&tb.dir.join("registry"), &big);
    let d = Daemon::start(&proxied_registries(&tb, &front.addr));
    let image = format!("{}/{repo}:1", front.addr);
    let mark = tb.registry_log_mark();
    let j = d.pull_json(&image, None);
    let _ = std::fs::remove_dir_all(&hosts);
    assert_eq!(j["action"], "pulled", "{j}\n{}", d.log());
    let gets = blob_gets(&tb.registry_log, mark, &big);
    assert!(
        gets.len() > 1
            && gets
                .iter()
                .all(|g| g.status == 206 && g.agent.starts_with("cimage/")),
        "cimage's ranges at the host the blob was sent on to: {gets:?}"
    );
    assert_eq!(gets.iter().map(|g| g.bytes).sum::<u64>(), size, "{gets:?}");
    let redirected = front
        .paths
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.contains(&big))
        .count();
    assert_eq!(
        redirected, 1,
        "one redirect for the blob: the later ranges go straight where the first was led"
    );
    let out = run(&d, &[&image], &["/bin/busybox", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    remove(&d, &image);
}
