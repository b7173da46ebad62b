//! containerd's content store and leases as cimage's own fetch sees them: a blob is written
//! into the runtime's store under the ref containerd's own fetch would use, held by a lease
//! until the runtime's pull has found it, and committed against its digest. The real
//! implementation is in `crate::cri` (containerd's content and leases API on the runtime
//! socket, namespace `k8s.io`); unit tests use `fake::FakeStore`.

use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::RuntimeError;

/// The ref containerd's fetch writes a layer under (`remotes.MakeRefKey` for a layer): a
/// writer open on it makes the runtime's own fetch of that blob wait, and then find it.
pub fn layer_ref(digest: &str) -> String {
    format!("layer-{digest}")
}

/// A blob to write: its ref, digest and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobTarget {
    /// The ingest's ref ([`layer_ref`]).
    pub r#ref: String,
    /// `sha256:…`, checked at commit.
    pub digest: String,
    /// Its size, checked at commit.
    pub size: u64,
}

/// containerd's content store and leases.
#[async_trait]
pub trait ContentStore: Send + Sync {
    /// Whether the runtime answers containerd's content and leases API (CRI-O, or a CRI
    /// endpoint that serves the CRI alone, does not); asked before each pull that could use it.
    async fn available(&self) -> bool;

    /// Creates lease `id` expiring at `expires` (containerd collects it then, and what only
    /// it holds), with `labels` besides the expiry.
    async fn create_lease(
        &self,
        id: &str,
        expires: SystemTime,
        labels: &[(&str, &str)],
    ) -> Result<(), RuntimeError>;

    /// Deletes lease `id` (what only it held becomes garbage); a lease already gone is done.
    async fn delete_lease(&self, id: &str) -> Result<(), RuntimeError>;

    /// The leases carrying label `key` = `value`.
    async fn leases_labelled(&self, key: &str, value: &str) -> Result<Vec<String>, RuntimeError>;

    /// Opens a writer on `target.ref` under lease `lease`; `None` when the store holds the
    /// blob already. The writer holds the ref's lock until it is committed, aborted or
    /// dropped (whatever it wrote stays as an ingest, which the next writer starts over).
    async fn open_writer(
        &self,
        lease: &str,
        target: &BlobTarget,
    ) -> Result<Option<Box<dyn BlobWriter>>, RuntimeError>;
}

/// One open writer of the content store. Bytes go in order from offset 0.
#[async_trait]
pub trait BlobWriter: Send {
    /// Appends `data`. Returns once at most a small window of what was written (a few MiB) is
    /// not yet acknowledged by the store.
    async fn write(&mut self, data: Bytes) -> Result<(), RuntimeError>;

    /// Bytes written and acknowledged by the store so far (since the last restart).
    fn acknowledged(&self) -> u64;

    /// Starts the blob over at offset 0 (the store drops what was written), keeping the lock.
    async fn restart(&mut self) -> Result<(), RuntimeError>;

    /// Commits the blob: the store checks its size and digest and makes it visible.
    async fn commit(&mut self) -> Result<(), RuntimeError>;

    /// Drops the ingest while still holding the lock, then lets the lock go: the runtime's
    /// own fetch of the blob starts afresh.
    async fn abort(&mut self) -> Result<(), RuntimeError>;
}

/// An in-memory content store for unit tests.
#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    use super::*;
    use std::collections::{BTreeMap, HashSet};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use sha2::{Digest, Sha256};

    use crate::runtime::RuntimeErrorKind;

    /// What the fake store holds and saw.
    #[derive(Default)]
    pub struct State {
        /// Committed blobs by digest.
        pub blobs: BTreeMap<String, Vec<u8>>,
        /// Leases by id, with their labels.
        pub leases: BTreeMap<String, Vec<(String, String)>>,
        /// Refs whose writers are open.
        pub open: HashSet<String>,
        /// Refs in the order their writers were opened.
        pub opened: Vec<String>,
        /// Digests in the order they were committed.
        pub committed: Vec<String>,
        /// Refs aborted.
        pub aborted: Vec<String>,
        /// Restarts (offset 0 again) per ref.
        pub restarts: BTreeMap<String, u32>,
    }

    /// In-memory [`ContentStore`]: writes are checked for order, commits for size and digest.
    #[derive(Default, Clone)]
    pub struct FakeStore {
        /// Its state.
        pub state: Arc<Mutex<State>>,
        /// The API is refused (as by a runtime without containerd's services).
        pub refused: Arc<std::sync::atomic::AtomicBool>,
        /// Bytes written and not yet committed or aborted, over all writers.
        pub pending: Arc<AtomicU64>,
    }

    fn refused() -> RuntimeError {
        RuntimeError {
            op: "Content.Write",
            kind: RuntimeErrorKind::Other,
            message: "unimplemented".into(),
        }
    }

    #[async_trait]
    impl ContentStore for FakeStore {
        async fn available(&self) -> bool {
            !self.refused.load(Ordering::SeqCst)
        }
        async fn create_lease(
            &self,
            id: &str,
            _expires: SystemTime,
            labels: &[(&str, &str)],
        ) -> Result<(), RuntimeError> {
            let labels = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            self.state
                .lock()
                .unwrap()
                .leases
                .insert(id.to_owned(), labels);
            Ok(())
        }
        async fn delete_lease(&self, id: &str) -> Result<(), RuntimeError> {
            self.state.lock().unwrap().leases.remove(id);
            Ok(())
        }
        async fn leases_labelled(
            &self,
            key: &str,
            value: &str,
        ) -> Result<Vec<String>, RuntimeError> {
            let s = self.state.lock().unwrap();
            Ok(s.leases
                .iter()
                .filter(|(_, l)| l.iter().any(|(k, v)| k == key && v == value))
                .map(|(id, _)| id.clone())
                .collect())
        }
        async fn open_writer(
            &self,
            lease: &str,
            target: &BlobTarget,
        ) -> Result<Option<Box<dyn BlobWriter>>, RuntimeError> {
            if self.refused.load(Ordering::SeqCst) {
                return Err(refused());
            }
            let mut s = self.state.lock().unwrap();
            assert!(s.leases.contains_key(lease), "a writer under a live lease");
            if s.blobs.contains_key(&target.digest) {
                return Ok(None);
            }
            assert!(
                s.open.insert(target.r#ref.clone()),
                "one writer per ref at a time"
            );
            s.opened.push(target.r#ref.clone());
            Ok(Some(Box::new(FakeWriter {
                store: self.clone(),
                target: target.clone(),
                data: Vec::new(),
                done: false,
            })))
        }
    }

    struct FakeWriter {
        store: FakeStore,
        target: BlobTarget,
        data: Vec<u8>,
        done: bool,
    }

    impl FakeWriter {
        fn close(&mut self) {
            if !self.done {
                self.done = true;
                self.store
                    .pending
                    .fetch_sub(self.data.len() as u64, Ordering::SeqCst);
                self.store
                    .state
                    .lock()
                    .unwrap()
                    .open
                    .remove(&self.target.r#ref);
            }
        }
    }

    impl Drop for FakeWriter {
        fn drop(&mut self) {
            self.close();
        }
    }

    #[async_trait]
    impl BlobWriter for FakeWriter {
        async fn write(&mut self, data: Bytes) -> Result<(), RuntimeError> {
            assert!(!self.done, "a write after the end");
            self.store
                .pending
                .fetch_add(data.len() as u64, Ordering::SeqCst);
            self.data.extend_from_slice(&data);
            Ok(())
        }
        fn acknowledged(&self) -> u64 {
            self.data.len() as u64
        }
        async fn restart(&mut self) -> Result<(), RuntimeError> {
            self.store
                .pending
                .fetch_sub(self.data.len() as u64, Ordering::SeqCst);
            self.data.clear();
            *self
                .store
                .state
                .lock()
                .unwrap()
                .restarts
                .entry(self.target.r#ref.clone())
                .or_default() += 1;
            Ok(())
        }
        async fn commit(&mut self) -> Result<(), RuntimeError> {
            let got = format!("sha256:{:x}", Sha256::digest(&self.data));
            let fail = |message: String| RuntimeError {
                op: "Content.Write",
                kind: RuntimeErrorKind::Other,
                message,
            };
            if self.data.len() as u64 != self.target.size {
                return Err(fail(format!(
                    "unexpected commit size {}, expected {}",
                    self.data.len(),
                    self.target.size
                )));
            }
            if got != self.target.digest {
                return Err(fail(format!(
                    "unexpected commit digest {got}, expected {}",
                    self.target.digest
                )));
            }
            {
                let mut s = self.store.state.lock().unwrap();
                s.blobs
                    .insert(self.target.digest.clone(), std::mem::take(&mut self.data));
                s.committed.push(self.target.digest.clone());
            }
            self.store
                .pending
                .fetch_sub(self.target.size, Ordering::SeqCst);
            self.done = true;
            self.store
                .state
                .lock()
                .unwrap()
                .open
                .remove(&self.target.r#ref);
            Ok(())
        }
        async fn abort(&mut self) -> Result<(), RuntimeError> {
            self.store
                .state
                .lock()
                .unwrap()
                .aborted
                .push(self.target.r#ref.clone());
            self.close();
            Ok(())
        }
    }
}
