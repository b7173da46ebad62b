//! An in-memory runtime for the launcher's unit tests ([`FakeTaskRuntime`]): a started
//! container "runs" for a scripted time (on tokio's clock, so a test may pause it) and exits
//! with a scripted code, unless stopped; calls can be made to fail, once or until told
//! otherwise, and the runtime can be "down" as a restarting one is.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;

use super::task::{
    ContainerInfo, ContainerSpec, ContainerState, ContainerStatus, Created, EtcCheck, ExecAttach,
    ExecEvent, ExecInput, ExecOutput, ExecSession, HostProcess, Landing, MountSpec, PodInfo,
    PodSpec, ProcessIdentity, RuntimeVersion, SpecMount, TaskRuntime,
};
use super::{RuntimeError, RuntimeErrorKind};

/// How a fake container behaves once started.
#[derive(Debug, Clone, Copy)]
pub struct Script {
    /// How long it runs.
    pub runs_for: Duration,
    /// Its exit code.
    pub exit_code: i32,
}

#[derive(Debug)]
struct FakeContainer {
    identity: ProcessIdentity,
    mounts: Vec<MountSpec>,
    pod: String,
    labels: BTreeMap<String, String>,
    started: Option<Instant>,
    stopped_with: Option<i32>,
    script: Script,
}

/// A fake pod: its labels and whether it is ready.
type FakePod = (BTreeMap<String, String>, bool);

/// In-memory [`TaskRuntime`].
#[derive(Default)]
pub struct FakeTaskRuntime {
    pods: Mutex<HashMap<String, FakePod>>,
    containers: Mutex<HashMap<String, FakeContainer>>,
    next: Mutex<u64>,
    /// Script for the next containers created (default: exit 0 at once).
    pub script: Mutex<Option<Script>>,
    /// Calls that fail: operation name → message.
    pub failing: Mutex<HashMap<&'static str, String>>,
    /// Every call made, in order (operation name).
    pub calls: Mutex<Vec<&'static str>>,
    /// Errors returned once by the next call of an operation.
    pub fail_once: Mutex<HashMap<&'static str, RuntimeError>>,
    /// Gids "the image's /etc/group" adds to every container created from now on.
    pub image_groups: Mutex<Vec<u32>>,
    /// Every container spec created, in order.
    pub created: Mutex<Vec<ContainerSpec>>,
    /// What [`TaskRuntime::version`] answers (default containerd v1.6.20).
    pub runtime_version: Mutex<Option<RuntimeVersion>>,
    /// The `/etc` that [`TaskRuntime::inspect_created`] reports (default: plain).
    pub etc: Mutex<Option<EtcCheck>>,
    /// While set, every call fails as a restarting runtime's would (unavailable);
    /// containers go on running meanwhile.
    pub down: std::sync::atomic::AtomicBool,
    /// The volumes every image declares (`None`: the runtime does not say).
    pub image_volumes: Mutex<Option<Vec<String>>>,
    /// What [`TaskRuntime::creates_image_volumes`] answers; the fake mounts an image's volumes
    /// unless it is `Some(false)`.
    pub creates_volumes: Mutex<Option<bool>>,
    /// Where a destination lands in "the image" (by symlinks), when not where it is named.
    pub landings: Mutex<HashMap<String, String>>,
    /// The groups a started process has on "the host", when not those it was created with.
    pub host_groups: Mutex<Option<Vec<u32>>>,
}

impl FakeTaskRuntime {
    fn call(&self, op: &'static str) -> Result<(), RuntimeError> {
        self.calls.lock().unwrap().push(op);
        if let Some(e) = self.fail_once.lock().unwrap().remove(op) {
            return Err(e);
        }
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(RuntimeError {
                op,
                kind: RuntimeErrorKind::Unavailable,
                message: "runtime at /fake is unavailable: restarting".into(),
            });
        }
        match self.failing.lock().unwrap().get(op) {
            Some(m) => Err(RuntimeError {
                op,
                kind: RuntimeErrorKind::Other,
                message: m.clone(),
            }),
            None => Ok(()),
        }
    }

    fn id(&self, prefix: &str) -> String {
        let mut n = self.next.lock().unwrap();
        *n += 1;
        format!("{prefix}{n}")
    }

    /// Pods that exist now.
    pub fn pod_count(&self) -> usize {
        self.pods.lock().unwrap().len()
    }

    /// Containers that exist now.
    pub fn container_count(&self) -> usize {
        self.containers.lock().unwrap().len()
    }

    /// Adds a pod as if someone else had created it.
    pub fn add_pod(&self, labels: BTreeMap<String, String>) -> String {
        let id = self.id("pod");
        self.pods.lock().unwrap().insert(id.clone(), (labels, true));
        id
    }

    fn state(c: &FakeContainer) -> (ContainerState, i32) {
        if let Some(code) = c.stopped_with {
            return (ContainerState::Exited, code);
        }
        match c.started {
            None => (ContainerState::Created, 0),
            Some(t) if t.elapsed() >= c.script.runs_for => {
                (ContainerState::Exited, c.script.exit_code)
            }
            Some(_) => (ContainerState::Running, 0),
        }
    }
}

fn matches(have: &BTreeMap<String, String>, want: &BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

#[async_trait]
impl TaskRuntime for FakeTaskRuntime {
    async fn run_pod(&self, spec: &PodSpec) -> Result<String, RuntimeError> {
        self.call("RunPodSandbox")?;
        let id = self.id("pod");
        self.pods
            .lock()
            .unwrap()
            .insert(id.clone(), (spec.labels.clone(), true));
        Ok(id)
    }
    async fn stop_pod(&self, id: &str) -> Result<(), RuntimeError> {
        self.call("StopPodSandbox")?;
        if let Some(p) = self.pods.lock().unwrap().get_mut(id) {
            p.1 = false;
        }
        for c in self.containers.lock().unwrap().values_mut() {
            if c.pod == id && c.stopped_with.is_none() {
                c.stopped_with = Some(137);
            }
        }
        Ok(())
    }
    async fn remove_pod(&self, id: &str) -> Result<(), RuntimeError> {
        self.call("RemovePodSandbox")?;
        self.pods.lock().unwrap().remove(id);
        self.containers.lock().unwrap().retain(|_, c| c.pod != id);
        Ok(())
    }
    async fn list_pods(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<PodInfo>, RuntimeError> {
        Ok(self
            .pods
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, (l, _))| matches(l, labels))
            .map(|(id, (l, ready))| PodInfo {
                id: id.clone(),
                labels: l.clone(),
                ready: *ready,
            })
            .collect())
    }
    async fn create_container(
        &self,
        pod_id: &str,
        _pod: &PodSpec,
        spec: &ContainerSpec,
    ) -> Result<String, RuntimeError> {
        self.call("CreateContainer")?;
        let id = self.id("ctr");
        let script = self.script.lock().unwrap().unwrap_or(Script {
            runs_for: Duration::ZERO,
            exit_code: 0,
        });
        let mut additional_gids = spec.supplemental_groups.clone();
        additional_gids.extend(self.image_groups.lock().unwrap().iter().copied());
        self.created.lock().unwrap().push(spec.clone());
        self.containers.lock().unwrap().insert(
            id.clone(),
            FakeContainer {
                mounts: spec.mounts.clone(),
                identity: ProcessIdentity {
                    uid: spec.run_as_user.unwrap_or(0),
                    gid: spec.run_as_group.unwrap_or(0),
                    additional_gids,
                },
                pod: pod_id.to_owned(),
                labels: spec.labels.clone(),
                started: None,
                stopped_with: None,
                script,
            },
        );
        Ok(id)
    }
    async fn inspect_created(&self, id: &str, image: bool) -> Result<Created, RuntimeError> {
        self.call("ContainerStatus")?;
        let (identity, asked) = self
            .containers
            .lock()
            .unwrap()
            .get(id)
            .map(|c| (Some(c.identity.clone()), c.mounts.clone()))
            .unwrap_or_default();
        let etc = image.then(|| self.etc.lock().unwrap().clone().unwrap_or(EtcCheck::Plain));
        // The runtime's /dev, the request's mounts, then the image's volumes unless ignored.
        let mut destinations = vec![("/dev".to_owned(), false)];
        destinations.extend(asked.iter().map(|m| (m.container_path.clone(), true)));
        if *self.creates_volumes.lock().unwrap() != Some(false) {
            let volumes = self
                .image_volumes
                .lock()
                .unwrap()
                .clone()
                .unwrap_or_default();
            destinations.extend(volumes.into_iter().map(|v| (v, true)));
        }
        let landings = self.landings.lock().unwrap().clone();
        let mounts = destinations
            .into_iter()
            .map(|(destination, bind)| {
                let path = landings.get(&destination).unwrap_or(&destination).clone();
                let landing = image.then(|| {
                    Ok(Landing {
                        looked_at: vec![path.clone()],
                        path,
                    })
                });
                SpecMount {
                    destination,
                    bind,
                    landing,
                }
            })
            .collect();
        Ok(Created {
            identity,
            etc,
            mounts,
        })
    }
    async fn image_volumes(&self, _image: &str) -> Result<Option<Vec<String>>, RuntimeError> {
        self.call("ImageStatus")?;
        Ok(self.image_volumes.lock().unwrap().clone())
    }
    async fn creates_image_volumes(&self) -> Result<Option<bool>, RuntimeError> {
        self.call("Status")?;
        Ok(*self.creates_volumes.lock().unwrap())
    }
    async fn container_process(&self, id: &str) -> Result<Option<HostProcess>, RuntimeError> {
        self.call("ContainerStatus")?;
        let host_groups = self.host_groups.lock().unwrap().clone();
        Ok(self.containers.lock().unwrap().get(id).and_then(|c| {
            (Self::state(c).0 == ContainerState::Running).then(|| HostProcess {
                pid: 4242,
                uids: [c.identity.uid; 4],
                gids: [c.identity.gid; 4],
                groups: host_groups.unwrap_or_else(|| c.identity.additional_gids.clone()),
            })
        }))
    }
    async fn version(&self) -> Result<RuntimeVersion, RuntimeError> {
        self.call("Version")?;
        Ok(self
            .runtime_version
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(RuntimeVersion {
                name: "containerd".into(),
                version: "v1.6.20".into(),
            }))
    }
    async fn reopen_container_log(&self, id: &str) -> Result<(), RuntimeError> {
        self.call("ReopenContainerLog")?;
        match self.containers.lock().unwrap().get(id).map(Self::state) {
            Some((ContainerState::Running, _)) => Ok(()),
            _ => Err(RuntimeError {
                op: "ReopenContainerLog",
                kind: RuntimeErrorKind::Other,
                message: format!("container {id} is not running"),
            }),
        }
    }
    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.call("StartContainer")?;
        if let Some(c) = self.containers.lock().unwrap().get_mut(id) {
            c.started = Some(Instant::now());
        }
        Ok(())
    }
    async fn container_status(&self, id: &str) -> Result<Option<ContainerStatus>, RuntimeError> {
        // Polled often: not recorded in `calls`, but a runtime that is down is down.
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(RuntimeError {
                op: "ContainerStatus",
                kind: RuntimeErrorKind::Unavailable,
                message: "runtime at /fake is unavailable: restarting".into(),
            });
        }
        Ok(self.containers.lock().unwrap().get(id).map(|c| {
            let (state, exit_code) = Self::state(c);
            ContainerStatus {
                id: id.to_owned(),
                state,
                exit_code,
                reason: String::new(),
                message: String::new(),
            }
        }))
    }
    async fn stop_container(&self, id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        self.call("StopContainer")?;
        if let Some(c) = self.containers.lock().unwrap().get_mut(id) {
            if Self::state(c).0 != ContainerState::Exited {
                c.stopped_with = Some(128 + 15);
            }
        }
        Ok(())
    }
    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.call("RemoveContainer")?;
        self.containers.lock().unwrap().remove(id);
        Ok(())
    }
    async fn list_containers(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<ContainerInfo>, RuntimeError> {
        Ok(self
            .containers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, c)| matches(&c.labels, labels))
            .map(|(id, c)| ContainerInfo {
                id: id.clone(),
                pod_id: c.pod.clone(),
                labels: c.labels.clone(),
                state: Self::state(c).0,
            })
            .collect())
    }
    async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        _timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        self.call("ExecSync")?;
        let running = self
            .containers
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|c| Self::state(c).0 == ContainerState::Running);
        if !running {
            return Err(RuntimeError {
                op: "ExecSync",
                kind: RuntimeErrorKind::NotFound,
                message: format!("container {id} is not running"),
            });
        }
        // The fake echoes the command, as `echo` would.
        Ok(ExecOutput {
            stdout: format!("{}\n", cmd.join(" ")).into_bytes(),
            stderr: Vec::new(),
            exit_code: 0,
        })
    }
    async fn exec_attach(
        &self,
        id: &str,
        cmd: &[String],
        attach: ExecAttach,
    ) -> Result<ExecSession, RuntimeError> {
        self.exec_sync(id, cmd, Duration::from_secs(1)).await?;
        // The fake is `cat` behind a terminal that reports its size: input comes back on
        // stdout, a resize as `WxH`, and the end of input ends it with code 0. Without
        // input it prints its command, as `echo` would.
        let (input, mut from_caller) = tokio::sync::mpsc::channel(16);
        let (to_caller, output) = tokio::sync::mpsc::channel(16);
        let words = cmd.join(" ");
        tokio::spawn(async move {
            if !attach.stdin {
                let _ = to_caller.send(ExecEvent::Stdout(words.into_bytes())).await;
                let _ = to_caller.send(ExecEvent::Exited(0)).await;
                return;
            }
            while let Some(i) = from_caller.recv().await {
                let out = match i {
                    ExecInput::Stdin(b) => ExecEvent::Stdout(b),
                    ExecInput::Resize { width, height } => {
                        ExecEvent::Stdout(format!("{width}x{height}").into_bytes())
                    }
                    ExecInput::CloseStdin => break,
                };
                if to_caller.send(out).await.is_err() {
                    return;
                }
            }
            let _ = to_caller.send(ExecEvent::Exited(0)).await;
        });
        Ok(ExecSession { input, output })
    }
}
