//! The real runtimes: [`CriImageRuntime`] (CRI ImageService) and [`CriTaskRuntime`] (CRI
//! RuntimeService) of containerd or CRI-O over their unix sockets (k8s-cri bindings, CRI v1).
//! This file owns the connection and the mapping of gRPC errors to [`RuntimeError`]; the two
//! services are in `image` and `runtime`.
//!
//! The channel is lazy: cimaged starts even when the runtime is not up yet, and when the runtime
//! restarts the channel reconnects by itself on the next call (the puller retries the one call that
//! meets the broken connection).

mod content;
mod image;
mod ingest;
mod inspect;
mod layers;
mod runtime;
mod snapshot;
mod spdy;
mod spdy_frames;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::ImageSpec;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use crate::runtime::{RuntimeError, RuntimeErrorKind};
pub use image::{to_image, CriImageRuntime};
pub use runtime::{CriTaskRuntime, MASKED_PATHS, READONLY_PATHS};

/// An image reference (name, digest reference or id) as CRI takes it.
pub(super) fn image_spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    })
}

/// The namespace containerd's CRI plugin keeps its images, containers and content in.
const CRI_NAMESPACE: &str = "k8s.io";

/// Opens a lazy gRPC channel to a unix socket; nothing is dialled until the first call. The
/// channel pings its peer every 30 s (a quiet stream is not an idle connection, and a peer that
/// went away is noticed) and gives up connecting after 5 s.
pub fn unix_channel(path: &Path) -> Channel {
    let path: PathBuf = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
}

/// Maps a CRI status to a runtime error kind. containerd reports registry failures during a pull
/// as `Unknown` with the cause in the message, so the message is read too.
pub(super) fn classify(op: &'static str, endpoint: &Path, status: Status) -> RuntimeError {
    let msg = status.message().to_owned();
    let lower = msg.to_ascii_lowercase();
    let kind = match status.code() {
        Code::Unavailable => RuntimeErrorKind::Unavailable,
        // containerd's CRI plugin right after a restart, before it has loaded its state.
        _ if lower.contains("server is not initialized yet") => RuntimeErrorKind::Unavailable,
        // The connection to the runtime broke mid-call (a restart): as unavailable. Only at
        // the start of the message: containerd's own words about a registry come prefixed
        // with what failed, and are classified below.
        Code::Unknown
            if lower.starts_with("transport error")
                || lower.starts_with("connection reset")
                || lower.starts_with("broken pipe") =>
        {
            RuntimeErrorKind::Unavailable
        }
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
            || lower.contains("tls handshake timeout")
            // A blob whose bytes do not match its digest: corrupted on the way, worth another try.
            || lower.contains("unexpected commit digest")
            || lower.contains("unexpected commit size") =>
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

pub(super) async fn bounded<T>(
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
pub(super) fn gone_is_ok(r: Result<(), RuntimeError>) -> Result<(), RuntimeError> {
    match r {
        Err(e) if e.kind == RuntimeErrorKind::NotFound => Ok(()),
        other => other,
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
        assert_eq!(
            k(Code::Unknown, "transport error"),
            RuntimeErrorKind::Unavailable,
            "the connection to the runtime broke mid-call"
        );
        assert_eq!(
            k(
                Code::Unknown,
                "failed to pull and unpack image \"x\": read tcp 127.0.0.1:1->127.0.0.1:2: read: connection reset by peer"
            ),
            RuntimeErrorKind::Transient
        );
        assert_eq!(k(Code::Unknown, "something odd"), RuntimeErrorKind::Other);
    }
}
