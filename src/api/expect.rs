//! The `Expectations` gRPC service: `cimage expect`, `cimage expected` and `cimage expect
//! --cancel`, over the expector. The caller is who the socket says; a user acts for themselves.

use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use super::pb;
use super::peer::AdminPolicy;
use super::service::{caller, credentials_from_pb};
use crate::expect::{
    Asker, CancelTarget, ExpectError, ExpectRequest, Expectation, Expector, SourceHealth,
};

/// The service implementation.
pub struct ExpectationsApi {
    expector: Arc<Expector>,
    admin: AdminPolicy,
    clock: Arc<dyn crate::clock::Clock>,
}

impl ExpectationsApi {
    /// A service over the daemon's expector.
    pub fn new(
        expector: Arc<Expector>,
        admin: AdminPolicy,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Self {
        Self {
            expector,
            admin,
            clock,
        }
    }

    fn asker<T>(&self, req: &Request<T>) -> Result<Asker, Status> {
        let c = caller(req)?;
        Ok(Asker {
            uid: c.uid,
            admin: self.admin.is_admin(&c),
        })
    }
}

fn expect_status(e: &ExpectError) -> Status {
    let code = match e {
        ExpectError::Reference(_) | ExpectError::Invalid(_) => Code::InvalidArgument,
        ExpectError::TooMany { .. } => Code::ResourceExhausted,
        ExpectError::NotFound(_) => Code::NotFound,
        ExpectError::Store(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// An expectation as the API shows it, its state as of `now_ms`.
pub fn expectation_pb(e: &Expectation, now_ms: i64) -> pb::Expectation {
    let lead = e.lead_ms();
    pb::Expectation {
        image: e.image.clone(),
        job: e.job.clone().unwrap_or_default(),
        deadline_ms: e.deadline_ms,
        source: e.source.as_str().to_owned(),
        owner_uid: e.owner,
        state: e.shown_state(now_ms).to_owned(),
        reason: e.reason.clone().unwrap_or_default(),
        ready_ms: e.ready_ms.unwrap_or(0),
        first_request_ms: e.first_request.map(|f| f.at_ms).unwrap_or(0),
        found_ready: e.first_request.is_some_and(|f| f.found_ready),
        lead_ms: lead.unwrap_or(0),
        has_lead: lead.is_some(),
        running: e.running,
        created_ms: e.created_ms,
    }
}

fn source_pb(h: &SourceHealth) -> pb::QueueSourceStatus {
    pb::QueueSourceStatus {
        name: h.name.clone(),
        healthy: h.healthy,
        last_ok_ms: h.last_ok_ms.unwrap_or(0),
        error: h.error.clone().unwrap_or_default(),
        planned: h.planned as u32,
    }
}

#[tonic::async_trait]
impl pb::expectations_server::Expectations for ExpectationsApi {
    async fn expect(
        &self,
        req: Request<pb::ExpectRequest>,
    ) -> Result<Response<pb::Expectation>, Status> {
        let who = self.asker(&req)?;
        let r = req.into_inner();
        let e = self
            .expector
            .expect(
                ExpectRequest {
                    image: r.image,
                    deadline_ms: r.deadline_ms,
                    job: (!r.job.is_empty()).then_some(r.job),
                    credentials: credentials_from_pb(r.credentials),
                },
                who,
            )
            .await
            .map_err(|e| expect_status(&e))?;
        Ok(Response::new(expectation_pb(&e, self.clock.now_ms())))
    }

    async fn list_expected(
        &self,
        req: Request<pb::ListExpectedRequest>,
    ) -> Result<Response<pb::ListExpectedResponse>, Status> {
        let who = self.asker(&req)?;
        let now = self.clock.now_ms();
        Ok(Response::new(pb::ListExpectedResponse {
            expectations: self
                .expector
                .list(who)
                .iter()
                .map(|e| expectation_pb(e, now))
                .collect(),
            source: self.expector.source_health().as_ref().map(source_pb),
        }))
    }

    async fn cancel_expected(
        &self,
        req: Request<pb::CancelExpectedRequest>,
    ) -> Result<Response<pb::CancelExpectedResponse>, Status> {
        let who = self.asker(&req)?;
        let target = match req.into_inner().target {
            Some(pb::cancel_expected_request::Target::Image(i)) => CancelTarget::Image(i),
            Some(pb::cancel_expected_request::Target::Job(j)) => CancelTarget::Job(j),
            None => {
                return Err(Status::invalid_argument(
                    "name an image or a job whose expectations to cancel",
                ))
            }
        };
        let now = self.clock.now_ms();
        let gone = self
            .expector
            .cancel(target, who)
            .await
            .map_err(|e| expect_status(&e))?;
        Ok(Response::new(pb::CancelExpectedResponse {
            cancelled: gone.iter().map(|e| expectation_pb(e, now)).collect(),
        }))
    }
}
