//! The API socket's accept loop and its HTTP/2 connections, served with hyper directly so that
//! each connection gets the settings of its peer: the uid is known when the connection is
//! accepted ([`Gate`]), so an ordinary user's connection carries fewer streams at once than an
//! admin's, every request body is charged to its uid ([`Metered`]), and what a connection is
//! refused for is counted and told without flooding the log ([`AbuseLog`]).
//!
//! At shutdown the loop stops accepting, every connection is told to finish (HTTP/2 GOAWAY:
//! calls under way run to their end), and the loop returns once all have closed.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tonic::service::Routes;
use tower::ServiceExt;
use tracing::debug;

use super::abuse::{AbuseLog, Refusal, REPORT_EVERY};
use super::answers::{Answers, Held, OUTPUT_CALLS, USER_ANSWERS};
use super::budget::{header_bytes, Metered, Metering, RequestBudget};
use super::gate::{Gate, Gated};

/// What each connection is served with, besides the gate's limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionSettings {
    /// Streams (calls) at once on one connection of an ordinary user.
    pub user_streams: u32,
    /// The same on a connection of root or the admin group.
    pub admin_streams: u32,
    /// The largest request message the services decode.
    pub max_message: usize,
    /// Paths of calls whose request is a stream of messages (their read timeout is per
    /// message).
    pub streamed_requests: &'static [&'static str],
}

/// Serves `routes` on `listener` until `shutdown` resolves, admitting connections through
/// `gate`; refusals are counted and logged by `abuse`.
pub async fn serve(
    listener: UnixListener,
    gate: Gate,
    routes: Routes,
    settings: ConnectionSettings,
    abuse: AbuseLog,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let budget = RequestBudget::default();
    let answers = Answers::default();
    let connections = TaskTracker::new();
    let (stop, stopped) = watch::channel(false);
    let mut flush =
        tokio::time::interval_at(tokio::time::Instant::now() + REPORT_EVERY, REPORT_EVERY);
    tokio::pin!(shutdown);
    let result = loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = flush.tick() => {
                abuse.flush();
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if is_transient(&e) => {
                // Out of descriptors or memory for a moment: let connections close first.
                debug!("accepting on the API socket: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => break Err(e),
        };
        let gated = match gate.try_admit(stream) {
            Ok(g) => g,
            Err(refused) => {
                // Closed at once (dropped), counted, and logged once a minute per uid at most.
                abuse.note(refused.uid, refused.reason);
                continue;
            }
        };
        let conn = Connection {
            routes: routes.clone(),
            budget: budget.clone(),
            answers: answers.clone(),
            abuse: abuse.clone(),
            settings,
            limits: *gate.limits(),
        };
        connections.spawn(conn.serve(gated, stopped.clone()));
    };
    drop(listener);
    let _ = stop.send(true);
    connections.close();
    connections.wait().await;
    result
}

/// Accept errors that pass: the next accept may succeed.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EINTR
                | libc::EAGAIN
        )
    )
}

/// What one connection is served with.
struct Connection {
    routes: Routes,
    budget: RequestBudget,
    /// The open answers that carry a step's output, per uid.
    answers: Answers,
    abuse: AbuseLog,
    settings: ConnectionSettings,
    limits: super::gate::Limits,
}

impl Connection {
    async fn serve(self, gated: Gated, mut stopped: watch::Receiver<bool>) {
        let caller = gated.caller().clone();
        let admin = gated.is_admin();
        let uid = caller.uid;
        let (streams, budget_cap) = match admin {
            true => (
                self.settings.admin_streams,
                self.limits.request_bytes_per_admin,
            ),
            false => (
                self.settings.user_streams,
                self.limits.request_bytes_per_user,
            ),
        };
        let Connection {
            routes,
            budget,
            answers,
            abuse,
            settings,
            limits,
        } = self;
        let abuse_of_requests = abuse.clone();
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            let routes = routes.clone();
            let abuse = abuse_of_requests.clone();
            let mut charge = budget.charge(uid, budget_cap);
            let caller = caller.clone();
            let answers = answers.clone();
            async move {
                if let Err(over) = charge.set(header_bytes(&req)) {
                    abuse.note(Some(uid), Refusal::OverBudget);
                    let status = tonic::Status::resource_exhausted(over.to_string());
                    return Ok::<_, Infallible>(status.into_http());
                }
                // Root and admins are the node's own work: their answers are not counted.
                let slot = match !admin && OUTPUT_CALLS.contains(&req.uri().path()) {
                    false => None,
                    true => match answers.take(uid, USER_ANSWERS) {
                        Ok(slot) => Some(slot),
                        Err(too_many) => {
                            abuse.note(Some(uid), Refusal::TooManyAnswers);
                            let status = tonic::Status::resource_exhausted(too_many.to_string());
                            return Ok(status.into_http());
                        }
                    },
                };
                let how = Metering {
                    read_timeout: limits.request_read_timeout,
                    max_message: settings.max_message as u64,
                    streaming: settings.streamed_requests.contains(&req.uri().path()),
                };
                req.extensions_mut().insert(caller);
                let deadline = client_deadline(req.headers());
                let req =
                    req.map(|body| tonic::body::Body::new(Metered::new(body, charge, how, abuse)));
                let answer = match deadline {
                    None => routes.oneshot(req).await,
                    Some(d) => match tokio::time::timeout(d, routes.oneshot(req)).await {
                        Ok(answer) => answer,
                        Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                            "no answer within the client's deadline of {}",
                            crate::units::format_duration(d)
                        ))
                        .into_http()),
                    },
                };
                // The slot is held until the answer has been sent whole (or dropped).
                match slot {
                    None => answer,
                    Some(slot) => {
                        answer.map(|a| a.map(|body| tonic::body::Body::new(Held::new(body, slot))))
                    }
                }
            }
        });
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            // Dead peers are found by keepalive pings; a live one answers them.
            .keep_alive_interval(Some(Duration::from_secs(60)))
            .keep_alive_timeout(Duration::from_secs(20))
            .max_concurrent_streams(Some(streams));
        let conn = builder.serve_connection(TokioIo::new(gated), service);
        tokio::pin!(conn);
        let ended = tokio::select! {
            ended = conn.as_mut() => ended,
            _ = async { drop(stopped.wait_for(|s| *s).await) } => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = ended {
            match refusal_of(&e) {
                Some(why) => abuse.note(Some(uid), why),
                None => debug!(uid, "API connection ended: {e}"),
            }
        }
    }
}

/// The deadline a gRPC client gave its call (`grpc-timeout`: up to 8 digits and a unit, `H`,
/// `M`, `S`, `m`, `u` or `n`), which the server keeps as gRPC servers do: no answer by then
/// ends the call with `DEADLINE_EXCEEDED`. A malformed value is ignored.
fn client_deadline(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Whether a connection's end was the server refusing the peer's conduct: a GOAWAY this side
/// sent for a flood or another protocol error. A peer that went away, an idle or keepalive
/// timeout, or a GOAWAY from the peer is no refusal.
fn refusal_of(e: &hyper::Error) -> Option<Refusal> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            if !(h2e.is_go_away() && h2e.is_library()) {
                return None;
            }
            return match h2e.reason() {
                Some(h2::Reason::NO_ERROR) | None => None,
                Some(h2::Reason::ENHANCE_YOUR_CALM) => Some(Refusal::Flood),
                Some(_) => Some(Refusal::ProtocolError),
            };
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_grpc_timeout_is_read_as_grpc_defines_it() {
        let deadline = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            client_deadline(&h)
        };
        assert_eq!(deadline("300m"), Some(Duration::from_millis(300)));
        assert_eq!(deadline("5S"), Some(Duration::from_secs(5)));
        assert_eq!(deadline("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            deadline("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "123456789S", "5s", "-5S", "5 S"] {
            assert_eq!(deadline(bad), None, "{bad:?}");
        }
        assert_eq!(client_deadline(&http::HeaderMap::new()), None);
    }
}
