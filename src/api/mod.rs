//! The gRPC API on a unix socket: the only place, with [`crate::cri`], that speaks tonic.
//!
//! The caller is identified by the socket's peer credentials ([`peer`]), never by a request field.
//! Domain errors become `tonic::Status` codes here ([`service`]). What one uid may hold is
//! bounded: connections ([`gate`]), calls per connection and the bytes of requests not yet
//! arrived whole ([`budget`], [`server`]); refusals are counted and logged sparingly ([`abuse`]).

pub mod abuse;
pub mod answers;
pub mod authority;
pub mod budget;
pub mod cri_image;
pub mod expect;
pub mod gate;
pub mod http;
pub mod launcher;
pub mod maintenance;
pub mod peer;
pub mod readiness;
pub mod server;
pub mod service;

use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;

/// The generated cimage API types (proto/cimage/v1/cimage.proto).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("cimage.v1");
}

impl std::fmt::Debug for pb::Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Creates the API socket: parent directory made if missing, a stale socket file replaced, mode
/// 0660, and group `group` if given, so only root and that group can connect.
pub fn bind_socket(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    bind_socket_mode(path, 0o660, group)
}

/// As [`bind_socket`], with the socket file's `mode` (0600 for root's alone).
pub fn bind_socket_mode(
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> std::io::Result<UnixListener> {
    let with = |what: &str, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| with("creating the directory of", e))?;
    }
    if path.exists() {
        // A socket someone still answers on belongs to a running daemon: do not steal it.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use: another cimaged is already listening there",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path).map_err(|e| with("removing stale socket", e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| with("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| with(&format!("setting mode {mode:o} on"), e))?;
    if let Some(gid) = group {
        chown(path, None, Some(gid)).map_err(|e| with("changing the group of", e))?;
    }
    Ok(listener)
}

/// Calls in flight at once on one connection of root or the admin group (50 concurrent pulls
/// over one connection fit).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Calls in flight at once on one connection of another user (a client that asks for more is
/// made to wait by its HTTP/2 library).
pub const MAX_STREAMS_PER_USER_CONNECTION: u32 = 16;

/// Calls whose request is a stream of messages (see proto/cimage/v1/cimage.proto): their read
/// timeout applies to each message, not to the whole request.
pub const STREAMED_REQUESTS: &[&str] = &["/cimage.v1.Launcher/ExecStream"];

/// A server stream of the API.
pub type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send>>;

/// Ends `stream` with an `UNAVAILABLE` status saying `why` when it ran out because the daemon
/// is shutting down, so a client can tell "done" from "the daemon went away".
pub fn ending_at_shutdown<T: Send + 'static>(
    stream: impl futures::Stream<Item = Result<T, tonic::Status>> + Send + 'static,
    background: &crate::background::Background,
    why: String,
) -> BoxStream<T> {
    use futures::StreamExt;
    let bg = background.clone();
    let last = futures::stream::once(async move {
        bg.is_shutting_down()
            .then(|| Err(tonic::Status::unavailable(why)))
    })
    .filter_map(futures::future::ready);
    Box::pin(stream.chain(last))
}

/// Largest request the API decodes: requests are small (a launch with its environment is a few
/// KiB); anything bigger is refused before it is read.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// The services the API socket serves.
pub struct Services {
    /// Pulls, images, status.
    pub images: service::ImageCacheApi,
    /// Job steps.
    pub launcher: launcher::LauncherApi,
    /// Eviction and pre-warm schedules.
    pub maintenance: maintenance::MaintenanceApi,
    /// Expected images.
    pub expectations: expect::ExpectationsApi,
}

/// Serves the API on `listener` until `shutdown` resolves, admitting connections through
/// `gate` (per-uid caps, idle limit, request budget); refusals count into `metrics`.
pub async fn serve(
    listener: UnixListener,
    gate: gate::Gate,
    services: Services,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let Services {
        images,
        launcher,
        maintenance,
        expectations,
    } = services;
    let routes = tonic::service::Routes::new(
        pb::image_cache_server::ImageCacheServer::new(images)
            .max_decoding_message_size(MAX_REQUEST_BYTES),
    )
    .add_service(
        pb::launcher_server::LauncherServer::new(launcher)
            .max_decoding_message_size(MAX_REQUEST_BYTES),
    )
    .add_service(
        pb::maintenance_server::MaintenanceServer::new(maintenance)
            .max_decoding_message_size(MAX_REQUEST_BYTES),
    )
    .add_service(
        pb::expectations_server::ExpectationsServer::new(expectations)
            .max_decoding_message_size(MAX_REQUEST_BYTES),
    )
    .prepare();
    let settings = server::ConnectionSettings {
        user_streams: MAX_STREAMS_PER_USER_CONNECTION,
        admin_streams: MAX_STREAMS_PER_CONNECTION,
        max_message: MAX_REQUEST_BYTES,
        streamed_requests: STREAMED_REQUESTS,
    };
    let abuse = abuse::AbuseLog::new("API", metrics);
    server::serve(listener, gate, routes, settings, abuse, shutdown).await
}

/// A maintenance client (gc, top, pre-warm) for the API at a unix socket.
pub fn maintenance_client(
    path: &Path,
) -> pb::maintenance_client::MaintenanceClient<tonic::transport::Channel> {
    pb::maintenance_client::MaintenanceClient::new(crate::cri::unix_channel(path))
}

/// An expectations client for the API at a unix socket.
pub fn expectations_client(
    path: &Path,
) -> pb::expectations_client::ExpectationsClient<tonic::transport::Channel> {
    pb::expectations_client::ExpectationsClient::new(crate::cri::unix_channel(path))
}

/// A launcher client for the API at a unix socket.
pub fn launcher_client(
    path: &Path,
) -> pb::launcher_client::LauncherClient<tonic::transport::Channel> {
    // Room for `exec`'s two outputs of up to 4 MiB each.
    pb::launcher_client::LauncherClient::new(crate::cri::unix_channel(path))
        .max_decoding_message_size(16 << 20)
}

/// A client for the API at a unix socket (used by the CLI and the tests).
pub fn client(path: &Path) -> pb::image_cache_client::ImageCacheClient<tonic::transport::Channel> {
    pb::image_cache_client::ImageCacheClient::new(crate::cri::unix_channel(path))
}

#[cfg(test)]
mod tests {
    use super::pb;

    #[test]
    fn the_streamed_requests_are_those_the_proto_declares() {
        let proto = include_str!("../../proto/cimage/v1/cimage.proto");
        let mut service = "";
        let mut streamed = Vec::new();
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().unwrap_or("");
            }
            if let Some(rest) = line.strip_prefix("rpc ") {
                let (name, args) = rest.split_once('(').unwrap();
                if args.trim_start().starts_with("stream ") {
                    streamed.push(format!("/cimage.v1.{service}/{}", name.trim()));
                }
            }
        }
        assert_eq!(streamed, super::STREAMED_REQUESTS);
    }

    #[test]
    fn requests_never_show_a_password_in_debug_output() {
        let creds = Some(pb::Credentials {
            username: "alice".into(),
            password: "hunter2-secret".into(),
        });
        let pull = pb::PullRequest {
            image: "x:1".into(),
            policy: 0,
            credentials: creds.clone(),
        };
        let launch = pb::LaunchRequest {
            credentials: creds,
            ..Default::default()
        };
        for shown in [format!("{pull:?}"), format!("{launch:#?}")] {
            assert!(
                shown.contains("alice") && !shown.contains("hunter2-secret"),
                "{shown}"
            );
        }
    }
}
