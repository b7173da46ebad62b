//! Keeping step logs within bounds: a running step's log is measured every few seconds and
//! rotated past `Launcher.MaxLogSize` (renamed, then the runtime reopens it; the oldest rotated
//! files beyond `MaxLogFiles` go), and the log directory as a whole is kept under
//! `MaxLogDirSize` by removing the logs of finished steps, the biggest user's oldest first.
//! Sizes are read periodically, never per byte written.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::log_files;
use super::store::TaskRecord;
use super::Launcher;

/// A running step's log is measured at least this often.
const CHECK_MAX: Duration = Duration::from_secs(2);
/// And at most this often, however fast it grows.
const CHECK_MIN: Duration = Duration::from_millis(200);
/// The log directory is measured this long after steps end (so at most this often) ...
const DIR_CHECK_MIN: Duration = Duration::from_secs(5);
/// ... and at least this often.
const DIR_CHECK_MAX: Duration = Duration::from_secs(300);

/// When a running step's log is measured next, and what it measured last.
pub(super) struct LogWatch {
    due: Instant,
    size: u64,
    at: Instant,
}

impl LogWatch {
    /// A watch whose first measure is due at once.
    pub(super) fn new() -> Self {
        let now = Instant::now();
        Self {
            due: now,
            size: 0,
            at: now,
        }
    }

    /// The next measure, after one that found `measured` bytes and left `size` (0 after a
    /// rotation): sooner the faster the log grew, so that a fast writer passes the limit by
    /// little (half the time it would take to reach it at that rate, within [`CHECK_MIN`]
    /// and [`CHECK_MAX`]).
    fn plan(&mut self, measured: u64, size: u64, limit: u64) {
        let now = Instant::now();
        let grown = measured.saturating_sub(self.size) as f64;
        let rate = grown / now.duration_since(self.at).as_secs_f64().max(0.001);
        let left = limit.saturating_sub(size) as f64;
        let wait = match rate > 0.0 {
            true => Duration::from_secs_f64(left / rate / 2.0).clamp(CHECK_MIN, CHECK_MAX),
            false => CHECK_MAX,
        };
        *self = Self {
            due: now + wait,
            size,
            at: now,
        };
    }
}

impl Launcher {
    /// Rotates the log of running task `task` (container `cid`) when it has grown past
    /// `MaxLogSize`, if its measure is due.
    pub(super) async fn keep_log_in_bounds(&self, task: &TaskRecord, cid: &str, w: &mut LogWatch) {
        if Instant::now() < w.due {
            return;
        }
        let limits = self.settings.logs.clone();
        let path = task.log_path.clone();
        let size = blocking(move || std::fs::metadata(&path).map_or(0, |m| m.len())).await;
        if size <= limits.max_size {
            w.plan(size, size, limits.max_size);
            return;
        }
        let path = task.log_path.clone();
        let rotated = tokio::task::spawn_blocking(move || log_files::rotate(&path))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let rotated = match rotated {
            Ok(p) => p,
            Err(e) => {
                warn!(task = %task.id, "cannot rotate the step's log: {e}");
                w.plan(size, size, limits.max_size);
                return;
            }
        };
        if let Err(e) = self.rt.reopen_container_log(cid).await {
            // A step that ended meanwhile writes no more; one that runs on would go on
            // writing the renamed file unbounded: put it back, to try again later.
            warn!(task = %task.id, "the runtime did not reopen the step's log: {e}");
            let (from, to) = (rotated, task.log_path.clone());
            blocking(move || {
                if !to.exists() {
                    let _ = std::fs::rename(&from, &to);
                }
            })
            .await;
            w.plan(size, size, limits.max_size);
            return;
        }
        let (path, keep) = (task.log_path.clone(), limits.max_files - 1);
        let freed = blocking(move || log_files::drop_oldest(&path, keep)).await;
        info!(task = %task.id, bytes = size, freed, "step log rotated");
        w.plan(size, 0, limits.max_size);
    }

    /// Removes the logs of finished steps while the log directory holds more than
    /// `MaxLogDirSize`: those of the user who holds the most bytes of them first, oldest
    /// first, so that one user's output never pushes out another's while it holds more.
    /// Running steps' logs are never removed (each is bounded by its own share). Returns the
    /// steps whose logs went.
    pub async fn keep_log_dir_in_bounds(&self) -> usize {
        let root = self.settings.log_dir.clone();
        let max = self.settings.logs.max_dir_size;
        let live: std::collections::HashSet<String> =
            self.live.lock().unwrap().keys().cloned().collect();
        let (steps, total) = blocking(move || log_files::walk(&root)).await;
        if total <= max {
            return 0;
        }
        let finished: Vec<_> = steps
            .into_iter()
            .filter(|s| !live.contains(&s.task))
            .collect();
        let ids: Vec<String> = finished.iter().map(|s| s.task.clone()).collect();
        let uids = self
            .blocking(move |s| {
                Ok(ids
                    .iter()
                    .map(|id| s.task(id).ok().flatten().map(|t| t.uid))
                    .collect::<Vec<_>>())
            })
            .await
            .unwrap_or_else(|e| {
                warn!("reading whose step logs are whose: {e}");
                Vec::new()
            });
        let mut uids = uids.into_iter();
        let owned: Vec<_> = finished
            .into_iter()
            .map(|s| (s, uids.next().flatten()))
            .collect();
        let (gone, freed) = blocking(move || {
            let going = log_files::to_remove(owned, total, max);
            let mut freed = 0;
            for s in &going {
                if s.files.iter().all(|f| std::fs::remove_file(f).is_ok()) {
                    freed += s.bytes;
                }
            }
            (going.len(), freed)
        })
        .await;
        if gone > 0 {
            info!(
                steps = gone,
                bytes = freed,
                "removed the logs of finished steps, the biggest user's oldest first \
                 (Launcher.MaxLogDirSize)"
            );
        }
        gone
    }

    /// Keeps the log directory within `MaxLogDirSize` until shutdown: measured 5 s after steps
    /// end (so at most every 5 s) and every 5 minutes anyway.
    pub async fn log_dir_loop(self: Arc<Self>) {
        loop {
            let ended = self.live_changed.notified();
            tokio::select! {
                _ = ended => {}
                _ = tokio::time::sleep(DIR_CHECK_MAX) => {}
                _ = self.background.shutting_down() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(DIR_CHECK_MIN) => {}
                _ = self.background.shutting_down() => return,
            }
            self.keep_log_dir_in_bounds().await;
        }
    }
}

/// Runs file system work on the blocking pool (the log directory is often on a shared file
/// system); a panic there is taken as its default result.
async fn blocking<T: Default + Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap_or_default()
}
