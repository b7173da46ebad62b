//! The CRI container log format, which containerd and CRI-O write for every container:
//! `<RFC 3339 time> <stdout|stderr> <F|P> <text>` per line, `P` marking a line the runtime split;
//! and [`Tail`], which reads a step's log as it grows, across its rotated files.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

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
/// in memory (a reader that does not read its answer holds at most this much of the file);
/// [`Tail::has_more`] says when another read would find more at once.
pub const MAX_READ: u64 = 512 << 10;

/// An unfinished line longer than this is dropped: the runtime splits long lines into partial
/// records far below it, so only a damaged file gets here.
const MAX_PENDING: usize = 1 << 20;

/// One open file of a step's log, read from `offset` on.
#[derive(Debug)]
struct Reader {
    file: std::fs::File,
    /// (device, inode): the file whatever its name becomes.
    id: (u64, u64),
    /// Its number when it was opened as a rotated file.
    rotated: Option<u64>,
    offset: u64,
    /// The start of a line not yet complete.
    pending: Vec<u8>,
}

fn file_id(md: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (md.dev(), md.ino())
}

impl Reader {
    fn open(path: &Path, rotated: Option<u64>, offset: u64) -> Option<Self> {
        let file = std::fs::File::open(path).ok()?;
        let id = file_id(&file.metadata().ok()?);
        Some(Self {
            file,
            id,
            rotated,
            offset,
            pending: Vec::new(),
        })
    }

    /// The complete lines added since the last read, from at most `budget` bytes (taken off
    /// it); whether it reached the end of the file.
    fn read(&mut self, budget: &mut u64, out: &mut Vec<Chunk>) -> bool {
        let mut buf = Vec::new();
        if self.file.seek(SeekFrom::Start(self.offset)).is_err()
            || (&mut self.file)
                .take(*budget)
                .read_to_end(&mut buf)
                .is_err()
        {
            return true;
        }
        self.offset += buf.len() as u64;
        *budget -= buf.len() as u64;
        let at_end = *budget > 0;
        self.pending.extend_from_slice(&buf);
        let Some(last_nl) = self.pending.iter().rposition(|&b| b == b'\n') else {
            if self.pending.len() > MAX_PENDING {
                self.pending.clear();
            }
            return at_end;
        };
        let complete: Vec<u8> = self.pending.drain(..=last_nl).collect();
        out.extend(
            String::from_utf8_lossy(&complete)
                .lines()
                .filter_map(parse_line),
        );
        at_end
    }
}

/// Reads a step's log incrementally, across its rotated files (see `log_files`): each
/// [`Tail::read`] returns the complete lines added since. A file is read through the
/// descriptor opened on it, whatever it is renamed to or whether it is removed meanwhile; once
/// it is read to its end and a newer file exists, the next one is opened. The file read before
/// is read again on each call for a while, for what the runtime wrote to it between the rename
/// and its reopening.
#[derive(Debug, Default)]
pub struct Tail {
    cur: Option<Reader>,
    prev: Option<Reader>,
    /// Rotated files numbered up to this one are behind the reader.
    after: u64,
    /// Where to start in the first file opened (`last_lines`): its number and offset.
    start: Option<(Option<u64>, u64)>,
    more: bool,
}

impl Tail {
    /// New chunks since the last call, from at most [`MAX_READ`] bytes. A missing file yields
    /// nothing (the runtime creates it when the container starts). Blocking: async code uses
    /// [`Tail::read_off_thread`].
    pub fn read(&mut self, path: &Path) -> Vec<Chunk> {
        self.more = false;
        let mut budget = MAX_READ;
        let mut out = Vec::new();
        if let Some(prev) = &mut self.prev {
            prev.read(&mut budget, &mut out);
        }
        loop {
            if self.cur.is_none() {
                self.cur = self.open_next(path);
            }
            let Some(cur) = &mut self.cur else {
                break;
            };
            if !cur.read(&mut budget, &mut out) {
                self.more = true;
                break;
            }
            match self.next_after_end(path) {
                Some(next) => self.prev = self.cur.replace(next),
                None => break,
            }
        }
        out
    }

    /// The first file to read: where `last_lines` said, or the oldest rotated file, or the
    /// file being written.
    fn open_next(&mut self, path: &Path) -> Option<Reader> {
        if let Some((number, offset)) = self.start.take() {
            let at = match number {
                Some(n) => rotated_path(path, n),
                None => path.to_owned(),
            };
            if let Some(r) = Reader::open(&at, number, offset) {
                return Some(r);
            }
        }
        self.newer(path)
    }

    /// The oldest file after `self.after`: a rotated one, or the file being written.
    fn newer(&self, path: &Path) -> Option<Reader> {
        for (n, p) in super::log_files::rotated(path) {
            if n > self.after {
                if let Some(r) = Reader::open(&p, Some(n), 0) {
                    return Some(r);
                }
            }
        }
        Reader::open(path, None, 0)
    }

    /// Once the current file is read to its end: the next one, if the current one is done
    /// (rotated away, or a rotated file followed by a newer one).
    fn next_after_end(&mut self, path: &Path) -> Option<Reader> {
        let cur = self.cur.as_ref()?;
        let number = match cur.rotated {
            Some(n) => n,
            None => {
                // The file being written: done once the runtime writes another one (during a
                // rotation the name is missing for a moment: not done yet).
                let now = std::fs::metadata(path).ok()?;
                if file_id(&now) == cur.id {
                    return None;
                }
                // It was renamed to one of the rotated names; removed if none has it.
                super::log_files::rotated(path)
                    .into_iter()
                    .find(|(_, p)| std::fs::metadata(p).is_ok_and(|m| file_id(&m) == cur.id))
                    .map_or(self.after, |(n, _)| n)
            }
        };
        self.after = self.after.max(number);
        let next = self.newer(path)?;
        (next.id != cur.id).then_some(next)
    }

    /// A reader that starts at the last `n` lines of the log, across its rotated files (all
    /// of it when it has fewer), found by reading backwards from the end in blocks. Blocking.
    pub fn last_lines(path: &Path, n: u32) -> Self {
        let mut files: Vec<(Option<u64>, PathBuf)> = super::log_files::rotated(path)
            .into_iter()
            .map(|(n, p)| (Some(n), p))
            .collect();
        files.push((None, path.to_owned()));
        let mut wanted = u64::from(n);
        for (number, file) in files.iter().rev() {
            let Ok(mut f) = std::fs::File::open(file) else {
                continue;
            };
            let Ok(len) = f.seek(SeekFrom::End(0)) else {
                continue;
            };
            let newest = files.iter().rev().find_map(|(n, _)| *n).unwrap_or(0);
            if wanted == 0 {
                return Self::starting(*number, len, newest);
            }
            match lines_from_end(&mut f, len, wanted) {
                Ok(offset) => return Self::starting(*number, offset, newest),
                Err(seen) => wanted -= seen,
            }
        }
        Self::default()
    }

    /// A reader that starts in file `number` (`None`: the one being written) at `offset`, the
    /// newest rotated file being numbered `newest`.
    fn starting(number: Option<u64>, offset: u64, newest: u64) -> Self {
        Self {
            // The rotated files before the first one read are behind the reader.
            after: number.map_or(newest, |n| n - 1),
            start: Some((number, offset)),
            ..Self::default()
        }
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

/// The rotated file numbered `n` of the log at `path`.
fn rotated_path(path: &Path, n: u64) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

/// The offset at which the last `n` lines of a file of `len` bytes start, or, when it has
/// fewer, how many it has.
fn lines_from_end(f: &mut std::fs::File, len: u64, n: u64) -> Result<u64, u64> {
    const BLOCK: u64 = 64 << 10;
    // Newlines from the end; the file's own last one ends the last line.
    let mut seen = 0u64;
    let mut end = len;
    let mut buf = vec![0u8; BLOCK as usize];
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let chunk = &mut buf[..(end - start) as usize];
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_exact(chunk).is_err() {
            return Err(seen);
        }
        for (i, b) in chunk.iter().enumerate().rev() {
            let at = start + i as u64;
            if *b == b'\n' && at + 1 != len {
                seen += 1;
                if seen == n {
                    return Ok(at + 1);
                }
            }
        }
        end = start;
    }
    // The first line has no newline before it.
    match len > 0 {
        true => Err(seen + 1),
        false => Err(0),
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
        // A file bigger than one read comes whole over several.
        let mut all = Tail::last_lines(&path, 50_000);
        let mut n = all.read(&path).len();
        while all.has_more() {
            n += all.read(&path).len();
        }
        assert_eq!(n, 20_000);
    }

    /// Appends CRI lines `text` to `path`.
    fn write(path: &Path, texts: &[&str]) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        for t in texts {
            writeln!(f, "2026-11-27T17:04:03.1Z stdout F {t}").unwrap();
        }
    }

    fn texts(chunks: Vec<Chunk>) -> Vec<String> {
        chunks
            .into_iter()
            .map(|c| c.text.trim_end().to_owned())
            .collect()
    }

    #[test]
    fn follows_a_log_across_its_rotations_without_losing_a_line() {
        use crate::launcher::log_files::rotate;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0-t.log");
        let mut tail = Tail::default();
        write(&log, &["1", "2"]);
        assert_eq!(texts(tail.read(&log)), ["1", "2"]);
        // Renamed; the runtime writes once more to the old file before it reopens.
        let old = rotate(&log).unwrap();
        write(&old, &["3"]);
        assert_eq!(texts(tail.read(&log)), ["3"], "nothing reopened yet");
        write(&log, &["4"]);
        write(&old, &["late"]);
        assert_eq!(texts(tail.read(&log)), ["late", "4"]);
        // Two rotations between reads, the older of the two files already removed.
        write(&log, &["5"]);
        let r2 = rotate(&log).unwrap();
        write(&log, &["6"]);
        rotate(&log).unwrap();
        write(&log, &["7"]);
        std::fs::remove_file(&old).unwrap();
        assert_eq!(texts(tail.read(&log)), ["5", "6", "7"]);
        assert!(!r2.exists() || tail.read(&log).is_empty());
        // A new reader reads what is left, oldest first, and the last lines across files.
        let mut fresh = Tail::default();
        assert_eq!(texts(fresh.read(&log)), ["4", "5", "6", "7"]);
        let last = |n| texts(Tail::last_lines(&log, n).read(&log));
        assert_eq!(last(2), ["6", "7"]);
        assert_eq!(last(3), ["5", "6", "7"]);
        assert_eq!(last(0), Vec::<String>::new());
        assert_eq!(last(100), ["4", "5", "6", "7"]);
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
