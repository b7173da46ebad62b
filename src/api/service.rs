//! The `ImageCache` gRPC service: checks who is calling, hands the request to the domain, and
//! turns domain errors into status codes with the domain's own message.

use std::sync::Arc;

use tonic::{Code, Request, Response, Status};
use tracing::info;

use super::peer::{AdminPolicy, Caller};
use super::{ending_at_shutdown, pb, BoxStream};
use crate::background::Background;
use crate::cache::{Cache, CacheError, ImageRecord, Origin};
use crate::policy::PullPolicy;
use crate::puller::{EnsureRequest, Ensured, PullError, PullProgress, Puller, SlotOwner};
use crate::registry::RegistryErrorKind;
use crate::runtime::{ImageRuntime, RuntimeError, RuntimeErrorKind};

/// The service implementation.
pub struct ImageCacheApi {
    puller: Arc<Puller>,
    cache: Arc<Cache>,
    runtime: Arc<dyn ImageRuntime>,
    admin: AdminPolicy,
    instance: String,
    background: Background,
    prewarm: Option<Arc<crate::prewarm::Prewarmer>>,
    launcher: Option<Arc<crate::launcher::Launcher>>,
    metrics_addr: Option<String>,
}

impl ImageCacheApi {
    /// A service over the daemon's puller and cache; `instance` is the store's instance id,
    /// reported by `status`; streamed pulls run as tracked tasks of `background`.
    pub fn new(
        puller: Arc<Puller>,
        cache: Arc<Cache>,
        runtime: Arc<dyn ImageRuntime>,
        admin: AdminPolicy,
        instance: String,
        background: Background,
    ) -> Self {
        Self {
            puller,
            cache,
            runtime,
            admin,
            instance,
            background,
            prewarm: None,
            launcher: None,
            metrics_addr: None,
        }
    }

    /// What `status` also reports: the pre-warm schedules' next fires, the task history (as
    /// the launcher counts it) and the metrics address.
    pub fn with_status_of(
        mut self,
        prewarm: Arc<crate::prewarm::Prewarmer>,
        launcher: Arc<crate::launcher::Launcher>,
        metrics_addr: Option<String>,
    ) -> Self {
        self.prewarm = Some(prewarm);
        self.launcher = Some(launcher);
        self.metrics_addr = metrics_addr;
        self
    }

    /// The request as the puller takes it.
    fn ensure_request(who: &Caller, r: pb::PullRequest) -> Result<EnsureRequest, Status> {
        Ok(EnsureRequest {
            image: r.image,
            policy: policy_from_pb(r.policy)?,
            credentials: credentials_from_pb(r.credentials),
            origin: Origin::Pull,
            requester: Some(who.uid),
            progress: None,
        })
    }

    /// Whose share of the pull slots the caller's pulls count against: root's and the admin
    /// group's are the node's own; anyone else's are theirs (`MaxPullsPerUser`).
    fn slot_owner(&self, who: &Caller) -> SlotOwner {
        match self.admin.is_admin(who) {
            true => SlotOwner::Node,
            false => SlotOwner::User(who.uid),
        }
    }

    fn require_admin<T>(&self, req: &Request<T>, what: &str) -> Result<Caller, Status> {
        require_admin(&self.admin, req, what)
    }
}

/// The caller, if it may use admin calls; PERMISSION_DENIED naming `what` otherwise.
pub fn require_admin<T>(
    admin: &AdminPolicy,
    req: &Request<T>,
    what: &str,
) -> Result<Caller, Status> {
    let caller = caller(req)?;
    if !admin.is_admin(&caller) {
        return Err(Status::permission_denied(format!(
            "{what} is an admin call: uid {} is neither root nor in the admin group (ImageCache.AdminGroup)",
            caller.uid
        )));
    }
    Ok(caller)
}

/// The caller's identity from the socket's peer credentials.
pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions().get::<Caller>().cloned().ok_or_else(|| {
        Status::unauthenticated("cannot identify the caller: no peer credentials on the connection")
    })
}

pub(crate) fn runtime_code(e: &RuntimeError) -> Code {
    match e.kind {
        RuntimeErrorKind::NotFound => Code::NotFound,
        RuntimeErrorKind::Unauthorized => Code::Unauthenticated,
        RuntimeErrorKind::Unavailable | RuntimeErrorKind::Transient => Code::Unavailable,
        RuntimeErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        RuntimeErrorKind::Other => Code::Internal,
    }
}

/// Maps a pull failure to a status; the message is the domain's one-line explanation.
pub fn pull_status(e: &PullError) -> Status {
    let code = match e {
        PullError::InvalidReference(_) => Code::InvalidArgument,
        PullError::NotPresent { .. } | PullError::LocalAbsent { .. } => Code::NotFound,
        PullError::Registry { source, .. } => match source.kind {
            RegistryErrorKind::NotFound => Code::NotFound,
            RegistryErrorKind::Unauthorized => Code::Unauthenticated,
            RegistryErrorKind::Unreachable
            | RegistryErrorKind::Server
            | RegistryErrorKind::TokenService => Code::Unavailable,
            RegistryErrorKind::Tls => Code::FailedPrecondition,
            RegistryErrorKind::Other => Code::Unknown,
        },
        PullError::Runtime { source, .. } => runtime_code(source),
        PullError::Timeout { .. } => Code::DeadlineExceeded,
        PullError::Stalled { .. } | PullError::Unresolved { .. } | PullError::Corrupt { .. } => {
            Code::Unavailable
        }
        PullError::Index { .. } => Code::Internal,
        PullError::ShuttingDown { .. } => Code::Unavailable,
        PullError::NoRoom { .. } => Code::ResourceExhausted,
        PullError::Credentials { .. } => Code::FailedPrecondition,
    };
    Status::new(code, e.to_string())
}

/// Maps a cache failure to a status.
pub fn cache_status(e: &CacheError) -> Status {
    let code = match e {
        CacheError::NotFound { .. } => Code::NotFound,
        CacheError::Ambiguous { .. } | CacheError::InvalidReference(_) => Code::InvalidArgument,
        CacheError::Runtime { source, .. } => runtime_code(source),
        CacheError::Store(_) => Code::Internal,
        CacheError::NoRoom { .. } => Code::ResourceExhausted,
    };
    Status::new(code, e.to_string())
}

/// Events a streaming call holds for a client that does not read; pull progress beyond it is
/// dropped (the next report says where the pull is), results and outcomes are waited for.
pub const STREAM_BUFFER: usize = 16;

/// A pull's progress as the API shows it.
pub fn progress_pb(p: &PullProgress) -> pb::PullProgress {
    pb::PullProgress {
        image: p.image.clone(),
        registry: p.registry.clone(),
        phase: p.phase.as_str().to_owned(),
        queue_position: p.queue_position,
        done_bytes: p.done_bytes,
        total_bytes: p.total_bytes,
        layers: p
            .layers
            .iter()
            .map(|l| pb::LayerProgress {
                digest: l.digest.clone(),
                done_bytes: l.done,
                total_bytes: l.total,
            })
            .collect(),
        bytes_known: p.bytes_known,
        rate_bytes_per_second: p.rate,
        requesters: p.requesters,
        attempt: p.attempt,
        age_seconds: p.started.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0),
        error: p.error.clone().unwrap_or_default(),
        eta_seconds: p.eta().map(|d| d.as_secs_f64()).unwrap_or(0.0),
    }
}

/// A served request as the API shows it.
fn response_pb(e: &Ensured) -> pb::PullResponse {
    pb::PullResponse {
        image: e.image.to_string(),
        digest: e.digest.clone().unwrap_or_default(),
        image_id: e.record.id.clone(),
        action: e.action.as_str().to_owned(),
        policy: e.policy.to_string(),
        seconds: e.elapsed.as_secs_f64(),
        size: e.record.size,
        stale: e.stale,
    }
}

/// An index record as the API shows it.
pub fn to_pb(r: &ImageRecord) -> pb::Image {
    pb::Image {
        id: r.id.clone(),
        names: r.names.clone(),
        digests: r.digests.clone(),
        size: r.size,
        first_seen: r.first_seen,
        last_used: r.last_used,
        use_count: r.use_count,
        pinned: r.pinned,
        origin: r.origin.as_str().to_owned(),
    }
}

/// Request credentials, if the request carries any.
pub fn credentials_from_pb(c: Option<pb::Credentials>) -> Option<crate::credentials::Credentials> {
    c.filter(|c| !c.username.is_empty() || !c.password.is_empty())
        .map(|c| crate::credentials::Credentials {
            username: c.username,
            password: c.password,
            kind: crate::credentials::SecretKind::Password,
        })
}

/// The domain pull policy for an API value (`None`: default by tag).
pub fn policy_from_pb(p: i32) -> Result<Option<PullPolicy>, Status> {
    match pb::PullPolicy::try_from(p) {
        Ok(pb::PullPolicy::Unspecified) => Ok(None),
        Ok(pb::PullPolicy::Always) => Ok(Some(PullPolicy::Always)),
        Ok(pb::PullPolicy::IfNotPresent) => Ok(Some(PullPolicy::IfNotPresent)),
        Ok(pb::PullPolicy::Never) => Ok(Some(PullPolicy::Never)),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown pull policy value {p}"
        ))),
    }
}

#[tonic::async_trait]
impl pb::image_cache_server::ImageCache for ImageCacheApi {
    async fn pull(
        &self,
        req: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        let image = r.image.clone();
        let ensured = self
            .puller
            .ensure_for(Self::ensure_request(&who, r)?, self.slot_owner(&who))
            .await
            .map_err(|e| {
                // Debug-quoted and cut: a request's string never starts a log line of its own.
                info!(uid = who.uid, image = ?crate::units::quote_short(&image), error = %e, "pull failed");
                pull_status(&e)
            })?;
        Ok(Response::new(response_pb(&ensured)))
    }

    type PullStreamStream = BoxStream<pb::PullEvent>;

    async fn pull_stream(
        &self,
        req: Request<pb::PullRequest>,
    ) -> Result<Response<Self::PullStreamStream>, Status> {
        use pb::pull_event::Event as E;
        let who = caller(&req)?;
        let r = req.into_inner();
        let image = r.image.clone();
        let ensure_req = Self::ensure_request(&who, r)?;
        let owner = self.slot_owner(&who);
        // Bounded: progress is a view of the moment, dropped for a client that does not read
        // (the result is waited for), so such a client holds at most this many events.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::PullEvent, Status>>(STREAM_BUFFER);
        let puller = Arc::clone(&self.puller);
        self.background.spawn(async move {
            let result = puller
                .ensure_watched_for(ensure_req, owner, |p| {
                    let _ = tx.try_send(Ok(pb::PullEvent {
                        event: Some(E::Progress(progress_pb(&p))),
                    }));
                })
                .await;
            let _ = tx.send(match result {
                Ok(e) => Ok(pb::PullEvent {
                    event: Some(E::Done(response_pb(&e))),
                }),
                Err(e) => {
                    info!(uid = who.uid, image = ?crate::units::quote_short(&image), error = %e, "pull failed");
                    Err(pull_status(&e))
                }
            })
            .await;
        });
        Ok(Response::new(ending_at_shutdown(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &self.background,
            "cimaged is shutting down; the pull was stopped".to_owned(),
        )))
    }

    async fn list_pulls(
        &self,
        req: Request<pb::ListPullsRequest>,
    ) -> Result<Response<pb::ListPullsResponse>, Status> {
        let who = caller(&req)?;
        let admin = self.admin.is_admin(&who);
        let pulls = self
            .puller
            .pulls()
            .into_iter()
            // A pull with credentials may be of a private image: its name is for those who
            // wait on it.
            .filter(|f| admin || !f.credentialed || f.uids.contains(&who.uid))
            .map(|f| progress_pb(&f.progress))
            .collect();
        Ok(Response::new(pb::ListPullsResponse { pulls }))
    }

    async fn list_images(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let who = caller(&req)?;
        let admin = self.admin.is_admin(&who);
        let images = self.cache.list().await.map_err(|e| cache_status(&e))?;
        Ok(Response::new(pb::ListImagesResponse {
            // Private images' names are for those who proved access to them.
            images: images
                .iter()
                .filter(|r| admin || r.visible_to(who.uid))
                .map(to_pb)
                .collect(),
        }))
    }

    async fn inspect_image(
        &self,
        req: Request<pb::InspectImageRequest>,
    ) -> Result<Response<pb::Image>, Status> {
        let who = caller(&req)?;
        let admin = self.admin.is_admin(&who);
        let image = req.into_inner().image;
        let (_, rec) = self
            .cache
            .find_and_adopt(&image)
            .await
            .map_err(|e| cache_status(&e))?;
        if !admin && !rec.visible_to(who.uid) {
            // The same answer as for an absent image.
            return Err(cache_status(&CacheError::NotFound { image }));
        }
        Ok(Response::new(to_pb(&rec)))
    }

    async fn remove_image(
        &self,
        req: Request<pb::RemoveImageRequest>,
    ) -> Result<Response<pb::RemoveImageResponse>, Status> {
        let who = self.require_admin(&req, "removing an image")?;
        let image = req.into_inner().image;
        let rec = self
            .cache
            .remove_image(&image)
            .await
            .map_err(|e| cache_status(&e))?;
        info!(uid = who.uid, image = %image, id = %rec.id, "image removed");
        Ok(Response::new(pb::RemoveImageResponse { image_id: rec.id }))
    }

    async fn set_pinned(
        &self,
        req: Request<pb::SetPinnedRequest>,
    ) -> Result<Response<pb::Image>, Status> {
        let what = if req.get_ref().pinned {
            "pinning an image"
        } else {
            "unpinning an image"
        };
        let who = self.require_admin(&req, what)?;
        let r = req.into_inner();
        let rec = self
            .cache
            .set_pinned(&r.image, r.pinned)
            .await
            .map_err(|e| cache_status(&e))?;
        info!(uid = who.uid, image = %r.image, pinned = r.pinned, "pin changed");
        Ok(Response::new(to_pb(&rec)))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        caller(&req)?;
        let (runtime_ok, runtime_message, mountpoint) = match self.runtime.image_fs_info().await {
            Ok(fs) => (
                true,
                fs.iter()
                    .map(|f| {
                        format!(
                            "images on {} take {}",
                            f.mountpoint,
                            crate::units::format_size(f.used_bytes)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                fs.first().map(|f| f.mountpoint.clone()).unwrap_or_default(),
            ),
            Err(e) => (false, e.to_string(), String::new()),
        };
        let (index_ok, images) = match self.cache.list().await {
            Ok(l) => (true, l.len() as u64),
            Err(_) => (false, 0),
        };
        let fs = self.cache.image_fs_usage().await;
        let (high, low) = self.cache.watermarks().unwrap_or((0.0, 0.0));
        let pulls = self.puller.pulls();
        let queued = self.puller.queued();
        let schedules = match &self.prewarm {
            Some(p) => p
                .list()
                .await
                .map(|l| {
                    l.into_iter()
                        .map(|i| pb::ScheduleFire {
                            name: i.spec.name,
                            next_fire: i.next_fire.unwrap_or(0),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let h = match &self.launcher {
            Some(l) => l.history().await.unwrap_or_default(),
            None => Default::default(),
        };
        let (tasks_recorded, tasks_live, tasks_pruned, history) =
            (h.recorded, h.live, h.pruned_since_start, h.settings);
        Ok(Response::new(pb::StatusResponse {
            tasks_recorded,
            tasks_live,
            tasks_pruned,
            history_max_tasks: history.max_tasks,
            history_keep_seconds: history.keep.as_secs_f64(),
            runtime_ok,
            runtime_message,
            index_ok,
            images,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            last_reconcile: self.cache.last_reconcile(),
            image_fs_used_bytes: fs.map(|f| f.used).unwrap_or(0),
            image_fs_size_bytes: fs.map(|f| f.total).unwrap_or(0),
            image_fs_mountpoint: mountpoint,
            eviction_enabled: self.cache.eviction_enabled(),
            high_percent: high,
            low_percent: low,
            pulls_in_flight: pulls.len() as u32,
            pulls_queued: queued as u32,
            schedules,
            metrics_addr: self.metrics_addr.clone().unwrap_or_default(),
            instance: self.instance.clone(),
        }))
    }
}
