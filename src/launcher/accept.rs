//! Accepting a step, before anything runs: who may launch, as whom the step runs (the host's
//! user database), the checks of `spec`, the job it joins and its step number, its mounts
//! opened, checked as its user and staged, and its record saved. A refused launch changes
//! nothing; an accepted one is driven by `lifecycle`.

use std::sync::Arc;

use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::devices::CdiSupport;
use super::etc_files::etc_files;
use super::lifecycle::{may_join, Step};
use super::mounts::MountError;
use super::request::{Identity, Principal, SpecError, UserRequest};
use super::run_as;
use super::spec::{self, LaunchSpec, Rules, Validated};
use super::store::{TaskRecord, TaskState};
use super::{EventSink, LaunchError, Launcher, TaskEvent};
use crate::runtime::MountSpec;

/// The host's names of a user's groups, by gid (`None`: the group has no name on the host).
type GroupNames = Vec<(u32, Option<String>)>;

impl Launcher {
    /// Accepts a step: validates it (nothing is created if that fails), records it, and runs it
    /// in the background. The receiver gets its lifecycle events and output; dropping it does not
    /// stop the task.
    ///
    /// The acceptance runs as a task of its own: a caller that goes away mid-way (its request
    /// future dropped) leaves either an accepted task or nothing, never mounts staged for a task
    /// that was not recorded.
    pub async fn launch(
        self: &Arc<Self>,
        who: Principal,
        spec: LaunchSpec,
    ) -> Result<(TaskRecord, Receiver<TaskEvent>), LaunchError> {
        let me = Arc::clone(self);
        self.background
            .spawn(async move { me.accept(who, spec).await })
            .await
            .map_err(|e| LaunchError::Internal {
                what: "the launch",
                message: e.to_string(),
            })?
    }

    async fn accept(
        self: Arc<Self>,
        who: Principal,
        spec: LaunchSpec,
    ) -> Result<(TaskRecord, Receiver<TaskEvent>), LaunchError> {
        if !who.admin && !self.settings.allow_user_launch {
            return Err(SpecError::Denied(format!(
                "uid {} may not launch containers on this node: steps start through the \
                 scheduler (a site that lets users run them directly sets \
                 ImageCache.Launcher.AllowUserLaunch: true)",
                who.uid
            ))
            .into());
        }
        let reservation = self.reserve_launch(who)?;
        let (identity, group_names) = self.host_identity(who, spec.user.clone()).await?;
        let cdi = match spec.devices.iter().any(|d| d.contains('=')) {
            false => None,
            true => Some(CdiSupport::of(&self.rt.version().await.map_err(
                |source| LaunchError::Runtime {
                    op: "ask the runtime's version (for CDI support)",
                    source,
                },
            )?)),
        };
        let rules = Rules {
            allowed_mount_prefixes: self.settings.allowed_mount_prefixes.clone(),
            allowed_devices: self.settings.allowed_devices.clone(),
            cdi,
            allowed_cgroup_parents: super::limits::cgroup_parents_for(
                &self.settings.allowed_cgroup_parents,
                who.uid,
            ),
            any_cgroup_parent: who.admin,
        };
        // Off the async workers: it resolves device paths and the allowed mount prefixes,
        // which may lie on a shared file system.
        let (spec, v) = tokio::task::spawn_blocking(move || {
            let v = spec::validate(&spec, who, identity, &rules);
            (spec, v)
        })
        .await
        .map_err(|e| LaunchError::Internal {
            what: "validating the launch",
            message: e.to_string(),
        })?;
        let v = v?;
        let guard = self.job_locks.lock(&v.job).await;
        let job_id = v.job.clone();
        let (existing, tasks) = self
            .blocking(move |s| Ok((s.job(&job_id)?, s.job_tasks(&job_id)?)))
            .await?;
        // Only a live job claims its id (a job whose first step failed has ended).
        if let Some(j) = existing.as_ref().filter(|j| j.ended.is_none()) {
            may_join(j, &v)?;
        }
        let job_tasks: Vec<&TaskRecord> = tasks.iter().filter(|t| t.job == v.job).collect();
        let step = match spec.step {
            Some(n) => n,
            None => job_tasks.iter().map(|t| t.step + 1).max().unwrap_or(0),
        };
        if job_tasks
            .iter()
            .any(|t| t.step == step && !t.state.is_final())
        {
            return Err(LaunchError::Conflict {
                what: "step",
                id: format!("{step} of job {}", v.job),
                why: "is already running".into(),
            });
        }
        let id = format!("{:012x}", rand::random::<u64>() >> 16);
        let mounts = self.stage_mounts(&id, &v, &group_names).await?;
        let task = TaskRecord {
            log_path: self
                .settings
                .log_dir
                .join(&v.job)
                .join(format!("{step}-{id}.log")),
            id,
            job: v.job.clone(),
            step,
            uid: v.identity.uid,
            image: v.image.to_string(),
            image_id: None,
            container_id: None,
            state: TaskState::Pending,
            exit_code: None,
            signal: None,
            failure: None,
            created: self.clock.now_ms(),
            started: None,
            finished: None,
            timeout_ms: spec.timeout.map(|t| t.as_millis() as u64),
            cleaned: false,
        };
        let t = task.clone();
        if let Err(e) = self.blocking(move |s| s.put_task(&t)).await {
            self.release_mounts(&task.id).await;
            return Err(e.into());
        }
        drop(guard);
        let cancel = CancellationToken::new();
        self.live
            .lock()
            .unwrap()
            .insert(task.id.clone(), cancel.clone());
        reservation.accept(&task.id);
        let (tx, rx) = EventSink::channel();
        info!(task = %task.id, job = %task.job, step, image = %task.image, uid = task.uid, "task accepted");
        let accepted = Step { v, spec, mounts };
        self.background
            .spawn(Arc::clone(&self).run(task.clone(), accepted, tx, cancel));
        Ok((task, rx))
    }

    /// Who the step runs as, and for a user the host's names of its groups (for the step's
    /// `/etc/group`): asked of the host's user database off the async workers (NSS may block
    /// on a directory service).
    async fn host_identity(
        &self,
        who: Principal,
        request: Option<UserRequest>,
    ) -> Result<(Identity, GroupNames), LaunchError> {
        let users = Arc::clone(&self.users);
        tokio::task::spawn_blocking(move || {
            let identity = run_as::resolve_identity(who, request.as_ref(), users.as_ref())?;
            let mut names = Vec::new();
            if identity.uid != 0 {
                for &gid in &identity.groups {
                    names.push((gid, users.group_name(gid)?));
                }
            }
            Ok::<_, LaunchError>((identity, names))
        })
        .await
        .map_err(|e| LaunchError::Internal {
            what: "the user lookup",
            message: e.to_string(),
        })?
    }

    /// Opens, checks as the step's user and binds the mount sources of task `id` now: what is
    /// checked is what the container gets, whatever happens to the paths afterwards. A step as
    /// a user also gets the host's account of it as `/etc/passwd` and `/etc/group`. All or
    /// nothing: on failure nothing stays staged.
    async fn stage_mounts(
        &self,
        id: &str,
        v: &Validated,
        group_names: &[(u32, Option<String>)],
    ) -> Result<Vec<MountSpec>, LaunchError> {
        let identity_files = (v.identity.uid != 0).then(|| etc_files(&v.identity, group_names));
        if v.mount_requests.is_empty() && identity_files.is_none() {
            return Ok(Vec::new());
        }
        let (stager, task_id, requests, identity, prefixes) = (
            Arc::clone(&self.mounts),
            id.to_owned(),
            v.mount_requests.clone(),
            v.identity.clone(),
            self.settings.allowed_mount_prefixes.clone(),
        );
        let staged = tokio::task::spawn_blocking(move || {
            let mut mounts = stager.stage(&task_id, &requests, &identity, &prefixes)?;
            if let Some((passwd, group)) = identity_files {
                match stager.identity_files(&task_id, &passwd, &group) {
                    Ok(files) => mounts.extend(files),
                    Err(e) => {
                        let _ = stager.release(&task_id);
                        return Err(e);
                    }
                }
            }
            Ok(mounts)
        })
        .await
        .map_err(|e| LaunchError::Internal {
            what: "staging the mounts",
            message: e.to_string(),
        })?;
        staged.map_err(|e| match e {
            MountError::Denied { .. } | MountError::Outside { .. } => {
                SpecError::Denied(e.to_string()).into()
            }
            MountError::Refused { .. } => SpecError::Invalid(e.to_string()).into(),
            MountError::Host { .. } => LaunchError::Staging(e),
        })
    }
}
