//! Pulls as they move, on stderr (stdout keeps the command's result): on a terminal one live
//! line per pull, redrawn in place (image, phase, bytes / total, rate, ETA); elsewhere, and
//! with `-o json`, one line per phase change, so logs get no carriage returns.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use cimage::api::pb;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::{human_size, Output};

/// How pulls are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Live lines on a terminal.
    Live,
    /// A text line per phase change.
    Text,
    /// A JSON line per phase change.
    Json,
}

/// What was last shown of one pull.
struct Line {
    bar: Option<ProgressBar>,
    /// Phase, attempt and queue place last reported (a change makes a new line).
    shown: (String, u32, u32),
}

/// The pulls a command follows.
pub struct PullView {
    mode: Mode,
    bars: MultiProgress,
    lines: HashMap<String, Line>,
}

impl PullView {
    /// A view for a command printing in `output`: live on a terminal's stderr in table mode.
    pub fn new(output: Output) -> Self {
        let mode = match output {
            Output::Json => Mode::Json,
            Output::Table if std::io::stderr().is_terminal() => Mode::Live,
            Output::Table => Mode::Text,
        };
        Self::with_mode(mode)
    }

    fn with_mode(mode: Mode) -> Self {
        let target = if mode == Mode::Live {
            ProgressDrawTarget::stderr_with_hz(8)
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            mode,
            bars: MultiProgress::with_draw_target(target),
            lines: HashMap::new(),
        }
    }

    /// Prints a line of the command's own on stderr, above any live lines.
    pub fn note(&self, line: &str) {
        if self.mode == Mode::Live {
            let _ = self.bars.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    /// Takes in one progress report.
    pub fn update(&mut self, p: &pb::PullProgress) {
        let shown = (p.phase.clone(), p.attempt, p.queue_position);
        let changed = self.lines.get(&p.image).is_none_or(|l| l.shown != shown);
        match self.mode {
            Mode::Live => {
                let bars = &self.bars;
                let line = self.lines.entry(p.image.clone()).or_insert_with(|| Line {
                    bar: Some(bars.add(ProgressBar::new(0))),
                    shown: shown.clone(),
                });
                line.shown = shown;
                if let Some(bar) = &line.bar {
                    draw(bar, p);
                }
            }
            Mode::Text if changed => {
                eprintln!("{}", text_line(p));
                self.remember(p, shown);
            }
            Mode::Json if changed => {
                eprintln!("{}", progress_json(p));
                self.remember(p, shown);
            }
            _ => {}
        }
    }

    fn remember(&mut self, p: &pb::PullProgress, shown: (String, u32, u32)) {
        match self.lines.get_mut(&p.image) {
            Some(l) => l.shown = shown,
            None => {
                self.lines
                    .insert(p.image.clone(), Line { bar: None, shown });
            }
        }
    }

    /// The pull of `image` is over: its live line goes (the command prints the result).
    pub fn finish(&mut self, image: &str) {
        if let Some(Line { bar: Some(bar), .. }) = self.lines.remove(image) {
            bar.finish_and_clear();
            self.bars.remove(&bar);
        }
    }

    /// Every live line goes.
    pub fn clear(&mut self) {
        let images: Vec<String> = self.lines.keys().cloned().collect();
        for i in images {
            self.finish(&i);
        }
    }
}

/// Redraws a live line.
fn draw(bar: &ProgressBar, p: &pb::PullProgress) {
    let bytes = p.bytes_known && p.total_bytes > 0 && p.phase == "downloading";
    // The bar and the message take what the terminal's width leaves; nothing wraps.
    let style = if bytes {
        ProgressStyle::with_template(
            "{prefix} {msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
    } else {
        ProgressStyle::with_template("{prefix} {spinner} {wide_msg}")
    }
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(short_name(&p.image));
    if bytes {
        bar.set_length(p.total_bytes);
        bar.set_position(p.done_bytes);
        bar.set_message(phase_word(p));
    } else {
        bar.set_message(text_detail(p));
        bar.enable_steady_tick(Duration::from_millis(120));
    }
}

/// An image name cut to at most 40 characters from the left (the tag end is what tells pulls
/// apart), for a live line.
fn short_name(image: &str) -> String {
    const MAX: usize = 40;
    let n = image.chars().count();
    if n <= MAX {
        return image.to_owned();
    }
    let tail: String = image.chars().skip(n - (MAX - 1)).collect();
    format!("…{tail}")
}

/// The phase with its qualifiers: `queued (#2)`, `downloading (attempt 2)`.
fn phase_word(p: &pb::PullProgress) -> String {
    let mut w = p.phase.clone();
    if p.phase == "queued" && p.queue_position > 0 {
        w.push_str(&format!(" (#{})", p.queue_position));
    }
    if p.attempt > 1 && !matches!(p.phase.as_str(), "done" | "failed") {
        w.push_str(&format!(" (attempt {})", p.attempt));
    }
    w
}

/// The phase and whatever bytes are known, in words.
fn text_detail(p: &pb::PullProgress) -> String {
    let mut s = phase_word(p);
    if p.phase == "queued" {
        s.push_str(": waiting for a pull slot");
    } else if p.bytes_known && p.total_bytes > 0 && !matches!(p.phase.as_str(), "resolving") {
        s.push_str(&format!(
            " {} / {}",
            human_size(p.done_bytes),
            human_size(p.total_bytes)
        ));
        if p.phase == "downloading" && p.rate_bytes_per_second > 0.0 {
            s.push_str(&format!(
                " at {}/s",
                human_size(p.rate_bytes_per_second as u64)
            ));
        }
        if p.eta_seconds > 0.0 {
            s.push_str(&format!(
                ", {} to go",
                cimage::units::format_span(Duration::from_secs(p.eta_seconds.ceil() as u64))
            ));
        }
        if !p.layers.is_empty() {
            s.push_str(&format!(" ({} layers)", p.layers.len()));
        }
    }
    if p.phase == "failed" && !p.error.is_empty() {
        s.push_str(&format!(": {}", p.error));
    }
    s
}

/// One text line for a phase change.
fn text_line(p: &pb::PullProgress) -> String {
    format!("pull {}: {}", p.image, text_detail(p))
}

/// One JSON line for a phase change.
pub fn progress_json(p: &pb::PullProgress) -> serde_json::Value {
    json!({
        "image": p.image,
        "registry": p.registry,
        "phase": p.phase,
        "queue_position": p.queue_position,
        "done_bytes": p.done_bytes,
        "total_bytes": p.total_bytes,
        "bytes_known": p.bytes_known,
        "rate_bytes_per_second": p.rate_bytes_per_second,
        "requesters": p.requesters,
        "attempt": p.attempt,
        "age_seconds": p.age_seconds,
        "eta_seconds": (p.eta_seconds > 0.0).then_some(p.eta_seconds),
        "layers": p.layers.iter().map(|l| json!({
            "digest": l.digest,
            "done_bytes": l.done_bytes,
            "total_bytes": l.total_bytes,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(phase: &str, done: u64) -> pb::PullProgress {
        pb::PullProgress {
            image: "r/app:1".into(),
            phase: phase.into(),
            done_bytes: done,
            total_bytes: 4 << 20,
            bytes_known: true,
            rate_bytes_per_second: 1048576.0,
            attempt: 1,
            layers: vec![pb::LayerProgress::default(); 2],
            ..Default::default()
        }
    }

    #[test]
    fn text_lines_say_phase_and_bytes() {
        assert_eq!(
            text_line(&progress("downloading", 1 << 20)),
            "pull r/app:1: downloading 1.0 MiB / 4.0 MiB at 1.0 MiB/s (2 layers)"
        );
        let mut q = progress("queued", 0);
        q.queue_position = 2;
        assert_eq!(
            text_line(&q),
            "pull r/app:1: queued (#2): waiting for a pull slot"
        );
        let mut f = progress("failed", 0);
        f.attempt = 3;
        f.error = "no progress for 2m0s from r".into();
        assert!(
            text_line(&f).ends_with(": no progress for 2m0s from r"),
            "{}",
            text_line(&f)
        );
    }

    #[test]
    fn long_names_keep_their_end() {
        assert_eq!(short_name("r/app:1"), "r/app:1");
        let long = "127.0.0.1:5100/t-progress-big-0ddddc72-and-more:1";
        let s = short_name(long);
        assert_eq!(s.chars().count(), 40);
        assert!(s.starts_with('…') && s.ends_with("and-more:1"), "{s}");
    }

    #[test]
    fn a_line_per_phase_change_only() {
        let mut v = PullView::with_mode(Mode::Text);
        v.update(&progress("downloading", 1));
        v.update(&progress("downloading", 2));
        assert_eq!(v.lines["r/app:1"].shown.0, "downloading");
        v.update(&progress("unpacking", 4 << 20));
        assert_eq!(v.lines["r/app:1"].shown.0, "unpacking");
    }
}
