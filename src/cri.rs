//! The real [`ImageRuntime`]: the CRI ImageService of containerd or CRI-O over its unix socket
//! (k8s-cri bindings, CRI v1).
//!
//! The channel is lazy: cimaged starts even when the runtime is not up yet, and when the runtime
//! restarts the channel reconnects by itself on the next call (the puller retries the one call that
//! meets the broken connection).

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ListImagesRequest,
    PullImageRequest, RemoveImageRequest,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};

use crate::registry::Credentials;
use crate::runtime::{ImageFsUsage, ImageRuntime, RuntimeError, RuntimeErrorKind, RuntimeImage};

/// Opens a lazy gRPC channel to a unix socket; nothing is dialled until the first call.
pub fn unix_channel(path: &Path) -> Channel {
    let path: PathBuf = path.to_owned();
    Endpoint::from_static("http://localhost").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        },
    ))
}

/// CRI ImageService client.
#[derive(Clone)]
pub struct CriImageRuntime {
    client: ImageServiceClient<Channel>,
    endpoint: PathBuf,
    timeout: Duration,
}

impl CriImageRuntime {
    /// A client for the ImageService at `endpoint`; `timeout` bounds every call but `PullImage`,
    /// whose deadline the puller owns.
    pub fn new(endpoint: &Path, timeout: Duration) -> Self {
        Self {
            client: ImageServiceClient::new(unix_channel(endpoint)),
            endpoint: endpoint.to_owned(),
            timeout,
        }
    }

    fn spec(image: &str) -> Option<ImageSpec> {
        Some(ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        })
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, RuntimeError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(classify(op, &self.endpoint, status)),
            Err(_) => Err(RuntimeError {
                op,
                kind: RuntimeErrorKind::DeadlineExceeded,
                message: format!(
                    "no answer from the runtime at {} within {:?}",
                    self.endpoint.display(),
                    self.timeout
                ),
            }),
        }
    }
}

fn to_image(i: k8s_cri::v1::Image) -> RuntimeImage {
    RuntimeImage {
        id: i.id,
        repo_tags: i.repo_tags,
        repo_digests: i.repo_digests,
        size: i.size,
        pinned: i.pinned,
    }
}

/// Maps a CRI status to a runtime error kind. containerd reports registry failures during a pull
/// as `Unknown` with the cause in the message, so the message is read too.
fn classify(op: &'static str, endpoint: &Path, status: Status) -> RuntimeError {
    let msg = status.message().to_owned();
    let lower = msg.to_ascii_lowercase();
    let kind = match status.code() {
        Code::Unavailable => RuntimeErrorKind::Unavailable,
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
            || lower.contains("tls handshake timeout") =>
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

#[async_trait]
impl ImageRuntime for CriImageRuntime {
    async fn image_status(&self, image: &str) -> Result<Option<RuntimeImage>, RuntimeError> {
        let mut c = self.client.clone();
        let req = ImageStatusRequest {
            image: Self::spec(image),
            verbose: false,
        };
        let resp = self.bounded("ImageStatus", c.image_status(req)).await?;
        Ok(resp.image.map(to_image))
    }

    async fn pull_image(
        &self,
        image: &str,
        credentials: Option<&Credentials>,
    ) -> Result<String, RuntimeError> {
        let mut c = self.client.clone();
        let auth = credentials.map(|cr| AuthConfig {
            username: cr.username.clone(),
            password: cr.password.clone(),
            ..Default::default()
        });
        let req = PullImageRequest {
            image: Self::spec(image),
            auth,
            sandbox_config: None,
        };
        match c.pull_image(req).await {
            Ok(resp) => Ok(resp.into_inner().image_ref),
            Err(status) => Err(classify("PullImage", &self.endpoint, status)),
        }
    }

    async fn list_images(&self) -> Result<Vec<RuntimeImage>, RuntimeError> {
        let mut c = self.client.clone();
        let resp = self
            .bounded(
                "ListImages",
                c.list_images(ListImagesRequest { filter: None }),
            )
            .await?;
        Ok(resp.images.into_iter().map(to_image).collect())
    }

    async fn remove_image(&self, image: &str) -> Result<(), RuntimeError> {
        let mut c = self.client.clone();
        let req = RemoveImageRequest {
            image: Self::spec(image),
        };
        self.bounded("RemoveImage", c.remove_image(req)).await?;
        Ok(())
    }

    async fn image_fs_info(&self) -> Result<Vec<ImageFsUsage>, RuntimeError> {
        let mut c = self.client.clone();
        let resp = self
            .bounded("ImageFsInfo", c.image_fs_info(ImageFsInfoRequest {}))
            .await?;
        Ok(resp
            .image_filesystems
            .into_iter()
            .map(|fs| ImageFsUsage {
                mountpoint: fs.fs_id.map(|f| f.mountpoint).unwrap_or_default(),
                used_bytes: fs.used_bytes.map(|u| u.value).unwrap_or(0),
            })
            .collect())
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
        assert_eq!(k(Code::Unknown, "something odd"), RuntimeErrorKind::Other);
    }
}
