//! The bytes of API requests that have begun to arrive and have not arrived whole, bounded per
//! uid, and the time such a request may take.
//!
//! Each request is at most [`super::MAX_REQUEST_BYTES`], but a client that announces a message
//! and sends it one byte short, on many streams of many connections, would make the decoder hold
//! all of them at once. So every request body is [`Metered`]: its header fields and its gRPC
//! messages are charged to the caller's uid, each message at its announced length as soon as its
//! 5-byte prefix arrives (the decoder reserves that much at once), and the charge goes back when
//! the request has been read and dropped. A request that would take the uid past its budget ends
//! at once with `RESOURCE_EXHAUSTED`; one that has not arrived whole within the read timeout
//! ends with `DEADLINE_EXCEEDED`. For a call whose request is a stream (`ExecStream`), the limit
//! applies to each message from its first byte, not to the quiet time between messages, and the
//! largest message so far stays charged (the decoder keeps its buffer).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;
use tonic::Status;

use super::abuse::{AbuseLog, Refusal};
use crate::units::format_duration;

/// A boxed error, as the gRPC decoder takes a body's.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bytes charged per uid for requests not yet read whole.
#[derive(Clone, Default)]
pub struct RequestBudget {
    held: Arc<Mutex<HashMap<u32, u64>>>,
}

impl RequestBudget {
    /// An empty charge for one request of `uid`, whose requests together may hold `cap` bytes.
    pub fn charge(&self, uid: u32, cap: u64) -> Charge {
        Charge {
            held: Arc::clone(&self.held),
            uid,
            cap,
            bytes: 0,
        }
    }

    /// Bytes `uid`'s unfinished requests hold now.
    pub fn held_by(&self, uid: u32) -> u64 {
        self.held.lock().unwrap().get(&uid).copied().unwrap_or(0)
    }
}

/// Why a request was refused: its uid's unfinished requests would hold more than the cap.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "uid {uid}'s requests that have not arrived whole already hold {held} bytes, and this one \
     needs {more} more: at most {cap} bytes may wait at once (ImageCache.MaxRequestBytesPerUser, \
     MaxRequestBytesPerAdmin); send each request whole, or fewer at once"
)]
pub struct OverBudget {
    /// The caller's uid.
    pub uid: u32,
    /// What its other requests held.
    pub held: u64,
    /// What this request needed on top of its current charge.
    pub more: u64,
    /// The uid's budget.
    pub cap: u64,
}

/// One request's share of its uid's budget, given back when dropped.
pub struct Charge {
    held: Arc<Mutex<HashMap<u32, u64>>>,
    uid: u32,
    cap: u64,
    bytes: u64,
}

impl Charge {
    /// Makes this request's charge `bytes`. Growing past the uid's cap fails and changes
    /// nothing; shrinking always succeeds.
    pub fn set(&mut self, bytes: u64) -> Result<(), OverBudget> {
        if bytes == self.bytes {
            return Ok(());
        }
        let mut held = self.held.lock().unwrap();
        let total = held.entry(self.uid).or_insert(0);
        let others = *total - self.bytes;
        if bytes > self.bytes && others + bytes > self.cap {
            let more = bytes - self.bytes;
            if *total == 0 {
                held.remove(&self.uid);
            }
            return Err(OverBudget {
                uid: self.uid,
                held: others + self.bytes,
                more,
                cap: self.cap,
            });
        }
        *total = others + bytes;
        if *total == 0 {
            held.remove(&self.uid);
        }
        self.bytes = bytes;
        Ok(())
    }

    /// The bytes charged now.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let _ = self.set(0);
    }
}

/// Where the reading of a body is in its gRPC framing (1 flag byte, 4 length bytes, message).
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// Reading a message's prefix; `have` of its 5 bytes are in.
    Prefix { got: [u8; 5], have: usize },
    /// Reading a message announced as `announced` bytes, `left` of them still to come.
    Message { announced: u64, left: u64 },
}

/// How a request body is metered.
#[derive(Debug, Clone, Copy)]
pub struct Metering {
    /// The longest a request (or, for a streamed request, one message) may take to arrive.
    pub read_timeout: Duration,
    /// The largest message the decoder takes; a longer one is refused by the decoder as soon
    /// as its prefix is read, so only its bytes actually received are charged.
    pub max_message: u64,
    /// The request is a stream of messages (a client-streaming call).
    pub streaming: bool,
}

/// A request body charged to its uid's budget as it arrives, and given a time to arrive in.
pub struct Metered<B> {
    inner: B,
    charge: Charge,
    header_bytes: u64,
    framing: Framing,
    /// The largest message read whole so far (prefix included): the decoder keeps room for it.
    largest_done: u64,
    how: Metering,
    /// When the request (or the message under way) must have arrived by; none while a
    /// streamed request rests between messages, or once it has ended.
    deadline: Option<Pin<Box<Sleep>>>,
    abuse: AbuseLog,
    /// An error was given: the body is over.
    done: bool,
}

impl<B> Metered<B> {
    /// Meters `inner`, whose header fields `charge` already holds (`header_bytes`).
    pub fn new(inner: B, charge: Charge, how: Metering, abuse: AbuseLog) -> Self {
        let header_bytes = charge.bytes();
        Self {
            inner,
            charge,
            header_bytes,
            framing: Framing::Prefix {
                got: [0; 5],
                have: 0,
            },
            largest_done: 0,
            how,
            deadline: Some(Box::pin(tokio::time::sleep(how.read_timeout))),
            abuse,
            done: false,
        }
    }

    /// What this request holds now: its header fields, the largest message read whole, and the
    /// message under way (at its announced length once the prefix is in).
    fn holding(&self) -> u64 {
        let current = match self.framing {
            Framing::Prefix { have, .. } => have as u64,
            Framing::Message { announced, left } if announced > self.how.max_message => {
                5 + announced - left
            }
            Framing::Message { announced, .. } => 5 + announced,
        };
        self.header_bytes + self.largest_done + current
    }

    /// Follows the framing through `data`, charging as it goes.
    fn account(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            match &mut self.framing {
                Framing::Prefix { got, have } => {
                    if *have == 0 && self.how.streaming && self.deadline.is_none() {
                        // A new message of a streamed request: it has its own time.
                        self.deadline = Some(Box::pin(tokio::time::sleep(self.how.read_timeout)));
                    }
                    let n = (5 - *have).min(data.len());
                    got[*have..*have + n].copy_from_slice(&data[..n]);
                    *have += n;
                    data = &data[n..];
                    if *have == 5 {
                        let announced = u32::from_be_bytes([got[1], got[2], got[3], got[4]]) as u64;
                        self.framing = Framing::Message {
                            announced,
                            left: announced,
                        };
                    }
                }
                Framing::Message { left, .. } => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    data = &data[n as usize..];
                }
            }
            if let Framing::Message { announced, left: 0 } = self.framing {
                self.largest_done = self.largest_done.max(5 + announced);
                self.framing = Framing::Prefix {
                    got: [0; 5],
                    have: 0,
                };
                if self.how.streaming {
                    self.deadline = None;
                }
            }
            let want = self.holding();
            if let Err(over) = self.charge.set(want) {
                self.abuse.note(Some(over.uid), Refusal::OverBudget);
                return Err(Status::resource_exhausted(over.to_string()));
            }
        }
        Ok(())
    }

    fn timed_out(&self) -> Status {
        self.abuse.note(Some(self.charge.uid), Refusal::ReadTimeout);
        Status::deadline_exceeded(format!(
            "the request did not arrive whole within {} (ImageCache.RequestReadTimeout); send \
             each request whole",
            format_duration(self.how.read_timeout)
        ))
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(status) = this.account(data) {
                        this.done = true;
                        this.deadline = None;
                        return Poll::Ready(Some(Err(status.into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                // Arrived whole; the charge stays until the decoder lets the body go.
                this.deadline = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    this.done = true;
                    this.deadline = None;
                    return Poll::Ready(Some(Err(this.timed_out().into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a request's header fields count for, as HTTP/2 counts a header list (RFC 9113 §6.5.2:
/// name, value and 32 bytes each), pseudo-headers included.
pub fn header_bytes<B>(req: &http::Request<B>) -> u64 {
    let fields: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum();
    let uri = req.uri();
    let pseudo = uri.path().len()
        + uri.authority().map_or(0, |a| a.as_str().len())
        + req.method().as_str().len()
        + 4 * 32
        + 8;
    (fields + pseudo) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Arc;

    use crate::metrics::Metrics;

    /// A body that yields `chunks`, then ends if `ends`, else waits for ever (a client holding
    /// its request).
    struct Held {
        chunks: VecDeque<Bytes>,
        ends: bool,
    }

    impl Body for Held {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.chunks.pop_front() {
                Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
                None if self.ends => Poll::Ready(None),
                None => Poll::Pending,
            }
        }
    }

    const MIB: u64 = 1 << 20;

    fn message(announced: u32, sent: usize) -> Bytes {
        let mut m = vec![0u8];
        m.extend(announced.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, sent));
        m.into()
    }

    fn metered(
        budget: &RequestBudget,
        uid: u32,
        cap: u64,
        chunks: Vec<Bytes>,
        ends: bool,
        streaming: bool,
    ) -> Metered<Held> {
        let mut charge = budget.charge(uid, cap);
        charge.set(100).unwrap();
        Metered::new(
            Held {
                chunks: chunks.into(),
                ends,
            },
            charge,
            Metering {
                read_timeout: Duration::from_secs(30),
                max_message: MIB,
                streaming,
            },
            AbuseLog::new("API", Arc::new(Metrics::default())),
        )
    }

    /// Polls `body` until it waits or ends; the error's status if it gave one.
    fn drain(body: &mut Metered<Held>) -> Option<Status> {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        loop {
            match Pin::new(&mut *body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(e))) => return Some(*e.downcast::<Status>().unwrap()),
                Poll::Ready(None) | Poll::Pending => return None,
            }
        }
    }

    #[tokio::test]
    async fn a_message_is_charged_at_its_announced_length_until_the_request_is_dropped() {
        let budget = RequestBudget::default();
        let mut a = metered(
            &budget,
            1000,
            3 * MIB,
            vec![message(1 << 20, 10)],
            false,
            false,
        );
        assert_eq!(drain(&mut a).map(|s| s.code()), None);
        assert_eq!(budget.held_by(1000), 100 + 5 + MIB);
        // Arriving whole changes nothing until the decoder drops the body.
        let mut b = metered(
            &budget,
            1000,
            3 * MIB,
            vec![message(1000, 600), Bytes::from(vec![7u8; 400])],
            true,
            false,
        );
        assert!(drain(&mut b).is_none());
        assert_eq!(budget.held_by(1000), 100 + 5 + MIB + 100 + 1005);
        drop((a, b));
        assert_eq!(budget.held_by(1000), 0);
    }

    #[tokio::test]
    async fn a_request_past_its_uids_budget_is_refused_and_other_uids_are_not() {
        let budget = RequestBudget::default();
        let cap = 5 * MIB / 2;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut m = metered(&budget, 1000, cap, vec![message(1 << 20, 1)], false, false);
            assert!(drain(&mut m).is_none());
            held.push(m);
        }
        let mut third = metered(&budget, 1000, cap, vec![message(1 << 20, 1)], false, false);
        let refused = drain(&mut third).expect("over the budget");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("MaxRequestBytesPerUser"),
            "{refused:?}"
        );
        // Refused: the body is over, and it holds no more than its header fields.
        assert!(drain(&mut third).is_none());
        assert_eq!(budget.held_by(1000), 2 * (100 + 5 + MIB) + 100);
        drop(third);
        // Another uid has a budget of its own.
        let mut other = metered(&budget, 1001, cap, vec![message(1 << 20, 1)], false, false);
        assert!(drain(&mut other).is_none());
        // Room comes back as requests go.
        held.pop();
        let mut again = metered(&budget, 1000, cap, vec![message(1 << 20, 1)], false, false);
        assert!(drain(&mut again).is_none());
    }

    #[tokio::test]
    async fn an_announced_length_past_the_message_limit_is_charged_as_received() {
        let budget = RequestBudget::default();
        let mut m = metered(&budget, 7, MIB, vec![message(u32::MAX, 10)], false, false);
        assert!(drain(&mut m).is_none());
        assert_eq!(budget.held_by(7), 100 + 15);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_not_whole_within_the_read_timeout_ends_with_deadline_exceeded() {
        let budget = RequestBudget::default();
        let mut m = metered(
            &budget,
            1000,
            8 * MIB,
            vec![message(4096, 10)],
            false,
            false,
        );
        assert!(drain(&mut m).is_none());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(drain(&mut m).is_none());
        tokio::time::advance(Duration::from_secs(1)).await;
        let s = drain(&mut m).expect("timed out");
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        assert!(s.message().contains("RequestReadTimeout"), "{s:?}");
        // A request whole in time is never cut, however long it is then held.
        let mut whole = metered(&budget, 1000, 8 * MIB, vec![message(10, 10)], true, false);
        assert!(drain(&mut whole).is_none());
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(drain(&mut whole).is_none());
        // A unary request whose message is whole but which never ends is cut too.
        let mut open = metered(&budget, 1000, 8 * MIB, vec![message(10, 10)], false, false);
        assert!(drain(&mut open).is_none());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(drain(&mut open).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_streamed_request_may_rest_between_messages_but_not_inside_one() {
        let budget = RequestBudget::default();
        let mut m = metered(
            &budget,
            1000,
            8 * MIB,
            vec![message(2000, 2000), message(10, 10)],
            false,
            true,
        );
        assert!(drain(&mut m).is_none());
        // The largest message read whole stays charged; nothing is under way.
        assert_eq!(budget.held_by(1000), 100 + 2005);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(drain(&mut m).is_none());
        // A message begun and not finished has the read timeout.
        m.inner.chunks.push_back(message(100, 1));
        assert!(drain(&mut m).is_none());
        assert_eq!(budget.held_by(1000), 100 + 2005 + 105);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            drain(&mut m).map(|s| s.code()),
            Some(tonic::Code::DeadlineExceeded)
        );
    }

    #[test]
    fn header_fields_count_as_http2_counts_them() {
        let req = http::Request::post("http://localhost/cimage.v1.ImageCache/Status")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let n = header_bytes(&req);
        assert!((12 + 16 + 32 + 32..400).contains(&n), "{n}");
    }
}
