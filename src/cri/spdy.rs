//! A client of the runtime's streaming server, for commands attached to a caller (`cimage exec
//! -i/-t`). CRI `Exec` answers with a single-use URL (containerd serves it on loopback by
//! default, valid for about a minute); the command starts when a client connects to it and opens
//! its streams. The protocol is Kubernetes' remote command execution, version
//! `v4.channel.k8s.io`, over SPDY/3.1: one SPDY stream per channel (error, stdin, stdout, stderr,
//! resize), the exit status as a JSON `Status` on the error channel. SPDY rather than WebSocket
//! because only SPDY can end the command's input without ending the session (a half-close of
//! the stdin stream), which `echo data | cimage exec -i …` needs.
//!
//! Only what a client needs is implemented: the runtime's header blocks are skipped (nothing in
//! them is needed); header blocks are compressed without SPDY's preset dictionary (a zlib
//! reader takes a stream that does not use it); and no flow control is done, as containerd's
//! streaming server (spdystream) does none either; a strict SPDY peer would need
//! WINDOW_UPDATE frames past 64 KiB.
//!
//! This file owns the session: the URL check, the upgrade, and the two halves that relay
//! frames; the frames themselves are in `spdy_frames`.

use std::io::Cursor;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::spdy_frames::{
    control_head, data_frame, exit_status, read_frame, syn_stream, Channels, Frame,
    HeaderCompressor, FLAG_FIN, PING,
};
use crate::runtime::{ExecAttach, ExecEvent, ExecInput, ExecSession};

/// The remote command protocol asked for.
const PROTOCOL: &str = "v4.channel.k8s.io";
/// Longest wait for the connection and the upgrade answer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest upgrade answer read.
const MAX_HEAD: usize = 16 << 10;
/// Largest exit status accepted on the error channel.
const MAX_STATUS: usize = 64 << 10;
/// Input is sent in data frames of at most this many bytes.
const CHUNK: usize = 32 << 10;
/// Events buffered between the connection and the caller.
const BUFFER: usize = 16;

/// Why an attached command's session could not be set up.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    /// The runtime serves its streams over TLS.
    #[error(
        "the runtime serves exec streams over TLS ({url}); cimage relays plain-HTTP streams \
         on loopback only: set containerd's enable_tls_streaming = false"
    )]
    Tls {
        /// The URL the runtime gave.
        url: String,
    },
    /// Not an `http://` URL.
    #[error("the runtime's exec URL {url:?} is not an http:// URL")]
    NotHttp {
        /// The URL the runtime gave.
        url: String,
    },
    /// No IP address and port in it.
    #[error(
        "the runtime's exec URL {url:?} does not name a loopback IP address and port \
         (host names are not followed)"
    )]
    NoAddress {
        /// The URL the runtime gave.
        url: String,
    },
    /// An address off the node.
    #[error(
        "the runtime serves exec streams on {addr}, not on loopback: set containerd's \
         stream_server_address = \"127.0.0.1\""
    )]
    NotLoopback {
        /// The address in the URL.
        addr: SocketAddr,
    },
    /// The connection failed.
    #[error("{doing} the runtime's stream server {addr}: {source}")]
    Io {
        /// `connecting to`, `writing to`, `reading from`, ...
        doing: &'static str,
        /// The stream server.
        addr: SocketAddr,
        /// The system's error.
        source: std::io::Error,
    },
    /// The answer's head does not end.
    #[error("the runtime's stream server {addr} sent an answer head over {MAX_HEAD} bytes")]
    HeadTooLarge {
        /// The stream server.
        addr: SocketAddr,
    },
    /// The connection ended before the answer.
    #[error("the runtime's stream server {addr} closed the connection before answering")]
    ClosedEarly {
        /// The stream server.
        addr: SocketAddr,
    },
    /// No answer in time.
    #[error(
        "the runtime's stream server {addr} did not answer within {}s",
        HANDSHAKE_TIMEOUT.as_secs()
    )]
    Timeout {
        /// The stream server.
        addr: SocketAddr,
    },
    /// The upgrade was refused (e.g. an expired URL).
    #[error(
        "the runtime's stream server refused the exec session: {status}{}{said}",
        if said.is_empty() { "" } else { ": " }
    )]
    Refused {
        /// The answer's status line.
        status: String,
        /// The first line of its body.
        said: String,
    },
    /// Upgraded, without the protocol version asked for.
    #[error("the runtime's stream server did not agree on the {PROTOCOL} protocol")]
    NoAgreement,
    /// A header block could not be compressed.
    #[error("compressing SPDY headers: {0}")]
    Compress(#[from] flate2::CompressError),
}

/// Where a streaming URL points: refused unless plain HTTP on a loopback address, so a session
/// never leaves the node and carries nothing over a network.
fn parse_url(url: &str) -> Result<(SocketAddr, String, String), SessionError> {
    if url.starts_with("https://") {
        return Err(SessionError::Tls {
            url: url.to_owned(),
        });
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| SessionError::NotHttp {
            url: url.to_owned(),
        })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = match authority.strip_prefix("localhost:") {
        Some(port) => format!("127.0.0.1:{port}").parse(),
        None => authority.parse(),
    }
    .map_err(|_| SessionError::NoAddress {
        url: url.to_owned(),
    })?;
    if !addr.ip().is_loopback() {
        return Err(SessionError::NotLoopback { addr });
    }
    Ok((addr, authority.to_owned(), path.to_owned()))
}

/// Connects to the runtime's streaming `url` (from CRI `Exec` with the same `attach`) and
/// starts the command; the session relays input and output until the command ends or the
/// caller drops it.
pub(super) async fn attach(url: &str, attach: ExecAttach) -> Result<ExecSession, SessionError> {
    let (addr, host, path) = parse_url(url)?;
    let handshake = async {
        let mut sock = TcpStream::connect(addr)
            .await
            .map_err(|source| SessionError::Io {
                doing: "connecting to",
                addr,
                source,
            })?;
        sock.set_nodelay(true).ok();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
             X-Stream-Protocol-Version: {PROTOCOL}\r\nContent-Length: 0\r\n\r\n"
        );
        sock.write_all(request.as_bytes())
            .await
            .map_err(|source| SessionError::Io {
                doing: "writing to",
                addr,
                source,
            })?;
        let (head, rest) = read_head(&mut sock, addr).await?;
        check_upgrade(&head, &rest)?;
        Ok::<_, SessionError>((sock, rest))
    };
    let (sock, rest) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| SessionError::Timeout { addr })??;
    let channels = Channels::for_attach(attach);
    let mut headers = HeaderCompressor::new();
    let mut opening = Vec::new();
    for (id, name) in channels.named() {
        opening.extend(syn_stream(id, &headers.block(&[("streamtype", name)])?));
    }
    let (rd, mut wr) = sock.into_split();
    wr.write_all(&opening)
        .await
        .map_err(|source| SessionError::Io {
            doing: "opening the exec streams at",
            addr,
            source,
        })?;
    let (input, from_caller) = mpsc::channel(BUFFER);
    let (to_caller, output) = mpsc::channel(BUFFER);
    let (control, control_rx) = mpsc::channel(4);
    let reader = BufReader::new(Cursor::new(rest).chain(rd));
    // Either side ending ends the other, so the connection closes as a whole: a writer stuck
    // on a runtime that stopped reading, or a reader waiting on a quiet command, lets go.
    let done = CancellationToken::new();
    tokio::spawn(read_frames(
        reader,
        channels,
        to_caller,
        control,
        done.clone(),
    ));
    tokio::spawn(write_frames(wr, channels, from_caller, control_rx, done));
    Ok(ExecSession { input, output })
}

/// Reads the HTTP answer's head; returns it and the bytes read past it (the first frames).
async fn read_head(
    sock: &mut TcpStream,
    addr: SocketAddr,
) -> Result<(String, Vec<u8>), SessionError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(SessionError::HeadTooLarge { addr });
        }
        let n = sock
            .read(&mut chunk)
            .await
            .map_err(|source| SessionError::Io {
                doing: "reading from",
                addr,
                source,
            })?;
        if n == 0 {
            return Err(SessionError::ClosedEarly { addr });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Checks that the answer switched to SPDY with the v4 protocol; otherwise the error carries
/// the runtime's status line and the first line of its body (e.g. an expired URL).
fn check_upgrade(head: &str, body: &[u8]) -> Result<(), SessionError> {
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().trim();
    if status.split_whitespace().nth(1) != Some("101") {
        let said = String::from_utf8_lossy(body);
        return Err(SessionError::Refused {
            status: status.to_owned(),
            said: said.lines().next().unwrap_or_default().trim().to_owned(),
        });
    }
    let agreed = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("x-stream-protocol-version") && v.trim() == PROTOCOL
        })
    });
    if !agreed {
        return Err(SessionError::NoAgreement);
    }
    Ok(())
}

/// Passes the runtime's frames to the caller until the exit status arrives, the connection
/// ends, the caller goes away or the writer gives up (`done`); answers the runtime's pings
/// through `control`.
async fn read_frames<R: AsyncRead + Unpin>(
    mut rd: R,
    ch: Channels,
    out: mpsc::Sender<ExecEvent>,
    control: mpsc::Sender<Vec<u8>>,
    done: CancellationToken,
) {
    let _end_both = done.clone().drop_guard();
    let mut status = Vec::new();
    let end = loop {
        let frame = tokio::select! {
            _ = out.closed() => return,
            _ = done.cancelled() => return,
            f = read_frame(&mut rd) => f,
        };
        let event = match frame {
            Err(e) => break ExecEvent::Failed(format!("reading the runtime's exec stream: {e}")),
            Ok(None) => {
                break ExecEvent::Failed(
                    "the runtime closed the exec stream without the command's exit status".into(),
                )
            }
            Ok(Some(Frame::Control { kind, body })) => {
                if kind == PING && body.len() == 4 {
                    let mut f = control_head(PING, 0, 4).to_vec();
                    f.extend(body);
                    // Never wait on the writer: an answer that does not fit is dropped.
                    let _ = control.try_send(f);
                }
                continue;
            }
            Ok(Some(Frame::Data { id, body })) if id == ch.error => {
                if status.len() + body.len() > MAX_STATUS {
                    break ExecEvent::Failed(format!(
                        "the runtime's exit status passed {MAX_STATUS} bytes"
                    ));
                }
                status.extend(body);
                match exit_status(&status) {
                    Some(end) => break end,
                    None => continue,
                }
            }
            Ok(Some(Frame::Data { body, .. })) if body.is_empty() => continue,
            Ok(Some(Frame::Data { id, body })) if id == ch.stdout => ExecEvent::Stdout(body),
            Ok(Some(Frame::Data { id, body })) if Some(id) == ch.stderr => ExecEvent::Stderr(body),
            Ok(Some(Frame::Data { .. })) => continue,
        };
        let sent = tokio::select! {
            r = out.send(event) => r.is_ok(),
            _ = done.cancelled() => false,
        };
        if !sent {
            return;
        }
    };
    let _ = out.send(end).await;
}

/// Sends the caller's input, terminal sizes and ping answers until the caller or the reader
/// is done, then closes the connection's sending side.
async fn write_frames(
    mut wr: OwnedWriteHalf,
    ch: Channels,
    mut input: mpsc::Receiver<ExecInput>,
    mut control: mpsc::Receiver<Vec<u8>>,
    done: CancellationToken,
) {
    let _end_both = done.clone().drop_guard();
    let mut stdin_open = ch.stdin.is_some();
    loop {
        let frames = tokio::select! {
            _ = done.cancelled() => break,
            i = input.recv() => match (i, ch.stdin) {
                (None, _) => break,
                (Some(ExecInput::Stdin(b)), Some(id)) if stdin_open => {
                    b.chunks(CHUNK).flat_map(|c| data_frame(id, 0, c)).collect()
                }
                (Some(ExecInput::CloseStdin), Some(id)) if stdin_open => {
                    stdin_open = false;
                    data_frame(id, FLAG_FIN, &[])
                }
                (Some(ExecInput::Resize { width, height }), _) => match ch.resize {
                    Some(id) => data_frame(
                        id,
                        0,
                        format!("{{\"Width\":{width},\"Height\":{height}}}").as_bytes(),
                    ),
                    None => continue,
                },
                (Some(_), _) => continue,
            },
            c = control.recv() => match c {
                Some(f) => f,
                None => break,
            },
        };
        let written = tokio::select! {
            r = wr.write_all(&frames) => r.is_ok(),
            _ = done.cancelled() => false,
        };
        if !written {
            break;
        }
    }
    // Dropping the write half (and the reader its read half) closes the connection.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_on_loopback_is_accepted() {
        let (addr, host, path) = parse_url("http://127.0.0.1:42113/exec/AbCd").unwrap();
        assert_eq!(addr.to_string(), "127.0.0.1:42113");
        assert_eq!(
            (host.as_str(), path.as_str()),
            ("127.0.0.1:42113", "/exec/AbCd")
        );
        assert!(parse_url("http://[::1]:8080/exec/x").is_ok());
        assert!(parse_url("http://localhost:8080/exec/x").is_ok());
        let e = parse_url("http://10.1.2.3:8080/exec/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("stream_server_address"), "{e}");
        let e = parse_url("https://127.0.0.1:8080/exec/x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("enable_tls_streaming"), "{e}");
        assert!(parse_url("ftp://x").is_err());
        assert!(parse_url("http://nohost/exec").is_err());
    }

    #[test]
    fn refusals_carry_the_runtimes_words() {
        let e = check_upgrade(
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain",
            b"token not found\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("404 Not Found: token not found"), "{e}");
        assert!(check_upgrade(
            "HTTP/1.1 101 Switching Protocols\r\nX-Stream-Protocol-Version: v4.channel.k8s.io",
            b""
        )
        .is_ok());
        assert!(
            check_upgrade("HTTP/1.1 101 Switching Protocols\r\nUpgrade: SPDY/3.1", b"").is_err()
        );
    }

    #[tokio::test]
    async fn frames_are_relayed_and_the_status_ends_the_session() {
        let ch = Channels::for_attach(ExecAttach {
            tty: false,
            stdin: false,
        });
        let mut wire = data_frame(ch.stdout, 0, b"hello ");
        wire.extend(control_head(PING, 0, 4));
        wire.extend(7u32.to_be_bytes());
        wire.extend(data_frame(ch.stderr.unwrap(), 0, b"oops"));
        wire.extend(data_frame(ch.stdout, 0, b""));
        let status = br#"{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"2"}]}}"#;
        wire.extend(data_frame(ch.error, 0, &status[..20]));
        wire.extend(data_frame(ch.error, 0, &status[20..]));
        let (tx, mut rx) = mpsc::channel(16);
        let (ctl, mut ctl_rx) = mpsc::channel(4);
        read_frames(Cursor::new(wire), ch, tx, ctl, CancellationToken::new()).await;
        assert_eq!(rx.recv().await, Some(ExecEvent::Stdout(b"hello ".to_vec())));
        assert_eq!(rx.recv().await, Some(ExecEvent::Stderr(b"oops".to_vec())));
        assert_eq!(rx.recv().await, Some(ExecEvent::Exited(2)));
        let pong = ctl_rx.recv().await.unwrap();
        assert_eq!(&pong[8..], &7u32.to_be_bytes());
        let (tx, mut rx) = mpsc::channel(16);
        let (ctl, _ctl_rx) = mpsc::channel(4);
        read_frames(
            Cursor::new(Vec::new()),
            ch,
            tx,
            ctl,
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(rx.recv().await, Some(ExecEvent::Failed(m)) if m.contains("without")));
    }
}
