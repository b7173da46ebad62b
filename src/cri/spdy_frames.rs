//! The wire of an attached command's session (see `spdy`): SPDY/3.1 frames as a client needs
//! them (control heads, SYN_STREAM, data frames, header blocks compressed as one zlib stream),
//! the channels of Kubernetes' `v4.channel.k8s.io` remote command protocol, and the exit status
//! the runtime writes on its error channel.

use flate2::{Compress, Compression, FlushCompress};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::runtime::{ExecAttach, ExecEvent};

/// Largest SPDY frame accepted from the runtime (its writes are 32 KiB at most).
pub(super) const MAX_FRAME: usize = 1 << 20;
/// SPDY control frame types and flags used here.
pub(super) const SYN_STREAM: u16 = 1;
pub(super) const PING: u16 = 6;
pub(super) const FLAG_FIN: u8 = 0x01;

/// The SPDY stream ids of one session's channels (client streams have odd ids).
#[derive(Debug, Clone, Copy)]
pub(super) struct Channels {
    pub(super) error: u32,
    pub(super) stdin: Option<u32>,
    pub(super) stdout: u32,
    pub(super) stderr: Option<u32>,
    pub(super) resize: Option<u32>,
}

impl Channels {
    /// The channels the runtime expects for `attach` (it opens exactly the ones the `Exec`
    /// request asked for: stdout always, stderr only without a terminal, resize only with one).
    pub(super) fn for_attach(attach: ExecAttach) -> Self {
        let mut next = 1;
        let mut take = |wanted: bool| {
            wanted.then(|| {
                let id = next;
                next += 2;
                id
            })
        };
        let error = take(true).unwrap_or(1);
        let stdin = take(attach.stdin);
        let stdout = take(true).unwrap_or(3);
        let stderr = take(!attach.tty);
        let resize = take(attach.tty);
        Self {
            error,
            stdin,
            stdout,
            stderr,
            resize,
        }
    }

    /// `(stream id, channel name)` in the order they are opened.
    pub(super) fn named(&self) -> Vec<(u32, &'static str)> {
        let mut v = vec![(self.error, "error")];
        v.extend(self.stdin.map(|id| (id, "stdin")));
        v.push((self.stdout, "stdout"));
        v.extend(self.stderr.map(|id| (id, "stderr")));
        v.extend(self.resize.map(|id| (id, "resize")));
        v
    }
}

/// The compression context of the header blocks this side sends: SPDY compresses every header
/// block of a session as one zlib stream, each block ending at a sync flush.
pub(super) struct HeaderCompressor(Compress);

impl HeaderCompressor {
    pub(super) fn new() -> Self {
        Self(Compress::new(Compression::fast(), true))
    }

    /// A compressed name/value block.
    pub(super) fn block(
        &mut self,
        pairs: &[(&str, &str)],
    ) -> Result<Vec<u8>, flate2::CompressError> {
        let mut raw = Vec::new();
        raw.extend((pairs.len() as u32).to_be_bytes());
        for (name, value) in pairs {
            for s in [name, value] {
                raw.extend((s.len() as u32).to_be_bytes());
                raw.extend(s.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            out.reserve(256);
            let before = self.0.total_in();
            self.0.compress_vec(input, &mut out, FlushCompress::Sync)?;
            input = &input[(self.0.total_in() - before) as usize..];
            // The flush is complete once input is used up and there was room to spare.
            if input.is_empty() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// A control frame's first eight bytes: version 3, `kind`, `flags`, `len`.
pub(super) fn control_head(kind: u16, flags: u8, len: usize) -> [u8; 8] {
    let k = kind.to_be_bytes();
    let l = (len as u32).to_be_bytes();
    [0x80, 0x03, k[0], k[1], flags, l[1], l[2], l[3]]
}

/// A SYN_STREAM frame opening client stream `id` with the compressed `headers`.
pub(super) fn syn_stream(id: u32, headers: &[u8]) -> Vec<u8> {
    let mut f = control_head(SYN_STREAM, 0, 10 + headers.len()).to_vec();
    f.extend((id & 0x7fff_ffff).to_be_bytes());
    f.extend(0u32.to_be_bytes());
    f.extend([0, 0]);
    f.extend(headers);
    f
}

/// A data frame on stream `id`.
pub(super) fn data_frame(id: u32, flags: u8, data: &[u8]) -> Vec<u8> {
    let l = (data.len() as u32).to_be_bytes();
    let mut f = (id & 0x7fff_ffff).to_be_bytes().to_vec();
    f.extend([flags, l[1], l[2], l[3]]);
    f.extend(data);
    f
}

/// One frame read from the runtime.
pub(super) enum Frame {
    Control { kind: u16, body: Vec<u8> },
    Data { id: u32, body: Vec<u8> },
}

pub(super) async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R) -> std::io::Result<Option<Frame>> {
    let mut head = [0u8; 8];
    match rd.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (more than {MAX_FRAME})"),
        ));
    }
    let mut body = vec![0u8; len];
    rd.read_exact(&mut body).await?;
    Ok(Some(if head[0] & 0x80 != 0 {
        Frame::Control {
            kind: u16::from_be_bytes([head[2], head[3]]),
            body,
        }
    } else {
        Frame::Data {
            id: u32::from_be_bytes([head[0] & 0x7f, head[1], head[2], head[3]]),
            body,
        }
    }))
}

/// How the command ended, from the v4 `Status` on the error channel; `None` while it is not
/// yet a whole JSON document.
pub(super) fn exit_status(raw: &[u8]) -> Option<ExecEvent> {
    let v: serde_json::Value = serde_json::from_slice(raw).ok()?;
    if v["status"] == "Success" {
        return Some(ExecEvent::Exited(0));
    }
    if v["reason"] == "NonZeroExitCode" {
        let code = v["details"]["causes"].as_array().and_then(|causes| {
            causes
                .iter()
                .find(|c| c["reason"] == "ExitCode")
                .and_then(|c| c["message"].as_str()?.trim().parse().ok())
        });
        if let Some(code) = code {
            return Some(ExecEvent::Exited(code));
        }
    }
    let message = v["message"].as_str().unwrap_or("no message").trim();
    Some(ExecEvent::Failed(format!(
        "the runtime could not run the command: {message}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    #[test]
    fn channels_follow_the_request() {
        let c = Channels::for_attach(ExecAttach {
            tty: true,
            stdin: true,
        });
        assert_eq!(
            c.named(),
            vec![(1, "error"), (3, "stdin"), (5, "stdout"), (7, "resize")]
        );
        let c = Channels::for_attach(ExecAttach {
            tty: false,
            stdin: false,
        });
        assert_eq!(c.named(), vec![(1, "error"), (3, "stdout"), (5, "stderr")]);
    }

    #[test]
    fn header_blocks_are_one_zlib_stream_flushed_per_block() {
        let mut c = HeaderCompressor::new();
        let a = c.block(&[("streamtype", "error")]).unwrap();
        let b = c.block(&[("streamtype", "stdout")]).unwrap();
        let mut d = Decompress::new(true);
        let mut out = Vec::with_capacity(256);
        d.decompress_vec(&a, &mut out, FlushDecompress::Sync)
            .unwrap();
        let mut expect = 1u32.to_be_bytes().to_vec();
        expect.extend(10u32.to_be_bytes());
        expect.extend(b"streamtype");
        expect.extend(5u32.to_be_bytes());
        expect.extend(b"error");
        assert_eq!(out, expect);
        out.clear();
        d.decompress_vec(&b, &mut out, FlushDecompress::Sync)
            .unwrap();
        assert!(out.ends_with(b"stdout"));
    }

    #[test]
    fn exit_statuses_are_read_as_the_runtime_writes_them() {
        assert_eq!(
            exit_status(br#"{"metadata":{},"status":"Success"}"#),
            Some(ExecEvent::Exited(0))
        );
        let failed = br#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: exit status 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#;
        assert_eq!(exit_status(failed), Some(ExecEvent::Exited(3)));
        let internal = br#"{"metadata":{},"status":"Failure","message":"Internal error occurred: executable file not found","reason":"InternalError","code":500}"#;
        match exit_status(internal) {
            Some(ExecEvent::Failed(m)) => assert!(m.contains("executable file not found"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(exit_status(br#"{"metadata":{},"sta"#), None);
    }
}
