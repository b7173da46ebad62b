//! containerd's content service on the runtime's socket (namespace `k8s.io`), through the
//! `containerd-client` bindings: the bytes of the downloads under way, the blobs the store
//! holds, and (in `ingest.rs`) cimage's own writes and leases.
//!
//! CRI reports nothing while `PullImage` runs. containerd writes each blob it fetches as an
//! *ingest* of its content store and answers `Content/ListStatuses` with each ingest's offset
//! and total. An ingest disappears once its blob is committed; `Content/Info` then finds the
//! blob. A runtime without that service (CRI-O, or a CRI endpoint that serves the CRI alone)
//! answers `Unimplemented`: from then on cimage stops asking, pulls report phases without
//! bytes, and cimage fetches nothing into it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use containerd_client::services::v1::content_client::ContentClient as Grpc;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::{
    InfoRequest, ListRequest, ListStatusesRequest, Status as IngestStatus,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::CRI_NAMESPACE;
use crate::runtime::{Ingest, RuntimeError};

/// The gRPC header that names the lease a call works under.
const LEASE_HEADER: &str = "containerd-lease";

/// A request in the CRI plugin's namespace, under `lease` when given.
pub(super) fn request<T>(message: T, lease: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    let md = req.metadata_mut();
    md.insert(
        "containerd-namespace",
        tonic::metadata::MetadataValue::from_static(CRI_NAMESPACE),
    );
    if let Some(id) = lease {
        if let Ok(v) = id.parse() {
            md.insert(LEASE_HEADER, v);
        }
    }
    req
}

/// A client of containerd's content and leases services; remembers a runtime that has none.
#[derive(Clone)]
pub(super) struct ContentClient {
    pub(super) channel: Channel,
    pub(super) endpoint: std::path::PathBuf,
    pub(super) timeout: Duration,
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

    pub(super) fn grpc(&self) -> Grpc<Channel> {
        Grpc::new(self.channel.clone())
    }

    pub(super) fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }

    /// Whether the runtime is known to have no content service.
    pub(super) fn is_unsupported(&self) -> bool {
        self.unsupported.load(Ordering::Relaxed)
    }

    /// Bounds `call` by the client's timeout; an `Unimplemented` answer marks the runtime as
    /// one without the service and reads as `None`.
    pub(super) async fn bounded<R>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    ) -> Result<Option<R>, RuntimeError> {
        if self.is_unsupported() {
            return Ok(None);
        }
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(r)) => Ok(Some(r.into_inner())),
            Ok(Err(s)) if s.code() == Code::Unimplemented => {
                tracing::info!(
                    endpoint = %self.endpoint.display(),
                    "the runtime has no containerd content service: pulls report phases without bytes, and cimage fetches no blobs into it"
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
        let mut c = self.grpc();
        let resp = self
            .bounded(
                "Content.ListStatuses",
                c.list_statuses(request(ListStatusesRequest::default(), None)),
            )
            .await?;
        Ok(resp.map(|r| r.statuses.into_iter().filter_map(ingest).collect()))
    }

    /// Whether the runtime answers both the content and the leases service (one cheap call
    /// of each; a refusal is remembered).
    pub(super) async fn available(&self) -> bool {
        if !matches!(self.ingests().await, Ok(Some(_))) {
            return false;
        }
        let mut l = self.leases();
        let none = ListRequest {
            filters: vec!["id==cimage-probe".into()],
        };
        matches!(
            self.bounded("Leases.List", l.list(request(none, None)))
                .await,
            Ok(Some(_))
        )
    }

    /// Whether the content store holds blob `digest`; `None` when the runtime has no content
    /// service.
    pub(super) async fn has_blob(&self, digest: &str) -> Result<Option<bool>, RuntimeError> {
        Ok(self.info(digest).await?.map(|i| i.is_some()))
    }

    /// The size of blob `digest` in the content store; `None` when it is not there or the
    /// runtime has no content service.
    pub(super) async fn blob_size(&self, digest: &str) -> Result<Option<u64>, RuntimeError> {
        Ok(self.info(digest).await?.flatten())
    }

    /// The size of blob `digest` in the store: `Some(None)` when it does not hold it, `None`
    /// when the runtime has no content service.
    async fn info(&self, digest: &str) -> Result<Option<Option<u64>>, RuntimeError> {
        let mut c = self.grpc();
        let req = request(
            InfoRequest {
                digest: digest.to_owned(),
            },
            None,
        );
        match self.bounded("Content.Info", c.info(req)).await {
            Ok(r) => Ok(r.map(|r| Some(r.info.map_or(0, |i| i.size.max(0) as u64)))),
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
            ..Default::default()
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
            ..Default::default()
        })
        .unwrap();
        assert_eq!((by_ref.digest, by_ref.offset, by_ref.total), (d, 0, 5));
        assert!(ingest(IngestStatus {
            r#ref: "unnamed".into(),
            ..Default::default()
        })
        .is_none());
    }

    #[test]
    fn requests_carry_the_namespace_and_the_lease() {
        let r = request((), Some("cimage-fetch-1"));
        assert_eq!(r.metadata().get("containerd-namespace").unwrap(), "k8s.io");
        assert_eq!(r.metadata().get(LEASE_HEADER).unwrap(), "cimage-fetch-1");
        assert!(request((), None).metadata().get(LEASE_HEADER).is_none());
    }
}
