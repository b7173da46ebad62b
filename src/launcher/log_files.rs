//! A step's log as files on disk: the one the runtime writes (`<step>-<task>.log`, the task's
//! `log_path`) and those rotated away from it (`<step>-<task>.log.1`, `.2`, … numbered in the
//! order they were rotated), which `logs` reads as one stream. Rotation is kubelet's: the file
//! is renamed, then the runtime is asked to reopen its log (CRI `ReopenContainerLog`), and the
//! oldest rotated files beyond the step's share are removed. All blocking.

use std::path::{Path, PathBuf};

/// How much log a step keeps, and all steps together (`ImageCache.Launcher`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLimits {
    /// A step's log file is rotated once it is larger than this (`MaxLogSize`).
    pub max_size: u64,
    /// Files a step keeps, the one being written included (`MaxLogFiles`, at least 2).
    pub max_files: usize,
    /// All logs under the log directory; past it the logs of the steps that finished first
    /// go (`MaxLogDirSize`).
    pub max_dir_size: u64,
}

impl Default for LogLimits {
    /// The config's defaults.
    fn default() -> Self {
        Self {
            max_size: crate::config::DEFAULT_MAX_LOG_SIZE,
            max_files: crate::config::DEFAULT_MAX_LOG_FILES,
            max_dir_size: crate::config::DEFAULT_MAX_LOG_DIR_SIZE,
        }
    }
}

/// Mode of the log directory: others may pass through it to what they are given, never list
/// it (the job and task ids in it are the node's users' business).
pub const LOG_ROOT_MODE: u32 = 0o711;
/// Mode of a job's log directory: root's alone (logs are read through cimaged).
pub const JOB_DIR_MODE: u32 = 0o700;

/// Makes the log directory `root` (mode [`LOG_ROOT_MODE`], also when it exists) and the job's
/// directory `dir` in it (mode [`JOB_DIR_MODE`]).
pub fn make_job_dir(root: &Path, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root)?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(LOG_ROOT_MODE))?;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(JOB_DIR_MODE))
}

/// The rotated files of the log at `path`, oldest first: (number, path).
pub fn rotated(path: &Path) -> Vec<(u64, PathBuf)> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name();
            let number = n.to_str()?.strip_prefix(&prefix)?.parse().ok()?;
            Some((number, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Every file of the log at `path`, in the order written: the rotated ones, then `path`
/// itself when it exists.
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = rotated(path).into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        out.push(path.to_owned());
    }
    out
}

/// Renames the log at `path` to the next rotated name; the runtime must then reopen it.
/// Returns the rotated file's path.
pub fn rotate(path: &Path) -> std::io::Result<PathBuf> {
    let next = rotated(path).last().map_or(1, |(n, _)| n + 1);
    let mut to = path.as_os_str().to_owned();
    to.push(format!(".{next}"));
    let to = PathBuf::from(to);
    std::fs::rename(path, &to)?;
    Ok(to)
}

/// Removes the oldest rotated files of the log at `path` so that at most `keep` remain;
/// returns the bytes freed.
pub fn drop_oldest(path: &Path, keep: usize) -> u64 {
    let old = rotated(path);
    let surplus = old.len().saturating_sub(keep);
    old.iter()
        .take(surplus)
        .map(|(_, p)| {
            let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            match std::fs::remove_file(p) {
                Ok(()) => size,
                Err(_) => 0,
            }
        })
        .sum()
}

/// One step's log files as found in the log directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepLogs {
    /// The task they belong to.
    pub task: String,
    /// Its files.
    pub files: Vec<PathBuf>,
    /// Their bytes.
    pub bytes: u64,
    /// When any of them was last written (unix nanoseconds).
    pub written: i128,
}

/// The task a log file name belongs to: `<step>-<task>.log` or `<step>-<task>.log.<n>`.
fn task_of(name: &str) -> Option<&str> {
    let stem = match name.strip_suffix(".log") {
        Some(s) => s,
        None => {
            let (before, n) = name.rsplit_once('.')?;
            n.parse::<u64>().ok()?;
            before.strip_suffix(".log")?
        }
    };
    let (step, task) = stem.split_once('-')?;
    step.parse::<u32>().ok()?;
    (!task.is_empty()).then_some(task)
}

/// Every step's logs under `root` (`root/JOB/<step>-<task>.log*`), and their total bytes.
/// One pass over the job directories (what the node-wide bound costs).
pub fn walk(root: &Path) -> (Vec<StepLogs>, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut by_task: std::collections::HashMap<String, StepLogs> = Default::default();
    let mut total = 0;
    for job in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if !job.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for f in std::fs::read_dir(job.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = f.file_name();
            let Some(task) = name.to_str().and_then(task_of) else {
                continue;
            };
            let Ok(md) = f.metadata() else { continue };
            if !md.is_file() {
                continue;
            }
            total += md.len();
            let e = by_task.entry(task.to_owned()).or_insert_with(|| StepLogs {
                task: task.to_owned(),
                files: Vec::new(),
                bytes: 0,
                written: 0,
            });
            e.files.push(f.path());
            e.bytes += md.len();
            let written = i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec());
            e.written = e.written.max(written);
        }
    }
    (by_task.into_values().collect(), total)
}

/// Which of `steps` (none of them running), each with the uid it ran as, lose their logs so
/// that `total` comes down to `max`: the user holding the most bytes of finished logs loses
/// theirs first, oldest first, so one user's output never pushes out another's while it holds
/// more than they do. Steps of an unknown uid count as one user.
pub fn to_remove(steps: Vec<(StepLogs, Option<u32>)>, total: u64, max: u64) -> Vec<StepLogs> {
    if total <= max {
        return Vec::new();
    }
    let mut by_user: std::collections::BTreeMap<Option<u32>, (u64, Vec<StepLogs>)> =
        Default::default();
    for (step, uid) in steps {
        let e = by_user.entry(uid).or_default();
        e.0 += step.bytes;
        e.1.push(step);
    }
    for (_, list) in by_user.values_mut() {
        // Newest first, so that the oldest is popped first.
        list.sort_by(|a, b| (b.written, &b.task).cmp(&(a.written, &a.task)));
    }
    let mut over = total - max;
    let mut going = Vec::new();
    while over > 0 {
        let Some((_, (held, list))) = by_user
            .iter_mut()
            .filter(|(_, (_, l))| !l.is_empty())
            .max_by_key(|(uid, (held, _))| (*held, std::cmp::Reverse(**uid)))
        else {
            break;
        };
        let step = list.pop().expect("a user with logs left");
        *held -= step.bytes;
        over = over.saturating_sub(step.bytes);
        going.push(step);
    }
    going
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_numbers_files_in_order_and_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0-abc.log");
        for i in 0..4 {
            std::fs::write(&log, format!("file {i}\n")).unwrap();
            rotate(&log).unwrap();
        }
        std::fs::write(&log, "file 4\n").unwrap();
        // Another step's files in the same directory are not this one's.
        std::fs::write(dir.path().join("0-abcd.log.1"), "other").unwrap();
        let names: Vec<String> = files(&log)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "0-abc.log.1",
                "0-abc.log.2",
                "0-abc.log.3",
                "0-abc.log.4",
                "0-abc.log"
            ]
        );
        assert_eq!(drop_oldest(&log, 1), 21);
        let left: Vec<String> = files(&log)
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert_eq!(left, ["file 3\n", "file 4\n"]);
        // The next rotation continues the numbers.
        assert!(rotate(&log).unwrap().ends_with("0-abc.log.5"));
    }

    #[test]
    fn the_node_bound_takes_the_logs_written_longest_ago_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("job-1")).unwrap();
        std::fs::write(dir.path().join("job-1/0-aaa.log"), [0u8; 100]).unwrap();
        std::fs::write(dir.path().join("job-1/0-aaa.log.1"), [0u8; 50]).unwrap();
        std::fs::write(dir.path().join("job-1/1-bbb.log"), [0u8; 10]).unwrap();
        std::fs::write(dir.path().join("job-1/notes.txt"), [0u8; 999]).unwrap();
        let (mut steps, total) = walk(dir.path());
        assert_eq!(total, 160);
        steps.sort_by(|a, b| a.task.cmp(&b.task));
        assert_eq!(
            steps
                .iter()
                .map(|s| (s.task.as_str(), s.bytes))
                .collect::<Vec<_>>(),
            [("aaa", 150), ("bbb", 10)]
        );
        let step = |task: &str, bytes, written| StepLogs {
            task: task.into(),
            files: vec![],
            bytes,
            written,
        };
        let steps = [
            step("new", 10, 30),
            step("old", 10, 10),
            step("mid", 10, 20),
        ];
        let gone = |steps: Vec<(StepLogs, Option<u32>)>, total, max| -> Vec<String> {
            to_remove(steps, total, max)
                .into_iter()
                .map(|s| s.task)
                .collect()
        };
        let one_user: Vec<_> = steps.iter().cloned().map(|s| (s, Some(1000))).collect();
        assert_eq!(gone(one_user.clone(), 30, 30), Vec::<String>::new());
        assert_eq!(gone(one_user.clone(), 30, 25), ["old"]);
        assert_eq!(gone(one_user.clone(), 30, 15), ["old", "mid"]);
        assert_eq!(gone(one_user, 30, 0), ["old", "mid", "new"]);
        // A user who writes a lot loses their own logs first, not another's older one.
        let two_users = vec![
            (step("theirs", 10, 1), Some(1001)),
            (step("a1", 20, 5), Some(1000)),
            (step("a2", 20, 6), Some(1000)),
            (step("a3", 20, 7), Some(1000)),
        ];
        assert_eq!(gone(two_users.clone(), 70, 40), ["a1", "a2"]);
        // Once both hold as much, the one holding more goes first again, oldest first.
        assert_eq!(gone(two_users, 70, 5), ["a1", "a2", "a3", "theirs"]);
        assert_eq!(task_of("12-abc.log.3"), Some("abc"));
        assert_eq!(task_of("x-abc.log"), None);
        assert_eq!(task_of("0-abc.log.x"), None);
    }
}
