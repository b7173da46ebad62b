//! The Slurm queue source: the real Slurm commands on the node, run as root.
//!
//! One `squeue` call a look lists the pending and running jobs with their state, start time
//! (the backfill planner's expected start for a pending job, the real one for a running job),
//! planned nodes (`SCHEDNODES`), allocated nodes and comment. A pending job is planned here when
//! this node is among its planned nodes and its expected start is within the horizon. Its image
//! comes from its batch script (`scontrol write batch_script JOB -`, asked once per job): a
//! `#CIMAGE image=IMAGE` line or pyxis's `#SBATCH --container-image=IMAGE`, in the script's
//! header; else from its comment (`sbatch --comment=image=IMAGE`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::TimeZone;

use super::source::{Planned, QueueSource, QueueView, Runner, SourceError};

/// The `squeue` columns read: id, state, start, planned nodes, allocated nodes, the job's uid,
/// comment (last, since a comment may hold the separator).
const SQUEUE_FORMAT: &str = "%i|%T|%S|%Y|%N|%U|%k";

/// Jobs whose script's answer is remembered (the oldest half is dropped past it).
const SCRIPTS_KEPT: usize = 4096;

/// A Slurm cluster's queue, as seen from the node `node`.
pub struct SlurmSource {
    runner: Arc<dyn Runner>,
    node: String,
    /// Job id → the image its script names (None: none), so a script is read once.
    scripts: Mutex<HashMap<String, Option<String>>>,
}

impl SlurmSource {
    /// A source for node `node` (Slurm's NodeName), running commands through `runner`.
    pub fn new(runner: Arc<dyn Runner>, node: &str) -> Self {
        Self {
            runner,
            node: node.to_owned(),
            scripts: Mutex::default(),
        }
    }

    async fn script_image(&self, job: &str) -> Result<Option<String>, SourceError> {
        if let Some(known) = self.scripts.lock().unwrap().get(job) {
            return Ok(known.clone());
        }
        let argv: Vec<String> = ["scontrol", "write", "batch_script", job, "-"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let image = match self.runner.run(&argv).await {
            Ok(out) => image_in_script(&String::from_utf8_lossy(&out)),
            // A job without a script (srun, salloc) has none to read.
            Err(SourceError::Failed { .. }) => None,
            Err(e) => return Err(e),
        };
        let mut scripts = self.scripts.lock().unwrap();
        if scripts.len() >= SCRIPTS_KEPT {
            let drop: Vec<String> = scripts.keys().take(SCRIPTS_KEPT / 2).cloned().collect();
            for k in drop {
                scripts.remove(&k);
            }
        }
        scripts.insert(job.to_owned(), image.clone());
        Ok(image)
    }
}

#[async_trait::async_trait]
impl QueueSource for SlurmSource {
    fn name(&self) -> &'static str {
        "slurm"
    }

    async fn look(&self, now_ms: i64, horizon: Duration) -> Result<QueueView, SourceError> {
        let argv: Vec<String> = ["squeue", "-h", "-t", "PD,R,CG", "-o", SQUEUE_FORMAT]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = self.runner.run(&argv).await?;
        let mut view = QueueView {
            knows_running: true,
            ..Default::default()
        };
        let until = now_ms + horizon.as_millis() as i64;
        for row in parse_squeue(&String::from_utf8_lossy(&out)) {
            match row.state.as_str() {
                "PENDING" => {
                    let (Some(start), true) = (
                        row.start_ms,
                        hostlist_contains(&row.planned_nodes, &self.node),
                    ) else {
                        continue;
                    };
                    if start > until {
                        continue;
                    }
                    let image = match self.script_image(&row.job).await? {
                        Some(i) => Some(i),
                        None => image_in_comment(&row.comment),
                    };
                    if let Some(image) = image {
                        view.planned.push(Planned {
                            job: row.job,
                            image,
                            start_ms: start,
                            uid: row.uid,
                        });
                    }
                }
                "RUNNING" | "COMPLETING" if hostlist_contains(&row.nodes, &self.node) => {
                    view.running.push((row.job, row.start_ms));
                }
                _ => {}
            }
        }
        Ok(view)
    }
}

/// One line of [`SQUEUE_FORMAT`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    job: String,
    state: String,
    start_ms: Option<i64>,
    planned_nodes: String,
    nodes: String,
    uid: Option<u32>,
    comment: String,
}

fn parse_squeue(text: &str) -> Vec<Row> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(7, '|');
            Some(Row {
                job: f.next()?.trim().to_owned(),
                state: f.next()?.trim().to_owned(),
                start_ms: slurm_time(f.next()?.trim()),
                planned_nodes: f.next()?.trim().to_owned(),
                nodes: f.next()?.trim().to_owned(),
                uid: f.next()?.trim().parse().ok(),
                comment: f.next().unwrap_or("").trim().to_owned(),
            })
        })
        .filter(|r| !r.job.is_empty())
        .collect()
}

/// A time as squeue prints it (`2026-12-06T07:56:12`, the node's local time), in Unix ms;
/// `N/A`, `Unknown` and the like are None.
fn slurm_time(s: &str) -> Option<i64> {
    let t = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S").ok()?;
    chrono::Local
        .from_local_datetime(&t)
        .earliest()
        .map(|t| t.timestamp_millis())
}

/// The image a job's comment names: a word `image=IMAGE`.
pub fn image_in_comment(comment: &str) -> Option<String> {
    comment
        .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .find_map(|w| w.strip_prefix("image="))
        .filter(|i| !i.is_empty())
        .map(str::to_owned)
}

/// The image a batch script names in its header (the comment lines before its first command):
/// `#CIMAGE image=IMAGE`, or `#SBATCH --container-image=IMAGE` (also `--container-image IMAGE`),
/// the first one found.
pub fn image_in_script(script: &str) -> Option<String> {
    for line in script.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("#!") {
            continue;
        }
        let Some(rest) = line.strip_prefix('#') else {
            break; // the first command ends the header, as it ends #SBATCH
        };
        let mut words = rest.split_whitespace();
        match words.next() {
            Some("CIMAGE") => {
                if let Some(i) = words.find_map(|w| w.strip_prefix("image=")) {
                    if !i.is_empty() {
                        return Some(i.to_owned());
                    }
                }
            }
            Some("SBATCH") => {
                while let Some(w) = words.next() {
                    if let Some(i) = w.strip_prefix("--container-image=") {
                        if !i.is_empty() {
                            return Some(i.to_owned());
                        }
                    } else if w == "--container-image" {
                        if let Some(i) = words.next() {
                            return Some(i.to_owned());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// Names expanded from one hostlist at most (a larger list is read as not naming the node).
const HOSTLIST_LIMIT: usize = 100_000;

/// Whether Slurm's hostlist expression `list` (`node[01-04,07],gpu3`) names `node`.
pub fn hostlist_contains(list: &str, node: &str) -> bool {
    if list.is_empty() || list == "(null)" || list == "N/A" {
        return false;
    }
    split_top(list).into_iter().any(|item| {
        let mut names = Vec::new();
        expand(item, String::new(), &mut names) && names.iter().any(|n| n == node)
    })
}

/// Splits at commas outside brackets.
fn split_top(list: &str) -> Vec<&str> {
    let (mut out, mut depth, mut from) = (Vec::new(), 0i32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&list[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    out.push(&list[from..]);
    out
}

/// Expands one item (`rack[1-2]-n[01-03]`) after `prefix` into `out`; false when it is malformed
/// or would pass [`HOSTLIST_LIMIT`].
fn expand(item: &str, prefix: String, out: &mut Vec<String>) -> bool {
    let Some(open) = item.find('[') else {
        out.push(prefix + item);
        return out.len() <= HOSTLIST_LIMIT;
    };
    let Some(close) = item[open..].find(']').map(|c| open + c) else {
        return false;
    };
    let (head, ranges, tail) = (&item[..open], &item[open + 1..close], &item[close + 1..]);
    for range in ranges.split(',') {
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let (Ok(a), Ok(b)) = (lo.parse::<u64>(), hi.parse::<u64>()) else {
            return false;
        };
        if b < a || b - a > HOSTLIST_LIMIT as u64 {
            return false;
        }
        let width = lo.len();
        for n in a..=b {
            let name = format!("{prefix}{head}{n:0width$}");
            if !expand(tail, name, out) {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::super::source::fake::TableRunner;
    use super::*;

    #[test]
    fn hostlists_name_nodes_by_range_and_padding() {
        assert!(hostlist_contains("vm", "vm"));
        assert!(hostlist_contains("a,vm,b", "vm"));
        assert!(hostlist_contains("node[01-04,07]", "node03"));
        assert!(hostlist_contains("node[01-04,07]", "node07"));
        assert!(!hostlist_contains("node[01-04,07]", "node05"));
        assert!(!hostlist_contains("node[01-04,07]", "node3"));
        assert!(hostlist_contains("rack[1-2]-n[1-3],gpu[10-11]", "rack2-n3"));
        assert!(hostlist_contains("rack[1-2]-n[1-3],gpu[10-11]", "gpu11"));
        assert!(!hostlist_contains("(null)", "vm"));
        assert!(!hostlist_contains("", "vm"));
        assert!(!hostlist_contains("node[1-", "node1"));
        assert!(!hostlist_contains("node[1-99999999]", "node5"));
    }

    #[test]
    fn a_script_names_its_image_in_its_header_only() {
        let s = "#!/bin/bash\n#SBATCH -n 2\n#CIMAGE image=reg/app:1\necho hi\n";
        assert_eq!(image_in_script(s).as_deref(), Some("reg/app:1"));
        let s = "#!/bin/sh\n\n#SBATCH --container-image=nvcr.io/nvidia/pytorch:24.01-py3\nsrun x\n";
        assert_eq!(
            image_in_script(s).as_deref(),
            Some("nvcr.io/nvidia/pytorch:24.01-py3")
        );
        let s = "#!/bin/sh\n#SBATCH --time=5 --container-image reg/b:2\n";
        assert_eq!(image_in_script(s).as_deref(), Some("reg/b:2"));
        // After the first command, a directive is only a comment.
        assert_eq!(
            image_in_script("#!/bin/sh\necho\n#CIMAGE image=x:1\n"),
            None
        );
        assert_eq!(image_in_script("#!/bin/sh\n#CIMAGE image=\n"), None);
        assert_eq!(image_in_comment("image=reg/c:3"), Some("reg/c:3".into()));
        assert_eq!(
            image_in_comment("run x image=reg/c:3, more"),
            Some("reg/c:3".into())
        );
        assert_eq!(image_in_comment("nothing"), None);
    }

    fn ms(s: &str) -> i64 {
        slurm_time(s).unwrap()
    }

    #[tokio::test]
    async fn pending_jobs_planned_here_within_the_horizon_are_planned() {
        let r = Arc::new(TableRunner::default());
        r.answer(
            "squeue -h -t PD,R,CG -o %i|%T|%S|%Y|%N|%U|%k",
            Ok("10|RUNNING|2026-12-06T07:00:00|(null)|vm|1000|\n\
                11|PENDING|2026-12-06T08:00:00|vm|(null)|1000|\n\
                12|PENDING|2026-12-06T08:05:00|other|(null)|1000|image=reg/x:1\n\
                13|PENDING|2026-12-06T08:10:00|vm,other|(null)|1001|image=reg/from-comment:1\n\
                14|PENDING|N/A|(null)|(null)|1000|image=reg/unplanned:1\n\
                15|PENDING|2026-12-06T12:00:00|vm|(null)|1000|image=reg/far:1\n\
                16|RUNNING|2026-12-06T07:30:00|(null)|other|1000|\n"),
        );
        r.answer(
            "scontrol write batch_script 11 -",
            Ok("#!/bin/sh\n#CIMAGE image=reg/app:1\nsleep 1\n"),
        );
        r.answer(
            "scontrol write batch_script 13 -",
            Ok("#!/bin/sh\nsleep 1\n"),
        );
        let s = SlurmSource::new(r.clone(), "vm");
        let now = ms("2026-12-06T07:50:00");
        let view = s.look(now, Duration::from_secs(3600)).await.unwrap();
        assert_eq!(
            view.planned,
            vec![
                Planned {
                    job: "11".into(),
                    image: "reg/app:1".into(),
                    start_ms: ms("2026-12-06T08:00:00"),
                    uid: Some(1000),
                },
                Planned {
                    job: "13".into(),
                    image: "reg/from-comment:1".into(),
                    start_ms: ms("2026-12-06T08:10:00"),
                    uid: Some(1001),
                },
            ]
        );
        assert_eq!(
            view.running,
            vec![("10".to_string(), Some(ms("2026-12-06T07:00:00")))]
        );
        // A second look reads no script again.
        s.look(now, Duration::from_secs(3600)).await.unwrap();
        let scripts = r
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("scontrol"))
            .count();
        assert_eq!(scripts, 2);
    }

    #[tokio::test]
    async fn a_slurm_that_does_not_answer_is_an_error() {
        let r = Arc::new(TableRunner::default());
        r.answer(
            "squeue -h -t PD,R,CG -o %i|%T|%S|%Y|%N|%U|%k",
            Err(SourceError::Failed {
                program: "squeue".into(),
                status: "exit status: 1".into(),
                stderr: "slurm_load_jobs error: Unable to contact slurm controller".into(),
            }),
        );
        let s = SlurmSource::new(r, "vm");
        let e = s.look(0, Duration::from_secs(60)).await.unwrap_err();
        assert!(e.to_string().contains("Unable to contact"), "{e}");
    }
}
