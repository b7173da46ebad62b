//! cimaged as the node's CRI image endpoint, called the way Craned and kubelet call it: a
//! `runtime.v1.ImageService` gRPC client on cimaged's image socket, against the testbed's real
//! containerd and registry, its answers compared with containerd's own.

mod common;

use std::time::Duration;

use common::images::Layer;
use common::*;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ListImagesRequest,
    PullImageRequest, RemoveImageRequest,
};
use tonic::transport::Channel;

fn client(socket: &std::path::Path) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(cimage::cri::unix_channel(socket))
}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

/// As Craned sends it: an AuthConfig always, empty when it has no credentials.
fn pull(image: &str) -> PullImageRequest {
    PullImageRequest {
        image: spec(image),
        auth: Some(AuthConfig::default()),
        sandbox_config: None,
    }
}

fn status(image: &str) -> ImageStatusRequest {
    ImageStatusRequest {
        image: spec(image),
        verbose: false,
    }
}

/// GETs of `blob` from the registry since `mark`: one per runtime pull of an image none of
/// whose blobs the runtime has.
fn blob_gets(tb: &Testbed, mark: u64, repo: &str, blob: &str) -> usize {
    tb.registry_requests_since(mark, repo)
        .iter()
        .filter(|r| r.starts_with("GET ") && r.ends_with(blob))
        .count()
}

/// Waits until the registry's log has caught up with what was asked of it so far: sends a
/// request of its own for `repo` (its tag list) and waits for that request in the log, which
/// the registry writes once each request is answered.
fn registry_log_caught_up(tb: &Testbed, mark: u64, repo: &str) {
    use std::io::{Read, Write};
    let marker = format!("GET /v2/{repo}/tags/list");
    let before = tb
        .registry_requests_since(mark, repo)
        .iter()
        .filter(|r| **r == marker)
        .count();
    let mut conn = std::net::TcpStream::connect(&tb.registry).unwrap();
    write!(
        conn,
        "GET /v2/{repo}/tags/list HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        tb.registry
    )
    .unwrap();
    conn.read_to_end(&mut Vec::new()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen = tb.registry_requests_since(mark, repo);
        if seen.iter().filter(|r| **r == marker).count() > before {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the registry never logged {marker}: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn use_count(d: &Daemon, id: &str) -> u64 {
    let out = d.cli(&["images", "-o", "json"]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"].as_str() == Some(id))
        .map(|i| i["use_count"].as_u64().unwrap())
        .unwrap_or(0)
}

#[test]
fn the_endpoint_answers_as_containerd_does_and_counts_uses() {
    let d = Daemon::start("");
    let tb = &d.testbed;
    let img = tb.push_new("cri-basic", &[Layer::busybox(), Layer::random(4096)]);
    block_on(async {
        let mut ours = client(&d.cri_socket());
        let mut theirs = client(&tb.cri);
        // kubelet and crictl check the endpoint with ImageFsInfo first.
        let a = ours.image_fs_info(ImageFsInfoRequest {}).await.unwrap();
        let b = theirs.image_fs_info(ImageFsInfoRequest {}).await.unwrap();
        assert_eq!(
            a.get_ref().image_filesystems.len(),
            b.get_ref().image_filesystems.len()
        );
        // Absent: the runtime's own "no image".
        let s = ours.image_status(status(&img.reference)).await.unwrap();
        assert!(s.get_ref().image.is_none());
        let id = ours
            .pull_image(pull(&img.reference))
            .await
            .unwrap()
            .into_inner()
            .image_ref;
        assert!(id.starts_with("sha256:"), "{id}");
        let s = ours.image_status(status(&img.reference)).await.unwrap();
        let t = theirs.image_status(status(&img.reference)).await.unwrap();
        assert_eq!(
            s.get_ref().image,
            t.get_ref().image,
            "containerd's own answer"
        );
        assert_eq!(s.get_ref().image.as_ref().unwrap().id, id);
        let listed = ours
            .list_images(ListImagesRequest { filter: None })
            .await
            .unwrap();
        assert!(listed.get_ref().images.iter().any(|i| i.id == id));
        // The pull and the status right after it on one connection are one use; a status on a
        // new connection (Craned's next step) is another.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(use_count(&d, &id), 1);
        let mut next_step = client(&d.cri_socket());
        assert!(next_step
            .image_status(status(&img.reference))
            .await
            .unwrap()
            .get_ref()
            .image
            .is_some());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(use_count(&d, &id), 2);
        // A pinned image is not removed; unpinned, it goes from the runtime and the index.
        assert!(d.cli(&["pin", &img.reference]).status.success());
        let e = ours
            .remove_image(RemoveImageRequest { image: spec(&id) })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("pinned"), "{}", e.message());
        assert!(d.cli(&["unpin", &img.reference]).status.success());
        ours.remove_image(RemoveImageRequest { image: spec(&id) })
            .await
            .unwrap();
        let t = theirs.image_status(status(&img.reference)).await.unwrap();
        assert!(t.get_ref().image.is_none(), "removed from containerd");
        assert_eq!(use_count(&d, &id), 0, "and from the index");
    });
}

#[test]
fn twenty_concurrent_pulls_of_a_cold_image_make_one_runtime_pull() {
    let d = Daemon::start("");
    let tb = &d.testbed;
    let img = tb.push_new("cri-herd", &[Layer::random(4 << 20)]);
    let mark = tb.registry_log_mark();
    let ids = block_on(async {
        let pulls = (0..20).map(|_| {
            // A connection each, as Craned's supervisors have.
            let mut c = client(&d.cri_socket());
            let r = pull(&img.reference);
            async move { c.pull_image(r).await.map(|r| r.into_inner().image_ref) }
        });
        futures::future::join_all(pulls).await
    });
    let first = ids[0].as_ref().unwrap().clone();
    assert!(
        ids.iter().all(|i| i.as_ref().ok() == Some(&first)),
        "{ids:?}"
    );
    registry_log_caught_up(tb, mark, &img.repo);
    for blob in &img.blobs {
        assert_eq!(blob_gets(tb, mark, &img.repo, blob), 1, "{blob}");
    }
}

#[test]
fn a_pull_outlives_a_client_whose_deadline_passed_and_its_retry_joins_it() {
    let d = Daemon::start("");
    let tb = &d.testbed;
    let img = tb.push_new("cri-deadline", &[Layer::random(128 << 20)]);
    let mark = tb.registry_log_mark();
    block_on(async {
        let mut c = client(&d.cri_socket());
        let mut req = tonic::Request::new(pull(&img.reference));
        req.set_timeout(Duration::from_millis(300));
        let e = c.pull_image(req).await.unwrap_err();
        // Go clients see DeadlineExceeded; tonic's own timer reports Cancelled.
        assert!(
            matches!(
                e.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            "{e:?}"
        );
        // Craned's retry, on a new connection.
        let mut again = client(&d.cri_socket());
        let id = again
            .pull_image(pull(&img.reference))
            .await
            .unwrap()
            .into_inner()
            .image_ref;
        assert!(id.starts_with("sha256:"));
    });
    registry_log_caught_up(tb, mark, &img.repo);
    // One pull's worth: each byte of each blob served once (the big layer in ranges, by
    // cimage's own fetch; the rest in one GET each).
    for blob in &img.blobs {
        let served: u64 = common::blob_gets(&tb.registry_log, mark, blob)
            .iter()
            .map(|g| g.bytes)
            .sum();
        assert_eq!(
            served,
            stored_size(&tb.dir.join("registry"), blob),
            "one pull: {blob}"
        );
    }
}

#[test]
fn a_config_shared_with_craned_names_cimageds_socket_as_the_image_endpoint() {
    // Craned and cimaged read one file; its ImageEndpoint is cimaged's socket, and cimaged
    // itself goes to the runtime.
    let mut d = Daemon::start("");
    d.kill9();
    let cfg = std::fs::read_to_string(d.config_path()).unwrap();
    let shared = cfg.replacen(
        "  RuntimeEndpoint:",
        &format!(
            "  ImageEndpoint: unix://{}\n  RuntimeEndpoint:",
            d.cri_socket().display()
        ),
        1,
    );
    std::fs::write(d.config_path(), shared).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cimaged"))
        .args([
            "--config",
            d.config_path().to_str().unwrap(),
            "--check-config",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("image endpoint:   {}", d.testbed.cri.display())),
        "{text}"
    );
    // The daemon started on that file serves the endpoint.
    d.spawn();
    let img = d.testbed.push_new("cri-shared", &[Layer::busybox()]);
    let id = block_on(async {
        client(&d.cri_socket())
            .pull_image(pull(&img.reference))
            .await
            .unwrap()
            .into_inner()
            .image_ref
    });
    assert!(id.starts_with("sha256:"));
}

#[test]
fn under_systemd_the_socket_waits_for_cimaged_and_readiness_is_told() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // The config of a daemon that is then stopped: what a socket unit and a service would run.
    let mut d = Daemon::start("");
    d.kill9();
    let _ = std::fs::remove_file(d.cri_socket());
    // systemd's part: the listening socket, and the notification socket.
    let listener = std::os::unix::net::UnixListener::bind(d.cri_socket()).unwrap();
    let notify_path = d.dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // A client (Craned starting a step) connects before cimaged runs; its call waits.
    let socket = d.cri_socket();
    let early = std::thread::spawn(move || {
        block_on(async {
            let mut c = client(&socket);
            let mut req = tonic::Request::new(ImageFsInfoRequest {});
            req.set_timeout(Duration::from_secs(30));
            c.image_fs_info(req).await.map(|r| r.into_inner())
        })
    });
    std::thread::sleep(Duration::from_millis(300));
    let fd = listener.as_raw_fd();
    let log = std::fs::File::create(d.dir.path().join("activated.log")).unwrap();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_cimaged"))
        .arg(d.config_path())
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: only dup2 or fcntl between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec: clear it instead.
            let rc = match fd {
                3 => libc::fcntl(3, libc::F_SETFD, 0),
                _ => libc::dup2(fd, 3),
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut buf = [0u8; 64];
    let n = notify.recv(&mut buf);
    let answered = early.join().unwrap();
    // The socket stays for the next start, as systemd holds it.
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(d.dir.path().join("activated.log")).unwrap();
    let n = n.unwrap_or_else(|e| panic!("no readiness ({e}):\n{log}"));
    assert_eq!(&buf[..n], b"READY=1");
    let info = answered.unwrap_or_else(|e| panic!("{e:?}\n{log}"));
    assert!(!info.image_filesystems.is_empty());
    assert!(log.contains("CRI image socket from systemd"), "{log}");
    assert!(d.cri_socket().exists());
}

#[test]
fn credentials_of_a_cri_pull_work_in_every_form_and_never_leak() {
    let tb = Testbed::get();
    let repo = Testbed::unique_repo("cri-private");
    let (user, pw) = tb.alice.clone();
    let pushed = block_on(common::images::push_with(
        &tb.private_registry,
        &repo,
        "1",
        &[Layer::random(1024)],
        &["sh"],
        Some(common::images::Private {
            ca: Some(&tb.ca),
            username: &user,
            password: &pw,
        }),
    ));
    let d = Daemon::start(&format!(
        "Registries:\n  \"{}\":\n    Insecure: true\n  \"{}\":\n    CaFile: {}\n",
        tb.registry,
        tb.private_registry,
        tb.ca.display()
    ));
    let encoded = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    };
    block_on(async {
        let mut c = client(&d.cri_socket());
        // Without credentials: refused, as containerd would.
        let e = c.pull_image(pull(&pushed.reference)).await.unwrap_err();
        assert!(!e.message().contains(&pw));
        for auth in [
            AuthConfig {
                username: user.clone(),
                password: pw.clone(),
                ..Default::default()
            },
            AuthConfig {
                auth: encoded.clone(),
                server_address: tb.private_registry.clone(),
                ..Default::default()
            },
        ] {
            let mut req = pull(&pushed.reference);
            req.auth = Some(auth);
            let id = c.pull_image(req).await.unwrap().into_inner().image_ref;
            assert!(id.starts_with("sha256:"));
        }
        // A wrong password is refused, and its refusal quotes no secret either.
        let mut wrong = pull(&pushed.reference);
        wrong.auth = Some(AuthConfig {
            username: user.clone(),
            password: "wrong-password-cri".into(),
            ..Default::default()
        });
        let e = c.pull_image(wrong).await.unwrap_err();
        assert!(
            !e.message().contains("wrong-password-cri"),
            "{}",
            e.message()
        );
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_no_secret(&d, &[&pw, &encoded, "wrong-password-cri"]);
}
