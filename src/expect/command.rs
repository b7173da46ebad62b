//! The command queue source: any executable (`Queue.Command: [path, args…]`) that prints, one
//! JSON object a line, the jobs planned on this node:
//!
//! ```text
//! {"job": "4242", "image": "registry.example.com/app:1", "start": "2026-12-06T09:00:00Z"}
//! ```
//!
//! `start` is RFC 3339. A job that leaves the answer is no longer planned: its expectation ends.
//! This is how a scheduler other than Slurm plugs in (CraneSched, once its controller reports
//! the images of pending jobs, or a site's own planner).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::source::{Planned, QueueSource, QueueView, Runner, SourceError};

/// One line of the command's answer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    job: String,
    image: String,
    start: String,
    /// The uid the job runs as (optional).
    #[serde(default)]
    uid: Option<u32>,
}

/// A site's command as a queue source.
pub struct CommandSource {
    runner: Arc<dyn Runner>,
    argv: Vec<String>,
}

impl CommandSource {
    /// Runs `argv` (program first) through `runner` at each look.
    pub fn new(runner: Arc<dyn Runner>, argv: Vec<String>) -> Self {
        Self { runner, argv }
    }
}

#[async_trait::async_trait]
impl QueueSource for CommandSource {
    fn name(&self) -> &'static str {
        "command"
    }

    async fn look(&self, now_ms: i64, horizon: Duration) -> Result<QueueView, SourceError> {
        let out = self.runner.run(&self.argv).await?;
        let program = self.argv.first().cloned().unwrap_or_default();
        let until = now_ms + horizon.as_millis() as i64;
        let mut view = QueueView::default();
        for (n, line) in String::from_utf8_lossy(&out).lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |why: String| SourceError::Unreadable {
                program: program.clone(),
                reason: format!("line {}: {why}", n + 1),
            };
            let l: Line = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            let start = chrono::DateTime::parse_from_rfc3339(&l.start)
                .map_err(|e| bad(format!("start {:?} is not RFC 3339: {e}", l.start)))?
                .timestamp_millis();
            if l.job.is_empty() || l.image.is_empty() {
                return Err(bad("job and image must not be empty".into()));
            }
            if start <= until {
                view.planned.push(Planned {
                    job: l.job,
                    image: l.image,
                    start_ms: start,
                    uid: l.uid,
                });
            }
        }
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::super::source::fake::TableRunner;
    use super::*;

    #[tokio::test]
    async fn each_line_is_a_planned_job_within_the_horizon() {
        let r = Arc::new(TableRunner::default());
        r.answer(
            "/usr/local/bin/planned --node n1",
            Ok("{\"job\": \"7\", \"image\": \"reg/a:1\", \"start\": \"2026-12-06T09:00:00Z\"}\n\
                \n\
                {\"job\": \"8\", \"image\": \"reg/b:1\", \"start\": \"2026-12-07T09:00:00+01:00\"}\n"),
        );
        let s = CommandSource::new(
            r,
            vec![
                "/usr/local/bin/planned".into(),
                "--node".into(),
                "n1".into(),
            ],
        );
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-06T08:00:00Z")
            .unwrap()
            .timestamp_millis();
        let view = s.look(now, Duration::from_secs(7200)).await.unwrap();
        assert_eq!(view.planned.len(), 1);
        assert_eq!(view.planned[0].job, "7");
        assert_eq!(view.planned[0].start_ms, now + 3_600_000);
        assert!(!view.knows_running);
    }

    #[tokio::test]
    async fn a_bad_line_names_its_number_and_what_is_wrong() {
        let r = Arc::new(TableRunner::default());
        r.answer(
            "planner",
            Ok("{\"job\": \"7\", \"image\": \"reg/a:1\", \"start\": \"tomorrow\"}\n"),
        );
        let s = CommandSource::new(r, vec!["planner".into()]);
        let e = s
            .look(0, Duration::from_secs(60))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("tomorrow"), "{e}");
    }
}
