//! cimaged: the per-node daemon. Keeps the index over the CRI runtime's images, applies pull
//! policies, and serves the cimage API on a unix socket. This file starts and stops things;
//! `wiring` maps the configuration onto each module's settings.

mod man;
mod settings;
mod systemd;
mod wiring;

use std::io::IsTerminal;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use cimage::api::{
    self, expect::ExpectationsApi, launcher::LauncherApi, maintenance::MaintenanceApi, peer,
    service::ImageCacheApi,
};
use cimage::background::Background;
use cimage::cache::{Cache, Index};
use cimage::clock::SystemClock;
use cimage::config::{self, Settings};
use cimage::credentials::Fingerprinter;
use cimage::cri::{CriImageRuntime, CriTaskRuntime};
use cimage::expect::{CommandSource, Expector, ProcessRunner, QueueSource, SlurmSource};
use cimage::fetch::{FetchMode, Fetcher};
use cimage::identity::Nss;
use cimage::launcher::mounts::BindStager;
use cimage::launcher::{Launcher, Parts};
use cimage::metrics::Metrics;
use cimage::prewarm::Prewarmer;
use cimage::puller::{Puller, PullerSettings};
use cimage::registry::OciRegistry;
use cimage::runtime::ImageRuntime;
use cimage::store::Store;
use wiring::Wiring;

/// How long shutdown waits for tracked work (cleanups being written, uses being committed).
const SHUTDOWN_BOUND: Duration = Duration::from_secs(15);

/// cimaged: image pre-pull and cache management daemon for CRI compute nodes.
///
/// Reads the node's config (CraneSched's config.yaml or a file of its own with the same
/// `Container` section plus an `ImageCache` section), then serves the cimage API on
/// `ImageCache.Socket`. Log verbosity comes from CIMAGE_LOG (e.g. `debug`, `cimage=trace`).
#[derive(Parser, Debug)]
#[command(name = "cimaged", version)]
struct Args {
    /// Configuration file.
    #[arg(
        long,
        short,
        default_value = "/etc/crane/config.yaml",
        env = "CIMAGE_CONFIG"
    )]
    config: PathBuf,
    /// Validate the configuration, print the resolved settings and exit.
    #[arg(long)]
    check_config: bool,
    /// Print every configuration key with its default and meaning (a Markdown table) and exit.
    #[arg(long)]
    config_reference: bool,
    /// Write the manual pages cimaged(8) and cimage-config(5) into DIR and exit.
    #[arg(long, value_name = "DIR", hide = true)]
    generate_man: Option<PathBuf>,
}

fn main() {
    // glibc gives threads that allocate arenas of their own; the database work runs on
    // tokio's blocking threads, whose arenas keep freed memory resident. Two arenas suffice for
    // a daemon this size (measured with 10,000 indexed images: 43.1 MiB resident before, 40.0
    // after).
    // SAFETY: mallopt before any thread exists only changes the allocator's tuning.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    // The range fetch's segments (MiBs each) are mapped and unmapped on their own, so what a
    // fetch frees goes back at once instead of staying in an arena (glibc would otherwise raise
    // its threshold past them after the first free). Measured: a 512 MiB fetch peaked at idle
    // + 112 MiB without this.
    // SAFETY: as above.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20) };
    let args = Args::parse();
    if args.config_reference || args.check_config {
        // A report piped into `head` ends quietly when the reader goes, as other command-line
        // tools do (the daemon itself keeps ignoring SIGPIPE: its peers are sockets).
        // SAFETY: restoring the default disposition of one signal, before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    if args.config_reference {
        print!("{}", config::reference::markdown());
        return;
    }
    if let Some(dir) = &args.generate_man {
        use clap::CommandFactory;
        if let Err(e) = man::write_pages(Args::command(), dir) {
            eprintln!("cimaged: writing manual pages into {}: {e}", dir.display());
            std::process::exit(1);
        }
        return;
    }
    init_logging();
    let settings = match config::load(&args.config) {
        Ok(s) => s,
        Err(e) => {
            // Disabled container support is an error too: the node asked for a daemon that has
            // nothing to manage, and the service manager should say so.
            eprintln!("cimaged: {e}");
            std::process::exit(1);
        }
    };
    let wiring = match wiring::wire(&settings).and_then(|w| {
        wiring::preflight(&settings, &w)?;
        Ok(w)
    }) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("cimaged: {e}");
            std::process::exit(1);
        }
    };
    if args.check_config {
        settings::print_settings(&settings, &wiring);
        return;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cimaged: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(settings, wiring)) {
        error!("{e:#}");
        eprintln!("cimaged: {e:#}");
        std::process::exit(1);
    }
}

/// The log level without `CIMAGE_LOG`: cimage's own `info`, and the HTTP/2 library's errors
/// only. Its warnings are per connection and a peer chooses them (a client that resets streams
/// in a loop makes one per connection); cimaged tells those itself, once per uid a minute
/// (`api::abuse`). An explicit `CIMAGE_LOG` (e.g. `info,h2=debug`) still shows them.
const DEFAULT_LOG: &str = "info,h2=error";

fn init_logging() {
    // An empty CIMAGE_LOG (`Environment=CIMAGE_LOG=` in a unit) means the default too.
    let filter = std::env::var("CIMAGE_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn run(settings: Settings, wiring: Wiring) -> Result<()> {
    let ic = &settings.image_cache;
    let admin_gid = ic
        .admin_group
        .as_deref()
        .map(peer::resolve_group)
        .transpose()
        .context("ImageCache.AdminGroup")?;
    let socket_gid = ic
        .socket_group
        .as_deref()
        .map(peer::resolve_group)
        .transpose()
        .context("ImageCache.SocketGroup")?;

    std::fs::create_dir_all(&settings.state_dir)
        .with_context(|| format!("creating state directory {}", settings.state_dir.display()))?;
    std::fs::set_permissions(&settings.state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting mode 0700 on {}", settings.state_dir.display()))?;
    let store = Store::open(&settings.index_path())?;
    let index = Index::open_with(&store, wiring.index)?;

    let cri = Arc::new(CriImageRuntime::new(
        &settings.image_endpoint,
        &settings.runtime_endpoint,
        wiring.runtime_timeout,
    ));
    let runtime: Arc<dyn ImageRuntime> = cri.clone();
    let metrics = Arc::new(Metrics::default());
    metrics.set_labelled(
        "cimage_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    // Every task the daemon spawns is tracked here; shutdown cancels its token and waits.
    let background = Background::new();
    let mut cache = Cache::new(index, runtime.clone(), Arc::new(SystemClock))
        .with_background(background.clone())
        .with_metrics(metrics.clone())
        .with_presence_ttl(wiring.presence_ttl)
        .with_evictions_kept_for(wiring.launcher.history.keep);
    if let Some(eviction) = wiring.eviction.clone() {
        cache = cache.with_eviction(eviction);
    }
    let cache = Arc::new(cache);
    let registry = Arc::new(OciRegistry::new(&wiring.registries)?);
    let fetcher = Arc::new(Fetcher::new(
        cri.clone(),
        registry.clone(),
        wiring.fetch.clone(),
    ));
    // Leases an earlier cimaged left in the runtime (killed mid-fetch) go before any pull.
    fetcher.clean_leftovers().await;
    let mut puller = Puller::new(
        runtime.clone(),
        registry,
        cache.clone(),
        metrics.clone(),
        PullerSettings {
            fingerprinter: Arc::new(
                Fingerprinter::load_or_create(&ic.node_key_file)
                    .context("ImageCache.NodeKeyFile")?,
            ),
            ..wiring.puller.clone()
        },
        background.clone(),
    );
    if wiring.fetch.mode != FetchMode::Off {
        puller = puller.with_fetcher(fetcher);
    }
    let puller = Arc::new(puller);

    let clock = Arc::new(SystemClock);
    let launcher = Launcher::new(
        Parts {
            runtime: Arc::new(CriTaskRuntime::new(
                &settings.runtime_endpoint,
                wiring.runtime_timeout,
            )),
            puller: puller.clone(),
            cache: cache.clone(),
            metrics: metrics.clone(),
            store: store.clone(),
            clock,
            users: Arc::new(Nss),
            mounts: Arc::new(
                BindStager::new(settings.state_dir.join("mnt"))
                    .context("creating the mount staging directory")?,
            ),
            background: background.clone(),
        },
        wiring.launcher.clone(),
    )?;

    let prewarm = Prewarmer::new(
        puller.clone(),
        cache.clone(),
        metrics.clone(),
        &store,
        Arc::new(SystemClock),
        background.clone(),
    )?;
    prewarm
        .sync_config(wiring.schedules.clone())
        .await
        .context("ImageCache.Prewarm.Schedules")?;
    match prewarm.catch_up().await {
        Ok(0) => {}
        Ok(n) => info!(schedules = n, "catching up missed pre-warm runs"),
        Err(e) => warn!("pre-warm catch-up failed: {e}"),
    }

    let expector = Expector::new(
        puller.clone(),
        cache.clone(),
        metrics.clone(),
        &store,
        Arc::new(SystemClock),
        wiring.expect.clone(),
        wiring.queue.as_ref().map(queue_source),
        background.clone(),
    )?;
    expector.start();
    if let Some(ev) = &wiring.eviction {
        metrics.set(
            "cimage_image_fs_high_watermark_ratio",
            ev.high_percent / 100.0,
        );
    }

    background.spawn(recover_loop(launcher.clone(), background.clone()));
    background.spawn(launcher.clone().log_dir_loop());
    background.spawn(trim_loop(background.clone()));
    background.spawn(history_loop(
        launcher.clone(),
        prewarm.clone(),
        background.clone(),
    ));
    background.spawn(prewarm.clone().timer());
    background.spawn(api::readiness::keep_fresh(
        metrics.clone(),
        cache.clone(),
        prewarm.clone(),
        expector.clone(),
        Duration::from_secs(2),
        background.clone(),
    ));
    if let Some(addr) = &ic.metrics_addr {
        let addr = addr.parse().context("ImageCache.MetricsAddr")?;
        let listener = api::http::bind(addr).await?;
        let (m, c, bg) = (metrics.clone(), cache.clone(), background.clone());
        background.spawn(async move {
            if let Err(e) = api::http::serve(listener, m, c, bg).await {
                error!("metrics endpoint stopped: {e}");
            }
        });
    }
    background.spawn(reconcile_loop(
        cache.clone(),
        wiring.reconcile_interval,
        background.clone(),
    ));

    let listener = api::bind_socket(&ic.socket, socket_gid)?;
    // The CRI image endpoint: root's alone, served beside the API until shutdown.
    let cri_socket = ic
        .image_service
        .enabled
        .then(|| ic.image_service.socket.clone());
    let mut from_systemd = false;
    if let Some(path) = &cri_socket {
        // Held by a systemd socket unit while cimaged was down, or made now.
        let cri_listener = match systemd::activated(path) {
            Some(l) => {
                from_systemd = true;
                info!(socket = %path.display(), "CRI image socket from systemd");
                tokio::net::UnixListener::from_std(l)
                    .context("ImageCache.ImageService.Socket (from systemd)")?
            }
            None => api::bind_socket_mode(path, 0o600, None)
                .context("ImageCache.ImageService.Socket")?,
        };
        let service = api::cri_image::CriImageApi::new(
            &settings.image_endpoint,
            puller.clone(),
            cache.clone(),
            background.clone(),
        );
        let bg = background.clone();
        let max_connections = ic.image_service.max_connections;
        let abuse = api::abuse::AbuseLog::new("CRI image", metrics.clone());
        info!(socket = %path.display(), upstream = %settings.image_endpoint.display(), "serving the CRI image service");
        background.spawn(async move {
            let shutdown = bg.clone();
            if let Err(e) =
                api::cri_image::serve(cri_listener, service, max_connections, abuse, async move {
                    shutdown.shutting_down().await
                })
                .await
            {
                error!("the CRI image service stopped: {e}");
                bg.begin_shutdown();
            }
        });
    }
    info!(socket = %ic.socket.display(), runtime = %settings.image_endpoint.display(), "cimaged listening");
    let admin = peer::AdminPolicy { admin_gid };
    let maintenance =
        MaintenanceApi::new(cache.clone(), prewarm.clone(), admin, background.clone());
    let images = ImageCacheApi::new(
        puller,
        cache,
        runtime,
        admin,
        store.instance().to_owned(),
        background.clone(),
    )
    .with_status_of(prewarm, launcher.clone(), ic.metrics_addr.clone());
    let launcher_api = LauncherApi::new(launcher, admin, background.clone());
    let expectations = ExpectationsApi::new(expector, admin, Arc::new(SystemClock));

    let bg = background.clone();
    background.spawn(async move {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
            _ = bg.shutting_down() => {}
        }
        bg.begin_shutdown();
    });

    // Stops accepting at shutdown; open streams end (with a status saying why) as the work
    // behind them sees the token.
    let bg = background.clone();
    let gate = api::gate::Gate::new(wiring.connections, move |caller| admin.is_admin(caller));
    systemd::notify("READY=1");
    let served = api::serve(
        listener,
        gate,
        api::Services {
            images,
            launcher: launcher_api,
            maintenance,
            expectations,
        },
        metrics,
        async move { bg.shutting_down().await },
    )
    .await;
    background.begin_shutdown();
    systemd::notify("STOPPING=1");
    let _ = std::fs::remove_file(&ic.socket);
    // A socket systemd holds stays for the next start.
    if let Some(path) = cri_socket.as_ref().filter(|_| !from_systemd) {
        let _ = std::fs::remove_file(path);
    }
    let left = background.wait(SHUTDOWN_BOUND).await;
    if left > 0 {
        warn!(
            tasks = left,
            "shutting down with work still in progress; the next start finishes it"
        );
    }
    served.context("serving the API")?;
    info!("cimaged stopped");
    Ok(())
}

/// The queue source the config names, over child processes bounded by its timeout.
fn queue_source(q: &wiring::QueueWiring) -> Arc<dyn QueueSource> {
    match q {
        wiring::QueueWiring::Slurm { node, timeout } => Arc::new(SlurmSource::new(
            Arc::new(ProcessRunner {
                timeout: *timeout,
                ..ProcessRunner::default()
            }),
            node,
        )),
        wiring::QueueWiring::Command { argv, timeout } => Arc::new(CommandSource::new(
            Arc::new(ProcessRunner {
                timeout: *timeout,
                ..ProcessRunner::default()
            }),
            argv.clone(),
        )),
    }
}

/// Prunes the history (`ImageCache.History`) a minute after start-up, then every 10 minutes,
/// until shutdown: tasks, jobs and eviction records through the launcher, then pre-warm runs
/// past the same cutoff.
async fn history_loop(launcher: Arc<Launcher>, prewarm: Arc<Prewarmer>, background: Background) {
    let mut wait = Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = background.shutting_down() => return,
        }
        wait = Duration::from_secs(600);
        if let Err(e) = launcher.prune_history().await {
            warn!("pruning history failed: {e}");
        }
        if let Err(e) = prewarm.prune_runs(launcher.history_cutoff()).await {
            warn!("pruning pre-warm runs failed: {e}");
        }
    }
}

/// Hands memory freed after a burst (a thousand clients' connection buffers) back to the
/// system every 10 s: glibc keeps freed memory in its heap otherwise, and the daemon would stay
/// at its peak for good. Cheap when there is nothing to give back.
async fn trim_loop(background: Background) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = background.shutting_down() => return,
        }
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free memory of the allocator's heaps.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Re-attaches tasks and sweeps orphans once the runtime answers (retrying every 5 s).
async fn recover_loop(launcher: Arc<Launcher>, background: Background) {
    loop {
        match launcher.recover().await {
            Ok(r) => {
                info!(
                    reattached = r.reattached,
                    finished = r.finished,
                    orphan_pods = r.orphan_pods,
                    orphan_containers = r.orphan_containers,
                    "launcher recovered its tasks"
                );
                return;
            }
            Err(e) => warn!("task recovery failed, retrying in 5s: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = background.shutting_down() => return,
        }
    }
}

/// Reconciles at start-up (retrying every 5 s while the runtime is not reachable), then every
/// `interval`.
async fn reconcile_loop(cache: Arc<Cache>, interval: Duration, background: Background) {
    let mut ever_ok = false;
    loop {
        let next = match cache.reconcile().await {
            Ok(r) => {
                if !ever_ok || r.added + r.removed + r.updated > 0 {
                    info!(
                        added = r.added,
                        removed = r.removed,
                        updated = r.updated,
                        "index reconciled with the runtime"
                    );
                }
                ever_ok = true;
                if let Err(e) = cache.gc_reconciled().await {
                    warn!("eviction pass failed: {e}");
                }
                interval
            }
            Err(e) => {
                warn!("reconciliation failed: {e}");
                if ever_ok {
                    interval
                } else {
                    Duration::from_secs(5).min(interval)
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = background.shutting_down() => return,
        }
    }
}
