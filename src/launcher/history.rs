//! History that stays cheap: finished tasks, ended jobs and eviction records are kept for
//! `History.Keep` (and at most `History.MaxTasks` tasks), and pruned in the background in
//! bounded batches, each one transaction, with the log files of the tasks removed (unless
//! `History.KeepLogs`), and only in the per-job directories cimage itself made under its log
//! directory. Pre-warm runs are bounded per schedule where they are kept.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use tracing::info;

use super::store::TaskRecord;
use super::{LaunchError, Launcher};

/// Tasks removed per transaction: a pass never holds the database for long.
const BATCH: usize = 500;

/// How much history is kept (`ImageCache.History`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistorySettings {
    /// Finished tasks and ended jobs older than this are removed.
    pub keep: Duration,
    /// At most this many task records are kept; the oldest finished ones go first.
    pub max_tasks: u64,
    /// Keep the log files of removed tasks.
    pub keep_logs: bool,
}

impl Default for HistorySettings {
    /// The config's defaults (`History.Keep`, `History.MaxTasks`), logs not kept.
    fn default() -> Self {
        Self {
            keep: crate::config::DEFAULT_HISTORY_KEEP,
            max_tasks: crate::config::DEFAULT_HISTORY_MAX_TASKS,
            keep_logs: false,
        }
    }
}

/// The task history as `status` shows it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HistoryCounts {
    /// Task records kept.
    pub recorded: u64,
    /// Of them, tasks not yet cleaned up.
    pub live: u64,
    /// Task records pruned since this daemon started (kept in memory: "since start" is what
    /// it says; `cimage_history_pruned_total` counts the same for monitoring).
    pub pruned_since_start: u64,
    /// The limits history is kept to.
    pub settings: HistorySettings,
}

/// What one pruning pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneReport {
    /// Task records removed.
    pub tasks: usize,
    /// Job records removed.
    pub jobs: usize,
    /// Log files removed.
    pub logs: usize,
}

/// How many of `oldest` (finished, cleaned-up tasks, oldest finished first) go: those finished
/// before `cutoff`, and, while the history is `over` its `MaxTasks`, the oldest regardless.
pub fn how_many_go(oldest: &[TaskRecord], cutoff: i64, over: u64) -> usize {
    oldest
        .iter()
        .enumerate()
        .take_while(|(i, t)| t.finished.unwrap_or(t.created) < cutoff || (*i as u64) < over)
        .count()
}

impl Launcher {
    /// Unix ms before which finished records go (`History.Keep` ago).
    pub fn history_cutoff(&self) -> i64 {
        let keep = self.settings.history.keep.as_millis() as i64;
        self.clock.now_ms().saturating_sub(keep)
    }

    /// One pruning pass over the task and job history.
    pub async fn prune_history(&self) -> Result<PruneReport, LaunchError> {
        let h = self.settings.history.clone();
        let cutoff = self.history_cutoff();
        let (total, _) = self.blocking(|s| s.counts()).await?;
        let mut over = total.saturating_sub(h.max_tasks);
        let mut report = PruneReport::default();
        // The oldest finished tasks, a batch at a time, through the finished index: the cost
        // is what goes, not the whole history. (Bounded in rounds too, should the index ever
        // name a record that cannot go.)
        for _ in 0..total / BATCH as u64 + 2 {
            let oldest = self.blocking(|s| s.oldest_done(BATCH)).await?;
            let going = how_many_go(&oldest, cutoff, over);
            if going == 0 {
                break;
            }
            let batch: Vec<TaskRecord> = oldest[..going].to_vec();
            over = over.saturating_sub(going as u64);
            let job_ids: Vec<String> = batch
                .iter()
                .map(|t| t.job.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let jobs_before = job_ids.clone();
            let (logs, jobs_removed) = self.blocking(move |s| s.prune(&batch, &job_ids)).await?;
            report.tasks += logs.len();
            report.jobs += jobs_removed;
            if !h.keep_logs {
                report.logs += self.remove_logs(&logs, &jobs_before).await;
            }
            tokio::task::yield_now().await;
        }
        // Ended jobs whose tasks are all gone (a job whose only step failed early, or whose
        // tasks went in an earlier pass).
        let jobs = self.blocking(|s| s.jobs()).await?;
        let stale: Vec<String> = jobs
            .iter()
            .filter(|j| j.ended.is_some_and(|e| e < cutoff))
            .map(|j| j.id.clone())
            .collect();
        for batch in stale.chunks(BATCH) {
            let ids = batch.to_vec();
            let (_, removed) = self.blocking(move |s| s.prune(&[], &ids)).await?;
            report.jobs += removed;
            if !h.keep_logs {
                self.remove_logs(&[], batch).await;
            }
        }
        self.tasks_pruned
            .fetch_add(report.tasks as u64, std::sync::atomic::Ordering::Relaxed);
        if report.tasks + report.jobs > 0 {
            let m = &self.metrics;
            m.add(
                "cimage_history_pruned_total",
                &[("kind", "task")],
                report.tasks as u64,
            );
            m.add(
                "cimage_history_pruned_total",
                &[("kind", "job")],
                report.jobs as u64,
            );
            info!(
                tasks = report.tasks,
                jobs = report.jobs,
                logs = report.logs,
                "history pruned"
            );
        }
        Ok(report)
    }

    /// Removes log files of pruned tasks, and the emptied job directories, but only inside
    /// cimage's own per-job directories under its log directory.
    async fn remove_logs(&self, logs: &[std::path::PathBuf], jobs: &[String]) -> usize {
        let root = self.settings.log_dir.clone();
        let (logs, jobs) = (logs.to_vec(), jobs.to_vec());
        tokio::task::spawn_blocking(move || {
            let mut n = 0;
            for log in &logs {
                if is_ours(&root, log) && std::fs::remove_file(log).is_ok() {
                    n += 1;
                }
            }
            for j in &jobs {
                // Fails while the directory holds anything (a running job's logs): kept.
                let _ = std::fs::remove_dir(root.join(j));
            }
            n
        })
        .await
        .unwrap_or(0)
    }
}

/// Whether `log` is a file directly inside a job directory of `root` (`root/JOB/FILE`), with
/// no `..` on the way.
fn is_ours(root: &Path, log: &Path) -> bool {
    let Ok(rest) = log.strip_prefix(root) else {
        return false;
    };
    let parts: Vec<_> = rest.components().collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::store::TaskState;

    fn t(id: &str, finished: Option<i64>, state: TaskState) -> TaskRecord {
        TaskRecord {
            id: id.into(),
            job: "j".into(),
            step: 0,
            uid: 0,
            image: "r/x:1".into(),
            image_id: None,
            container_id: None,
            state,
            exit_code: None,
            signal: None,
            failure: None,
            log_path: "/logs/j/x.log".into(),
            created: 0,
            started: None,
            finished,
            timeout_ms: None,
            cleaned: state.is_final(),
        }
    }

    #[test]
    fn old_and_surplus_finished_tasks_go_oldest_first() {
        let oldest = vec![
            t("old", Some(10), TaskState::Exited),
            t("new", Some(1000), TaskState::Exited),
            t("newer", Some(2000), TaskState::Failed),
        ];
        // Past the cutoff only.
        assert_eq!(how_many_go(&oldest, 500, 0), 1);
        // Over the cap: the oldest go, whatever their age.
        assert_eq!(how_many_go(&oldest, 0, 2), 2);
        assert_eq!(how_many_go(&oldest, 0, 5), 3);
        assert_eq!(how_many_go(&oldest, 0, 0), 0);
        assert_eq!(how_many_go(&[], 500, 3), 0);
    }

    #[test]
    fn only_files_in_cimages_job_directories_are_removed() {
        let root = Path::new("/var/crane/logs");
        assert!(is_ours(root, Path::new("/var/crane/logs/job1/step-0.log")));
        assert!(!is_ours(root, Path::new("/var/crane/logs/step-0.log")));
        assert!(!is_ours(root, Path::new("/var/crane/logs/j/../../etc/x")));
        assert!(!is_ours(root, Path::new("/etc/passwd")));
    }
}
