//! The CRI container log format, which containerd and CRI-O write for every container:
//! `<RFC 3339 time> <stdout|stderr> <F|P> <text>` per line, `P` marking a line the runtime split.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One piece of output: text of one stream, with its newline unless the runtime split the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The stream.
    pub stream: Stream,
    /// The text.
    pub text: String,
}

/// Parses one CRI log line; `None` for a line that is not in the format.
pub fn parse_line(line: &str) -> Option<Chunk> {
    let mut parts = line.splitn(4, ' ');
    let _time = parts.next()?;
    let stream = match parts.next()? {
        "stdout" => Stream::Stdout,
        "stderr" => Stream::Stderr,
        _ => return None,
    };
    let tag = parts.next()?;
    let text = parts.next().unwrap_or("");
    let full = !tag.split(':').any(|t| t == "P");
    Some(Chunk {
        stream,
        text: if full {
            format!("{text}\n")
        } else {
            text.to_owned()
        },
    })
}

/// Most bytes one [`Tail::read`] takes from the file, so one read never holds a whole large log
/// in memory; [`Tail::has_more`] says when another read would find more at once.
pub const MAX_READ: u64 = 4 << 20;

/// An unfinished line longer than this is dropped: the runtime splits long lines into partial
/// records far below it, so only a damaged file gets here.
const MAX_PENDING: usize = 1 << 20;

/// Reads a log file incrementally: each [`Tail::read`] returns the complete lines added since.
#[derive(Debug, Default)]
pub struct Tail {
    offset: u64,
    pending: Vec<u8>,
    more: bool,
}

impl Tail {
    /// New chunks since the last call, from at most [`MAX_READ`] bytes. A missing file yields
    /// nothing (the runtime creates it when the container starts). Blocking: async code uses
    /// [`Tail::read_off_thread`].
    pub fn read(&mut self, path: &Path) -> Vec<Chunk> {
        self.more = false;
        let Ok(mut f) = std::fs::File::open(path) else {
            return vec![];
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return vec![];
        }
        let mut buf = Vec::new();
        if (&mut f).take(MAX_READ).read_to_end(&mut buf).is_err() {
            return vec![];
        }
        self.offset += buf.len() as u64;
        self.more = buf.len() as u64 == MAX_READ;
        self.pending.extend_from_slice(&buf);
        let Some(last_nl) = self.pending.iter().rposition(|&b| b == b'\n') else {
            if self.pending.len() > MAX_PENDING {
                self.pending.clear();
            }
            return vec![];
        };
        let complete: Vec<u8> = self.pending.drain(..=last_nl).collect();
        String::from_utf8_lossy(&complete)
            .lines()
            .filter_map(parse_line)
            .collect()
    }

    /// A reader that starts at the last `n` lines of the file (all of it when it has fewer),
    /// found by reading backwards from the end in blocks. Blocking.
    pub fn last_lines(path: &Path, n: u32) -> Self {
        const BLOCK: u64 = 64 << 10;
        let Ok(mut f) = std::fs::File::open(path) else {
            return Self::default();
        };
        let Ok(len) = f.seek(SeekFrom::End(0)) else {
            return Self::default();
        };
        if n == 0 {
            return Self {
                offset: len,
                ..Self::default()
            };
        }
        // Newlines from the end; the file's own last one ends the last line.
        let mut seen = 0u64;
        let mut end = len;
        let mut buf = vec![0u8; BLOCK as usize];
        while end > 0 {
            let start = end.saturating_sub(BLOCK);
            let chunk = &mut buf[..(end - start) as usize];
            if f.seek(SeekFrom::Start(start)).is_err() || f.read_exact(chunk).is_err() {
                return Self::default();
            }
            for (i, b) in chunk.iter().enumerate().rev() {
                let at = start + i as u64;
                if *b == b'\n' && at + 1 != len {
                    seen += 1;
                    if seen == u64::from(n) {
                        return Self {
                            offset: at + 1,
                            ..Self::default()
                        };
                    }
                }
            }
            end = start;
        }
        Self::default()
    }

    /// Whether the last read stopped at [`MAX_READ`] with more to come.
    pub fn has_more(&self) -> bool {
        self.more
    }

    /// [`Tail::read`] on the blocking pool, so file reads never stall the async workers.
    pub async fn read_off_thread(&mut self, path: &Path) -> Vec<Chunk> {
        let mut tail = std::mem::take(self);
        let path = path.to_owned();
        match tokio::task::spawn_blocking(move || {
            let chunks = tail.read(&path);
            (tail, chunks)
        })
        .await
        {
            Ok((tail, chunks)) => {
                *self = tail;
                chunks
            }
            Err(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_only_the_last_lines_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut f = std::fs::File::create(&path).unwrap();
        // Enough lines to span several blocks read backwards.
        for i in 0..20_000 {
            writeln!(f, "2026-11-27T17:04:03.1Z stdout F line {i}").unwrap();
        }
        let texts = |n| {
            Tail::last_lines(&path, n)
                .read(&path)
                .into_iter()
                .map(|c| c.text)
                .collect::<Vec<_>>()
        };
        assert_eq!(texts(2), ["line 19998\n", "line 19999\n"]);
        assert_eq!(texts(1500).len(), 1500);
        assert_eq!(texts(1500)[0], "line 18500\n");
        assert_eq!(texts(0), Vec::<String>::new());
        assert_eq!(Tail::last_lines(&path, 50_000).read(&path).len(), 20_000);
    }

    #[test]
    fn parses_cri_lines() {
        assert_eq!(
            parse_line("2026-11-27T17:04:03.1Z stdout F hello world"),
            Some(Chunk {
                stream: Stream::Stdout,
                text: "hello world\n".into()
            })
        );
        assert_eq!(
            parse_line("2026-11-27T17:04:03.1Z stderr P part"),
            Some(Chunk {
                stream: Stream::Stderr,
                text: "part".into()
            })
        );
        assert_eq!(
            parse_line("2026-11-27T17:04:03.1Z stdout F ").unwrap().text,
            "\n"
        );
        assert_eq!(parse_line("garbage"), None);
    }

    #[test]
    fn tails_only_complete_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let mut tail = Tail::default();
        assert!(tail.read(&path).is_empty());
        let mut f = std::fs::File::create(&path).unwrap();
        write!(f, "t stdout F one\nt stderr F tw").unwrap();
        let got = tail.read(&path);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].text, "one\n");
        writeln!(f, "o").unwrap();
        let got = tail.read(&path);
        assert_eq!(
            (got[0].stream, got[0].text.as_str()),
            (Stream::Stderr, "two\n")
        );
        assert!(tail.read(&path).is_empty());
    }
}
