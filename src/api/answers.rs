//! Calls whose answers carry a step's output (`Exec`, `ExecStream`, `Logs`) held open per uid.
//!
//! An answer is memory of cimaged's until the client has read it: an `Exec` answer holds up to
//! the step's whole captured output, and a `Logs` stream a read of the file ahead. A client
//! that opens many such calls and never reads them (an HTTP/2 window of zero, pings answered)
//! would hold that memory for as long as it likes, so a uid that is neither root nor an admin
//! has at most [`USER_ANSWERS`] of them open at once; the next is refused at once. A call
//! counts from its start until its answer has been sent whole or dropped (its stream reset,
//! its connection gone).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};

/// Calls of an ordinary user whose answers carry a step's output, open at once.
pub const USER_ANSWERS: usize = 16;

/// The paths of the calls counted.
pub(super) const OUTPUT_CALLS: &[&str] = &[
    "/cimage.v1.Launcher/Exec",
    "/cimage.v1.Launcher/ExecStream",
    "/cimage.v1.Launcher/Logs",
];

/// The open answers of each uid (only uids with one are kept).
#[derive(Debug, Clone, Default)]
pub(super) struct Answers(Arc<Mutex<HashMap<u32, usize>>>);

/// One open answer of a uid, given back when dropped.
#[derive(Debug)]
pub(super) struct AnswerSlot {
    answers: Answers,
    uid: u32,
}

/// A uid's answers were all taken.
#[derive(Debug, thiserror::Error)]
#[error(
    "uid {uid} already has {cap} calls open whose answers carry a step's output (exec, logs); \
     read or end one of them first"
)]
pub(super) struct TooManyAnswers {
    uid: u32,
    cap: usize,
}

impl Answers {
    /// One more open answer for `uid`, if it has fewer than `cap`.
    pub(super) fn take(&self, uid: u32, cap: usize) -> Result<AnswerSlot, TooManyAnswers> {
        let mut open = self.0.lock().unwrap();
        let n = open.entry(uid).or_insert(0);
        if *n >= cap {
            return Err(TooManyAnswers { uid, cap });
        }
        *n += 1;
        Ok(AnswerSlot {
            answers: self.clone(),
            uid,
        })
    }

    /// Answers `uid` has open now.
    #[cfg(test)]
    fn open(&self, uid: u32) -> usize {
        self.0.lock().unwrap().get(&uid).copied().unwrap_or(0)
    }
}

impl Drop for AnswerSlot {
    fn drop(&mut self) {
        let mut open = self.answers.0.lock().unwrap();
        if let Some(n) = open.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// An answer's body holding its slot until the body has ended or is dropped.
pub(super) struct Held {
    body: tonic::body::Body,
    slot: Option<AnswerSlot>,
}

impl Held {
    /// `body`, counted by `slot`.
    pub(super) fn new(body: tonic::body::Body, slot: AnswerSlot) -> Self {
        Self {
            body,
            slot: Some(slot),
        }
    }
}

impl Body for Held {
    type Data = <tonic::body::Body as Body>::Data;
    type Error = <tonic::body::Body as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.slot = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_holds_at_most_its_cap_and_a_dropped_answer_gives_its_slot_back() {
        let answers = Answers::default();
        let held: Vec<_> = (0..3).map(|_| answers.take(1000, 3).unwrap()).collect();
        let refused = answers.take(1000, 3).unwrap_err().to_string();
        assert!(
            refused.contains("uid 1000 already has 3 calls open"),
            "{refused}"
        );
        // Another uid is not held back by the first.
        let other = answers.take(1001, 3).unwrap();
        drop(held);
        assert_eq!(answers.open(1000), 0);
        assert_eq!(answers.open(1001), 1);
        drop(other);
        assert!(answers.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_slot_is_given_back_once_the_answer_has_ended() {
        let answers = Answers::default();
        let mut held = Held::new(tonic::body::Body::empty(), answers.take(7, 1).unwrap());
        assert_eq!(answers.open(7), 1);
        while std::future::poll_fn(|cx| Pin::new(&mut held).poll_frame(cx))
            .await
            .is_some()
        {}
        assert_eq!(
            answers.open(7),
            0,
            "given back at the end, before the body is dropped"
        );
        drop(held);
        assert_eq!(answers.open(7), 0);
    }
}
