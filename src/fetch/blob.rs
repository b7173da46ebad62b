//! The fetch of one pull's blobs: each blob in segments (range requests), fetched ahead into
//! buffers bounded by the pull's budget and written in order into its writer, its digest
//! checked before the commit (so a blob that does not match is fetched again while cimage
//! still holds its ref).
//!
//! Segments are dispatched strictly in order, bottom layer first: a segment first takes its
//! bytes from the budget, then a connection of the pull and one of its registry, so the
//! segment the writer needs next is never starved by later ones. A segment that fails or
//! stalls is fetched again alone (backoff, `Retry-After`); one that fails for good leaves its
//! blob to the runtime (the writer is aborted, the runtime's own fetch of it starts). A host
//! that answers a range with the whole blob gets that one stream for the blob.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{FetchError, Shared};
use crate::registry::{Blob, BlobBody, RangeReader, RegistryError, RegistryErrorKind};
use crate::runtime::BlobWriter;

/// Longest wait a registry's `Retry-After` gets before a segment is tried again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Aborts its task when dropped: a segment nobody waits for stops.
struct Guard<T>(JoinHandle<T>);

impl<T> Drop for Guard<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection held: one of the pull's and one of its registry's.
type Connection = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// A segment's bytes, and the budget they hold until written.
struct Fetched {
    chunks: Vec<Bytes>,
    _budget: OwnedSemaphorePermit,
}

/// Why a segment brought no bytes.
enum SegmentFailure {
    /// The host answered with the whole blob: it ignores ranges.
    Whole(BlobBody, Connection),
    /// For good (after its retries, or refused).
    Failed(RegistryError),
}

/// What the dispatcher hands the writer, in order.
enum Piece {
    /// One segment being fetched.
    Segment(Guard<Result<Fetched, SegmentFailure>>),
    /// The whole blob in one stream.
    Whole(BlobBody, Connection, OwnedSemaphorePermit),
    /// The blob cannot be fetched here.
    Failed(RegistryError),
}

/// How one pass over a blob ended.
enum Pass {
    Committed,
    /// Its bytes did not match its digest.
    Mismatch(String),
    /// Left to the runtime.
    GiveUp(String),
    /// The fetch was stopped.
    Stopped,
}

/// Fetches every blob of the pull; the first whose digest does not match twice is reported
/// on `fatal`.
pub(super) async fn run_all(
    shared: Arc<Shared>,
    writers: Vec<(Blob, Box<dyn BlobWriter>)>,
    counters: Vec<Arc<AtomicU64>>,
    fatal: watch::Sender<Option<FetchError>>,
    first_in: watch::Sender<bool>,
) {
    let mut turn: Option<oneshot::Receiver<()>> = None;
    let mut blobs = Vec::new();
    let mut first_in = Some(first_in);
    for ((blob, writer), counter) in writers.into_iter().zip(counters) {
        let (next_tx, next_rx) = oneshot::channel();
        let sh = Arc::clone(&shared);
        let mine = turn.replace(next_rx);
        let tell = first_in.take();
        blobs.push(async move {
            if let Some(t) = mine {
                let _ = t.await;
            }
            let r = one_blob(&sh, &blob, writer, &counter, next_tx).await;
            if let Some(t) = tell {
                t.send_replace(true);
            }
            r
        });
    }
    let mut all = futures::stream::iter(blobs).buffer_unordered(usize::MAX);
    while let Some(r) = all.next().await {
        if let Err(e) = r {
            fatal.send_replace(Some(e));
        }
    }
}

/// Fetches one blob, once more when its digest does not match.
async fn one_blob(
    sh: &Arc<Shared>,
    blob: &Blob,
    mut writer: Box<dyn BlobWriter>,
    counter: &AtomicU64,
    next: oneshot::Sender<()>,
) -> Result<(), FetchError> {
    let mut next = Some(next);
    let mut host = sh.image.registry().to_owned();
    for pass in 0..2 {
        let outcome = one_pass(sh, blob, writer.as_mut(), counter, &mut next, &mut host).await;
        let leave = |why: &str| {
            info!(image = %sh.image, digest = %blob.digest, "{why}");
        };
        match outcome {
            Pass::Committed => {
                debug!(image = %sh.image, digest = %blob.digest, "blob fetched in ranges and committed");
                return Ok(());
            }
            Pass::Mismatch(got) if pass == 0 => {
                warn!(image = %sh.image, registry = %host, digest = %blob.digest, %got, "blob does not match its digest: fetching it again");
                counter.store(0, Ordering::Relaxed);
                if let Err(e) = writer.restart().await {
                    leave(&format!(
                        "cannot start the blob over, left to the runtime: {e}"
                    ));
                    abort(writer.as_mut()).await;
                    return Ok(());
                }
            }
            Pass::Mismatch(got) => {
                warn!(image = %sh.image, registry = %host, digest = %blob.digest, %got, "blob does not match its digest a second time");
                abort(writer.as_mut()).await;
                return Err(FetchError {
                    registry: host,
                    image: sh.image.to_string(),
                    digest: blob.digest.clone(),
                });
            }
            Pass::GiveUp(why) => {
                leave(&format!(
                    "cimage's fetch of this blob failed, the runtime fetches it itself: {why}"
                ));
                abort(writer.as_mut()).await;
                return Ok(());
            }
            Pass::Stopped => {
                abort(writer.as_mut()).await;
                return Ok(());
            }
        }
    }
    unreachable!("the second pass returns")
}

async fn abort(writer: &mut dyn BlobWriter) {
    if let Err(e) = writer.abort().await {
        debug!("aborting a writer: {e}");
    }
}

/// One pass: every segment fetched and written in order, the digest checked, the commit.
async fn one_pass(
    sh: &Arc<Shared>,
    blob: &Blob,
    writer: &mut dyn BlobWriter,
    counter: &AtomicU64,
    next: &mut Option<oneshot::Sender<()>>,
    host: &mut String,
) -> Pass {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (host_tx, host_rx) = oneshot::channel();
    let dispatcher = Guard(tokio::spawn(dispatch(
        Arc::clone(sh),
        blob.clone(),
        tx,
        next.take(),
        host_tx,
    )));
    let mut hash = Sha256::new();
    let mut written = 0u64;
    let mut host_rx = Some(host_rx);
    loop {
        let piece = tokio::select! {
            p = rx.recv() => p,
            _ = sh.stop.cancelled() => return Pass::Stopped,
        };
        if let Some(h) = host_rx.as_mut().and_then(|r| r.try_recv().ok()) {
            *host = h;
            host_rx = None;
        }
        let Some(piece) = piece else { break };
        let got = match piece {
            Piece::Failed(e) => return Pass::GiveUp(e.to_string()),
            Piece::Segment(g) => tokio::select! {
                r = join_segment(g) => r,
                _ = sh.stop.cancelled() => return Pass::Stopped,
            },
            Piece::Whole(body, conn, budget) => {
                drop(dispatcher);
                return whole(sh, blob, writer, counter, body, conn, Some(budget), written).await;
            }
        };
        match got {
            Ok(f) => {
                // The buffers go back to the pull before its budget is given back (at the
                // end of this arm): the next segment takes one of them.
                for c in f.chunks {
                    hash.update(&c);
                    written += c.len() as u64;
                    if let Err(e) = writer.write(c.clone()).await {
                        return Pass::GiveUp(e.to_string());
                    }
                    sh.written(c);
                    counter.store(written, Ordering::Relaxed);
                }
            }
            Err(SegmentFailure::Failed(e)) => return Pass::GiveUp(e.to_string()),
            Err(SegmentFailure::Whole(body, conn)) => {
                // A host that ignores ranges after all: the blob from its start, in one stream.
                drop(dispatcher);
                drop(rx);
                return whole(sh, blob, writer, counter, body, conn, None, written).await;
            }
        }
    }
    finish(blob, writer, hash, written).await
}

/// Awaits a segment's task (a task that panicked or was aborted fails the segment).
async fn join_segment(
    mut g: Guard<Result<Fetched, SegmentFailure>>,
) -> Result<Fetched, SegmentFailure> {
    match (&mut g.0).await {
        Ok(r) => r,
        Err(e) => Err(SegmentFailure::Failed(RegistryError {
            registry: String::new(),
            image: String::new(),
            kind: RegistryErrorKind::Other,
            what: "segment task ended",
            detail: e.to_string(),
            retry_after: None,
        })),
    }
}

/// Checks size and digest of what was written, then commits.
async fn finish(blob: &Blob, writer: &mut dyn BlobWriter, hash: Sha256, written: u64) -> Pass {
    if written != blob.size {
        return Pass::GiveUp(format!("{written} bytes arrived of {}", blob.size));
    }
    let got = format!("sha256:{:x}", hash.finalize());
    if got != blob.digest {
        return Pass::Mismatch(got);
    }
    match writer.commit().await {
        Ok(()) => Pass::Committed,
        Err(e) => Pass::GiveUp(format!("the content store refused the commit: {e}")),
    }
}

/// Writes the blob from one stream of the whole (a host that ignores ranges); `written`
/// bytes of it were written already from segments, and the blob is started over.
#[allow(clippy::too_many_arguments)]
async fn whole(
    sh: &Shared,
    blob: &Blob,
    writer: &mut dyn BlobWriter,
    counter: &AtomicU64,
    mut body: BlobBody,
    _conn: Connection,
    _budget: Option<OwnedSemaphorePermit>,
    written: u64,
) -> Pass {
    if written > 0 {
        if let Err(e) = writer.restart().await {
            return Pass::GiveUp(e.to_string());
        }
    }
    debug!(digest = %blob.digest, "the host ignores ranges: one stream for the blob");
    let mut hash = Sha256::new();
    let mut written = 0u64;
    loop {
        let chunk = tokio::select! {
            c = tokio::time::timeout(sh.settings.stall_timeout, body.chunks.next()) => c,
            _ = sh.stop.cancelled() => return Pass::Stopped,
        };
        match chunk {
            Ok(Some(Ok(c))) => {
                hash.update(&c);
                written += c.len() as u64;
                if written > blob.size {
                    return Pass::GiveUp(format!(
                        "more than the blob's {} bytes arrived",
                        blob.size
                    ));
                }
                if let Err(e) = writer.write(c).await {
                    return Pass::GiveUp(e.to_string());
                }
                counter.store(written, Ordering::Relaxed);
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Pass::GiveUp(e.to_string()),
            Err(_) => return Pass::GiveUp("the stream of the whole blob stalled".into()),
        }
    }
    finish(blob, writer, hash, written).await
}

/// The byte ranges of a blob of `size` in segments of `segment`.
pub(super) fn segments(size: u64, segment: u64) -> Vec<Range<u64>> {
    let segment = segment.max(1);
    (0..size.div_ceil(segment))
        .map(|k| k * segment..((k + 1) * segment).min(size))
        .collect()
}

/// Takes `len` bytes of the budget, then a connection; `None` once the fetch is stopped.
async fn take(sh: &Shared, len: u64) -> Option<(OwnedSemaphorePermit, Connection)> {
    let budget = len.min(sh.settings.max_buffer_per_pull.max(sh.settings.segment())) as u32;
    let got = async {
        let b = Arc::clone(&sh.buffer)
            .acquire_many_owned(budget.max(1))
            .await
            .ok()?;
        let c = Arc::clone(&sh.connections).acquire_owned().await.ok()?;
        let r = Arc::clone(&sh.registry).acquire_owned().await.ok()?;
        Some((b, (c, r)))
    };
    tokio::select! {
        g = got => g,
        _ = sh.stop.cancelled() => None,
    }
}

/// Opens the blob and dispatches its segments in order; tells `next` when the last is
/// dispatched (the next blob may start), and `host` which host serves it.
async fn dispatch(
    sh: Arc<Shared>,
    blob: Blob,
    tx: mpsc::UnboundedSender<Piece>,
    next: Option<oneshot::Sender<()>>,
    host: oneshot::Sender<String>,
) {
    let ranges = segments(blob.size, sh.settings.segment());
    let Some((budget, conn)) = take(&sh, ranges[0].end - ranges[0].start).await else {
        return;
    };
    let mut attempt = 0;
    let opened = loop {
        let r = sh
            .source
            .open(&sh.image, &blob, sh.credentials.as_ref(), ranges[0].clone())
            .await;
        match r {
            Ok(o) => break o,
            Err(e) => match backoff(&sh, &e, &mut attempt).await {
                true => continue,
                false => {
                    let _ = tx.send(Piece::Failed(e));
                    return;
                }
            },
        }
    };
    let _ = host.send(opened.reader.host().to_owned());
    if opened.first.whole {
        let _ = tx.send(Piece::Whole(opened.first, conn, budget));
        if let Some(n) = next {
            let _ = n.send(());
        }
        return;
    }
    let reader = opened.reader;
    let first = ranges[0].clone();
    let seg = tokio::spawn(segment(
        Arc::clone(&sh),
        Arc::clone(&reader),
        first,
        Some(opened.first),
        budget,
        conn,
    ));
    if tx.send(Piece::Segment(Guard(seg))).is_err() {
        return;
    }
    for range in ranges.into_iter().skip(1) {
        let Some((budget, conn)) = take(&sh, range.end - range.start).await else {
            return;
        };
        let seg = tokio::spawn(segment(
            Arc::clone(&sh),
            Arc::clone(&reader),
            range,
            None,
            budget,
            conn,
        ));
        if tx.send(Piece::Segment(Guard(seg))).is_err() {
            return;
        }
    }
    if let Some(n) = next {
        let _ = n.send(());
    }
}

/// Waits before another try of a failed read, when one is left and the failure may pass;
/// `false`: give up.
async fn backoff(sh: &Shared, e: &RegistryError, attempt: &mut u32) -> bool {
    if !e.is_transient() || *attempt >= sh.settings.segment_retries {
        return false;
    }
    let wait = sh.settings.backoff * 2u32.saturating_pow(*attempt);
    let wait = wait.max(e.retry_after.unwrap_or_default().min(MAX_RETRY_AFTER));
    *attempt += 1;
    debug!(image = %sh.image, attempt = *attempt, "a range read failed, trying it again in {wait:?}: {e}");
    tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = sh.stop.cancelled() => false,
    }
}

/// Fetches one segment into memory (its first answer may be given), again alone when it
/// fails or stalls.
async fn segment(
    sh: Arc<Shared>,
    reader: Arc<dyn RangeReader>,
    range: Range<u64>,
    mut first: Option<BlobBody>,
    budget: OwnedSemaphorePermit,
    conn: Connection,
) -> Result<Fetched, SegmentFailure> {
    let mut attempt = 0;
    loop {
        let body = match first.take() {
            Some(b) => Ok(b),
            None => reader.read(range.clone()).await,
        };
        let failure = match body {
            Ok(b) if b.whole => return Err(SegmentFailure::Whole(b, conn)),
            Ok(b) => match gather(&sh, reader.host(), &range, b).await {
                Ok(chunks) => {
                    return Ok(Fetched {
                        chunks,
                        _budget: budget,
                    })
                }
                Err(e) => e,
            },
            Err(e) => e,
        };
        if !backoff(&sh, &failure, &mut attempt).await {
            return Err(SegmentFailure::Failed(failure));
        }
    }
}

/// Reads one answer to its end: exactly the range's bytes, each chunk within the stall
/// timeout.
async fn gather(
    sh: &Shared,
    host: &str,
    range: &Range<u64>,
    mut body: BlobBody,
) -> Result<Vec<Bytes>, RegistryError> {
    let want = range.end - range.start;
    let mut got = 0u64;
    // One buffer of the range's size (a segment's size: one written before is taken again):
    // what the budget counts is what is held.
    let mut buf = sh.segment_buffer(want as usize);
    let fail = |what: &'static str, detail: String| {
        let mut e = RegistryError::new(&sh.image, RegistryErrorKind::Unreachable, what, detail);
        e.registry = host.to_owned();
        e
    };
    loop {
        match tokio::time::timeout(sh.settings.stall_timeout, body.chunks.next()).await {
            Err(_) => {
                return Err(fail(
                    "a range stalled",
                    format!(
                        "no bytes for {:?} at offset {}",
                        sh.settings.stall_timeout,
                        range.start + got
                    ),
                ))
            }
            Ok(None) if got == want => return Ok(vec![buf.freeze()]),
            Ok(None) => {
                return Err(fail(
                    "a range broke off",
                    format!("{got} of {want} bytes from offset {}", range.start),
                ))
            }
            Ok(Some(Err(e))) => return Err(e),
            Ok(Some(Ok(c))) => {
                got += c.len() as u64;
                if got > want {
                    let mut e = fail(
                        "a range longer than asked",
                        format!("over {want} bytes from offset {}", range.start),
                    );
                    e.kind = RegistryErrorKind::Other;
                    return Err(e);
                }
                buf.extend_from_slice(&c);
            }
        }
    }
}
