//! cimaged as the node's CRI image endpoint: `runtime.v1.ImageService` on a socket of its own,
//! so that Craned's step supervisor, kubelet and `crictl` go through cimage without a change.
//!
//! - `PullImage` goes through the same puller as `cimage pull` (single flight, limits, retries,
//!   room made on disk), as the `Always` policy: the runtime is not asked to pull when the
//!   registry has just confirmed, with the request's own credentials, that the tag still points
//!   at the digest the runtime holds. The pull runs in a task of its own: a client whose deadline
//!   passes leaves it running (up to `PullTimeout`), and its retry joins it.
//! - `ImageStatus`, `ListImages` and `ImageFsInfo` are the runtime's own answers, passed through.
//! - `RemoveImage` is refused for an image pinned in cimage, else passed through and the image
//!   taken out of the index.
//! - A `PullImage`, and an `ImageStatus` that finds the image, count as a use (once per
//!   connection and image within a second), recorded behind the answer.
//!
//! The socket is root's alone (mode 0600; other peers are turned away at accept): it carries
//! no per-uid cap and no idle limit, since Craned opens a connection per step and kubelet keeps
//! its connections for days. It serves at most `ImageService.MaxConnections` connections at
//! once, so that what they may hold is bounded; the next waits in the listen queue until one
//! closes (root's clients are made to wait, never refused).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest, ImageStatusResponse,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::abuse::{AbuseLog, Refusal, REPORT_EVERY};
use super::authority::AuthorityFix;
use super::service::pull_status;
use crate::background::Background;
use crate::cache::{Cache, CacheError, Origin};
use crate::credentials::Credentials;
use crate::policy::PullPolicy;
use crate::puller::{EnsureRequest, Puller};
use crate::runtime::RuntimeImage;

/// Largest message either way, as kubelet allows.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Uses of one image from one connection closer together than this count once (kubelet's
/// `PullImage` is followed by an `ImageStatus` of the same image).
const SAME_USE: Duration = Duration::from_secs(1);

/// Which connection a request came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// An accepted connection of the CRI socket, numbered; what the client sends goes through
/// [`AuthorityFix`] (older gRPC clients name the socket's path as `:authority`).
pub struct CriConn {
    inner: AuthorityFix<UnixStream>,
    id: ConnId,
    /// Its place among the connections served at once, given back when it closes.
    _slot: OwnedSemaphorePermit,
}

impl Connected for CriConn {
    type ConnectInfo = ConnId;
    fn connect_info(&self) -> ConnId {
        self.id
    }
}

impl AsyncRead for CriConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CriConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.inner.get_mut()).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner.get_mut()).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.inner.get_mut()).poll_shutdown(cx)
    }
}

/// The image service, over the runtime's own image endpoint (`upstream`) and cimage's puller.
pub struct CriImageApi {
    upstream: ImageServiceClient<Channel>,
    puller: Arc<Puller>,
    cache: Arc<Cache>,
    background: Background,
    /// Last counted use per (connection, image id).
    recent: Mutex<HashMap<(ConnId, String), Instant>>,
}

impl CriImageApi {
    /// The service, passing through to the image endpoint at `upstream`.
    pub fn new(
        upstream: &std::path::Path,
        puller: Arc<Puller>,
        cache: Arc<Cache>,
        background: Background,
    ) -> Self {
        Self {
            upstream: ImageServiceClient::new(crate::cri::unix_channel(upstream))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            puller,
            cache,
            background,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a use of `id` on `conn` is new (not within [`SAME_USE`] of the last one
    /// counted); notes it either way.
    fn first_use(&self, conn: Option<ConnId>, id: &str) -> bool {
        let Some(conn) = conn else { return true };
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap();
        if recent.len() > 4096 {
            recent.retain(|_, t| now.duration_since(*t) < SAME_USE);
        }
        match recent.insert((conn, id.to_owned()), now) {
            Some(t) => now.duration_since(t) >= SAME_USE,
            None => true,
        }
    }

    /// Counts a use of `image` behind the answer (group-committed within milliseconds; a crash
    /// loses at most the uses not yet committed, never an image).
    fn count_use(&self, conn: Option<ConnId>, image: RuntimeImage) {
        if !self.first_use(conn, &image.id) {
            return;
        }
        let cache = Arc::clone(&self.cache);
        self.background.spawn(async move {
            if let Err(e) = cache.record_use(image, Origin::Cri).await {
                warn!("recording a use from the CRI endpoint: {e}");
            }
        });
    }
}

/// The credentials of a CRI `AuthConfig` for an image on registry `host`, as containerd reads
/// them: none when `server_address` names another registry (credentials for one registry are
/// never sent to another); then `username`/`password`, an `identity_token` (an OAuth2 refresh
/// token, which the runtime exchanges), `auth` (base64 of `user:password`), and last a
/// `registry_token` (a bearer token). Empty strings mean none.
pub fn credentials_of(
    auth: Option<AuthConfig>,
    host: Option<&str>,
) -> Result<Option<Credentials>, Status> {
    use crate::credentials::SecretKind;
    let Some(a) = auth else { return Ok(None) };
    if !a.server_address.is_empty()
        && host.is_some_and(|h| registry_host(&a.server_address) != registry_host(h))
    {
        return Ok(None);
    }
    if !a.username.is_empty() {
        return Ok(Some(Credentials {
            username: a.username,
            password: a.password,
            kind: SecretKind::Password,
        }));
    }
    if !a.identity_token.is_empty() {
        return Ok(Some(Credentials {
            username: String::new(),
            password: a.identity_token,
            kind: SecretKind::IdentityToken,
        }));
    }
    if !a.auth.is_empty() {
        let bad = || Status::invalid_argument("PullImage: auth is not base64 of user:password");
        let raw = crate::credentials::base64_decode(a.auth.trim()).ok_or_else(bad)?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let (user, pass) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials {
            username: user.to_owned(),
            password: pass.to_owned(),
            kind: SecretKind::Password,
        }));
    }
    Ok((!a.registry_token.is_empty()).then(|| Credentials {
        username: String::new(),
        password: a.registry_token,
        kind: SecretKind::RegistryToken,
    }))
}

/// A registry's `host[:port]` from a server address as clients write it (`https://host/v1/`),
/// with Docker Hub's other names folded into `docker.io`.
fn registry_host(address: &str) -> &str {
    let rest = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    let host = rest.split('/').next().unwrap_or(rest);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        h => h,
    }
}

fn image_of(spec: Option<k8s_cri::v1::ImageSpec>, op: &str) -> Result<String, Status> {
    spec.map(|s| s.image)
        .filter(|i| !i.is_empty())
        .ok_or_else(|| Status::invalid_argument(format!("{op}: no image given")))
}

#[tonic::async_trait]
impl ImageService for CriImageApi {
    async fn list_images(
        &self,
        req: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.upstream.clone().list_images(req.into_inner()).await
    }

    async fn image_status(
        &self,
        req: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let conn = req.extensions().get::<ConnId>().copied();
        let resp = self.upstream.clone().image_status(req.into_inner()).await?;
        if let Some(i) = &resp.get_ref().image {
            self.count_use(conn, crate::cri::to_image(i.clone()));
        }
        Ok(resp)
    }

    async fn pull_image(
        &self,
        req: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let conn = req.extensions().get::<ConnId>().copied();
        let r = req.into_inner();
        let image = image_of(r.image, "PullImage")?;
        let host = crate::reference::ImageRef::parse(&image)
            .ok()
            .map(|i| i.registry().to_owned());
        let credentials = credentials_of(r.auth, host.as_deref())?;
        let puller = Arc::clone(&self.puller);
        // A task of its own: the pull goes on when this caller's deadline passes.
        let pull = self.background.spawn(async move {
            puller
                .ensure(EnsureRequest {
                    progress: None,
                    image,
                    policy: Some(PullPolicy::Always),
                    credentials,
                    origin: Origin::Cri,
                    requester: None,
                })
                .await
        });
        let ensured = pull
            .await
            .map_err(|e| Status::internal(format!("the pull task failed: {e}")))?
            .map_err(|e| pull_status(&e))?;
        // The use is counted by the puller; an ImageStatus right after is the same use.
        self.first_use(conn, &ensured.record.id);
        Ok(Response::new(PullImageResponse {
            image_ref: ensured.record.id,
        }))
    }

    async fn remove_image(
        &self,
        req: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let r = req.into_inner();
        let image = image_of(r.image.clone(), "RemoveImage")?;
        let known = match self.cache.find_and_adopt(&image).await {
            Ok((rt, rec)) => Some((rt, rec)),
            Err(CacheError::NotFound { .. }) => None,
            Err(e) => return Err(super::service::cache_status(&e)),
        };
        if let Some((_, rec)) = known.as_ref().filter(|(_, rec)| rec.pinned) {
            return Err(Status::failed_precondition(format!(
                "image {} is pinned in cimage (cimage pin); unpin it before removing it",
                rec.names.first().unwrap_or(&rec.id)
            )));
        }
        let resp = self.upstream.clone().remove_image(r).await?;
        if let Some((rt, _)) = known {
            info!(image = %rt.id, "removed through the CRI endpoint");
            if let Err(e) = self.cache.drop_removed(&rt.id).await {
                warn!(image = %rt.id, "taking a removed image out of the index: {e}");
            }
        }
        Ok(resp)
    }

    async fn image_fs_info(
        &self,
        req: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        self.upstream.clone().image_fs_info(req.into_inner()).await
    }
}

/// The accept loop's state: the listener, connection numbers, the free places, and when the
/// cap was last told in the log.
struct Accepting {
    listener: UnixListener,
    next: AtomicU64,
    slots: Arc<Semaphore>,
    max: usize,
    abuse: AbuseLog,
    told_full: Option<Instant>,
}

impl Accepting {
    /// A free place, waited for when all `max` are taken (told once a minute at most).
    async fn slot(&mut self) -> OwnedSemaphorePermit {
        if let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() {
            return slot;
        }
        if self.told_full.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
            self.told_full = Some(Instant::now());
            warn!(
                "the CRI image socket serves its {} connections (ImageService.MaxConnections);                  the next waits to be accepted until one closes",
                self.max
            );
        }
        Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

/// Serves the image service on `listener` (made by [`super::bind_socket`] with mode 0600) until
/// `shutdown` resolves, at most `max_connections` connections at once. Peers other than root
/// are turned away at accept, counted by `abuse`.
pub async fn serve(
    listener: UnixListener,
    api: CriImageApi,
    max_connections: usize,
    abuse: AbuseLog,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let state = Accepting {
        listener,
        next: AtomicU64::new(1),
        slots: Arc::new(Semaphore::new(max_connections)),
        max: max_connections,
        abuse,
        told_full: None,
    };
    let incoming = futures::stream::unfold(state, |mut state| async move {
        loop {
            let slot = state.slot().await;
            match state.listener.accept().await {
                Ok((stream, _)) => {
                    match stream.peer_cred() {
                        Ok(c) if c.uid() == 0 => {}
                        // Not root: closed at once (the socket's mode should already say so).
                        Ok(c) => {
                            state.abuse.note(Some(c.uid()), Refusal::NotRoot);
                            continue;
                        }
                        Err(_) => {
                            state.abuse.note(None, Refusal::UnidentifiedPeer);
                            continue;
                        }
                    }
                    let id = ConnId(state.next.fetch_add(1, Ordering::Relaxed));
                    let conn = CriConn {
                        inner: AuthorityFix::new(stream),
                        id,
                        _slot: slot,
                    };
                    return Some((Ok::<_, io::Error>(conn), state));
                }
                Err(e) => return Some((Err(e), state)),
            }
        }
    });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(
            ImageServiceServer::new(api)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_basic_form_of_auth_config_gives_the_same_credentials() {
        let want = Some(Credentials {
            username: "alice".into(),
            password: "pw:with:colons".into(),
            kind: crate::credentials::SecretKind::Password,
        });
        let plain = AuthConfig {
            username: "alice".into(),
            password: "pw:with:colons".into(),
            ..Default::default()
        };
        assert_eq!(
            credentials_of(Some(plain), Some("127.0.0.1:5443")).unwrap(),
            want
        );
        let encoded = AuthConfig {
            auth: {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode("alice:pw:with:colons")
            },
            server_address: "127.0.0.1:5443".into(),
            ..Default::default()
        };
        assert_eq!(
            credentials_of(Some(encoded), Some("127.0.0.1:5443")).unwrap(),
            want
        );
        // Craned always sends an AuthConfig, with empty strings when it has none.
        assert_eq!(
            credentials_of(Some(AuthConfig::default()), None).unwrap(),
            None
        );
        assert_eq!(credentials_of(None, None).unwrap(), None);
        let bad = AuthConfig {
            auth: "not base64!".into(),
            ..Default::default()
        };
        let e = credentials_of(Some(bad), None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            !format!("{e:?}").contains("not base64!"),
            "the input is not quoted"
        );
        // Tokens keep their kind: the runtime gets them in the same fields.
        let token = AuthConfig {
            registry_token: "secret-token".into(),
            ..Default::default()
        };
        let c = credentials_of(Some(token), None).unwrap().unwrap();
        assert_eq!(c.kind, crate::credentials::SecretKind::RegistryToken);
        assert!(!format!("{c:?}").contains("secret-token"));
        let refresh = AuthConfig {
            identity_token: "refresh-secret".into(),
            ..Default::default()
        };
        let c = credentials_of(Some(refresh), None).unwrap().unwrap();
        assert_eq!(
            (c.kind, c.username.as_str()),
            (crate::credentials::SecretKind::IdentityToken, ""),
            "a refresh token goes with no user name, as containerd reads it"
        );
        // Credentials for another registry are not used at all.
        let elsewhere = AuthConfig {
            username: "alice".into(),
            password: "pw".into(),
            server_address: "https://other.example:5000/v1/".into(),
            ..Default::default()
        };
        assert_eq!(
            credentials_of(Some(elsewhere.clone()), Some("127.0.0.1:5443")).unwrap(),
            None
        );
        let hub = AuthConfig {
            server_address: "https://index.docker.io/v1/".into(),
            ..elsewhere
        };
        assert!(credentials_of(Some(hub), Some("docker.io"))
            .unwrap()
            .is_some());
    }
}
