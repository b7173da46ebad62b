//! [`TaskRuntime`] over the CRI RuntimeService: pod sandboxes and containers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

use super::{bounded, gone_is_ok, image_spec, unix_channel};
use crate::runtime::{
    ContainerInfo, ContainerSpec, ContainerState, ContainerStatus, Created, ExecAttach, ExecOutput,
    ExecSession, HostProcess, PodInfo, PodSpec, RuntimeError, RuntimeErrorKind, RuntimeVersion,
    TaskRuntime,
};

/// Paths hidden from every step: the default set kubelet sends for a container that is not
/// privileged (the kernel's and firmware's internals).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths every step sees read-only: kubelet's default set (kernel settings and triggers).
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// CRI RuntimeService client: pod sandboxes and containers.
#[derive(Clone)]
pub struct CriTaskRuntime {
    pub(super) client: RuntimeServiceClient<Channel>,
    /// The same connection, for containerd's own services (snapshots) and the image service.
    pub(super) channel: Channel,
    pub(super) endpoint: PathBuf,
    pub(super) timeout: Duration,
}

impl CriTaskRuntime {
    /// A client for the RuntimeService at `endpoint`; `timeout` bounds each call (a stop waits
    /// its grace period on top).
    pub fn new(endpoint: &Path, timeout: Duration) -> Self {
        let channel = unix_channel(endpoint);
        Self {
            // Room for ExecSync's answer: both outputs of a command, each cut at 4 MiB by the
            // launcher (the 4 MiB default would fail the call instead).
            client: RuntimeServiceClient::new(channel.clone())
                .max_decoding_message_size(EXEC_ANSWER_BYTES),
            channel,
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
                cgroup_parent: spec
                    .pod_cgroup
                    .clone()
                    .or_else(|| spec.cgroup_parent.clone())
                    .unwrap_or_default(),
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

/// Largest answer of a runtime call cimage takes: an `ExecSync` with large outputs (a command
/// printing more than this in all fails, rather than have cimaged hold it).
const EXEC_ANSWER_BYTES: usize = 16 << 20;

/// CFS period the CPU quota is given over (the kernel's default, 100 ms).
const CPU_PERIOD_US: i64 = 100_000;

/// A step's limits as CRI takes them; `None` when none is asked for (the runtime's defaults).
fn container_resources(r: &crate::runtime::Resources) -> Option<cri::LinuxContainerResources> {
    if r.is_empty() {
        return None;
    }
    let mut out = cri::LinuxContainerResources::default();
    if let Some(m) = r.millicpus {
        out.cpu_period = CPU_PERIOD_US;
        out.cpu_quota = i64::from(m) * CPU_PERIOD_US / 1000;
        // As kubelet does: 1024 shares per CPU, at least 2.
        out.cpu_shares = (i64::from(m) * 1024 / 1000).max(2);
    }
    if let Some(b) = r.memory_bytes {
        out.memory_limit_in_bytes = b as i64;
        // No swap beyond the limit (as kubelet without swap): the limit is the step's memory.
        out.memory_swap_limit_in_bytes = b as i64;
    }
    if let Some(c) = &r.cpuset_cpus {
        out.cpuset_cpus = c.clone();
    }
    Some(out)
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
                resources: container_resources(&spec.resources),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    run_as_user: spec
                        .run_as_user
                        .map(|u| cri::Int64Value { value: u.into() }),
                    run_as_group: spec
                        .run_as_group
                        .map(|g| cri::Int64Value { value: g.into() }),
                    readonly_rootfs: spec.readonly_rootfs,
                    supplemental_groups: spec
                        .supplemental_groups
                        .iter()
                        .map(|g| i64::from(*g))
                        .collect(),
                    no_new_privs: spec.no_new_privileges,
                    capabilities: spec.drop_all_capabilities.then(|| cri::Capability {
                        drop_capabilities: vec!["ALL".into()],
                        ..Default::default()
                    }),
                    // Never privileged; always the runtime's default seccomp profile.
                    privileged: false,
                    seccomp: Some(cri::SecurityProfile {
                        profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                        localhost_ref: String::new(),
                    }),
                    // containerd applies only the paths the request names: without these a
                    // step as root could write /proc/sys or /proc/sysrq-trigger.
                    masked_paths: MASKED_PATHS.iter().map(|p| p.to_string()).collect(),
                    readonly_paths: READONLY_PATHS.iter().map(|p| p.to_string()).collect(),
                    ..Default::default()
                }),
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

    async fn inspect_created(&self, id: &str, image: bool) -> Result<Created, RuntimeError> {
        self.created(id, image).await
    }

    async fn image_volumes(&self, image: &str) -> Result<Option<Vec<String>>, RuntimeError> {
        self.volumes_of(image).await
    }

    async fn creates_image_volumes(&self) -> Result<Option<bool>, RuntimeError> {
        self.creates_volumes().await
    }

    async fn container_process(&self, id: &str) -> Result<Option<HostProcess>, RuntimeError> {
        self.process_of(id).await
    }

    async fn version(&self) -> Result<RuntimeVersion, RuntimeError> {
        let mut c = self.client.clone();
        let r = bounded(
            "Version",
            &self.endpoint,
            self.timeout,
            c.version(cri::VersionRequest {
                version: String::new(),
            }),
        )
        .await?;
        Ok(RuntimeVersion {
            name: r.runtime_name,
            version: r.runtime_version,
        })
    }

    async fn reopen_container_log(&self, id: &str) -> Result<(), RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::ReopenContainerLogRequest {
            container_id: id.to_owned(),
        };
        bounded(
            "ReopenContainerLog",
            &self.endpoint,
            self.timeout,
            c.reopen_container_log(req),
        )
        .await?;
        Ok(())
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

    async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.to_vec(),
            timeout: timeout.as_secs() as i64,
        };
        let r = bounded(
            "ExecSync",
            &self.endpoint,
            self.timeout + timeout,
            c.exec_sync(req),
        )
        .await?;
        Ok(ExecOutput {
            stdout: r.stdout,
            stderr: r.stderr,
            exit_code: r.exit_code,
        })
    }

    async fn exec_attach(
        &self,
        id: &str,
        cmd: &[String],
        attach: ExecAttach,
    ) -> Result<ExecSession, RuntimeError> {
        let mut c = self.client.clone();
        let req = cri::ExecRequest {
            container_id: id.to_owned(),
            cmd: cmd.to_vec(),
            tty: attach.tty,
            stdin: attach.stdin,
            stdout: true,
            // With a terminal the command's stderr goes to the terminal too.
            stderr: !attach.tty,
        };
        let r = bounded("Exec", &self.endpoint, self.timeout, c.exec(req)).await?;
        super::spdy::attach(&r.url, attach)
            .await
            .map_err(|e| RuntimeError {
                op: "Exec",
                kind: RuntimeErrorKind::Other,
                message: e.to_string(),
            })
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
