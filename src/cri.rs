//! The real [`ImageRuntime`]: the CRI ImageService of containerd or CRI-O over its unix socket
//! (k8s-cri bindings, CRI v1).
//!
//! The channel is lazy: cimaged starts even when the runtime is not up yet, and when the runtime
//! restarts the channel reconnects by itself on the next call (the puller retries the one call that
//! meets the broken connection).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ListImagesRequest,
    PullImageRequest, RemoveImageRequest,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use crate::credentials::Credentials;
use crate::runtime::{
    ContainerInfo, ContainerSpec, ContainerState, ContainerStatus, ImageFsUsage, ImageRuntime,
    PodInfo, PodSpec, RuntimeError, RuntimeErrorKind, RuntimeImage, TaskRuntime,
};

/// Opens a lazy gRPC channel to a unix socket; nothing is dialled until the first call.
pub fn unix_channel(path: &Path) -> Channel {
    let path: PathBuf = path.to_owned();
    Endpoint::from_static("http://localhost").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        },
    ))
}

/// CRI ImageService client (with a RuntimeService client for the runtime's own settings).
#[derive(Clone)]
pub struct CriImageRuntime {
    client: ImageServiceClient<Channel>,
    runtime: RuntimeServiceClient<Channel>,
    endpoint: PathBuf,
    timeout: Duration,
}

impl CriImageRuntime {
    /// A client for the ImageService at `endpoint` (and the RuntimeService at
    /// `runtime_endpoint`); `timeout` bounds every call but `PullImage`, whose deadline the
    /// puller owns.
    pub fn new(endpoint: &Path, runtime_endpoint: &Path, timeout: Duration) -> Self {
        Self {
            client: ImageServiceClient::new(unix_channel(endpoint)),
            runtime: RuntimeServiceClient::new(unix_channel(runtime_endpoint)),
            endpoint: endpoint.to_owned(),
            timeout,
        }
    }

    /// [`bounded`] with this client's endpoint and timeout.
    async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, RuntimeError> {
        bounded(op, &self.endpoint, self.timeout, fut).await
    }
}

/// An image reference (name, digest reference or id) as CRI takes it.
fn image_spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

fn to_image(i: k8s_cri::v1::Image) -> RuntimeImage {
    RuntimeImage {
        id: i.id,
        repo_tags: i.repo_tags,
        repo_digests: i.repo_digests,
        size: i.size,
        pinned: i.pinned,
    }
}

/// Maps a CRI status to a runtime error kind. containerd reports registry failures during a pull
/// as `Unknown` with the cause in the message, so the message is read too.
fn classify(op: &'static str, endpoint: &Path, status: Status) -> RuntimeError {
    let msg = status.message().to_owned();
    let lower = msg.to_ascii_lowercase();
    let kind = match status.code() {
        Code::Unavailable => RuntimeErrorKind::Unavailable,
        Code::DeadlineExceeded => RuntimeErrorKind::DeadlineExceeded,
        Code::NotFound => RuntimeErrorKind::NotFound,
        Code::Unauthenticated | Code::PermissionDenied => RuntimeErrorKind::Unauthorized,
        _ if lower.contains("401 unauthorized")
            || lower.contains("403 forbidden")
            || lower.contains("unauthorized")
            || lower.contains("authorization failed") =>
        {
            RuntimeErrorKind::Unauthorized
        }
        _ if lower.contains("not found") => RuntimeErrorKind::NotFound,
        _ if lower.contains("connection refused")
            || lower.contains("connection reset")
            || lower.contains("i/o timeout")
            || lower.contains("eof")
            || lower.contains("502 bad gateway")
            || lower.contains("503 service unavailable")
            || lower.contains("500 internal server error")
            || lower.contains("429 too many requests")
            || lower.contains("tls handshake timeout") =>
        {
            RuntimeErrorKind::Transient
        }
        _ => RuntimeErrorKind::Other,
    };
    let message = if kind == RuntimeErrorKind::Unavailable {
        format!("runtime at {} is unavailable: {msg}", endpoint.display())
    } else {
        msg
    };
    RuntimeError { op, kind, message }
}

#[async_trait]
impl ImageRuntime for CriImageRuntime {
    async fn image_status(&self, image: &str) -> Result<Option<RuntimeImage>, RuntimeError> {
        let mut c = self.client.clone();
        let req = ImageStatusRequest {
            image: image_spec(image),
            verbose: false,
        };
        let resp = self.bounded("ImageStatus", c.image_status(req)).await?;
        Ok(resp.image.map(to_image))
    }

    async fn pull_image(
        &self,
        image: &str,
        credentials: Option<&Credentials>,
    ) -> Result<String, RuntimeError> {
        let mut c = self.client.clone();
        let auth = credentials.map(|cr| AuthConfig {
            username: cr.username.clone(),
            password: cr.password.clone(),
            ..Default::default()
        });
        let req = PullImageRequest {
            image: image_spec(image),
            auth,
            sandbox_config: None,
        };
        match c.pull_image(req).await {
            Ok(resp) => Ok(resp.into_inner().image_ref),
            Err(status) => Err(classify("PullImage", &self.endpoint, status)),
        }
    }

    async fn list_images(&self) -> Result<Vec<RuntimeImage>, RuntimeError> {
        let mut c = self.client.clone();
        let resp = self
            .bounded(
                "ListImages",
                c.list_images(ListImagesRequest { filter: None }),
            )
            .await?;
        Ok(resp.images.into_iter().map(to_image).collect())
    }

    async fn remove_image(&self, image: &str) -> Result<(), RuntimeError> {
        let mut c = self.client.clone();
        let req = RemoveImageRequest {
            image: image_spec(image),
        };
        self.bounded("RemoveImage", c.remove_image(req)).await?;
        Ok(())
    }

    async fn image_fs_info(&self) -> Result<Vec<ImageFsUsage>, RuntimeError> {
        let mut c = self.client.clone();
        let resp = self
            .bounded("ImageFsInfo", c.image_fs_info(ImageFsInfoRequest {}))
            .await?;
        Ok(resp
            .image_filesystems
            .into_iter()
            .map(|fs| ImageFsUsage {
                mountpoint: fs.fs_id.map(|f| f.mountpoint).unwrap_or_default(),
                used_bytes: fs.used_bytes.map(|u| u.value).unwrap_or(0),
            })
            .collect())
    }

    async fn sandbox_image(&self) -> Result<Option<String>, RuntimeError> {
        let mut c = self.runtime.clone();
        let resp = self
            .bounded("Status", c.status(cri::StatusRequest { verbose: true }))
            .await?;
        Ok(sandbox_image_from(&resp.info))
    }
}

/// The sandbox image from a verbose CRI `Status`: containerd puts its CRI config, with
/// `sandboxImage`, under the `config` key; CRI-O uses `pause_image`.
fn sandbox_image_from(info: &std::collections::HashMap<String, String>) -> Option<String> {
    let config: serde_json::Value = serde_json::from_str(info.get("config")?).ok()?;
    ["sandboxImage", "pause_image", "pauseImage"]
        .iter()
        .find_map(|k| config.get(*k)?.as_str().map(str::to_owned))
        .filter(|s| !s.is_empty())
}

async fn bounded<T>(
    op: &'static str,
    endpoint: &Path,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, RuntimeError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(classify(op, endpoint, status)),
        Err(_) => Err(RuntimeError {
            op,
            kind: RuntimeErrorKind::DeadlineExceeded,
            message: format!(
                "no answer from the runtime at {} within {timeout:?}",
                endpoint.display()
            ),
        }),
    }
}

/// Treats "not found" as success: removing or stopping something already gone is done.
fn gone_is_ok(r: Result<(), RuntimeError>) -> Result<(), RuntimeError> {
    match r {
        Err(e) if e.kind == RuntimeErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// CRI RuntimeService client: pod sandboxes and containers.
#[derive(Clone)]
pub struct CriTaskRuntime {
    client: RuntimeServiceClient<Channel>,
    endpoint: PathBuf,
    timeout: Duration,
}

impl CriTaskRuntime {
    /// A client for the RuntimeService at `endpoint`; `timeout` bounds each call (a stop waits
    /// its grace period on top).
    pub fn new(endpoint: &Path, timeout: Duration) -> Self {
        Self {
            client: RuntimeServiceClient::new(unix_channel(endpoint)),
            endpoint: endpoint.to_owned(),
            timeout,
        }
    }

    fn sandbox_config(spec: &PodSpec) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: spec.name.clone(),
                uid: spec.uid.clone(),
                namespace: spec.namespace.clone(),
                attempt: 0,
            }),
            hostname: spec.hostname.clone(),
            log_directory: spec.log_directory.display().to_string(),
            labels: spec.labels.clone().into_iter().collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Host network (no CNI needed, as batch jobs expect), PID and IPC shared by the pod's steps.
fn pod_namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: cri::NamespaceMode::Pod as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn container_state(s: i32) -> ContainerState {
    match cri::ContainerState::try_from(s) {
        Ok(cri::ContainerState::ContainerCreated) => ContainerState::Created,
        Ok(cri::ContainerState::ContainerRunning) => ContainerState::Running,
        Ok(cri::ContainerState::ContainerExited) => ContainerState::Exited,
        _ => ContainerState::Unknown,
    }
}

#[async_trait]
impl TaskRuntime for CriTaskRuntime {
    async fn run_pod(&self, spec: &PodSpec) -> Result<String, RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::RunPodSandboxRequest {
            config: Some(Self::sandbox_config(spec)),
            runtime_handler: String::new(),
        };
        // Creating a sandbox may pull the pause image: allow it a pull's worth of time.
        let r = bounded(
            "RunPodSandbox",
            &self.endpoint,
            self.timeout * 4,
            c.run_pod_sandbox(req),
        )
        .await?;
        Ok(r.pod_sandbox_id)
    }

    async fn stop_pod(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        };
        gone_is_ok(
            bounded(
                "StopPodSandbox",
                &self.endpoint,
                self.timeout,
                c.stop_pod_sandbox(req),
            )
            .await
            .map(|_| ()),
        )
    }

    async fn remove_pod(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        };
        gone_is_ok(
            bounded(
                "RemovePodSandbox",
                &self.endpoint,
                self.timeout,
                c.remove_pod_sandbox(req),
            )
            .await
            .map(|_| ()),
        )
    }

    async fn list_pods(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<PodInfo>, RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                label_selector: labels.clone().into_iter().collect(),
                ..Default::default()
            }),
        };
        let r = bounded(
            "ListPodSandbox",
            &self.endpoint,
            self.timeout,
            c.list_pod_sandbox(req),
        )
        .await?;
        Ok(r.items
            .into_iter()
            .map(|p| PodInfo {
                ready: p.state == cri::PodSandboxState::SandboxReady as i32,
                id: p.id,
                labels: p.labels.into_iter().collect(),
            })
            .collect())
    }

    async fn create_container(
        &self,
        pod_id: &str,
        pod: &PodSpec,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError> {
        let mut c = self.client.clone();
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: spec.name.clone(),
                attempt: 0,
            }),
            image: image_spec(&spec.image),
            command: spec.command.clone(),
            working_dir: spec.working_dir.clone(),
            envs: spec
                .env
                .iter()
                .map(|(k, v)| cri::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            mounts: spec
                .mounts
                .iter()
                .map(|m| cri::Mount {
                    container_path: m.container_path.clone(),
                    host_path: m.host_path.display().to_string(),
                    readonly: m.readonly,
                    ..Default::default()
                })
                .collect(),
            devices: spec
                .devices
                .iter()
                .map(|d| cri::Device {
                    container_path: d.container_path.clone(),
                    host_path: d.host_path.display().to_string(),
                    permissions: "rwm".into(),
                })
                .collect(),
            cdi_devices: spec
                .cdi_devices
                .iter()
                .map(|n| cri::CdiDevice { name: n.clone() })
                .collect(),
            labels: spec.labels.clone().into_iter().collect(),
            log_path: spec.log_path.clone(),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    run_as_user: spec
                        .run_as_user
                        .map(|u| cri::Int64Value { value: u.into() }),
                    run_as_group: spec
                        .run_as_group
                        .map(|g| cri::Int64Value { value: g.into() }),
                    readonly_rootfs: spec.readonly_rootfs,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_owned(),
            config: Some(config),
            sandbox_config: Some(Self::sandbox_config(pod)),
        };
        let r = bounded(
            "CreateContainer",
            &self.endpoint,
            self.timeout,
            c.create_container(req),
        )
        .await?;
        Ok(r.container_id)
    }

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::StartContainerRequest {
            container_id: id.to_owned(),
        };
        bounded(
            "StartContainer",
            &self.endpoint,
            self.timeout,
            c.start_container(req),
        )
        .await?;
        Ok(())
    }

    async fn container_status(&self, id: &str) -> Result<Option<ContainerStatus>, RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        };
        match bounded(
            "ContainerStatus",
            &self.endpoint,
            self.timeout,
            c.container_status(req),
        )
        .await
        {
            Ok(r) => Ok(r.status.map(|s| ContainerStatus {
                id: s.id,
                state: container_state(s.state),
                exit_code: s.exit_code,
                reason: s.reason,
                message: s.message,
            })),
            Err(e) if e.kind == RuntimeErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::StopContainerRequest {
            container_id: id.to_owned(),
            timeout: grace.as_secs() as i64,
        };
        gone_is_ok(
            bounded(
                "StopContainer",
                &self.endpoint,
                self.timeout + grace,
                c.stop_container(req),
            )
            .await
            .map(|_| ()),
        )
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::RemoveContainerRequest {
            container_id: id.to_owned(),
        };
        gone_is_ok(
            bounded(
                "RemoveContainer",
                &self.endpoint,
                self.timeout,
                c.remove_container(req),
            )
            .await
            .map(|_| ()),
        )
    }

    async fn list_containers(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                label_selector: labels.clone().into_iter().collect(),
                ..Default::default()
            }),
        };
        let r = bounded(
            "ListContainers",
            &self.endpoint,
            self.timeout,
            c.list_containers(req),
        )
        .await?;
        Ok(r.containers
            .into_iter()
            .map(|x| ContainerInfo {
                id: x.id,
                pod_id: x.pod_sandbox_id,
                labels: x.labels.into_iter().collect(),
                state: container_state(x.state),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_containerd_pull_failures() {
        let p = Path::new("/run/c.sock");
        let k = |code, msg: &str| classify("PullImage", p, Status::new(code, msg)).kind;
        assert_eq!(
            k(Code::Unavailable, "transport error"),
            RuntimeErrorKind::Unavailable
        );
        assert_eq!(
            k(Code::Unknown, "failed to pull and unpack image \"x\": failed to resolve reference \"x\": x: not found"),
            RuntimeErrorKind::NotFound
        );
        assert_eq!(
            k(Code::Unknown, "failed to resolve reference: pulling from host 127.0.0.1:5000 failed with status code [manifests 1]: 401 Unauthorized"),
            RuntimeErrorKind::Unauthorized
        );
        assert_eq!(
            k(
                Code::Unknown,
                "dial tcp 127.0.0.1:5000: connect: connection refused"
            ),
            RuntimeErrorKind::Transient
        );
        assert_eq!(k(Code::Unknown, "something odd"), RuntimeErrorKind::Other);
    }
}
