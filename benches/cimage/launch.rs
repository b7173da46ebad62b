//! Launch-to-exit of a trivial task: the `cimage run` process and the gRPC `Launch` stream
//! against the raw CRI sequence.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cimage::api::pb;

use super::rig::*;

pub(crate) const LAUNCHES: usize = 30;

/// One gRPC `Launch` of `true` as uid 65534 on `image`, followed to its cleanup; fails unless
/// the step exited 0.
pub(crate) async fn launch_true(
    launcher: &mut pb::launcher_client::LauncherClient<tonic::transport::Channel>,
    image: &str,
) -> Result<(), String> {
    use futures::StreamExt;
    let mut stream = launcher
        .launch(pb::LaunchRequest {
            image: image.to_owned(),
            policy: pb::PullPolicy::IfNotPresent as i32,
            command: vec!["true".into()],
            uid: Some(65534),
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let mut code = None;
    while let Some(ev) = stream.next().await {
        match ev.map_err(|e| e.to_string())?.event {
            Some(pb::task_event::Event::Exited(x)) => code = Some(x.exit_code),
            Some(pb::task_event::Event::CleanedUp(_)) => break,
            _ => {}
        }
    }
    match code {
        Some(0) => Ok(()),
        other => Err(format!("step ended with {other:?}")),
    }
}

/// [`launch_true`], timed from the request to the cleanup.
pub(crate) async fn grpc_launch(
    launcher: &mut pb::launcher_client::LauncherClient<tonic::transport::Channel>,
    image: &str,
) -> Duration {
    let t = Instant::now();
    launch_true(launcher, image).await.expect("Launch of true");
    t.elapsed()
}

/// Launch-to-exit of `true` on a warm busybox image: raw CRI sequence, cimage's gRPC `Launch`,
/// and the `cimage run` CLI, interleaved so that drift hits all three alike. The raw sequence goes
/// through cimage's CRI adapter, whose calls map one to one onto CRI requests, with the same pod
/// and container shape and the same 5 ms status polling.
pub(crate) async fn launches(
    daemon: &Daemon,
    cri_path: &str,
    registry: &str,
) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>) {
    use cimage::runtime::{ContainerSpec, ContainerState, PodSpec, TaskRuntime};
    let image = format!("{registry}/busybox:1");
    let rt = cimage::cri::CriTaskRuntime::new(Path::new(cri_path), Duration::from_secs(30));
    let mut api = cimage::api::client(&daemon.socket);
    api.pull(pb::PullRequest {
        image: image.clone(),
        policy: pb::PullPolicy::IfNotPresent as i32,
        credentials: None,
    })
    .await
    .unwrap();
    let image_id = api
        .inspect_image(pb::InspectImageRequest {
            image: image.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    let logs = tempfile::tempdir().unwrap();
    let mut launcher = cimage::api::launcher_client(&daemon.socket);
    let (mut raw, mut grpc, mut cli) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=LAUNCHES {
        let t = Instant::now();
        let pod = PodSpec {
            name: format!("bench-raw-{i}"),
            uid: format!("{:016x}", rand::random::<u64>()),
            namespace: "bench".into(),
            hostname: String::new(),
            log_directory: logs.path().to_owned(),
            labels: Default::default(),
            cgroup_parent: None,
            pod_cgroup: None,
        };
        let sid = rt.run_pod(&pod).await.unwrap();
        let spec = ContainerSpec {
            name: "step".into(),
            image: image_id.clone(),
            command: vec!["true".into()],
            log_path: format!("raw-{i}.log"),
            run_as_user: Some(65534),
            run_as_group: Some(65534),
            ..Default::default()
        };
        let cid = rt.create_container(&sid, &pod, &spec).await.unwrap();
        rt.start_container(&cid).await.unwrap();
        while rt.container_status(&cid).await.unwrap().unwrap().state != ContainerState::Exited {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        rt.remove_container(&cid).await.unwrap();
        rt.stop_pod(&sid).await.unwrap();
        rt.remove_pod(&sid).await.unwrap();
        let d_raw = t.elapsed();

        let d_grpc = grpc_launch(&mut launcher, &image).await;

        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_cimage"))
            .args(["run", "--image", &image, "--user", "65534", "--", "true"])
            .env("CIMAGE_SOCKET", &daemon.socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let d_cli = t.elapsed();
        // The first round warms every path and is not counted.
        if i > 0 {
            raw.push(d_raw);
            grpc.push(d_grpc);
            cli.push(d_cli);
        }
    }
    (raw, grpc, cli)
}
