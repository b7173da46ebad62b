//! The unit-test rig shared by the puller, launcher and pre-warm tests: a store in a temp dir,
//! the fake runtime and registry, and a cache and puller over them.

use std::sync::Arc;
use std::time::Duration;

use crate::background::Background;
use crate::cache::{Cache, Index};
use crate::clock::{Clock, SystemClock};
use crate::metrics::Metrics;
use crate::puller::{Puller, PullerSettings};
use crate::registry::fake::FakeRegistry;
use crate::runtime::fake::FakeRuntime;
use crate::store::Store;

/// Puller settings for tests: short deadline, 1 ms backoff, metrics that name the tests'
/// registry `127.0.0.1:5000`, otherwise the defaults.
pub fn puller_settings() -> PullerSettings {
    PullerSettings {
        pull_timeout: Duration::from_secs(5),
        backoff: Duration::from_millis(1),
        labelled_registries: ["127.0.0.1:5000".to_owned()].into(),
        ..PullerSettings::default()
    }
}

/// A store, fakes, and a cache and puller over them.
pub struct Rig {
    /// Holds the store file.
    pub dir: tempfile::TempDir,
    /// The store.
    pub store: Store,
    /// The fake CRI image service.
    pub rt: Arc<FakeRuntime>,
    /// The fake registry.
    pub reg: Arc<FakeRegistry>,
    /// The cache over the store and the fake runtime.
    pub cache: Arc<Cache>,
    /// The puller over all of it.
    pub puller: Arc<Puller>,
    /// The tracked tasks and shutdown token every module of the rig shares.
    pub background: Background,
    /// The metrics every module of the rig counts into.
    pub metrics: Arc<Metrics>,
}

impl Rig {
    /// A rig on the system clock (for tests that wait on real time).
    pub fn on_system_clock(settings: PullerSettings) -> Self {
        Self::with(settings, Arc::new(SystemClock), |c| c)
    }

    /// A rig with these puller settings and clock; `cache` may add eviction or a presence TTL.
    pub fn with(
        settings: PullerSettings,
        clock: Arc<dyn Clock>,
        cache: impl FnOnce(Cache) -> Cache,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        let rt = Arc::new(FakeRuntime::default());
        let reg = Arc::new(FakeRegistry::default());
        let background = Background::new();
        let metrics = Arc::new(Metrics::default());
        let cache = Arc::new(cache(
            Cache::new(Index::open(&store).unwrap(), rt.clone(), clock)
                .with_metrics(Arc::clone(&metrics))
                .with_background(background.clone()),
        ));
        let puller = Arc::new(Puller::new(
            rt.clone(),
            reg.clone(),
            cache.clone(),
            Arc::clone(&metrics),
            settings,
            background.clone(),
        ));
        Self {
            dir,
            store,
            rt,
            reg,
            cache,
            puller,
            background,
            metrics,
        }
    }
}
