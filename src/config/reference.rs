//! Every key of the configuration file with its default and meaning: the one table the README's
//! configuration reference, `cimaged --config-reference` and the `cimage-config(5)` man page are
//! made from. Its tests hold it to the file model: every key the parser reads is here and every
//! key here is read, and a default given as a value is the value the parser uses.

/// A key's default: a value the file could hold, or words for one that depends on others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Default {
    /// What the key is when unset, as it would be written in the file.
    Value(&'static str),
    /// A default that is not a plain value (another key's, none, required); Markdown.
    Text(&'static str),
}

/// One key of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// Its path, sections joined by dots; `<host>` stands for a map's key and `[]` for a
    /// list's items.
    pub name: &'static str,
    /// Its default.
    pub default: Default,
    /// What it does (Markdown, one paragraph).
    pub meaning: &'static str,
}

/// Every key of the file, in the order of the reference.
pub const KEYS: &[Key] = &[
    Key {
        name: "CraneBaseDir",
        default: Default::Value("/var/crane"),
        meaning: "base of relative paths",
    },
    Key {
        name: "Container.Enabled",
        default: Default::Value("false"),
        meaning: "container support; cimaged refuses to run without it",
    },
    Key {
        name: "Container.TempDir",
        default: Default::Value("supervisor/containers/"),
        meaning: "scratch space for container tasks",
    },
    Key {
        name: "Container.RuntimeEndpoint",
        default: Default::Text("— (required)"),
        meaning: "CRI RuntimeService socket",
    },
    Key {
        name: "Container.ImageEndpoint",
        default: Default::Text("`RuntimeEndpoint`"),
        meaning: "CRI ImageService socket; when it names `ImageCache.ImageService.Socket` (a file shared with Craned), cimaged uses `RuntimeEndpoint`",
    },
    Key {
        name: "ImageCache.Socket",
        default: Default::Value("/run/cimage/cimaged.sock"),
        meaning: "API socket (absolute path)",
    },
    Key {
        name: "ImageCache.SocketGroup",
        default: Default::Text("none (root's group)"),
        meaning: "group that may connect",
    },
    Key {
        name: "ImageCache.AdminGroup",
        default: Default::Text("none (root only)"),
        meaning: "group that may use admin calls",
    },
    Key {
        name: "ImageCache.MaxConnectionsPerUser",
        default: Default::Value("64"),
        meaning: "API connections one uid may hold at once; more are closed as they come",
    },
    Key {
        name: "ImageCache.MaxConnectionsPerAdmin",
        default: Default::Value("1024"),
        meaning: "the same for root and `AdminGroup`",
    },
    Key {
        name: "ImageCache.ConnectionIdleTimeout",
        default: Default::Value("5m"),
        meaning: "an API connection that sends nothing this long is closed (the CLI pings every 30 s during long streams)",
    },
    Key {
        name: "ImageCache.MaxRequestBytesPerUser",
        default: Default::Value("64MiB"),
        meaning: "bytes one uid's API requests may hold while they have not arrived whole (header fields, and each message at its announced length from its prefix on); a call past it ends with `RESOURCE_EXHAUSTED`; at least `2MiB`. An ordinary user's connection also carries at most 16 calls at once (a client's HTTP/2 library queues the rest)",
    },
    Key {
        name: "ImageCache.MaxRequestBytesPerAdmin",
        default: Default::Value("1GiB"),
        meaning: "the same for root and `AdminGroup`, whose connections carry 64 calls at once",
    },
    Key {
        name: "ImageCache.RequestReadTimeout",
        default: Default::Value("30s"),
        meaning: "an API request that has not arrived whole this long after its headers ends with `DEADLINE_EXCEEDED`; for `ExecStream`, whose request is a stream, each message from its first byte (quiet time between messages is not counted)",
    },
    Key {
        name: "ImageCache.StateDir",
        default: Default::Value("cimage/"),
        meaning: "where `index.redb` lives",
    },
    Key {
        name: "ImageCache.NodeKeyFile",
        default: Default::Value("/etc/cimage/node.key"),
        meaning: "the node's secret (32 random bytes, mode 0600, created at first start) that keys the Argon2id fingerprints of credentials; absolute and outside `StateDir`, so a copy of the index does not let anyone test password guesses",
    },
    Key {
        name: "ImageCache.MaxConcurrentPulls",
        default: Default::Value("3"),
        meaning: "node-wide pull limit (≥ 1)",
    },
    Key {
        name: "ImageCache.MaxPullsPerUser",
        default: Default::Value("2"),
        meaning: "of the node's pull slots, how many one caller who is neither root nor in `AdminGroup` may hold (≥ 1); its further pulls wait for its own share, not in the node's line (root, admins, the CRI endpoint, job steps and pre-warm are under no share)",
    },
    Key {
        name: "ImageCache.PullTimeout",
        default: Default::Value("10m"),
        meaning: "per-request deadline",
    },
    Key {
        name: "ImageCache.PullResolveTimeout",
        default: Default::Value("1m"),
        meaning: "from the moment a pull has its slot (and from each retry), how long it may go without showing that its registry answers: cimage's read of its manifest, and a layer starting to download where the runtime reports bytes; a pull whose manifest cimage cannot read must end within it; one that shows nothing fails (≥ 1s)",
    },
    Key {
        name: "ImageCache.PullStallTimeout",
        default: Default::Value("2m"),
        meaning: "an attempt whose download bytes have not moved this long while a layer is still being fetched is cancelled and retried (a transient failure); only where the runtime reports bytes (≥ 1s)",
    },
    Key {
        name: "ImageCache.PullByteProgress",
        default: Default::Value("true"),
        meaning: "ask the runtime for the bytes of pulls in flight (containerd's content service, twice a second per pull); `false`: pulls report phases only and `PullStallTimeout` does not apply",
    },
    Key {
        name: "ImageCache.ParallelFetch.Enabled",
        default: Default::Value("auto"),
        meaning: "cimage fetches the big layers of a pull itself, several HTTP range requests per blob, into containerd's content store (namespace `k8s.io`, under containerd's own refs and a lease), then calls `PullImage`, which finds them and unpacks; `auto`: where the runtime answers containerd's content API (CRI-O, or an endpoint without it, keeps the plain `PullImage`); `true`: the same, and a runtime without it is told in the log; `false`: never",
    },
    Key {
        name: "ImageCache.ParallelFetch.ConnectionsPerPull",
        default: Default::Value("8"),
        meaning: "HTTP connections one pull's fetch uses at most (≥ 1)",
    },
    Key {
        name: "ImageCache.ParallelFetch.ConnectionsPerRegistry",
        default: Default::Value("16"),
        meaning: "HTTP connections all fetches from one registry use at most (≥ 1)",
    },
    Key {
        name: "ImageCache.ParallelFetch.SegmentSize",
        default: Default::Value("16MiB"),
        meaning: "bytes per range request at most; smaller when `MaxBufferPerPull` ÷ `ConnectionsPerPull` is (so that every connection stays busy; with the defaults 8 MiB), never under 1 MiB",
    },
    Key {
        name: "ImageCache.ParallelFetch.MinBlobSize",
        default: Default::Value("32MiB"),
        meaning: "layers smaller than this are left to the runtime",
    },
    Key {
        name: "ImageCache.ParallelFetch.MaxBufferPerPull",
        default: Default::Value("64MiB"),
        meaning: "bytes one pull's fetch holds in memory at most: segments fetched ahead of the one being written (≥ 1MiB)",
    },
    Key {
        name: "ImageCache.PullRetries",
        default: Default::Value("3"),
        meaning: "retries of transient failures",
    },
    Key {
        name: "ImageCache.ReconcileInterval",
        default: Default::Value("1m"),
        meaning: "reconciliation period (≥ 1s)",
    },
    Key {
        name: "ImageCache.RuntimeTimeout",
        default: Default::Value("30s"),
        meaning: "deadline of non-pull CRI calls",
    },
    Key {
        name: "ImageCache.DefaultPullPolicy",
        default: Default::Value("IfNotPresent"),
        meaning: "policy of a request that names none: `IfNotPresent` for every tag, `Always`, or `ByTag` (`Always` for `:latest` and untagged references only); a digest reference present is never pulled again",
    },
    Key {
        name: "ImageCache.OnRegistryUnavailable",
        default: Default::Value("Fail"),
        meaning: "what an `Always` request does when its registry cannot be reached (connection refused, timeout, its token service down, 5xx; never on 401/403/404): `Fail`, or `UseCached` to serve the node's copy unchecked, with a warning in the log, `cimage_stale_served_total`, and `\"stale\": true` in the JSON answer (the CLI says so on stderr); an image the node does not have still fails, and so does a private image the request has not proved access to",
    },
    Key {
        name: "ImageCache.PresenceTtl",
        default: Default::Value("0s"),
        meaning: "how long the runtime's confirmation that an image is present is trusted before `ImageStatus` is asked again; `0s` asks every time",
    },
    Key {
        name: "ImageCache.Registries.<host>.Insecure",
        default: Default::Value("false"),
        meaning: "use plain HTTP for that host",
    },
    Key {
        name: "ImageCache.Registries.<host>.MaxConcurrentPulls",
        default: Default::Text("global limit"),
        meaning: "per-registry pull limit",
    },
    Key {
        name: "ImageCache.Registries.<host>.CaFile",
        default: Default::Text("none"),
        meaning: "PEM CA for this registry's TLS certificate (absolute path)",
    },
    Key {
        name: "ImageCache.Registries.<host>.Mirrors",
        default: Default::Value("[]"),
        meaning: "mirror hosts tried in order before the registry for tag resolution",
    },
    Key {
        name: "ImageCache.Auth.Verify",
        default: Default::Value("IfPulledWithCredentials"),
        meaning: "which cached images a request must prove access to (`Always`, `Never`)",
    },
    Key {
        name: "ImageCache.Auth.ConfigFiles",
        default: Default::Value("[]"),
        meaning: "node auth files (docker config.json / auth.json), absolute paths",
    },
    Key {
        name: "ImageCache.Auth.CredentialHelpers",
        default: Default::Value("{}"),
        meaning: "registry host → docker credential helper name",
    },
    Key {
        name: "ImageCache.Launcher.AllowedMountPrefixes",
        default: Default::Value("[]"),
        meaning: "host directories job mounts may come from (absolute); a source is given as a plain path below one, without symlinks",
    },
    Key {
        name: "ImageCache.Launcher.AllowedDevices",
        default: Default::Value("[]"),
        meaning: "device nodes steps may have: paths and globs (`/dev/nvidia*`, `*` within one path component) matched against the resolved node, and CDI names (`vendor.com/class=*`) on runtimes with CDI (not containerd before 1.7)",
    },
    Key {
        name: "ImageCache.Launcher.MaxLaunchesPerUser",
        default: Default::Value("32"),
        meaning: "launches one user (not root or `AdminGroup`) may have in flight",
    },
    Key {
        name: "ImageCache.Launcher.AllowUserLaunch",
        default: Default::Value("false"),
        meaning: "whether callers that are neither root nor in `AdminGroup` may launch containers directly (outside the scheduler)",
    },
    Key {
        name: "ImageCache.Launcher.AllowedCgroupParents",
        default: Default::Value("[]"),
        meaning: "cgroup parents any launching caller may put a job's pod under: an absolute cgroup path (it and everything below) or a systemd slice (`crane.slice` allows `crane-job_42.slice`); `{uid}` stands for the caller's uid (`/crane/user_{uid}`: each user only under their own, never under another user's job); root and `AdminGroup` may use any",
    },
    Key {
        name: "ImageCache.Launcher.StopGracePeriod",
        default: Default::Value("10s"),
        meaning: "SIGTERM-to-SIGKILL grace (≤ 1h)",
    },
    Key {
        name: "ImageCache.Launcher.LogDir",
        default: Default::Text("`Container.TempDir`"),
        meaning: "where step logs go, relative to `CraneBaseDir`",
    },
    Key {
        name: "ImageCache.Launcher.MaxLogSize",
        default: Default::Value("100MiB"),
        meaning: "a running step's log is measured every 0.2 to 2 s (sooner the faster it grows) and, once larger than this, rotated as kubelet rotates container logs: renamed to `<step>-<task>.log.N`, then the runtime reopens it (CRI `ReopenContainerLog`); a fast writer may pass it by what it writes between two measures (at least 4KiB)",
    },
    Key {
        name: "ImageCache.Launcher.MaxLogFiles",
        default: Default::Value("2"),
        meaning: "log files a step keeps, the one being written included (at least 2); the oldest rotated ones go. `cimage logs` (and `-f`, `--tail`) read across them",
    },
    Key {
        name: "ImageCache.Launcher.PidsLimit",
        default: Default::Value("4096"),
        meaning: "processes a job's pod may hold, all its steps together (as kubelet's pod limit): CRI has no process limit, so cimaged makes the pod's cgroup itself, `cimage-<pod uid>` under the job's cgroup parent (or the root), writes `pids.max` there (cgroup v1 `pids` hierarchy, or v2 with the controller enabled on the way down) and gives it to the runtime as the pod's parent; removed with the pod. A systemd slice parent is left to its own `TasksMax`. `0`: no limit of cimaged's",
    },
    Key {
        name: "ImageCache.Launcher.MaxLogDirSize",
        default: Default::Value("10GiB"),
        meaning: "bound on all step logs under `LogDir`: a few seconds after steps end (and every 5 minutes), the logs of finished steps are removed, those of the user who holds the most bytes of them first (oldest first), until the rest fits; a running step's log is never removed (its own share bounds it)",
    },
    Key {
        name: "ImageCache.Eviction.Enabled",
        default: Default::Value("true"),
        meaning: "eviction on or off",
    },
    Key {
        name: "ImageCache.Eviction.HighPercent",
        default: Default::Value("85"),
        meaning: "image filesystem use (percent, as `df` counts it) above which images are evicted (0–100)",
    },
    Key {
        name: "ImageCache.Eviction.LowPercent",
        default: Default::Value("80"),
        meaning: "use eviction brings the filesystem down to (0–100, at most `HighPercent`)",
    },
    Key {
        name: "ImageCache.Eviction.MaxBytes",
        default: Default::Text("none"),
        meaning: "bound on the indexed images' total size (`500MiB`, `50GiB`, `2G`, bytes; an image pulled by cimage counts what its blobs hold, each once, when that is less than the runtime's size)",
    },
    Key {
        name: "ImageCache.Eviction.MinAge",
        default: Default::Value("2m"),
        meaning: "images younger than this are never evicted",
    },
    Key {
        name: "ImageCache.Eviction.MaxUnusedAge",
        default: Default::Text("off"),
        meaning: "evict images unused this long",
    },
    Key {
        name: "ImageCache.Eviction.Path",
        default: Default::Text("runtime's image fs"),
        meaning: "filesystem to watch",
    },
    Key {
        name: "ImageCache.History.Keep",
        default: Default::Value("7d"),
        meaning: "finished (and cleaned-up) tasks, ended jobs, eviction records and pre-warm runs older than this are removed (a schedule also keeps at most its last 100 runs; tasks are read oldest first through an index by finishing time, so a pass reads what goes, not the whole history), in the background every 10 minutes, in batches of 500 per transaction (≥ 1m)",
    },
    Key {
        name: "ImageCache.History.MaxTasks",
        default: Default::Value("100000"),
        meaning: "at most this many task records; beyond it the oldest finished ones go first (running tasks are never removed)",
    },
    Key {
        name: "ImageCache.History.KeepLogs",
        default: Default::Value("false"),
        meaning: "keep the log files of removed tasks; by default they are removed with them, and so is a job's log directory once empty, only inside the per-job directories cimage made under `Launcher.LogDir`",
    },
    Key {
        name: "ImageCache.Prewarm.PopularityHalfLife",
        default: Default::Value("7d"),
        meaning: "half-life of the popularity score",
    },
    Key {
        name: "ImageCache.Prewarm.ForgetAbsentAfter",
        default: Default::Value("90d"),
        meaning: "an image that left the node keeps its name, use count and score this long after its last use (or until its score falls below 0.01), so `Top: N` can bring it back",
    },
    Key {
        name: "ImageCache.Prewarm.Schedules[].Name",
        default: Default::Text("— (required)"),
        meaning: "unique name (A-Z a-z 0-9 . _ -)",
    },
    Key {
        name: "ImageCache.Prewarm.Schedules[].Cron",
        default: Default::Text("— (required)"),
        meaning: "crontab expression",
    },
    Key {
        name: "ImageCache.Prewarm.Schedules[].TimeZone",
        default: Default::Text("`UTC`"),
        meaning: "IANA zone",
    },
    Key {
        name: "ImageCache.Prewarm.Schedules[].Images",
        default: Default::Text("`[]`"),
        meaning: "images to keep warm",
    },
    Key {
        name: "ImageCache.Prewarm.Schedules[].Top",
        default: Default::Text("none"),
        meaning: "also the N most popular images",
    },
    Key {
        name: "ImageCache.Prewarm.Schedules[].Jitter",
        default: Default::Text("`0s`"),
        meaning: "random delay before a run",
    },
    Key {
        name: "ImageCache.Prewarm.Schedules[].Concurrency",
        default: Default::Text("`2`"),
        meaning: "images pulled at once",
    },
    Key {
        name: "ImageCache.Prewarm.Schedules[].CatchUp",
        default: Default::Text("`false`"),
        meaning: "run once after a start if a fire was missed",
    },
    Key {
        name: "ImageCache.Expect.Grace",
        default: Default::Value("1h"),
        meaning: "an expectation ends this long after its deadline (one a queue source made ends when its job leaves the queue, and stays while its job runs here)",
    },
    Key {
        name: "ImageCache.Expect.MaxPerUser",
        default: Default::Value("16"),
        meaning: "expectations one uid that is neither root nor in `AdminGroup` may hold at once (≥ 1)",
    },
    Key {
        name: "ImageCache.Queue.Source",
        default: Default::Value("none"),
        meaning: "where the jobs planned on this node come from: `none`, `slurm` (`squeue` and `scontrol` on the node, as root; `SLURM_CONF` from cimaged's environment) or `command`",
    },
    Key {
        name: "ImageCache.Queue.Interval",
        default: Default::Value("15s"),
        meaning: "how often the source is asked (≥ 1s)",
    },
    Key {
        name: "ImageCache.Queue.Horizon",
        default: Default::Value("2h"),
        meaning: "jobs planned to start further ahead are not expected yet",
    },
    Key {
        name: "ImageCache.Queue.NodeName",
        default: Default::Text("this host's short name"),
        meaning: "the node's name in the scheduler (Slurm's `NodeName`)",
    },
    Key {
        name: "ImageCache.Queue.Command",
        default: Default::Value("[]"),
        meaning: "`Source: command` only: the program (absolute path) and its arguments",
    },
    Key {
        name: "ImageCache.Queue.Timeout",
        default: Default::Value("30s"),
        meaning: "a look at the queue that takes longer fails (the source is then unhealthy)",
    },
    Key {
        name: "ImageCache.MetricsAddr",
        default: Default::Text("off"),
        meaning: "`host:port` for `/metrics` and `/healthz`; an address that cannot be bound stops cimaged at start",
    },
    Key {
        name: "ImageCache.ImageService.Enabled",
        default: Default::Value("true"),
        meaning: "serve the CRI image service",
    },
    Key {
        name: "ImageCache.ImageService.Socket",
        default: Default::Value("/run/cimage/image.sock"),
        meaning: "its socket (absolute; mode 0600, root only; not `ImageCache.Socket`)",
    },
    Key {
        name: "ImageCache.ImageService.Upstream",
        default: Default::Text("`Container.ImageEndpoint`, or `RuntimeEndpoint` when that names cimaged's socket"),
        meaning: "the runtime image endpoint cimaged uses; cimaged's own socket is refused",
    },
    Key {
        name: "ImageCache.ImageService.MaxConnections",
        default: Default::Value("512"),
        meaning: "connections the CRI image socket serves at once; the next waits in the listen queue until one closes (told in the log once a minute at most)",
    },
];

/// The reference as a Markdown table (what the README holds between its markers).
pub fn markdown() -> String {
    let mut out = String::from("| key | default | meaning |\n|---|---|---|\n");
    for k in KEYS {
        let default = match k.default {
            Default::Value(v) => format!("`{v}`"),
            Default::Text(t) => t.to_owned(),
        };
        out.push_str(&format!("| `{}` | {default} | {} |\n", k.name, k.meaning));
    }
    out
}

#[cfg(test)]
mod tests;
