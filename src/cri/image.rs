//! [`ImageRuntime`] over the CRI ImageService.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageStatusRequest, ListImagesRequest, PullImageRequest,
    RemoveImageRequest,
};
use tonic::transport::Channel;
use tonic::Status;

use super::content::ContentClient;
use super::{bounded, classify, image_spec, unix_channel};
use crate::credentials::{Credentials, SecretKind};
use crate::runtime::{ImageFsUsage, ImageRuntime, Ingest, RuntimeError, RuntimeImage};

/// CRI ImageService client (with a RuntimeService client for the runtime's own settings).
#[derive(Clone)]
pub struct CriImageRuntime {
    client: ImageServiceClient<Channel>,
    runtime: RuntimeServiceClient<Channel>,
    content: ContentClient,
    endpoint: PathBuf,
    timeout: Duration,
}

impl CriImageRuntime {
    /// A client for the ImageService at `endpoint` (and the RuntimeService at
    /// `runtime_endpoint`); `timeout` bounds every call but `PullImage`, whose deadline the
    /// puller owns.
    pub fn new(endpoint: &Path, runtime_endpoint: &Path, timeout: Duration) -> Self {
        let channel = unix_channel(endpoint);
        Self {
            content: ContentClient::new(channel.clone(), endpoint, timeout),
            client: ImageServiceClient::new(channel),
            runtime: RuntimeServiceClient::new(unix_channel(runtime_endpoint)),
            endpoint: endpoint.to_owned(),
            timeout,
        }
    }

    /// [`bounded`] with this client's endpoint and timeout.
    async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, RuntimeError> {
        bounded(op, &self.endpoint, self.timeout, fut).await
    }
}

/// The domain's view of a CRI image.
pub fn to_image(i: k8s_cri::v1::Image) -> RuntimeImage {
    RuntimeImage {
        id: i.id,
        repo_tags: i.repo_tags,
        repo_digests: i.repo_digests,
        size: i.size,
        pinned: i.pinned,
    }
}

#[async_trait]
impl ImageRuntime for CriImageRuntime {
    async fn image_status(&self, image: &str) -> Result<Option<RuntimeImage>, RuntimeError> {
        let mut c = self.client.clone();
        let req = ImageStatusRequest {
            image: image_spec(image),
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
        let auth = credentials.map(|cr| match cr.kind {
            SecretKind::Password => AuthConfig {
                username: cr.username.clone(),
                password: cr.password.clone(),
                ..Default::default()
            },
            SecretKind::IdentityToken => AuthConfig {
                username: cr.username.clone(),
                identity_token: cr.password.clone(),
                ..Default::default()
            },
            SecretKind::RegistryToken => AuthConfig {
                registry_token: cr.password.clone(),
                ..Default::default()
            },
        });
        let req = PullImageRequest {
            image: image_spec(image),
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
            image: image_spec(image),
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

    async fn sandbox_image(&self) -> Result<Option<String>, RuntimeError> {
        let mut c = self.runtime.clone();
        let resp = self
            .bounded("Status", c.status(cri::StatusRequest { verbose: true }))
            .await?;
        Ok(sandbox_image_from(&resp.info))
    }

    async fn downloads(&self) -> Result<Option<Vec<Ingest>>, RuntimeError> {
        self.content.ingests().await
    }

    async fn has_blob(&self, digest: &str) -> Result<Option<bool>, RuntimeError> {
        self.content.has_blob(digest).await
    }

    async fn blob_size(&self, digest: &str) -> Result<Option<u64>, RuntimeError> {
        self.content.blob_size(digest).await
    }

    async fn images_in_use(&self) -> Result<Vec<String>, RuntimeError> {
        self.container_images().await
    }
}

impl CriImageRuntime {
    /// The images of every container the runtime knows ([`ImageRuntime::images_in_use`]).
    async fn container_images(&self) -> Result<Vec<String>, RuntimeError> {
        let mut c = self.runtime.clone();
        let resp = self
            .bounded(
                "ListContainers",
                c.list_containers(cri::ListContainersRequest { filter: None }),
            )
            .await?;
        let mut out = Vec::new();
        for ct in resp.containers {
            out.push(ct.image_ref);
            if let Some(i) = ct.image {
                out.push(i.image);
            }
        }
        out.retain(|s| !s.is_empty());
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// The sandbox image from a verbose CRI `Status`: containerd puts its CRI config, with
/// `sandboxImage`, under the `config` key; CRI-O uses `pause_image`.
fn sandbox_image_from(info: &std::collections::HashMap<String, String>) -> Option<String> {
    let config: serde_json::Value = serde_json::from_str(info.get("config")?).ok()?;
    ["sandboxImage", "pause_image", "pauseImage"]
        .iter()
        .find_map(|k| config.get(*k)?.as_str().map(str::to_owned))
        .filter(|s| !s.is_empty())
}
