//! HTTP/2 abuse of cimaged's sockets, sent as raw frames the way any member of the socket's
//! group can: requests announced whole and held one byte short, a reset loop, a CONTINUATION
//! frame that announces 16 MiB. What one uid can make the daemon hold is measured from
//! `/proc/<pid>/status` (VmRSS); what it costs the log, from the log file's size.

mod common;

use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cimage::api::pb;
use common::h2raw::*;
use common::*;

/// An ordinary user (`nobody:nogroup`); the test daemons give the API socket to `nogroup`.
const NOBODY: (u32, u32) = (65534, 65534);
const STATUS: &str = "/cimage.v1.ImageCache/Status";
const MIB: u64 = 1 << 20;

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
}

/// Waits for `what` with a bound far past anything a working daemon needs, so a regression
/// fails instead of hanging.
async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: still waiting after 120 s"))
}

/// A gRPC message announcing 1 MiB, one byte short of it.
fn one_byte_short() -> Vec<u8> {
    let mut m = grpc_prefix(1 << 20);
    m.resize(5 + (1 << 20) - 1, 0x55);
    m
}

#[test]
fn half_sent_requests_of_one_uid_hold_at_most_its_budget_and_status_answers() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "SocketGroup: nogroup\nMetricsAddr: 127.0.0.1:{port}"
    ));
    let pid = d.child.as_ref().unwrap().id();
    assert!(d.cli(&["status"]).status.success());
    let idle = rss_kib(pid);
    let rt = runtime(4);
    let connector = Connector::as_user(&d.socket(), NOBODY.0, NOBODY.1);
    let conns: Vec<Raw> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(Raw::start(connector.connect().unwrap(), true).await);
        }
        v
    });
    let user_streams = conns[0].seen(|s| s.setting(MAX_CONCURRENT_STREAMS));
    let root = rt.block_on(Raw::start(
        StdUnixStream::connect(d.socket()).unwrap(),
        true,
    ));
    let admin_streams = root.seen(|s| s.setting(MAX_CONCURRENT_STREAMS));
    drop(root);
    // 8 connections × 64 calls, each announcing 1 MiB, sent one byte short and held.
    let message = one_byte_short();
    rt.block_on(async {
        let sends = conns.iter().map(|c| {
            let message = &message;
            async move {
                for i in 0..64u32 {
                    let id = 2 * i + 1;
                    if !c.open(id, STATUS).await {
                        break;
                    }
                    c.send_data(id, message, false).await;
                }
                // Everything sent has been read by the server.
                assert!(c.ping().await, "the connection stays up");
            }
        });
        within("sending", futures::future::join_all(sends)).await;
    });
    let held = rss_kib(pid);
    // Root is served meanwhile.
    let started = Instant::now();
    let status = d.cli(&["status", "-o", "json"]);
    let answered_in = started.elapsed();
    assert!(status.status.success(), "{}", stderr(&status));
    let page = scrape(port);
    let over_budget = series(
        &page,
        "cimage_requests_refused_total{reason=\"over_budget\"}",
    );
    let grown_mib = held.saturating_sub(idle) as f64 / 1024.0;
    eprintln!(
        "VmRSS idle {idle} KiB, with the requests held {held} KiB (+{grown_mib:.1} MiB); \
         status answered in {answered_in:?}; {over_budget} requests refused over budget"
    );
    drop(conns);
    // The budget (64 MiB by default) and what the streams themselves cost.
    assert!(
        grown_mib < 64.0 + 32.0,
        "one uid's held requests grew cimaged by {grown_mib:.1} MiB"
    );
    assert!(over_budget > 0.0, "{page}");
    // An ordinary user's connection carries 16 calls at once; root's, 64.
    assert_eq!(user_streams, Some(16));
    assert_eq!(admin_streams, Some(64));
}

#[test]
fn a_request_held_past_the_read_timeout_is_ended_and_its_bytes_given_back() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "SocketGroup: nogroup\nRequestReadTimeout: 2s\nMaxRequestBytesPerUser: 2MiB\nMetricsAddr: 127.0.0.1:{port}"
    ));
    let rt = runtime(2);
    let connector = Connector::as_user(&d.socket(), NOBODY.0, NOBODY.1);
    let conn = rt.block_on(Raw::start(connector.connect().unwrap(), true));
    rt.block_on(within("the held request to end", async {
        // One request held one byte short takes most of the uid's 2 MiB.
        assert!(conn.open(1, STATUS).await);
        assert!(conn.send_data(1, &one_byte_short(), false).await);
        assert!(conn.ping().await);
        // A second is refused as soon as its prefix announces another MiB.
        assert!(conn.open(3, STATUS).await);
        conn.send_data(3, &grpc_prefix(1 << 20), false).await;
        conn.wait(|s| s.ended.contains(&3)).await;
        // The first is ended once it has waited RequestReadTimeout.
        conn.wait(|s| s.ended.contains(&1)).await;
    }));
    // Its bytes are given back: the same user's next call is served.
    let out = d.cli_as(Some(NOBODY), &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = scrape(port);
    assert_eq!(
        series(
            &page,
            "cimage_requests_refused_total{reason=\"read_timeout\"}"
        ),
        1.0,
        "{page}"
    );
    assert_eq!(
        series(
            &page,
            "cimage_requests_refused_total{reason=\"over_budget\"}"
        ),
        1.0,
        "{page}"
    );
    drop(conn);
}

#[test]
fn legitimate_clients_never_notice_the_bounds() {
    let d = Daemon::start("SocketGroup: nogroup");
    let rt = runtime(4);
    let img = busybox(&d.testbed);
    rt.block_on(async {
        // 50 concurrent pulls over one connection of root's.
        let client = cimage::api::client(&d.socket());
        let pulls = (0..50).map(|_| {
            let mut c = client.clone();
            let image = img.clone();
            async move {
                c.pull(pb::PullRequest {
                    image,
                    policy: pb::PullPolicy::IfNotPresent as i32,
                    credentials: None,
                })
                .await
            }
        });
        for r in futures::future::join_all(pulls).await {
            r.unwrap();
        }
        // 40 concurrent calls over one connection of an ordinary user's: 16 at a time, the
        // rest wait in the client's HTTP/2 library.
        let connector = Connector::as_user(&d.socket(), NOBODY.0, NOBODY.1);
        let stream = connector.connect().unwrap();
        stream.set_nonblocking(true).unwrap();
        let slot = Arc::new(Mutex::new(Some(
            tokio::net::UnixStream::from_std(stream).unwrap(),
        )));
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let s = slot.lock().unwrap().take();
                async move {
                    s.map(hyper_util::rt::TokioIo::new)
                        .ok_or_else(|| std::io::Error::other("one connection only"))
                }
            }))
            .await
            .unwrap();
        let client = pb::image_cache_client::ImageCacheClient::new(channel);
        let calls = (0..40).map(|_| {
            let mut c = client.clone();
            async move { c.status(pb::StatusRequest::default()).await }
        });
        for r in futures::future::join_all(calls).await {
            r.unwrap();
        }
    });
    // And the CLI, as that user and as root.
    assert!(d.cli_as(Some(NOBODY), &["status"]).status.success());
    assert!(d.cli(&["images"]).status.success());
}

#[test]
fn a_reset_loop_from_eight_threads_adds_at_most_a_few_hundred_bytes_of_log() {
    let port = free_port();
    // The daemon's own log level, as a node runs it.
    let d = Daemon::start_with_env(
        &format!("SocketGroup: nogroup\nMetricsAddr: 127.0.0.1:{port}"),
        &[("CIMAGE_LOG", "")],
    );
    let before = std::fs::metadata(d.log_path()).unwrap().len();
    let rt = runtime(8);
    let socket = d.socket();
    let connections: u64 = rt.block_on(async {
        let end = Instant::now() + Duration::from_secs(6);
        let loops = (0..8).map(|_| {
            let socket = socket.clone();
            tokio::spawn(async move {
                let connector = Connector::as_user(&socket, NOBODY.0, NOBODY.1);
                let mut connections = 0u64;
                while Instant::now() < end {
                    let Some(stream) = connector.connect() else {
                        continue;
                    };
                    let raw = Raw::start(stream, false).await;
                    connections += 1;
                    // Streams opened and reset at once, until the server gives up on us.
                    let mut id = 1u32;
                    loop {
                        let mut burst = Vec::new();
                        for _ in 0..32 {
                            burst.extend(frame(
                                HEADERS,
                                END_HEADERS,
                                id,
                                &grpc_request_block(STATUS),
                            ));
                            burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
                            id += 2;
                        }
                        if !raw.write(&burst).await
                            || raw.seen(|s| s.goaway.is_some() || s.closed)
                            || Instant::now() >= end
                        {
                            break;
                        }
                    }
                }
                connections
            })
        });
        futures::future::join_all(loops)
            .await
            .into_iter()
            .map(Result::unwrap)
            .sum()
    });
    // Status answers afterwards, and the log grew by a line or two.
    assert!(d.cli(&["status"]).status.success());
    let after = std::fs::metadata(d.log_path()).unwrap().len();
    let log = d.log();
    let added = &log[before as usize..];
    let page = scrape(port);
    let floods = series(&page, "cimage_connections_refused_total{reason=\"flood\"}");
    eprintln!(
        "{connections} connections in 6 s; the log grew by {} bytes; {floods} counted as floods:\n{}",
        after - before,
        added.chars().take(2000).collect::<String>()
    );
    assert!(
        after - before < 1024,
        "the reset loop added {} bytes of log",
        after - before
    );
    assert!(floods > 0.0, "{page}");
}

/// The 24-bit length of a frame header set to `len`.
fn announcing(mut head: Vec<u8>, len: usize) -> Vec<u8> {
    head[0..3].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
    head
}

#[test]
fn an_oversized_continuation_on_the_cri_socket_is_refused_at_its_header() {
    let d = Daemon::start("");
    let pid = d.child.as_ref().unwrap().id();
    let idle = rss_kib(pid);
    let rt = runtime(4);
    let announced = (16 << 20) - 1;
    let results = rt.block_on(within(
        "the server to end the connections",
        futures::future::join_all((0..8).map(|_| async {
            let raw = Raw::start(StdUnixStream::connect(d.cri_socket()).unwrap(), true).await;
            let block = grpc_request_block("/runtime.v1.ImageService/ListImages");
            // A header block begun, and a CONTINUATION that announces 16 MiB.
            assert!(raw.send(HEADERS, 0, 1, &block[..8]).await);
            assert!(
                raw.write(&announcing(
                    frame(CONTINUATION, END_HEADERS, 1, &[]),
                    announced
                ))
                .await
            );
            let chunk = vec![0u8; 64 << 10];
            let mut sent = 0;
            while sent < announced {
                let n = chunk.len().min(announced - sent);
                if !raw.write(&chunk[..n]).await {
                    break;
                }
                sent += n;
            }
            raw.wait(|s| s.closed || s.goaway.is_some()).await;
            (sent, raw.seen(|s| s.goaway))
        })),
    ));
    let peak = rss_kib(pid);
    let grown_mib = peak.saturating_sub(idle) as f64 / 1024.0;
    eprintln!("VmRSS {idle} → {peak} KiB (+{grown_mib:.1} MiB); sent before the end: {results:?}");
    for (sent, goaway) in &results {
        assert_eq!(*goaway, Some(FRAME_SIZE_ERROR));
        assert!(
            (*sent as u64) < 4 * MIB,
            "{sent} bytes of the frame were taken before the connection was refused"
        );
    }
    assert!(grown_mib < 16.0, "cimaged grew by {grown_mib:.1} MiB");
    // The socket still serves.
    rt.block_on(async {
        k8s_cri::v1::image_service_client::ImageServiceClient::new(cimage::cri::unix_channel(
            &d.cri_socket(),
        ))
        .list_images(k8s_cri::v1::ListImagesRequest::default())
        .await
        .unwrap()
    });
}

#[test]
fn the_cri_socket_serves_its_cap_of_connections_and_the_next_waits_its_turn() {
    let d = Daemon::start("ImageService.MaxConnections: 4");
    let rt = runtime(2);
    let mut held: Vec<Raw> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(Raw::start(StdUnixStream::connect(d.cri_socket()).unwrap(), true).await);
        }
        v
    });
    // A fifth connects (the listen queue holds it) but is not served while four are open.
    let fifth = rt.block_on(Raw::start(
        StdUnixStream::connect(d.cri_socket()).unwrap(),
        false,
    ));
    let told = "the CRI image socket serves its 4 connections";
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.log().contains(told) {
        assert!(
            Instant::now() < deadline,
            "no word of the cap:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(fifth.seen(|s| s.settings.is_empty() && !s.closed));
    // One closes: the fifth is served.
    drop(held.pop());
    rt.block_on(within(
        "the fifth connection to be served",
        fifth.wait(|s| !s.settings.is_empty()),
    ));
    assert!(rt.block_on(fifth.ping()));
}

/// An `Exec` request as the wire carries it: the gRPC prefix and the message.
fn exec_message(task: &str, command: &[&str]) -> Vec<u8> {
    use prost::Message;
    let m = pb::ExecRequest {
        task_id: task.to_owned(),
        command: command.iter().map(|s| s.to_string()).collect(),
        timeout_seconds: 0,
    }
    .encode_to_vec();
    let mut out = grpc_prefix(m.len() as u32);
    out.extend(m);
    out
}

#[test]
fn answers_a_user_does_not_read_hold_at_most_their_share_of_the_daemon() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "SocketGroup: nogroup\nMetricsAddr: 127.0.0.1:{port}\nLauncher.AllowUserLaunch: true"
    ));
    let pid = d.child.as_ref().unwrap().id();
    let img = busybox(&d.testbed);
    let nobody = Some(NOBODY);
    let out = d.cli_as(
        nobody,
        &["run", "--detach", "--image", &img, "--", "sleep", "300"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let task = stdout(&out).trim().to_owned();
    // The step is running once an exec in it answers.
    let until = Instant::now() + Duration::from_secs(30);
    while !d
        .cli_as(nobody, &["exec", &task, "--", "true"])
        .status
        .success()
    {
        assert!(Instant::now() < until, "the step never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
    let idle = rss_kib(pid);
    // 4 connections × 16 calls, each a command that prints 4 MB, whose answers are never read
    // past the stream's first window.
    let rt = runtime(4);
    let connector = Connector::as_user(&d.socket(), NOBODY.0, NOBODY.1);
    let message = exec_message(&task, &["head", "-c", "4000000", "/dev/zero"]);
    let conns: Vec<Raw> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(Raw::start(connector.connect().unwrap(), true).await);
        }
        v
    });
    const EXEC: &str = "/cimage.v1.Launcher/Exec";
    rt.block_on(async {
        let calls = conns.iter().map(|c| {
            let message = &message;
            async move {
                for i in 0..16u32 {
                    let id = 2 * i + 1;
                    assert!(c.open(id, EXEC).await);
                    assert!(c.send_data(id, message, true).await);
                }
                assert!(c.ping().await, "the connection stays up");
            }
        });
        within("sending", futures::future::join_all(calls)).await;
    });
    // Every call beyond the user's 16 was refused at once; the 16 wait on their reader.
    let page = || scrape(port);
    let refused = || {
        series(
            &page(),
            "cimage_requests_refused_total{reason=\"too_many_answers\"}",
        )
    };
    let until = Instant::now() + Duration::from_secs(60);
    while refused() < 48.0 {
        assert!(Instant::now() < until, "refused: {}; {}", refused(), page());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let the 16 commands finish and their answers wait on the client.
    std::thread::sleep(Duration::from_secs(3));
    let held = rss_kib(pid);
    let grown_mib = held.saturating_sub(idle) as f64 / 1024.0;
    eprintln!("VmRSS idle {idle} KiB, with 64 unread exec answers asked for {held} KiB (+{grown_mib:.1} MiB)");
    let open = conns
        .iter()
        .map(|c| {
            c.seen(|s| {
                (1..32)
                    .step_by(2)
                    .filter(|id| !s.ended.contains(id))
                    .count()
            })
        })
        .sum::<usize>();
    assert_eq!(open, 16, "the user's answers in flight");
    // 16 answers of 4 MB each at most, and what the calls themselves cost.
    assert!(
        grown_mib < 16.0 * 4.0 + 48.0,
        "unread answers of one uid grew cimaged by {grown_mib:.1} MiB"
    );
    // Once those connections are gone, the user's answers are free again.
    drop(conns);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let out = d.cli_as(nobody, &["exec", &task, "--", "echo", "free"]);
        if out.status.success() && stdout(&out).contains("free") {
            break;
        }
        assert!(Instant::now() < until, "{}", stderr(&out));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(d.cli(&["cancel", &task]).status.success());
    // The step's container and pod are gone before the daemon stops.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ps: serde_json::Value =
            serde_json::from_slice(&d.cli(&["ps", "-a", "-o", "json"]).stdout).unwrap();
        let cleaned = ps
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == task.as_str() && t["cleaned_up"] == true);
        if cleaned {
            break;
        }
        assert!(Instant::now() < until, "task {task} not cleaned up: {ps}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
