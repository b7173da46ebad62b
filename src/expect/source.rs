//! Queue sources: what the scheduler says is coming to this node. A source is asked every
//! `Queue.Interval` for the jobs planned here within `Queue.Horizon` (with their image and
//! expected start) and the jobs running here now; the expectations follow its answer.
//!
//! Sources run outside programs (`squeue`, `scontrol`, a site's command) through a [`Runner`],
//! each call bounded in time and in output, so a scheduler that hangs or floods makes the
//! source unhealthy and nothing else.

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// A job the scheduler plans on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The scheduler's job id.
    pub job: String,
    /// The image its steps run (as written in the job; normalised by the caller).
    pub image: String,
    /// Its expected start, Unix ms.
    pub start_ms: i64,
    /// The uid the job runs as, when the source says: the image is that user's choice, so its
    /// pull counts against that user's share of the pull slots.
    pub uid: Option<u32>,
}

/// What a source sees in one look at the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueView {
    /// Pending jobs planned on this node within the horizon, with an image.
    pub planned: Vec<Planned>,
    /// Jobs running on this node now (their expectations stay until they end), with when each
    /// started (Unix ms) where the source knows it.
    pub running: Vec<(String, Option<i64>)>,
    /// Whether the source reports running jobs at all: a source that does not (a site's
    /// command) keeps an expectation until its job leaves the answer.
    pub knows_running: bool,
}

impl QueueView {
    /// The ids of the jobs running here.
    pub fn running_ids(&self) -> HashSet<&str> {
        self.running.iter().map(|(j, _)| j.as_str()).collect()
    }
}

/// Why a look at the queue failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The program could not be started.
    #[error("cannot run {program}: {reason}")]
    Spawn {
        /// The program.
        program: String,
        /// The operating system's words.
        reason: String,
    },
    /// The program did not finish in time.
    #[error("{program} did not answer within {seconds} s")]
    Timeout {
        /// The program.
        program: String,
        /// The bound.
        seconds: u64,
    },
    /// The program failed.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The program.
        program: String,
        /// Its exit status.
        status: String,
        /// The start of what it wrote to stderr.
        stderr: String,
    },
    /// The program wrote more than the bound.
    #[error("{program} wrote more than {limit} bytes")]
    TooMuch {
        /// The program.
        program: String,
        /// The bound.
        limit: usize,
    },
    /// Its answer could not be read.
    #[error("{program}: {reason}")]
    Unreadable {
        /// The program.
        program: String,
        /// What was wrong.
        reason: String,
    },
}

/// Runs an outside program and returns what it wrote to stdout: the seam between the sources and
/// the operating system.
#[async_trait::async_trait]
pub trait Runner: Send + Sync {
    /// Runs `argv` (program first) to its end.
    async fn run(&self, argv: &[String]) -> Result<Vec<u8>, SourceError>;
}

/// Runs programs as child processes, with a time bound and an output bound (the child is
/// killed when either is passed).
pub struct ProcessRunner {
    /// A call that takes longer fails.
    pub timeout: Duration,
    /// A call that writes more fails.
    pub max_output: usize,
}

impl Default for ProcessRunner {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            max_output: 8 << 20,
        }
    }
}

/// What to show of a program's stderr in an error.
const STDERR_SHOWN: usize = 300;

#[async_trait::async_trait]
impl Runner for ProcessRunner {
    async fn run(&self, argv: &[String]) -> Result<Vec<u8>, SourceError> {
        let program = argv.first().cloned().unwrap_or_default();
        let mut child = tokio::process::Command::new(&program)
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| SourceError::Spawn {
                program: program.clone(),
                reason: e.to_string(),
            })?;
        let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let limit = self.max_output;
        let work = async {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            let read_out = async {
                // One byte past the bound tells "too much" from "exactly the bound".
                (&mut out)
                    .take(limit as u64 + 1)
                    .read_to_end(&mut stdout)
                    .await
            };
            // The start of stderr is kept; the rest is read and dropped, so a talkative
            // program never blocks on a full pipe.
            let read_err = async {
                (&mut err)
                    .take(STDERR_SHOWN as u64)
                    .read_to_end(&mut stderr)
                    .await?;
                tokio::io::copy(&mut err, &mut tokio::io::sink()).await
            };
            let (o, _) = tokio::join!(read_out, read_err);
            o.map_err(|e| SourceError::Unreadable {
                program: program.clone(),
                reason: e.to_string(),
            })?;
            if stdout.len() > limit {
                return Err(SourceError::TooMuch {
                    program: program.clone(),
                    limit,
                });
            }
            let status = child.wait().await.map_err(|e| SourceError::Unreadable {
                program: program.clone(),
                reason: e.to_string(),
            })?;
            if !status.success() {
                return Err(SourceError::Failed {
                    program: program.clone(),
                    status: status.to_string(),
                    stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
                });
            }
            Ok(stdout)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(SourceError::Timeout {
                program,
                seconds: self.timeout.as_secs(),
            }),
        }
    }
}

/// A scheduler's view of what is coming to this node.
#[async_trait::async_trait]
pub trait QueueSource: Send + Sync {
    /// The source's name as configured (`slurm`, `command`).
    fn name(&self) -> &'static str;

    /// Looks at the queue now; `now_ms` and `horizon` bound which plans count.
    async fn look(&self, now_ms: i64, horizon: Duration) -> Result<QueueView, SourceError>;
}

#[cfg(test)]
pub mod fake {
    //! A runner that answers from a table, for the sources' unit tests.

    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    /// Answers each argv (joined with spaces) from a table; counts the calls.
    #[derive(Default)]
    pub struct TableRunner {
        /// argv joined with spaces → answer.
        pub answers: Mutex<HashMap<String, Result<Vec<u8>, SourceError>>>,
        /// Every argv asked, in order.
        pub calls: Mutex<Vec<String>>,
    }

    impl TableRunner {
        /// Sets the answer to `argv`.
        pub fn answer(&self, argv: &str, out: Result<&str, SourceError>) {
            self.answers
                .lock()
                .unwrap()
                .insert(argv.to_owned(), out.map(|s| s.as_bytes().to_vec()));
        }
    }

    #[async_trait::async_trait]
    impl Runner for TableRunner {
        async fn run(&self, argv: &[String]) -> Result<Vec<u8>, SourceError> {
            let key = argv.join(" ");
            self.calls.lock().unwrap().push(key.clone());
            self.answers
                .lock()
                .unwrap()
                .get(&key)
                .cloned()
                .unwrap_or_else(|| {
                    Err(SourceError::Spawn {
                        program: key,
                        reason: "no answer in the test's table".into(),
                    })
                })
        }
    }
}
