//! When the node's credentials are looked up, and how long a helper's answer is used.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::super::*;
use super::{req, rig, settings, APP, ID1, ID2};
use crate::policy::PullPolicy;
use crate::testing::Rig;

/// A credential helper double: counts its runs, and fails when told to.
#[derive(Default)]
struct CountingHelper {
    runs: std::sync::atomic::AtomicUsize,
    broken: std::sync::atomic::AtomicBool,
}

impl crate::credentials::HelperRunner for CountingHelper {
    fn run(
        &self,
        name: &str,
        _registry: &str,
    ) -> Result<Option<crate::credentials::Credentials>, crate::credentials::CredentialError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if self.broken.load(Ordering::SeqCst) {
            return Err(crate::credentials::CredentialError::Helper {
                program: format!("docker-credential-{name}"),
                message: "failed (exit status: 1)".into(),
            });
        }
        Ok(Some(crate::credentials::Credentials {
            username: "node".into(),
            password: "node-secret".into(),
            kind: crate::credentials::SecretKind::Password,
        }))
    }
}

/// A rig whose node credentials for 127.0.0.1:5000 come from `helper`.
fn rig_with_helper(helper: &Arc<CountingHelper>) -> Rig {
    let runner: Arc<dyn crate::credentials::HelperRunner> = helper.clone();
    rig(PullerSettings {
        node_credentials: crate::credentials::NodeCredentials {
            helpers: [("127.0.0.1:5000".to_owned(), "test".to_owned())].into(),
            runner: crate::credentials::Helpers::with_runner(runner),
            ..Default::default()
        },
        ..settings()
    })
}

#[tokio::test]
async fn a_warm_hit_of_a_public_image_runs_no_credential_helper() {
    let helper = Arc::new(CountingHelper::default());
    let r = rig_with_helper(&helper);
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    // On the node already, put there by someone else: public.
    r.rt.pull_image(APP, None).await.unwrap();
    for _ in 0..3 {
        let got = r
            .puller
            .ensure(req(APP, Some(PullPolicy::IfNotPresent)))
            .await
            .unwrap();
        assert_eq!(got.action, Action::Cached);
    }
    assert_eq!(
        helper.runs.load(Ordering::SeqCst),
        0,
        "no lookup for a warm hit"
    );
    // A broken helper does not make cache hits fail.
    helper.broken.store(true, Ordering::SeqCst);
    let got = r
        .puller
        .ensure(req(APP, Some(PullPolicy::IfNotPresent)))
        .await;
    assert_eq!(got.unwrap().action, Action::Cached);
}

#[tokio::test]
async fn a_helpers_answer_is_reused_for_its_lifetime() {
    let helper = Arc::new(CountingHelper::default());
    let r = rig_with_helper(&helper);
    r.rt.offer(APP, ID1, "sha256:d1", 10);
    r.rt.offer("127.0.0.1:5000/other:1", ID2, "sha256:d2", 10);
    // Two cold pulls from the same registry need the node's credentials twice: the helper
    // runs once.
    for image in [APP, "127.0.0.1:5000/other:1"] {
        let got = r
            .puller
            .ensure(req(image, Some(PullPolicy::IfNotPresent)))
            .await
            .unwrap();
        assert_eq!(got.action, Action::Pulled);
    }
    assert_eq!(helper.runs.load(Ordering::SeqCst), 1);
}
