//! The CRI RuntimeService as the launcher sees it: pod sandboxes and containers. The real
//! implementation is [`crate::cri::CriTaskRuntime`]; unit tests use
//! `fake_task::FakeTaskRuntime`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::RuntimeError;

/// A pod sandbox to create: one per job, host network, PID and IPC namespaces shared by its steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    /// Sandbox name (metadata.name).
    pub name: String,
    /// Unique id of this sandbox (metadata.uid).
    pub uid: String,
    /// Metadata namespace.
    pub namespace: String,
    /// Host name inside the pod.
    pub hostname: String,
    /// Absolute directory where the runtime writes the containers' logs.
    pub log_directory: PathBuf,
    /// Labels (cimage marker, instance, job, uid).
    pub labels: BTreeMap<String, String>,
    /// The cgroup the pod (and so every step of the job) is placed under, e.g. the scheduler's
    /// cgroup of the job (a `.slice` name with containerd's systemd cgroup driver).
    #[serde(default)]
    pub cgroup_parent: Option<String>,
    /// The cgroup cimage made for the pod under `cgroup_parent`, with the node's process
    /// limit: when set, the runtime is given this as the pod's parent.
    #[serde(default)]
    pub pod_cgroup: Option<String>,
}

/// CPU and memory limits of one container (CRI `LinuxContainerResources`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPUs in thousandths (1500 = 1.5 CPUs): a CFS quota over a 100 ms period and CPU shares
    /// in proportion.
    pub millicpus: Option<u32>,
    /// Memory limit in bytes (the kernel's OOM killer ends the step past it).
    pub memory_bytes: Option<u64>,
    /// CPUs it may run on, as a cpuset list (`0-3,8`).
    pub cpuset_cpus: Option<String>,
}

impl Resources {
    /// No limit asked for.
    pub fn is_empty(&self) -> bool {
        self.millicpus.is_none() && self.memory_bytes.is_none() && self.cpuset_cpus.is_none()
    }
}

/// A host path mounted into a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// Canonical host path.
    pub host_path: PathBuf,
    /// Path inside the container.
    pub container_path: String,
    /// Mounted read-only.
    pub readonly: bool,
}

/// A host device passed into a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Host device path.
    pub host_path: PathBuf,
    /// Path inside the container.
    pub container_path: String,
}

/// A container to create in a pod.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Container name (metadata.name), unique in the pod.
    pub name: String,
    /// Image id or reference.
    pub image: String,
    /// Overrides the image's entrypoint when not empty.
    pub command: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory ("" for the image's).
    pub working_dir: String,
    /// Host paths to mount.
    pub mounts: Vec<MountSpec>,
    /// Devices by path.
    pub devices: Vec<DeviceSpec>,
    /// Devices by CDI name (`vendor.com/class=name`).
    pub cdi_devices: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Log file path relative to the pod's log directory.
    pub log_path: String,
    /// uid to run as (None: the image's user).
    pub run_as_user: Option<u32>,
    /// gid to run as.
    pub run_as_group: Option<u32>,
    /// Read-only root filesystem.
    pub readonly_rootfs: bool,
    /// Supplementary gids of the process (the host's groups of its user, besides its gid).
    pub supplemental_groups: Vec<u32>,
    /// Set `no_new_privs`: setuid and file capabilities do not raise privileges.
    pub no_new_privileges: bool,
    /// Drop every capability.
    pub drop_all_capabilities: bool,
    /// CPU and memory limits.
    #[serde(default)]
    pub resources: Resources,
}

/// Who a created container's process will run as, read back from the spec the runtime
/// generated (so that what the image adds is seen, not only what was asked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// The process uid.
    pub uid: u32,
    /// The process gid.
    pub gid: u32,
    /// Every additional gid, whoever added it (the request or the image's /etc/group).
    pub additional_gids: Vec<u32>,
}

/// A created container, read back before it starts ([`TaskRuntime::inspect_created`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// Who its process will run as, if the runtime says.
    pub identity: Option<ProcessIdentity>,
    /// What its image holds at `/etc`, when asked.
    pub etc: Option<EtcCheck>,
    /// Every mount of the spec the runtime generated, in its order: the request's, the
    /// runtime's own (`/proc`, `/dev`, the pod's `/dev/shm`, `/etc/hosts`...) and the image's
    /// volumes; with where each lands in the image, when the image was asked for.
    pub mounts: Vec<SpecMount>,
}

/// One mount of a created container's generated spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecMount {
    /// Its destination, as the spec names it.
    pub destination: String,
    /// A bind of something on the host (a request's mount, an image volume, a file or the
    /// `/dev/shm` of the pod), whose contents are not the image's; `false` for a file system
    /// the runtime makes new for the container (tmpfs, proc, sysfs, devpts, mqueue, cgroup).
    pub bind: bool,
    /// Where the destination resolves through the image's symlinks, as runc resolves it;
    /// `None` when the image's files were not read, an error when it cannot be resolved.
    pub landing: Option<Result<Landing, LandingError>>,
}

/// Why a mount destination has no landing in the image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LandingError {
    /// Following the image's symlinks did not end: more than `limit` of them on the way.
    #[error("more than {limit} symlinks on the way (a loop at {at})")]
    SymlinkLoop {
        /// The most symlinks followed for one path.
        limit: usize,
        /// The path where the limit was passed.
        at: String,
    },
}

/// Where a mount destination resolves in a container's image: symlinks followed inside the
/// image's root and `..` taken lexically, as runc's `securejoin` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landing {
    /// The path it lands on: absolute and normal.
    pub path: String,
    /// Every path looked up in the image on the way, in order: what was read from the image
    /// rather than from another mount must not lie inside another mount.
    pub looked_at: Vec<String>,
}

/// A container's first process as the host sees it (`/proc/<pid>/status`), read after its
/// start to compare its credentials with those asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProcess {
    /// Its pid on the host.
    pub pid: u32,
    /// Real, effective, saved and file-system uid.
    pub uids: [u32; 4],
    /// Real, effective, saved and file-system gid.
    pub gids: [u32; 4],
    /// Its supplementary groups.
    pub groups: Vec<u32>,
}

/// What a created container's image holds at `/etc`, `/etc/passwd` and `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EtcCheck {
    /// A directory and regular files (or absent): mounts over them land where they say.
    Plain,
    /// A symlink or something else, which would send a mount elsewhere; says what.
    Redirected(String),
    /// The runtime does not let cimage look; says why.
    Unknown(String),
}

/// The runtime's name and version (CRI `Version`), e.g. `containerd` `v1.6.20`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeVersion {
    /// `containerd`, `cri-o`, ...
    pub name: String,
    /// As the runtime reports it, e.g. `v1.6.20` or `1.28.1`.
    pub version: String,
}

impl RuntimeVersion {
    /// (major, minor) of the version, if it parses.
    pub fn major_minor(&self) -> Option<(u32, u32)> {
        let v = self.version.trim_start_matches('v');
        let mut parts = v.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some((major, minor))
    }
}

/// A container's lifecycle state as the runtime reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Finished.
    Exited,
    /// The runtime does not know.
    Unknown,
}

/// A container's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerStatus {
    /// Container id.
    pub id: String,
    /// State.
    pub state: ContainerState,
    /// Exit code once exited (128+N when killed by signal N).
    pub exit_code: i32,
    /// The runtime's short reason (e.g. `Completed`, `Error`, `OOMKilled`).
    pub reason: String,
    /// The runtime's message.
    pub message: String,
}

/// A pod sandbox found in the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Sandbox id.
    pub id: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Whether it is ready (not stopped).
    pub ready: bool,
}

/// A container found in the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Container id.
    pub id: String,
    /// Its pod's id.
    pub pod_id: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its state.
    pub state: ContainerState,
}

/// The node's container runtime (CRI RuntimeService).
#[async_trait]
pub trait TaskRuntime: Send + Sync {
    /// Creates and starts a pod sandbox; returns its id.
    async fn run_pod(&self, spec: &PodSpec) -> Result<String, RuntimeError>;
    /// Stops a pod sandbox and every container in it. Stopping a missing pod is not an error.
    async fn stop_pod(&self, id: &str) -> Result<(), RuntimeError>;
    /// Removes a stopped pod sandbox. Removing a missing pod is not an error.
    async fn remove_pod(&self, id: &str) -> Result<(), RuntimeError>;
    /// Pods whose labels include all of `labels`.
    async fn list_pods(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<PodInfo>, RuntimeError>;
    /// Creates a container in a pod; returns its id.
    async fn create_container(
        &self,
        pod_id: &str,
        pod: &PodSpec,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError>;
    /// What a created container will be, read back before it starts from one verbose
    /// `ContainerStatus`: the identity its process will have and its mounts (from the
    /// runtime's generated spec; none when the runtime does not report it) and, when `image`
    /// is asked, what its image holds at `/etc` and where each mount lands in the image.
    async fn inspect_created(&self, id: &str, image: bool) -> Result<Created, RuntimeError>;
    /// The volumes image `image` declares in its config (`VOLUME`), which containerd 1.6
    /// creates for every container unless its CRI config says `ignore_image_defined_volumes`;
    /// `None` when the runtime does not say.
    async fn image_volumes(&self, image: &str) -> Result<Option<Vec<String>>, RuntimeError>;
    /// Whether the runtime creates the volumes images declare (containerd's CRI config, read
    /// from its verbose `Status`); `None` when it does not say.
    async fn creates_image_volumes(&self) -> Result<Option<bool>, RuntimeError>;
    /// A started container's first process as the host sees it; `None` when it has already
    /// exited, or the runtime does not say which it is.
    async fn container_process(&self, id: &str) -> Result<Option<HostProcess>, RuntimeError>;
    /// The runtime's name and version.
    async fn version(&self) -> Result<RuntimeVersion, RuntimeError>;
    /// Makes the runtime write a running container's log to a new file at its log path (CRI
    /// `ReopenContainerLog`), after the old one was renamed: how logs are rotated.
    async fn reopen_container_log(&self, id: &str) -> Result<(), RuntimeError>;
    /// Starts a created container.
    async fn start_container(&self, id: &str) -> Result<(), RuntimeError>;
    /// A container's status; `None` if the runtime does not know it.
    async fn container_status(&self, id: &str) -> Result<Option<ContainerStatus>, RuntimeError>;
    /// Stops a container: SIGTERM, then SIGKILL after `grace`. Stopping a missing one is not an error.
    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError>;
    /// Removes a container. Removing a missing one is not an error.
    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError>;
    /// Containers whose labels include all of `labels`.
    async fn list_containers(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerInfo>, RuntimeError>;
    /// Runs `cmd` in a running container and waits for it, up to `timeout` (CRI `ExecSync`).
    /// The command runs as the container's process does: its user, capabilities, no_new_privs
    /// and seccomp profile.
    async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError>;
    /// Starts `cmd` in a running container attached to the caller (CRI `Exec` and the
    /// runtime's streaming server). Like [`TaskRuntime::exec_sync`], the command runs as the
    /// container's process does.
    async fn exec_attach(
        &self,
        id: &str,
        cmd: &[String],
        attach: ExecAttach,
    ) -> Result<ExecSession, RuntimeError>;
}

/// How an interactive command is attached (CRI `Exec`): with a terminal (its output on one
/// stream, the terminal's size adjustable) or not (separate stdout and stderr), with or
/// without the caller's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecAttach {
    /// Give the command a pseudo-terminal.
    pub tty: bool,
    /// Pass the caller's input to the command.
    pub stdin: bool,
}

/// What the caller sends into an interactive command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecInput {
    /// Bytes for the command's standard input.
    Stdin(Vec<u8>),
    /// The caller's input ended: the command reads end-of-file.
    CloseStdin,
    /// The caller's terminal changed size (columns, rows).
    Resize {
        /// Columns.
        width: u16,
        /// Rows.
        height: u16,
    },
}

/// What an interactive command sends back, in order; the last event is `Exited` or `Failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes the command wrote to its standard output (or its terminal).
    Stdout(Vec<u8>),
    /// Bytes the command wrote to its standard error.
    Stderr(Vec<u8>),
    /// The command ended with this exit code.
    Exited(i32),
    /// The command could not be run, or the runtime's stream broke: the runtime's words.
    Failed(String),
}

/// A running interactive command: send input on `input`, read what it prints on `output`.
/// Dropping both ends the session: the runtime's connection is closed, so the command's input
/// ends. CRI has no way to stop an exec'd command, so one that does not read its input goes on
/// until it ends by itself or the step ends.
#[derive(Debug)]
pub struct ExecSession {
    /// The caller's input, terminal size and end of input.
    pub input: tokio::sync::mpsc::Sender<ExecInput>,
    /// The command's output, then how it ended.
    pub output: tokio::sync::mpsc::Receiver<ExecEvent>,
}

/// What a command run in a container printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
    /// Its exit code.
    pub exit_code: i32,
}
