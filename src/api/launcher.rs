//! The `Launcher` gRPC service: turns requests into [`LaunchSpec`]s for the caller established
//! from peer credentials, and launcher events into the streamed `TaskEvent`s.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use super::peer::AdminPolicy;
use super::service::{caller, credentials_from_pb, policy_from_pb};
use super::{ending_at_shutdown, pb, BoxStream};
use crate::background::Background;
use crate::launcher::limits::{MAX_MILLICPUS, MIN_MILLICPUS};
use crate::launcher::logs::{Chunk, Stream as OutStream};
use crate::launcher::request::{MountRequest, Principal, SpecError, UserRef, UserRequest};
use crate::launcher::spec::LaunchSpec;
use crate::launcher::store::{JobRecord, TaskRecord};
use crate::launcher::{Event, LaunchError, Launcher, TaskEvent};
use crate::runtime::{ExecAttach, ExecEvent, ExecInput, ExecSession};

/// The service implementation.
pub struct LauncherApi {
    launcher: Arc<Launcher>,
    admin: AdminPolicy,
    background: Background,
}

impl LauncherApi {
    /// A service over the daemon's launcher; its streams end with a clear status when
    /// `background` shuts down.
    pub fn new(launcher: Arc<Launcher>, admin: AdminPolicy, background: Background) -> Self {
        Self {
            launcher,
            admin,
            background,
        }
    }

    fn principal<T>(&self, req: &Request<T>) -> Result<Principal, Status> {
        let c = caller(req)?;
        Ok(Principal {
            uid: c.uid,
            gid: c.gid,
            admin: self.admin.is_admin(&c),
        })
    }
}

/// Maps a launcher failure to a status by its kind: the caller's request (invalid, denied),
/// the node (its user database or the runtime not answering, a mount that could not be
/// staged, the durable state) or cimaged itself; the message is the launcher's explanation.
pub fn launch_status(e: &LaunchError) -> Status {
    let code = match e {
        LaunchError::Spec(SpecError::Invalid(_)) => Code::InvalidArgument,
        LaunchError::Spec(SpecError::Denied(_)) => Code::PermissionDenied,
        LaunchError::Spec(SpecError::NoJob(_)) => Code::NotFound,
        LaunchError::IdentityUnavailable(_) => Code::Unavailable,
        LaunchError::Staging(_) | LaunchError::Internal { .. } | LaunchError::Store(_) => {
            Code::Internal
        }
        LaunchError::NotFound { .. } => Code::NotFound,
        LaunchError::Conflict { .. } => Code::FailedPrecondition,
        // A container that went away under the call (the step ended meanwhile) is NotFound.
        LaunchError::Runtime { source, .. } => super::service::runtime_code(source),
    };
    Status::new(code, e.to_string())
}

/// Input of an attached command is queued in pieces of at most this many bytes.
const EXEC_INPUT_PIECE: usize = 32 << 10;

/// Longest wait for the first message of an exec stream.
const EXEC_START_WAIT: Duration = Duration::from_secs(10);

/// A terminal size as the runtime takes it; `None` for an empty one.
fn terminal_size(s: pb::TerminalSize) -> Option<ExecInput> {
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    (s.width > 0 && s.height > 0).then(|| ExecInput::Resize {
        width: clamp(s.width),
        height: clamp(s.height),
    })
}

/// A CPU count as the launcher takes it (thousandths); 0 is none. Refused outside the
/// launcher's range ([`MIN_MILLICPUS`] to [`MAX_MILLICPUS`], checked after rounding to
/// thousandths as the launcher counts them).
fn cpus_pb(cpus: f64) -> Result<Option<u32>, Status> {
    if cpus == 0.0 {
        return Ok(None);
    }
    let millicpus = (cpus * 1000.0).round();
    if !millicpus.is_finite()
        || !(f64::from(MIN_MILLICPUS)..=f64::from(MAX_MILLICPUS)).contains(&millicpus)
    {
        return Err(Status::invalid_argument(format!(
            "CPU limit {cpus} is out of range: give between {} and {} CPUs",
            f64::from(MIN_MILLICPUS) / 1000.0,
            MAX_MILLICPUS / 1000
        )));
    }
    Ok(Some(millicpus as u32))
}

fn chunk_pb(c: Chunk) -> pb::LogChunk {
    pb::LogChunk {
        stderr: c.stream == OutStream::Stderr,
        data: c.text.into_bytes(),
    }
}

fn event_pb(e: TaskEvent) -> pb::TaskEvent {
    use pb::task_event::Event as E;
    let event = match e.event {
        Event::Accepted { job, step } => E::Accepted(pb::Accepted { job, step }),
        Event::SandboxReady { sandbox_id } => E::SandboxReady(pb::SandboxReady { sandbox_id }),
        Event::ImagePulling(p) => E::ImagePulling(super::service::progress_pb(&p)),
        Event::ImageReady { image, action } => E::ImageReady(pb::ImageReady {
            image,
            action: action.as_str().to_owned(),
        }),
        Event::ContainerCreated { container_id } => {
            E::ContainerCreated(pb::ContainerCreated { container_id })
        }
        Event::Started => E::Started(pb::Started {}),
        Event::Output(c) => E::Output(chunk_pb(c)),
        Event::Exited {
            exit_code,
            signal,
            reason,
        } => E::Exited(pb::Exited {
            exit_code,
            signal: signal.unwrap_or(0),
            reason: reason.as_str().to_owned(),
        }),
        Event::CleanedUp => E::CleanedUp(pb::CleanedUp {}),
        Event::Failed { stage, message } => E::Failed(pb::Failed {
            stage: stage.as_str().to_owned(),
            message,
        }),
    };
    pb::TaskEvent {
        task_id: e.task_id,
        time: e.time_ms,
        event: Some(event),
    }
}

/// A task record as the API shows it.
pub fn task_pb(t: &TaskRecord) -> pb::Task {
    let (failure_stage, failure_message) = t.failure.clone().unwrap_or_default();
    pb::Task {
        id: t.id.clone(),
        job: t.job.clone(),
        step: t.step,
        uid: t.uid,
        image: t.image.clone(),
        state: t.state.as_str().to_owned(),
        exit_code: t.exit_code,
        signal: t.signal.unwrap_or(0),
        failure_stage,
        failure_message,
        created: t.created,
        started: t.started.unwrap_or(0),
        finished: t.finished.unwrap_or(0),
        container_id: t.container_id.clone().unwrap_or_default(),
        log_path: t.log_path.display().to_string(),
        cleaned_up: t.cleaned,
    }
}

fn job_pb(j: &JobRecord, tasks: &[TaskRecord]) -> pb::Job {
    pb::Job {
        id: j.id.clone(),
        uid: j.uid,
        one_off: j.one_off,
        sandbox_id: j.sandbox_id.clone().unwrap_or_default(),
        created: j.created,
        ended: j.ended.unwrap_or(0),
        tasks: tasks.iter().map(|t| t.id.clone()).collect(),
        running: tasks.iter().filter(|t| !t.state.is_final()).count() as u32,
    }
}

#[tonic::async_trait]
impl pb::launcher_server::Launcher for LauncherApi {
    type LaunchStream = BoxStream<pb::TaskEvent>;
    type LogsStream = BoxStream<pb::LogChunk>;

    async fn launch(
        &self,
        req: Request<pb::LaunchRequest>,
    ) -> Result<Response<Self::LaunchStream>, Status> {
        let who = self.principal(&req)?;
        let r = req.into_inner();
        let user = match (r.uid, r.user_name.is_empty()) {
            (Some(_), false) => {
                return Err(Status::invalid_argument(
                    "give the user by uid or by user_name, not both",
                ))
            }
            (Some(uid), true) => Some(UserRef::Uid(uid)),
            (None, false) => Some(UserRef::Name(r.user_name.clone())),
            (None, true) if r.gid.is_some() => {
                return Err(Status::invalid_argument(
                    "a gid needs a user (--user USER:GID)",
                ))
            }
            (None, true) => None,
        };
        let spec = LaunchSpec {
            job: (!r.job.is_empty()).then_some(r.job),
            step: r.step,
            image: r.image,
            policy: policy_from_pb(r.policy)?,
            command: r.command,
            env: r.env.into_iter().map(|e| (e.name, e.value)).collect(),
            workdir: r.workdir,
            user: user.map(|user| UserRequest { user, gid: r.gid }),
            mounts: r
                .mounts
                .into_iter()
                .map(|m| MountRequest {
                    source: m.source.into(),
                    target: m.target,
                    readonly: m.readonly,
                })
                .collect(),
            devices: r.devices,
            readonly_rootfs: r.readonly_rootfs,
            timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
            credentials: credentials_from_pb(r.credentials),
            resources: crate::runtime::Resources {
                millicpus: cpus_pb(r.cpus)?,
                memory_bytes: (r.memory_bytes > 0).then_some(r.memory_bytes),
                cpuset_cpus: (!r.cpuset_cpus.is_empty()).then_some(r.cpuset_cpus),
            },
            cgroup_parent: (!r.cgroup_parent.is_empty()).then_some(r.cgroup_parent),
            name: (!r.name.is_empty()).then_some(r.name),
        };
        let (task, rx) = self
            .launcher
            .launch(who, spec)
            .await
            .map_err(|e| launch_status(&e))?;
        let stream = ReceiverStream::new(rx).map(|e| Ok(event_pb(e)));
        Ok(Response::new(ending_at_shutdown(
            stream,
            &self.background,
            format!(
                "cimaged is shutting down; task {} may still be running and is re-attached when cimaged starts again",
                task.id
            ),
        )))
    }

    async fn cancel(&self, req: Request<pb::TaskRef>) -> Result<Response<pb::Task>, Status> {
        let who = self.principal(&req)?;
        let t = self
            .launcher
            .cancel(who, &req.into_inner().task_id)
            .await
            .map_err(|e| launch_status(&e))?;
        Ok(Response::new(task_pb(&t)))
    }

    async fn get_task(&self, req: Request<pb::TaskRef>) -> Result<Response<pb::Task>, Status> {
        let who = self.principal(&req)?;
        let t = self
            .launcher
            .task(who, &req.into_inner().task_id)
            .await
            .map_err(|e| launch_status(&e))?;
        Ok(Response::new(task_pb(&t)))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let who = self.principal(&req)?;
        let tasks = self
            .launcher
            .tasks(who, req.into_inner().all)
            .await
            .map_err(|e| launch_status(&e))?;
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks.iter().map(task_pb).collect(),
        }))
    }

    async fn logs(
        &self,
        req: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let who = self.principal(&req)?;
        let r = req.into_inner();
        let rx = self
            .launcher
            .logs(who, &r.task_id, r.follow, r.tail)
            .await
            .map_err(|e| launch_status(&e))?;
        let stream = ReceiverStream::new(rx).map(|c| Ok(chunk_pb(c)));
        Ok(Response::new(ending_at_shutdown(
            stream,
            &self.background,
            format!(
                "cimaged is shutting down; output of task {} stopped",
                r.task_id
            ),
        )))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let who = self.principal(&req)?;
        let all = req.get_ref().all;
        let jobs = self
            .launcher
            .jobs(who, all)
            .await
            .map_err(|e| launch_status(&e))?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(|(j, t)| job_pb(j, t)).collect(),
        }))
    }

    async fn exec(
        &self,
        req: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        let who = self.principal(&req)?;
        let r = req.into_inner();
        let timeout = match r.timeout_seconds {
            0 => Duration::from_secs(60),
            s => Duration::from_secs(s.into()),
        };
        let (out, truncated) = self
            .launcher
            .exec(who, &r.task_id, r.command, timeout)
            .await
            .map_err(|e| launch_status(&e))?;
        Ok(Response::new(pb::ExecResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
            truncated,
        }))
    }

    type ExecStreamStream = BoxStream<pb::ExecStreamResponse>;

    async fn exec_stream(
        &self,
        req: Request<tonic::Streaming<pb::ExecStreamRequest>>,
    ) -> Result<Response<Self::ExecStreamStream>, Status> {
        use pb::exec_stream_request::Msg as In;
        use pb::exec_stream_response::Msg as Out;
        let who = self.principal(&req)?;
        let mut incoming = req.into_inner();
        let first = tokio::time::timeout(EXEC_START_WAIT, incoming.message())
            .await
            .map_err(|_| {
                Status::invalid_argument(format!(
                    "an exec stream must start with what to run, within {}s",
                    EXEC_START_WAIT.as_secs()
                ))
            })??;
        let Some(In::Start(start)) = first.and_then(|m| m.msg) else {
            return Err(Status::invalid_argument(
                "an exec stream must start with what to run (its start message)",
            ));
        };
        let attach = ExecAttach {
            tty: start.tty,
            stdin: start.stdin,
        };
        let task = start.task_id.clone();
        let (ExecSession { input, output }, slot) = self
            .launcher
            .exec_attach(who, &start.task_id, start.command, attach)
            .await
            .map_err(|e| launch_status(&e))?;
        if let Some(size) = start.size.filter(|_| start.tty).and_then(terminal_size) {
            let _ = input.send(size).await;
        }
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = incoming.message() => m,
                    // The command ended: nothing more to pass on.
                    _ = input.closed() => return,
                };
                let inputs = match next {
                    Ok(Some(pb::ExecStreamRequest { msg: Some(m) })) => match m {
                        // Input is queued in small pieces, so that what one session holds
                        // while the command does not read stays small.
                        In::Stdin(b) => b
                            .chunks(EXEC_INPUT_PIECE)
                            .map(|c| ExecInput::Stdin(c.to_vec()))
                            .collect(),
                        In::CloseStdin(_) => vec![ExecInput::CloseStdin],
                        In::Resize(size) => terminal_size(size).into_iter().collect(),
                        In::Start(_) => continue,
                    },
                    Ok(Some(_)) => continue,
                    // The client sends nothing more but still listens: keep the session
                    // until the command ends.
                    Ok(None) => {
                        input.closed().await;
                        return;
                    }
                    // The client went away: dropping the input ends the session.
                    Err(_) => return,
                };
                for i in inputs {
                    if input.send(i).await.is_err() {
                        return;
                    }
                }
            }
        });
        let started = futures::stream::once(futures::future::ready(Ok(pb::ExecStreamResponse {
            msg: Some(Out::Started(true)),
        })));
        let rest = ReceiverStream::new(output).map(move |ev| {
            // The session's slot is given back when this stream ends.
            let _held = &slot;
            let msg = match ev {
                ExecEvent::Stdout(b) => Out::Stdout(b),
                ExecEvent::Stderr(b) => Out::Stderr(b),
                ExecEvent::Exited(code) => Out::ExitCode(code),
                ExecEvent::Failed(why) => {
                    return Err(Status::aborted(format!("task {task}: {why}")))
                }
            };
            Ok(pb::ExecStreamResponse { msg: Some(msg) })
        });
        // At shutdown the session ends (dropping it closes the runtime's stream), so a shell
        // left open does not hold the daemon.
        let bg = self.background.clone();
        let rest = rest.take_until(async move { bg.shutting_down().await });
        Ok(Response::new(ending_at_shutdown(
            started.chain(rest),
            &self.background,
            "cimaged is shutting down; the command's session ended".into(),
        )))
    }

    async fn end_job(&self, req: Request<pb::EndJobRequest>) -> Result<Response<pb::Job>, Status> {
        let who = self.principal(&req)?;
        let id = req.into_inner().job;
        let job = self
            .launcher
            .end_job(who, &id)
            .await
            .map_err(|e| launch_status(&e))?;
        let tasks = self.launcher.tasks(who, true).await.unwrap_or_default();
        let mine: Vec<TaskRecord> = tasks.into_iter().filter(|t| t.job == job.id).collect();
        Ok(Response::new(job_pb(&job, &mine)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityError;
    use crate::runtime::{RuntimeError, RuntimeErrorKind};

    #[test]
    fn cpu_counts_are_checked_against_the_launchers_range() {
        assert_eq!(cpus_pb(0.0).unwrap(), None);
        assert_eq!(cpus_pb(0.01).unwrap(), Some(10));
        assert_eq!(cpus_pb(1.5).unwrap(), Some(1500));
        assert_eq!(cpus_pb(4096.0).unwrap(), Some(4_096_000));
        for bad in [0.004, -1.0, 4096.5, f64::NAN, f64::INFINITY, 1e300] {
            let e = cpus_pb(bad).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
            assert!(
                e.message().contains("between 0.01 and 4096"),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn launch_errors_map_to_codes_by_kind() {
        let runtime = |kind| LaunchError::Runtime {
            op: "run a command in the step",
            source: RuntimeError {
                op: "ExecSync",
                kind,
                message: "x".into(),
            },
        };
        for (e, want) in [
            (SpecError::Invalid("x".into()).into(), Code::InvalidArgument),
            (SpecError::Denied("x".into()).into(), Code::PermissionDenied),
            (
                LaunchError::IdentityUnavailable(IdentityError {
                    what: "uid 1000".into(),
                    message: "Resource temporarily unavailable".into(),
                }),
                Code::Unavailable,
            ),
            (
                LaunchError::Staging(crate::launcher::mounts::MountError::Host {
                    path: "/scratch/a".into(),
                    message: "Input/output error".into(),
                }),
                Code::Internal,
            ),
            (
                LaunchError::Internal {
                    what: "the user lookup",
                    message: "task panicked".into(),
                },
                Code::Internal,
            ),
            (runtime(RuntimeErrorKind::Unavailable), Code::Unavailable),
            (runtime(RuntimeErrorKind::NotFound), Code::NotFound),
            (runtime(RuntimeErrorKind::Other), Code::Internal),
        ] {
            assert_eq!(launch_status(&e).code(), want, "{e}");
        }
    }
}
