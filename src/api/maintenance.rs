//! The `Maintenance` gRPC service: gc, popularity, and pre-warm schedules.

use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use super::peer::AdminPolicy;
use super::service::{cache_status, caller, require_admin, to_pb};
use super::{ending_at_shutdown, pb, BoxStream};
use crate::background::Background;
use crate::cache::{Cache, ImageRecord};
use crate::config::DEFAULT_PREWARM_CONCURRENCY;
use crate::prewarm::schedule::ScheduleSpec;
use crate::prewarm::store::{ImageResult, RunRecord};
use crate::prewarm::{PrewarmError, Prewarmer, RunEvent, ScheduleInfo};

/// The service implementation.
pub struct MaintenanceApi {
    cache: Arc<Cache>,
    prewarm: Arc<Prewarmer>,
    admin: AdminPolicy,
    background: Background,
}

impl MaintenanceApi {
    /// A service over the daemon's cache and pre-warmer; the work behind its streams runs as
    /// tracked tasks of `background`.
    pub fn new(
        cache: Arc<Cache>,
        prewarm: Arc<Prewarmer>,
        admin: AdminPolicy,
        background: Background,
    ) -> Self {
        Self {
            cache,
            prewarm,
            admin,
            background,
        }
    }

    fn require_admin<T>(&self, req: &Request<T>, what: &str) -> Result<(), Status> {
        require_admin(&self.admin, req, what).map(|_| ())
    }
}

/// Whether `uid` may see image `r` at all: the rule of `images` and `inspect`, where a private
/// image it did not prove access to is absent (its id, size and use times say which image it
/// is as well as its name would).
fn shown_to(r: &ImageRecord, uid: u32, admin: bool) -> bool {
    admin || r.visible_to(uid)
}

fn prewarm_status(e: &PrewarmError) -> Status {
    let code = match e {
        PrewarmError::Invalid(_) => Code::InvalidArgument,
        PrewarmError::NotFound(_) => Code::NotFound,
        PrewarmError::Conflict(_) => Code::FailedPrecondition,
        PrewarmError::Store(_) => Code::Internal,
        PrewarmError::Cache(c) => return super::service::cache_status(c),
    };
    Status::new(code, e.to_string())
}

fn schedule_pb(s: &ScheduleSpec) -> pb::Schedule {
    pb::Schedule {
        name: s.name.clone(),
        cron: s.cron.clone(),
        time_zone: s.time_zone.clone().unwrap_or_default(),
        images: s.images.clone(),
        top: s.top.unwrap_or(0) as u32,
        jitter_ms: s.jitter_ms,
        concurrency: s.concurrency as u32,
        catch_up: s.catch_up,
        from_config: s.from_config,
    }
}

fn image_result_pb(r: &ImageResult) -> pb::ImageResult {
    pb::ImageResult {
        image: r.image.clone(),
        outcome: r.outcome.as_str().to_owned(),
        error: r.error.clone().unwrap_or_default(),
        bytes: r.bytes,
        seconds: r.seconds,
    }
}

fn run_pb(r: &RunRecord) -> pb::Run {
    pb::Run {
        schedule: r.schedule.clone(),
        trigger: r.trigger.clone(),
        scheduled_for: r.scheduled_for.unwrap_or(0),
        started: r.started,
        finished: r.finished.unwrap_or(0),
        jitter_ms: r.jitter_ms,
        outcome: r.outcome.as_str().to_owned(),
        images: r.images.iter().map(image_result_pb).collect(),
    }
}

fn info_pb(i: &ScheduleInfo) -> pb::ScheduleInfo {
    pb::ScheduleInfo {
        schedule: Some(schedule_pb(&i.spec)),
        next_fire: i.next_fire.unwrap_or(0),
        last_run: i.last_run.as_ref().map(run_pb),
        running: i.running,
    }
}

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for MaintenanceApi {
    type RunScheduleStream = BoxStream<pb::RunProgress>;

    async fn gc(&self, req: Request<pb::GcRequest>) -> Result<Response<pb::GcResponse>, Status> {
        let dry_run = req.get_ref().dry_run;
        let who = caller(&req)?;
        if !dry_run {
            self.require_admin(&req, "gc")?;
        }
        let admin = self.admin.is_admin(&who);
        let shown = |r: &ImageRecord| shown_to(r, who.uid, admin);
        let report = self.cache.gc(dry_run).await.map_err(|e| cache_status(&e))?;
        Ok(Response::new(pb::GcResponse {
            dry_run,
            evicted: report
                .plan
                .evict
                .iter()
                .filter(|(r, _)| shown(r))
                .map(|(r, why)| pb::Eviction {
                    image: Some(to_pb(r)),
                    reason: why.as_str().to_owned(),
                })
                .collect(),
            protected: report
                .plan
                .protected
                .iter()
                .filter(|(r, _)| shown(r))
                .map(|(r, why)| pb::ProtectedImage {
                    image: Some(to_pb(r)),
                    why: why.clone(),
                })
                .collect(),
            shortfall: report.plan.shortfall.unwrap_or_default(),
            fs_total: report.fs.map(|f| f.total).unwrap_or(0),
            fs_used: report.fs.map(|f| f.used).unwrap_or(0),
            enabled: self.cache.eviction_enabled(),
        }))
    }

    async fn top(&self, req: Request<pb::TopRequest>) -> Result<Response<pb::TopResponse>, Status> {
        let who = caller(&req)?;
        let admin = self.admin.is_admin(&who);
        let limit = match req.into_inner().limit {
            0 => 20,
            n => n as usize,
        };
        let top = self
            .prewarm
            .top(limit)
            .await
            .map_err(|e| prewarm_status(&e))?;
        Ok(Response::new(pb::TopResponse {
            images: top
                .iter()
                .filter(|r| shown_to(&r.record, who.uid, admin))
                .map(|r| pb::RankedImage {
                    image: Some(to_pb(&r.record)),
                    score: r.score,
                    absent: !r.present,
                })
                .collect(),
        }))
    }

    async fn add_schedule(
        &self,
        req: Request<pb::Schedule>,
    ) -> Result<Response<pb::ScheduleInfo>, Status> {
        self.require_admin(&req, "adding a pre-warm schedule")?;
        let s = req.into_inner();
        let spec = ScheduleSpec {
            name: s.name,
            cron: s.cron,
            time_zone: (!s.time_zone.is_empty()).then_some(s.time_zone),
            images: s.images,
            top: (s.top > 0).then_some(s.top as usize),
            jitter_ms: s.jitter_ms,
            concurrency: if s.concurrency == 0 {
                DEFAULT_PREWARM_CONCURRENCY
            } else {
                s.concurrency as usize
            },
            catch_up: s.catch_up,
            from_config: false,
        };
        let info = self
            .prewarm
            .add(spec)
            .await
            .map_err(|e| prewarm_status(&e))?;
        Ok(Response::new(info_pb(&info)))
    }

    async fn remove_schedule(
        &self,
        req: Request<pb::ScheduleRef>,
    ) -> Result<Response<pb::RemoveScheduleResponse>, Status> {
        self.require_admin(&req, "removing a pre-warm schedule")?;
        self.prewarm
            .remove(&req.into_inner().name)
            .await
            .map_err(|e| prewarm_status(&e))?;
        Ok(Response::new(pb::RemoveScheduleResponse {}))
    }

    async fn list_schedules(
        &self,
        req: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        caller(&req)?;
        let all = self.prewarm.list().await.map_err(|e| prewarm_status(&e))?;
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: all.iter().map(info_pb).collect(),
        }))
    }

    async fn run_schedule(
        &self,
        req: Request<pb::ScheduleRef>,
    ) -> Result<Response<Self::RunScheduleStream>, Status> {
        self.require_admin(&req, "running a pre-warm schedule")?;
        let name = req.into_inner().name;
        // Fail fast on an unknown or busy schedule, before the stream starts.
        let listed = self.prewarm.list().await.map_err(|e| prewarm_status(&e))?;
        match listed.iter().find(|i| i.spec.name == name) {
            None => return Err(prewarm_status(&PrewarmError::NotFound(name))),
            Some(i) if i.running => {
                return Err(Status::failed_precondition(format!(
                    "schedule {name:?} is running already"
                )))
            }
            Some(_) => {}
        }
        // Bounded: pull progress is dropped for a client that does not read; each image's
        // start and outcome, and the run's end, are kept for it in order (two per image).
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::RunProgress, Status>>(
            super::service::STREAM_BUFFER,
        );
        let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel::<RunEvent>();
        let prewarm = Arc::clone(&self.prewarm);
        let why = format!("cimaged is shutting down; the run of schedule {name:?} was cut short");
        self.background.spawn(async move {
            use pb::run_progress::Progress as P;
            let msg = |p| Ok(pb::RunProgress { progress: Some(p) });
            let mut owed: std::collections::VecDeque<P> = Default::default();
            let take = |r: RunEvent, owed: &mut std::collections::VecDeque<P>| match r {
                RunEvent::Pulling(p) if owed.is_empty() => {
                    let _ = tx.try_send(msg(P::Pulling(super::service::progress_pb(&p))));
                }
                RunEvent::Pulling(_) => {}
                RunEvent::Started(image) => owed.push_back(P::Started(image)),
                RunEvent::Finished(r) => owed.push_back(P::Image(image_result_pb(&r))),
            };
            let run = prewarm.run_now(&name, Some(ptx));
            tokio::pin!(run);
            let result = loop {
                tokio::select! {
                    r = &mut run => break r,
                    Some(r) = prx.recv() => take(r, &mut owed),
                    permit = tx.reserve(), if !owed.is_empty() => match permit {
                        Ok(permit) => permit.send(msg(owed.pop_front().expect("not empty"))),
                        Err(_) => owed.clear(),
                    },
                }
            };
            while let Ok(r) = prx.try_recv() {
                take(r, &mut owed);
            }
            for p in owed {
                if tx.send(msg(p)).await.is_err() {
                    return;
                }
            }
            let _ = tx
                .send(match result {
                    Ok(run) => msg(P::Done(run_pb(&run))),
                    Err(e) => Err(prewarm_status(&e)),
                })
                .await;
        });
        Ok(Response::new(ending_at_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &self.background,
            why,
        )))
    }

    async fn schedule_history(
        &self,
        req: Request<pb::ScheduleRef>,
    ) -> Result<Response<pb::ScheduleHistoryResponse>, Status> {
        caller(&req)?;
        let runs = self
            .prewarm
            .history(&req.into_inner().name)
            .await
            .map_err(|e| prewarm_status(&e))?;
        Ok(Response::new(pb::ScheduleHistoryResponse {
            runs: runs.iter().map(run_pb).collect(),
        }))
    }
}
