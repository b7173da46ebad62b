//! `cimage exec`: run a command in a running step.

use std::io::Write;
use std::path::Path;

use cimage::api::pb;

use crate::Failure;

/// Exit status of `cimage exec` when the command could not be run at all.
pub const EXEC_FAILED: u8 = 125;

/// Arguments of `cimage exec`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "The command runs inside the step as the step's own process does: its \
host user and groups, its capabilities (none for a step as a user), no_new_privs and seccomp \
profile; CRI's exec has no user of its own. Only the step's owner and root may run one.\n\
Without -i or -t the output is passed back when the command ends (each stream cut at 4 MiB).\n\
With -i and/or -t the command is attached to this terminal through cimaged and the runtime's \
streaming server (on loopback): -i passes standard input (its end reaches the command as \
end-of-file), -t gives the command a terminal (raw mode here, its size followed; the \
command's stderr comes on the terminal too). The session ends when the command or the step \
ends. When this client leaves first, the command's input ends; CRI cannot stop an exec'd \
command, so one that does not read its input goes on until it ends or the step does.\n\
Exit status: the command's exit code; 125 when it could not be run (no such running task, not \
yours, the runtime failed) or the session broke before it ended; 128+N when this client was \
ended by signal N.\n\
Examples:\n  cimage exec 3f2a9c1b7e44 -- ps aux\n  cimage exec -it 3f2a9c1b7e44 -- sh\n  \
tar c data | cimage exec -i 3f2a9c1b7e44 -- tar x -C /tmp"
)]
pub struct Args {
    /// Pass standard input to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the command a terminal (with -i: standard input must be a terminal).
    #[arg(short = 't', long)]
    tty: bool,
    /// Task id (from `cimage ps` or `cimage run -d`).
    task: String,
    /// Time limit for the command without -i/-t (e.g. 30s, 10m; at most 1h; default 60s).
    #[arg(long, value_parser = |s: &str| cimage::units::parse_duration(s))]
    timeout: Option<std::time::Duration>,
    /// The command and its arguments (after --).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Runs `cimage exec`; returns the exit status to leave with.
pub async fn run(socket: &Path, args: Args) -> Result<u8, Failure> {
    crate::connect(socket).await?;
    if args.interactive || args.tty {
        if args.timeout.is_some() {
            return Err(Failure::usage(
                "--timeout applies to exec without -i/-t; an attached command runs until it \
                 ends, the step ends, or you leave"
                    .into(),
            ));
        }
        return attached(socket, args).await;
    }
    let timeout = args.timeout.unwrap_or(std::time::Duration::from_secs(60));
    let secs = timeout.as_secs();
    if !(1..=3600).contains(&secs) {
        return Err(Failure::usage(format!(
            "--timeout {} is out of range: give 1s to 1h",
            cimage::units::format_duration(timeout)
        )));
    }
    let mut c = cimage::api::launcher_client(socket);
    let r = c
        .exec(pb::ExecRequest {
            task_id: args.task,
            command: args.command,
            timeout_seconds: secs as u32,
        })
        .await?
        .into_inner();
    let written = put(&mut std::io::stdout(), &r.stdout)
        .and_then(|()| put(&mut std::io::stderr(), &r.stderr));
    written.map_err(|e| Failure::new(format!("writing output: {e}")))?;
    if r.truncated {
        eprintln!("cimage: the command's output passed 4 MiB and was cut");
    }
    Ok(r.exit_code.clamp(0, 255) as u8)
}

/// `cimage exec -i/-t`: the command attached to this terminal over cimaged's `ExecStream`.
async fn attached(socket: &Path, args: Args) -> Result<u8, Failure> {
    use pb::exec_stream_request::Msg as In;
    use pb::exec_stream_response::Msg as Out;
    // SAFETY: isatty only inspects the descriptor.
    let stdin_is_tty = unsafe { libc::isatty(0) } == 1;
    if args.tty && args.interactive && !stdin_is_tty {
        return Err(Failure::usage(
            "-it needs a terminal on standard input; use -i alone to pipe input".into(),
        ));
    }
    // This client writes to cimaged for as long as the session lasts: cimaged going away must
    // end it with an error, not kill it with SIGPIPE (which main restores for `| head`).
    // SAFETY: changing one signal's disposition; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let size = args.tty.then(terminal_size).flatten();
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ExecStreamRequest>(16);
    let start = pb::ExecStreamRequest {
        msg: Some(In::Start(pb::ExecStart {
            task_id: args.task,
            command: args.command,
            tty: args.tty,
            stdin: args.interactive,
            size,
        })),
    };
    tx.send(start)
        .await
        .map_err(|_| Failure::new("the exec session closed before it started".into()))?;
    let mut c = cimage::api::launcher_client(socket);
    let mut replies = c
        .exec_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The first answer says the command started; only then is this terminal made raw, so an
    // error before it prints as usual.
    match replies.message().await? {
        Some(pb::ExecStreamResponse {
            msg: Some(Out::Started(_)),
        }) => {}
        _ => return Err(Failure::new("cimaged did not start the command".into())),
    }
    let _raw = if args.tty && args.interactive {
        Some(RawMode::enter(0).map_err(|e| Failure::new(format!("making the terminal raw: {e}")))?)
    } else {
        None
    };
    if args.interactive {
        let tx = tx.clone();
        // A thread of its own: a read of standard input cannot be cancelled.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 << 10];
            loop {
                // SAFETY: reading into a buffer we own, of its length.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                let msg = match n {
                    n if n > 0 => In::Stdin(buf[..n as usize].to_vec()),
                    0 => In::CloseStdin(true),
                    _ => match std::io::Error::last_os_error() {
                        e if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        // A non-blocking standard input with nothing yet: wait for some.
                        e if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(std::time::Duration::from_millis(10));
                            continue;
                        }
                        e => {
                            eprintln!("cimage: reading standard input: {e}; ending the input");
                            In::CloseStdin(true)
                        }
                    },
                };
                let end = matches!(msg, In::CloseStdin(_));
                if tx
                    .blocking_send(pb::ExecStreamRequest { msg: Some(msg) })
                    .is_err()
                    || end
                {
                    return;
                }
            }
        });
    }
    if args.tty {
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(mut sig) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
            else {
                return;
            };
            while sig.recv().await.is_some() {
                if let Some(size) = terminal_size() {
                    let msg = pb::ExecStreamRequest {
                        msg: Some(In::Resize(size)),
                    };
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    // Output is written by a thread of its own, so that a reader that pauses (a pager) never
    // stops this runtime from answering the connection's keepalive pings.
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<(bool, Vec<u8>)>(16);
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
        while let Some((to_stderr, data)) = out_rx.blocking_recv() {
            put(if to_stderr { &mut err } else { &mut out }, &data)?;
        }
        Ok(())
    });
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Failure::new(format!("watching for SIGTERM: {e}")))?;
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| Failure::new(format!("watching for SIGHUP: {e}")))?;
    let end = loop {
        let reply = tokio::select! {
            r = replies.message() => r,
            // Ended from outside: the terminal is restored (the guard) and the session dropped.
            _ = term.recv() => return Ok(128 + libc::SIGTERM as u8),
            _ = hup.recv() => return Ok(128 + libc::SIGHUP as u8),
        };
        let (to_stderr, data) = match reply?.and_then(|r| r.msg) {
            Some(Out::Stdout(b)) => (false, b),
            Some(Out::Stderr(b)) => (true, b),
            Some(Out::ExitCode(code)) => break Ok(code.clamp(0, 255) as u8),
            Some(Out::Started(_)) => continue,
            None => {
                break Err(Failure::new(
                    "the session ended without the command's exit code".into(),
                ))
            }
        };
        if out_tx.send((to_stderr, data)).await.is_err() {
            break Err(Failure::new("writing output failed".into()));
        }
    };
    drop(out_tx);
    match writer.join() {
        Ok(Err(e)) => Err(Failure::new(format!("writing output: {e}"))),
        _ => end,
    }
}

/// Writes a piece of the command's output through at once.
fn put(w: &mut dyn Write, data: &[u8]) -> std::io::Result<()> {
    w.write_all(data).and_then(|()| w.flush())
}

/// The size of the terminal on standard output (or input), if there is one.
fn terminal_size() -> Option<pb::TerminalSize> {
    [1, 0].into_iter().find_map(|fd| {
        // SAFETY: TIOCGWINSZ fills the winsize we pass.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
        (ok && ws.ws_col > 0 && ws.ws_row > 0).then(|| pb::TerminalSize {
            width: ws.ws_col.into(),
            height: ws.ws_row.into(),
        })
    })
}

/// This terminal in raw mode (keys pass through unprocessed, Ctrl-C included, to the
/// command's own terminal) until dropped, which restores it.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: i32) -> std::io::Result<Self> {
        // SAFETY: tcgetattr fills the termios we pass; cfmakeraw and tcsetattr take it back.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut t) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Self { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restoring the attributes read in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
