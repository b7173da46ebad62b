//! Makes the HTTP/2 `:authority` of requests on a unix socket acceptable to the server.
//!
//! Older gRPC clients (grpc-go before it adopted `localhost` for unix sockets, as in crictl
//! 1.26, and grpc-java) send the socket's path as `:authority`, e.g. `/run/cimage/image.sock`.
//! The `h2` crate under tonic refuses such a request with `PROTOCOL_ERROR`, while containerd
//! (grpc-go) accepts it, so an image endpoint that must stand in for containerd rewrites it.
//!
//! The rewrite works on the bytes the client sends, before the server reads them: in each
//! HEADERS block (with its CONTINUATION frames) every literal `:authority` field whose name is
//! the HPACK static entry 1 gets a new value. Literal values are never decoded, only skipped by
//! their length prefixes. A field the server adds to its HPACK table gets the one-character
//! value `x`, never longer than what the client added (a non-empty encoded string decodes to at
//! least one character): the server's entry is then no larger than the client's, and as entries
//! are addressed from the newest and a smaller one is evicted no earlier, every entry the client
//! refers to is still where it expects it. A field not indexed gets `localhost`. A block too big
//! to hold, or anything that is not HTTP/2 as expected, passes through unchanged.
//!
//! What is held is bounded by the frame headers, never by what a frame's payload turns out to
//! be: a frame is buffered whole only when its header announces at most the default frame size
//! and, while a header block is held, at most what keeps the block within `MAX_BLOCK`. Any
//! bigger frame passes on from its header (the server then refuses what it does not take), so
//! a CONTINUATION that announces 16 MiB costs this side nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// The client's connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame a peer must accept without settings saying more.
const DEFAULT_MAX_FRAME: usize = 16384;
/// The value of an `:authority` the server does not index.
const NEW_AUTHORITY: &[u8] = b"localhost";
/// The value of an `:authority` the server adds to its table (see the module's text).
const NEW_INDEXED_AUTHORITY: &[u8] = b"x";
/// A header block (HEADERS and its CONTINUATIONs) held for rewriting is at most this big;
/// beyond it, the frames pass on as they came.
const MAX_BLOCK: usize = 64 << 10;

/// Reads an HPACK integer with an `n`-bit prefix at `b[*i]`; advances `i`.
fn integer(b: &[u8], i: &mut usize, n: u8) -> Option<usize> {
    let mask = (1u16 << n) as usize - 1;
    let mut v = (*b.get(*i)? as usize) & mask;
    *i += 1;
    if v < mask {
        return Some(v);
    }
    let mut shift = 0;
    loop {
        let byte = *b.get(*i)? as usize;
        *i += 1;
        v = v.checked_add((byte & 0x7f).checked_shl(shift)?)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// Skips an HPACK string literal at `b[*i]`; returns its range (prefix included).
fn skip_string(b: &[u8], i: &mut usize) -> Option<std::ops::Range<usize>> {
    let start = *i;
    let len = integer(b, i, 7)?;
    *i = i.checked_add(len).filter(|end| *end <= b.len())?;
    Some(start..*i)
}

/// The header block with every non-empty literal `:authority` (static name index 1) given a
/// value the server accepts: `localhost` for a literal without indexing or never indexed, `x`
/// for one with incremental indexing (the server adds it to its table; see the module's text);
/// `None` when the block does not parse (it is then left alone).
pub fn rewrite_block(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let first = b[i];
        let start = i;
        if first & 0x80 != 0 {
            // Indexed field.
            integer(b, &mut i, 7)?;
        } else if first & 0xe0 == 0x20 {
            // Dynamic table size update.
            integer(b, &mut i, 5)?;
        } else {
            // A literal: with incremental indexing (6-bit index) or without / never indexed
            // (4-bit index); index 0 means the name follows as a string.
            let prefix = if first & 0xc0 == 0x40 { 6 } else { 4 };
            let index = integer(b, &mut i, prefix)?;
            if index == 0 {
                skip_string(b, &mut i)?;
            }
            let head = start..i;
            let value = skip_string(b, &mut i)?;
            // A non-empty encoded value (prefix byte plus at least one byte).
            if index == 1 && value.len() > 1 {
                let new = match prefix {
                    6 => NEW_INDEXED_AUTHORITY,
                    _ => NEW_AUTHORITY,
                };
                out.extend_from_slice(&b[head]);
                out.push(new.len() as u8);
                out.extend_from_slice(new);
                continue;
            }
        }
        out.extend_from_slice(&b[start..i]);
    }
    Some(out)
}

/// A reader that passes a client's HTTP/2 bytes through [`rewrite_block`].
pub struct AuthorityFix<R> {
    inner: R,
    /// Bytes read, not yet framed.
    raw: Vec<u8>,
    /// Bytes ready for the server.
    out: Vec<u8>,
    /// How much of `out` the server has taken.
    taken: usize,
    /// The preface has gone through.
    preface_done: bool,
    /// A HEADERS frame waiting for its CONTINUATIONs: frame header and collected block.
    pending: Option<([u8; 9], Vec<u8>, Vec<u8>)>,
    /// Rewriting was given up: bytes pass as they come.
    passing: bool,
    eof: bool,
}

impl<R> AuthorityFix<R> {
    /// Wraps the client side of a connection.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            raw: Vec::new(),
            out: Vec::new(),
            taken: 0,
            preface_done: false,
            pending: None,
            passing: false,
            eof: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The wrapped stream, mutably.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    fn emit_headers(&mut self, head: [u8; 9], prefix: Vec<u8>, block: Vec<u8>) {
        // Unparsable: left to the server to judge.
        let block = rewrite_block(&block).unwrap_or(block);
        self.emit_block(head, &prefix, &block, true);
    }

    /// Writes a header block as a HEADERS frame (padding dropped) and as many CONTINUATION
    /// frames as the default frame size needs; the last says END_HEADERS when `end`.
    fn emit_block(&mut self, mut head: [u8; 9], prefix: &[u8], block: &[u8], end: bool) {
        let first = block.len().min(DEFAULT_MAX_FRAME - prefix.len());
        let (now, mut rest) = block.split_at(first);
        let len = prefix.len() + now.len();
        head[0..3].copy_from_slice(&(len as u32).to_be_bytes()[1..]);
        head[3] = HEADERS;
        head[4] &= !PADDED;
        head[4] = match rest.is_empty() && end {
            true => head[4] | END_HEADERS,
            false => head[4] & !END_HEADERS,
        };
        self.out.extend_from_slice(&head);
        self.out.extend_from_slice(prefix);
        self.out.extend_from_slice(now);
        while !rest.is_empty() {
            let (chunk, more) = rest.split_at(rest.len().min(DEFAULT_MAX_FRAME));
            let mut h = head;
            h[0..3].copy_from_slice(&(chunk.len() as u32).to_be_bytes()[1..]);
            h[3] = CONTINUATION;
            h[4] = if more.is_empty() && end {
                END_HEADERS
            } else {
                0
            };
            self.out.extend_from_slice(&h);
            self.out.extend_from_slice(chunk);
            rest = more;
        }
    }

    /// Moves every complete frame from `raw` to `out`.
    fn process(&mut self) {
        if self.passing {
            self.out.append(&mut self.raw);
            return;
        }
        if !self.preface_done {
            if self.raw.len() < PREFACE.len() {
                if !PREFACE.starts_with(&self.raw) {
                    self.pass_all();
                }
                return;
            }
            if self.raw[..PREFACE.len()] != *PREFACE {
                self.pass_all();
                return;
            }
            self.out.extend(self.raw.drain(..PREFACE.len()));
            self.preface_done = true;
        }
        loop {
            if self.raw.len() < 9 {
                return;
            }
            let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
            if len > DEFAULT_MAX_FRAME && self.pending.is_none() {
                // A frame bigger than a server takes by default (DATA, after settings said
                // more): nothing to rewrite from here on; no frame is held whole.
                self.pass_all();
                return;
            }
            let too_big_to_hold = self.pending.as_ref().is_some_and(|(_, _, block)| {
                len > DEFAULT_MAX_FRAME || block.len() + len > MAX_BLOCK
            });
            if too_big_to_hold {
                // Judged at its header, before any of its payload is waited for: what was held
                // goes on unchanged, and so does everything after it (the server refuses a
                // frame over its size, or a header list over its limit).
                if let Some((h, prefix, block)) = self.pending.take() {
                    self.emit_block(h, &prefix, &block, false);
                }
                self.pass_all();
                return;
            }
            if self.raw.len() < 9 + len {
                return;
            }
            let frame: Vec<u8> = self.raw.drain(..9 + len).collect();
            let mut head = [0u8; 9];
            head.copy_from_slice(&frame[..9]);
            let (kind, flags, payload) = (head[3], head[4], &frame[9..]);
            match (kind, self.pending.take()) {
                (HEADERS, None) => {
                    let mut p = 0;
                    let pad = if flags & PADDED != 0 {
                        p += 1;
                        *payload.first().unwrap_or(&0) as usize
                    } else {
                        0
                    };
                    let prio = if flags & PRIORITY != 0 { 5 } else { 0 };
                    if payload.len() < p + prio + pad {
                        self.out.extend_from_slice(&frame);
                        continue;
                    }
                    let prefix = payload[p..p + prio].to_vec();
                    let block = payload[p + prio..payload.len() - pad].to_vec();
                    if flags & END_HEADERS != 0 {
                        self.emit_headers(head, prefix, block);
                    } else {
                        self.pending = Some((head, prefix, block));
                    }
                }
                (CONTINUATION, Some((h, prefix, mut block))) if head[5..9] == h[5..9] => {
                    block.extend_from_slice(payload);
                    if flags & END_HEADERS != 0 {
                        self.emit_headers(h, prefix, block);
                    } else {
                        self.pending = Some((h, prefix, block));
                    }
                }
                (_, Some((h, prefix, block))) => {
                    // Not the continuation one must be: what was held goes on unchanged, and
                    // so does everything after it (the server names any protocol error).
                    self.emit_block(h, &prefix, &block, false);
                    self.out.extend_from_slice(&frame);
                    self.pass_all();
                    return;
                }
                (_, None) => self.out.extend_from_slice(&frame),
            }
        }
    }

    /// Gives up rewriting (not HTTP/2 as expected): everything passes as it is, from now on.
    fn pass_all(&mut self) {
        self.preface_done = true;
        self.passing = true;
        self.out.append(&mut self.raw);
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for AuthorityFix<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.taken < self.out.len() {
                let n = buf.remaining().min(self.out.len() - self.taken);
                let from = self.taken;
                buf.put_slice(&self.out[from..from + n]);
                self.taken += n;
                if self.taken == self.out.len() {
                    self.out.clear();
                    self.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                // What is left unframed goes as it is; then end of stream.
                let rest = std::mem::take(&mut self.raw);
                if rest.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                self.out = rest;
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        self.eof = true;
                    } else {
                        self.raw.extend_from_slice(got);
                        self.process();
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A literal with incremental indexing of `:authority` (static name 1), value `v` raw.
    fn authority(v: &[u8]) -> Vec<u8> {
        let mut b = vec![0x41, v.len() as u8];
        b.extend_from_slice(v);
        b
    }

    #[test]
    fn the_authority_literal_is_replaced_and_the_rest_kept() {
        // :method POST (static 3), :scheme http (static 6), :path literal without indexing
        // (name index 4), :authority, then an indexed dynamic entry (62).
        let mut block = vec![0x83, 0x86, 0x04, 0x03, b'/', b'a', b'b'];
        block.extend(authority(b"/run/cimage/image.sock"));
        block.push(0xbe);
        let got = rewrite_block(&block).unwrap();
        let mut want = vec![0x83, 0x86, 0x04, 0x03, b'/', b'a', b'b'];
        want.extend(authority(b"x"));
        want.push(0xbe);
        assert_eq!(got, want);
        // A Huffman-coded value (H bit) is replaced the same way; its length is all we read.
        let huff = [0x41, 0x83, 0xaa, 0xbb, 0xcc, 0x82];
        assert_eq!(
            rewrite_block(&huff).unwrap(),
            [&authority(b"x")[..], &[0x82]].concat()
        );
        // Not indexed by the server: the value can be the usual one.
        let plain = [0x01, 0x05, b'/', b'r', b'u', b'n', b'/'];
        assert_eq!(
            rewrite_block(&plain).unwrap(),
            [&[0x01, 9][..], b"localhost"].concat()
        );
        // An empty value is left alone (nothing shorter to put in its place).
        assert_eq!(rewrite_block(&[0x41, 0x00]).unwrap(), [0x41, 0x00]);
        // Truncated blocks are not guessed at.
        assert!(rewrite_block(&[0x41, 0x10, b'x']).is_none());
        // Long integers (multi-byte prefixes) are followed.
        let long = [0xff, 0x81, 0x01];
        assert_eq!(rewrite_block(&long).unwrap(), long);
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn a_stream_of_frames_comes_out_with_its_headers_rewritten() {
        let settings = frame(0x4, 0, 0, &[]);
        let block = [vec![0x83], authority(b"/tmp/s.sock")].concat();
        let (a, b) = block.split_at(2);
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        // A padded HEADERS with priority, continued in a CONTINUATION.
        let mut payload = vec![3u8];
        payload.extend([0, 0, 0, 0, 16]);
        payload.extend(a);
        payload.extend([0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(frame(0x0, 0x1, 1, b"data"));
        let mut r = AuthorityFix::new(&input[..]);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        let mut want = PREFACE.to_vec();
        want.extend(&settings);
        let new_block = [vec![0x83], authority(b"x")].concat();
        let mut p = vec![0, 0, 0, 0, 16];
        p.extend(&new_block);
        want.extend(frame(HEADERS, PRIORITY | END_HEADERS, 1, &p));
        want.extend(frame(0x0, 0x1, 1, b"data"));
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn big_blocks_go_out_in_frames_a_server_takes_and_odd_ones_pass() {
        // A block of 24,000 bytes.
        let mut block = authority(b"/tmp/s.sock");
        for _ in 0..4000 {
            block.extend([0x00, 0x01, b'a', 0x02, b'b', b'c']);
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let mut r = AuthorityFix::new(&input[..]);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        // In one frame over the default frame size: not held, passed on as it came.
        assert_eq!(got, input);
        // In a HEADERS and a CONTINUATION: rewritten, and out in frames a server takes.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block[..10000]));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &block[10000..]));
        let mut r = AuthorityFix::new(&input[..]);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        let new_block = rewrite_block(&block).unwrap();
        let mut want = PREFACE.to_vec();
        want.extend(frame(HEADERS, 0, 1, &new_block[..DEFAULT_MAX_FRAME]));
        want.extend(frame(
            CONTINUATION,
            END_HEADERS,
            1,
            &new_block[DEFAULT_MAX_FRAME..],
        ));
        assert_eq!(got, want);
        // A CONTINUATION of another stream breaks the rules: the rest passes unchanged.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block[..100]));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &block[100..200]));
        input.extend(frame(HEADERS, END_HEADERS, 5, &authority(b"/tmp/s.sock")));
        let mut r = AuthorityFix::new(&input[..]);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, input);
    }

    /// What `r` gives without waiting for more from the client.
    fn readable_now<R: AsyncRead + Unpin>(r: &mut AuthorityFix<R>) -> Vec<u8> {
        use futures::FutureExt;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Some(n) = r.read(&mut buf).now_or_never() {
            let n = n.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn a_frame_too_big_to_hold_passes_on_at_its_header_without_its_payload() {
        use tokio::io::AsyncWriteExt;
        // A CONTINUATION that announces 16 MiB, of which 100 bytes have come.
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut r = AuthorityFix::new(server);
        let block = [vec![0x83], authority(b"/tmp/s.sock")].concat();
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &block));
        let mut huge = frame(CONTINUATION, END_HEADERS, 1, &[]);
        huge[0..3].copy_from_slice(&[0xff, 0xff, 0xff]);
        input.extend(&huge);
        input.extend([0u8; 100]);
        client.write_all(&input).await.unwrap();
        assert_eq!(readable_now(&mut r), input);
        assert!(r.raw.is_empty() && r.pending.is_none());
        // A held block of 60 KiB, then a CONTINUATION of 16 KiB that would take it past the
        // 64 KiB held at most: passed on at its header too.
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut r = AuthorityFix::new(server);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82; DEFAULT_MAX_FRAME]));
        for n in [DEFAULT_MAX_FRAME, DEFAULT_MAX_FRAME, 12 << 10] {
            input.extend(frame(CONTINUATION, 0, 1, &vec![0x82; n]));
        }
        let mut next = frame(CONTINUATION, END_HEADERS, 1, &[]);
        next[0..3].copy_from_slice(&(DEFAULT_MAX_FRAME as u32).to_be_bytes()[1..]);
        input.extend(&next);
        client.write_all(&input).await.unwrap();
        let got = readable_now(&mut r);
        assert!(got.ends_with(&next), "the frame header went on");
        assert_eq!(got.len(), input.len());
    }

    #[tokio::test]
    async fn bytes_that_are_not_http2_pass_unchanged() {
        let input = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        let mut r = AuthorityFix::new(&input[..]);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, input);
    }
}
