//! Bytes of the downloads under way, from containerd's content service on the runtime's socket.
//!
//! CRI reports nothing while `PullImage` runs. containerd writes each blob it fetches as an
//! *ingest* of its content store (namespace `k8s.io` for the CRI plugin) and answers
//! `containerd.services.content.v1.Content/ListStatuses` with each ingest's offset and total.
//! An ingest disappears once its blob is committed; `Content/Info` then finds the blob. A runtime
//! without that service (CRI-O) answers `Unimplemented`: from then on cimage stops asking and
//! pulls report phases without bytes.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::runtime::{Ingest, RuntimeError};

/// `containerd.services.content.v1.ListStatusesRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct ListStatusesRequest {
    #[prost(string, repeated, tag = "1")]
    filters: Vec<String>,
}

/// `containerd.services.content.v1.ListStatusesResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct ListStatusesResponse {
    #[prost(message, repeated, tag = "1")]
    statuses: Vec<IngestStatus>,
}

/// `containerd.services.content.v1.Status` (the timestamps, fields 1 and 2, are not read).
#[derive(Clone, PartialEq, prost::Message)]
struct IngestStatus {
    #[prost(string, tag = "3")]
    r#ref: String,
    #[prost(int64, tag = "4")]
    offset: i64,
    #[prost(int64, tag = "5")]
    total: i64,
    #[prost(string, tag = "6")]
    expected: String,
}

/// `containerd.services.content.v1.InfoRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct InfoRequest {
    #[prost(string, tag = "1")]
    digest: String,
}

/// `containerd.services.content.v1.InfoResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct InfoResponse {
    #[prost(message, optional, tag = "1")]
    info: Option<BlobInfo>,
}

/// `containerd.services.content.v1.Info`: the fields read of it.
#[derive(Clone, PartialEq, prost::Message)]
struct BlobInfo {
    #[prost(string, tag = "1")]
    digest: String,
    #[prost(int64, tag = "2")]
    size: i64,
}

/// A client of containerd's content service; remembers a runtime that has none.
#[derive(Clone)]
pub(super) struct ContentClient {
    channel: Channel,
    endpoint: std::path::PathBuf,
    timeout: Duration,
    unsupported: Arc<AtomicBool>,
}

impl ContentClient {
    /// A client over `channel`, the runtime's socket at `endpoint`.
    pub(super) fn new(channel: Channel, endpoint: &Path, timeout: Duration) -> Self {
        Self {
            channel,
            endpoint: endpoint.to_owned(),
            timeout,
            unsupported: Arc::new(AtomicBool::new(false)),
        }
    }

    async fn unary<Q, R>(&self, method: &'static str, req: Q) -> Result<Option<R>, RuntimeError>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        if self.unsupported.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let call = super::containerd_unary::<Q, R>(self.channel.clone(), method, req);
        let op = if method.ends_with("ListStatuses") {
            "Content.ListStatuses"
        } else {
            "Content.Info"
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(r)) => Ok(Some(r)),
            Ok(Err(s)) if s.code() == Code::Unimplemented => {
                tracing::info!(
                    endpoint = %self.endpoint.display(),
                    "the runtime has no containerd content service: pulls report phases without bytes"
                );
                self.unsupported.store(true, Ordering::Relaxed);
                Ok(None)
            }
            Ok(Err(s)) => Err(super::classify(op, &self.endpoint, s)),
            Err(_) => Err(super::classify(
                op,
                &self.endpoint,
                Status::deadline_exceeded("no answer"),
            )),
        }
    }

    /// Every ingest under way in the CRI namespace; `None` when the runtime has no content
    /// service.
    pub(super) async fn ingests(&self) -> Result<Option<Vec<Ingest>>, RuntimeError> {
        let resp: Option<ListStatusesResponse> = self
            .unary(
                "/containerd.services.content.v1.Content/ListStatuses",
                ListStatusesRequest::default(),
            )
            .await?;
        Ok(resp.map(|r| r.statuses.into_iter().filter_map(ingest).collect()))
    }

    /// Whether the content store holds blob `digest`; `None` when the runtime has no content
    /// service.
    pub(super) async fn has_blob(&self, digest: &str) -> Result<Option<bool>, RuntimeError> {
        Ok(self.info(digest).await?.map(|i| i.is_some()))
    }

    /// The size of blob `digest` in the content store; `None` when it is not there or the
    /// runtime has no content service.
    pub(super) async fn blob_size(&self, digest: &str) -> Result<Option<u64>, RuntimeError> {
        Ok(self
            .info(digest)
            .await?
            .flatten()
            .map(|i| i.size.max(0) as u64))
    }

    /// The content store's info of blob `digest`: `Some(None)` when it does not hold it,
    /// `None` when the runtime has no content service.
    async fn info(&self, digest: &str) -> Result<Option<Option<BlobInfo>>, RuntimeError> {
        let req = InfoRequest {
            digest: digest.to_owned(),
        };
        match self
            .unary::<_, InfoResponse>("/containerd.services.content.v1.Content/Info", req)
            .await
        {
            Ok(r) => Ok(r.map(|r| Some(r.info.unwrap_or_default()))),
            Err(e) if e.kind == crate::runtime::RuntimeErrorKind::NotFound => Ok(Some(None)),
            Err(e) => Err(e),
        }
    }
}

/// The domain's view of one ingest: its digest (the expected one, or the one its ref ends
/// with, as containerd names fetches `layer-sha256:…`), bytes so far and total.
fn ingest(s: IngestStatus) -> Option<Ingest> {
    let digest = if s.expected.starts_with("sha256:") {
        s.expected
    } else {
        let at = s.r#ref.find("sha256:")?;
        s.r#ref[at..].to_owned()
    };
    Some(Ingest {
        digest,
        offset: s.offset.max(0) as u64,
        total: s.total.max(0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ingest_is_named_by_its_expected_digest_or_its_ref() {
        let d = format!("sha256:{}", "a".repeat(64));
        let by_expected = ingest(IngestStatus {
            r#ref: "whatever".into(),
            offset: 10,
            total: 20,
            expected: d.clone(),
        })
        .unwrap();
        assert_eq!(
            (by_expected.digest.as_str(), by_expected.offset),
            (d.as_str(), 10)
        );
        let by_ref = ingest(IngestStatus {
            r#ref: format!("layer-{d}"),
            offset: -1,
            total: 5,
            expected: String::new(),
        })
        .unwrap();
        assert_eq!((by_ref.digest, by_ref.offset, by_ref.total), (d, 0, 5));
        assert!(ingest(IngestStatus {
            r#ref: "unnamed".into(),
            ..Default::default()
        })
        .is_none());
    }
}
