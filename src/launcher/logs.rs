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

/// Reads a log file incrementally: each [`Tail::read`] returns the complete lines added since.
#[derive(Debug, Default)]
pub struct Tail {
    offset: u64,
    pending: Vec<u8>,
}

impl Tail {
    /// New chunks since the last call. A missing file yields nothing (the runtime creates it when
    /// the container starts).
    pub fn read(&mut self, path: &Path) -> Vec<Chunk> {
        let Ok(mut f) = std::fs::File::open(path) else {
            return vec![];
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return vec![];
        }
        let mut buf = Vec::new();
        if f.read_to_end(&mut buf).is_err() {
            return vec![];
        }
        self.offset += buf.len() as u64;
        self.pending.extend_from_slice(&buf);
        let Some(last_nl) = self.pending.iter().rposition(|&b| b == b'\n') else {
            return vec![];
        };
        let complete: Vec<u8> = self.pending.drain(..=last_nl).collect();
        String::from_utf8_lossy(&complete)
            .lines()
            .filter_map(parse_line)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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
