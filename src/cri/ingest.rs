//! cimage's own writes into containerd's content store, and the leases that hold them: the
//! [`ContentStore`] of [`CriImageRuntime`].
//!
//! A blob is written through one `Content/Write` stream: a first message with its ref, total
//! and expected digest (containerd answers `AlreadyExists` when it holds the blob, and takes
//! the ref's lock), then the data in order, each message at the offset the store is at, then
//! `COMMIT`, which checks size and digest. containerd answers every message; a few are kept
//! in flight so that the store's disk and the socket overlap. Every call names the lease
//! (`containerd-lease` header) so that what is written is held until the lease goes.

use std::collections::VecDeque;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use containerd_client::services::v1::{
    AbortRequest, CreateRequest, DeleteRequest, ListRequest, WriteAction, WriteContentRequest,
    WriteContentResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use super::content::{request, ContentClient};
use super::CriImageRuntime;
use crate::runtime::{BlobTarget, BlobWriter, ContentStore, RuntimeError, RuntimeErrorKind};

/// Bytes per `WRITE` message (containerd takes up to 16 MiB a message).
const MESSAGE: usize = 1 << 20;
/// Messages sent and not yet answered, at most.
const IN_FLIGHT: usize = 4;

/// The label that makes containerd's garbage collector drop a lease at a time (RFC 3339).
const GC_EXPIRE: &str = "containerd.io/gc.expire";

#[async_trait]
impl ContentStore for CriImageRuntime {
    async fn available(&self) -> bool {
        self.content.available().await
    }

    async fn create_lease(
        &self,
        id: &str,
        expires: SystemTime,
        labels: &[(&str, &str)],
    ) -> Result<(), RuntimeError> {
        let c = &self.content;
        let expiry = chrono::DateTime::<chrono::Utc>::from(expires)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut all: std::collections::HashMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all.insert(GC_EXPIRE.into(), expiry);
        let req = CreateRequest {
            id: id.to_owned(),
            labels: all,
        };
        let mut l = c.leases();
        c.bounded("Leases.Create", l.create(request(req, None)))
            .await?
            .map(|_| ())
            .ok_or_else(|| unsupported("Leases.Create"))
    }

    async fn delete_lease(&self, id: &str) -> Result<(), RuntimeError> {
        let c = &self.content;
        let req = DeleteRequest {
            id: id.to_owned(),
            sync: false,
        };
        let mut l = c.leases();
        match c
            .bounded("Leases.Delete", l.delete(request(req, None)))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind == RuntimeErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn leases_labelled(&self, key: &str, value: &str) -> Result<Vec<String>, RuntimeError> {
        let c = &self.content;
        let req = ListRequest {
            filters: vec![format!("labels.\"{key}\"=={value}")],
        };
        let mut l = c.leases();
        Ok(c.bounded("Leases.List", l.list(request(req, None)))
            .await?
            .map(|r| r.leases.into_iter().map(|l| l.id).collect())
            .unwrap_or_default())
    }

    async fn open_writer(
        &self,
        lease: &str,
        target: &BlobTarget,
    ) -> Result<Option<Box<dyn BlobWriter>>, RuntimeError> {
        CriWriter::open(&self.content, lease, target)
            .await
            .map(|w| w.map(|w| Box::new(w) as Box<dyn BlobWriter>))
    }
}

fn unsupported(op: &'static str) -> RuntimeError {
    RuntimeError {
        op,
        kind: RuntimeErrorKind::Other,
        message: "the runtime has no containerd content and leases service".into(),
    }
}

/// One `Content/Write` stream.
struct CriWriter {
    client: ContentClient,
    lease: String,
    target: BlobTarget,
    tx: Option<mpsc::Sender<WriteContentRequest>>,
    answers: Streaming<WriteContentResponse>,
    /// Bytes sent (the store's offset once every message is answered).
    offset: u64,
    /// Bytes the store has answered for.
    acked: u64,
    /// Bytes gathered for the next message.
    buf: BytesMut,
    /// The sizes of the messages not yet answered, oldest first.
    unanswered: VecDeque<u64>,
}

impl CriWriter {
    /// Opens the stream: `None` when the store holds the blob, or another writer holds the
    /// ref (the runtime's own fetch, or another cimaged): then nothing is to be done here.
    async fn open(
        client: &ContentClient,
        lease: &str,
        target: &BlobTarget,
    ) -> Result<Option<Self>, RuntimeError> {
        let (tx, rx) = mpsc::channel(IN_FLIGHT + 2);
        let first = WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: target.r#ref.clone(),
            total: target.size as i64,
            expected: target.digest.clone(),
            ..Default::default()
        };
        tx.send(first).await.expect("the receiver is held below");
        let mut grpc = client.grpc();
        let call = grpc.write(request(ReceiverStream::new(rx), Some(lease)));
        let not_ours = |s: &Status| {
            s.code() == Code::AlreadyExists
                || (s.code() == Code::Unavailable && s.message().contains("locked"))
        };
        let answers = match tokio::time::timeout(client.timeout, call).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) if not_ours(&s) => return Ok(None),
            Ok(Err(s)) => {
                return Err(client
                    .bounded::<()>("Content.Write", async { Err(s) })
                    .await
                    .err()
                    .unwrap_or_else(|| unsupported("Content.Write")))
            }
            Err(_) => {
                return Err(super::classify(
                    "Content.Write",
                    &client.endpoint,
                    Status::deadline_exceeded("no answer"),
                ))
            }
        };
        let mut w = CriWriter {
            client: client.clone(),
            lease: lease.to_owned(),
            target: target.clone(),
            tx: Some(tx),
            answers,
            offset: 0,
            acked: 0,
            buf: BytesMut::new(),
            unanswered: VecDeque::new(),
        };
        match w.answer().await {
            Ok(_) => Ok(Some(w)),
            Err(s) if not_ours(&s) => {
                tracing::debug!(r#ref = %target.r#ref, "the store holds the blob, or another writer its ref: left as it is");
                Ok(None)
            }
            Err(s) => Err(w.failed(s)),
        }
    }

    fn failed(&self, s: Status) -> RuntimeError {
        let mut e = super::classify("Content.Write", &self.client.endpoint, s);
        e.message = format!("writing {}: {}", self.target.r#ref, e.message);
        e
    }

    /// The store's next answer, bounded by the client's timeout.
    async fn answer(&mut self) -> Result<WriteContentResponse, Status> {
        match tokio::time::timeout(self.client.timeout, self.answers.message()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => Err(Status::unavailable("the store ended the write stream")),
            Ok(Err(s)) => Err(s),
            Err(_) => Err(Status::deadline_exceeded(
                "no answer from the content store",
            )),
        }
    }

    /// Sends one message, and takes answers while too many are unanswered.
    async fn send(&mut self, msg: WriteContentRequest, len: u64) -> Result<(), RuntimeError> {
        let tx = self.tx.as_ref().expect("the stream is open until commit");
        if tx.send(msg).await.is_err() {
            // The call ended: its status says why.
            let s = self
                .answer()
                .await
                .err()
                .unwrap_or_else(|| Status::unavailable("the store ended the write stream"));
            return Err(self.failed(s));
        }
        self.unanswered.push_back(len);
        while self.unanswered.len() > IN_FLIGHT {
            self.take_answer().await?;
        }
        Ok(())
    }

    async fn take_answer(&mut self) -> Result<WriteContentResponse, RuntimeError> {
        let a = self.answer().await.map_err(|s| self.failed(s))?;
        if let Some(n) = self.unanswered.pop_front() {
            self.acked += n;
        }
        Ok(a)
    }

    async fn flush(&mut self) -> Result<(), RuntimeError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = self.buf.split().freeze();
        let len = data.len() as u64;
        let msg = WriteContentRequest {
            action: WriteAction::Write as i32,
            offset: self.offset as i64,
            data: data.to_vec(),
            ..Default::default()
        };
        self.offset += len;
        self.send(msg, len).await
    }

    async fn drain(&mut self) -> Result<(), RuntimeError> {
        while !self.unanswered.is_empty() {
            self.take_answer().await?;
        }
        Ok(())
    }
}

#[async_trait]
impl BlobWriter for CriWriter {
    async fn write(&mut self, mut data: Bytes) -> Result<(), RuntimeError> {
        // In messages of at most MESSAGE bytes: what is held here stays under one message.
        while !data.is_empty() {
            let take = (MESSAGE - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data.split_to(take));
            if self.buf.len() >= MESSAGE {
                self.flush().await?;
            }
        }
        Ok(())
    }

    fn acknowledged(&self) -> u64 {
        self.acked
    }

    async fn restart(&mut self) -> Result<(), RuntimeError> {
        self.flush().await?;
        self.drain().await?;
        // The next write is at offset 0, which makes the store truncate.
        self.offset = 0;
        self.acked = 0;
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), RuntimeError> {
        self.flush().await?;
        let msg = WriteContentRequest {
            action: WriteAction::Commit as i32,
            offset: self.offset as i64,
            total: self.target.size as i64,
            expected: self.target.digest.clone(),
            ..Default::default()
        };
        self.send(msg, 0).await?;
        self.drain().await?;
        self.tx = None;
        Ok(())
    }

    async fn abort(&mut self) -> Result<(), RuntimeError> {
        // While this stream holds the lock, the ingest goes; then the stream ends.
        let mut grpc = self.client.grpc();
        let req = AbortRequest {
            r#ref: self.target.r#ref.clone(),
        };
        let r = self
            .client
            .bounded("Content.Abort", grpc.abort(request(req, Some(&self.lease))))
            .await;
        self.tx = None;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.kind == RuntimeErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}
