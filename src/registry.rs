//! The registry side, reached with oci-client: resolving a tag to its manifest digest with a HEAD
//! request (cheap, and not counted as a pull by Docker Hub). The bytes themselves are pulled by the
//! runtime through CRI so they land where containers need them.

mod http;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;

use crate::credentials::{Credentials, SecretKind};
use crate::reference::ImageRef;

/// What kind of failure a registry request had; each is a distinct message and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryErrorKind {
    /// The repository or tag does not exist.
    NotFound,
    /// The credentials were refused or are needed.
    Unauthorized,
    /// The registry could not be reached (connection refused, DNS, timeout).
    Unreachable,
    /// TLS verification failed.
    Tls,
    /// The registry's token service (its `WWW-Authenticate: Bearer realm`) could not be reached.
    TokenService,
    /// The registry answered with a server error (5xx, 429); may pass.
    Server,
    /// Anything else (malformed answers).
    Other,
}

/// A failed registry request, naming the registry and the image.
#[derive(Debug, Clone, thiserror::Error)]
#[error("registry {registry}: {what} for {image}: {detail}")]
pub struct RegistryError {
    /// Registry host.
    pub registry: String,
    /// The image asked about.
    pub image: String,
    /// Classification.
    pub kind: RegistryErrorKind,
    /// Short description of the kind.
    pub what: &'static str,
    /// Details from the client (never credentials).
    pub detail: String,
    /// How long the registry asked to be left alone (`Retry-After` of a 429 or 503).
    pub retry_after: Option<Duration>,
}

impl RegistryError {
    /// An error about `image` at its registry (no `Retry-After`).
    pub fn new(
        image: &ImageRef,
        kind: RegistryErrorKind,
        what: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            registry: image.registry().to_owned(),
            image: image.to_string(),
            kind,
            what,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// The registry could not be reached or failed on its side (unreachable, its token
    /// service down, 5xx): not a refusal (401/403), not an absence (404), not a TLS mismatch.
    pub fn is_down(&self) -> bool {
        matches!(
            self.kind,
            RegistryErrorKind::Unreachable
                | RegistryErrorKind::TokenService
                | RegistryErrorKind::Server
        )
    }

    /// The `reason` label of metrics: `not_found`, `unauthorized`, `unreachable`, `tls`,
    /// `token_service`, `server` or `other`.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            RegistryErrorKind::NotFound => "not_found",
            RegistryErrorKind::Unauthorized => "unauthorized",
            RegistryErrorKind::Unreachable => "unreachable",
            RegistryErrorKind::Tls => "tls",
            RegistryErrorKind::TokenService => "token_service",
            RegistryErrorKind::Server => "server",
            RegistryErrorKind::Other => "other",
        }
    }

    /// Whether a retry may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.kind,
            RegistryErrorKind::Unreachable
                | RegistryErrorKind::Server
                | RegistryErrorKind::TokenService
        )
    }
}

/// The parts of the OCI distribution API cimage needs.
#[async_trait]
pub trait Registry: Send + Sync {
    /// Resolves a reference to its manifest digest (`sha256:…`) with a HEAD request. For a
    /// multi-platform image this is the index digest, as the runtime records it.
    async fn resolve(
        &self,
        image: &ImageRef,
        credentials: Option<&Credentials>,
    ) -> Result<String, RegistryError>;

    /// The image's manifest for this host's platform: its config and layer blobs as stored
    /// (compressed). Their sum is the same measure the runtime reports for images; the layers
    /// are what a pull downloads.
    async fn manifest(
        &self,
        image: &ImageRef,
        credentials: Option<&Credentials>,
    ) -> Result<ImageManifest, RegistryError>;
}

/// One blob a manifest names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// `sha256:…`.
    pub digest: String,
    /// Bytes as stored (compressed).
    pub size: u64,
}

/// What a pull of an image downloads: its config and its layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageManifest {
    /// The image config blob.
    pub config: Blob,
    /// The layer blobs, bottom first.
    pub layers: Vec<Blob>,
}

impl ImageManifest {
    /// Config and layers: the image's size as the runtime counts it.
    pub fn size(&self) -> u64 {
        self.config.size + self.layer_bytes()
    }

    /// The layers' bytes: what a cold pull downloads, apart from the small config.
    pub fn layer_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// How cimage talks to one registry host (from `ImageCache.Registries.<host>`).
#[derive(Debug, Clone, Default)]
pub struct HostSettings {
    /// Plain HTTP instead of HTTPS (test and air-gapped setups only).
    pub insecure: bool,
    /// PEM file of a CA trusted for this host only, besides the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Mirror hosts tried in order, before this host, to resolve tags.
    pub mirrors: Vec<String>,
}

/// Why the registry side could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A host's `CaFile` could not be read.
    #[error("ImageCache.Registries.{host}.CaFile {}: {source}", path.display())]
    CaUnreadable {
        /// The registry host.
        host: String,
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A host's `CaFile` holds no PEM certificate.
    #[error("ImageCache.Registries.{host}.CaFile {} holds no PEM certificate", path.display())]
    CaNotPem {
        /// The registry host.
        host: String,
        /// The file.
        path: std::path::PathBuf,
    },
}

/// [`Registry`] over oci-client.
///
/// Each registry host gets a client of its own, configured with its settings (plain HTTP for
/// `Insecure`, its `CaFile` as an extra root), so one registry's CA is never trusted for another.
/// Anonymous requests share the host's client. A client remembers the first credentials it saw
/// for a registry, so requests with credentials each get a fresh client: one tenant's credentials
/// must never be used for another's request.
pub struct OciRegistry {
    hosts: BTreeMap<String, HostSettings>,
    cas: BTreeMap<String, Vec<u8>>,
    anonymous: std::sync::Mutex<std::collections::HashMap<String, oci_client::Client>>,
    /// Clients for credentialed requests, one per (host, credentials), so that bearer tokens
    /// are reused until they expire. Keyed by a hash salted per process; never persisted.
    credentialed: std::sync::Mutex<std::collections::HashMap<(String, String), oci_client::Client>>,
    salt: [u8; 16],
    /// The HTTP client of cimage's own manifest requests, one per host (its TLS roots).
    http: Mutex<HashMap<String, reqwest::Client>>,
    /// `Authorization` values for manifest requests, per (host, credentials key, repository),
    /// with when they were obtained. In memory only.
    authorizations: Mutex<AuthorizationCache>,
}

/// `Authorization` values by (host, credentials key, repository), with when each was obtained.
type AuthorizationCache = HashMap<(String, String, String), (Option<String>, Instant)>;

/// How long an `Authorization` value is reused (registry tokens last at least 60 s).
const AUTHORIZATION_TTL: Duration = Duration::from_secs(50);
/// `Authorization` values kept at most (the map is cleared when full).
const MAX_AUTHORIZATIONS: usize = 1024;

/// Registry hosts whose clients are kept at most (the maps are cleared when full): the hosts
/// come from requests, so a caller naming ever new registries must not grow the daemon. A
/// host's two clients (the token step's and the manifest requests') hold about 230 KiB (TLS
/// roots, pools), and a node talks to a handful of registries and mirrors.
const MAX_HOSTS: usize = 32;

/// Credentialed clients kept at most (the map is cleared when full).
const MAX_CREDENTIALED_CLIENTS: usize = 256;

impl OciRegistry {
    /// Builds the registry side from the per-registry settings; fails when a `CaFile` cannot be
    /// read or holds no PEM certificate.
    pub fn new(registries: &BTreeMap<String, HostSettings>) -> Result<Self, SetupError> {
        let mut cas = BTreeMap::new();
        for (host, r) in registries {
            if let Some(path) = &r.ca_file {
                let pem = std::fs::read(path).map_err(|source| SetupError::CaUnreadable {
                    host: host.clone(),
                    path: path.clone(),
                    source,
                })?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(SetupError::CaNotPem {
                        host: host.clone(),
                        path: path.clone(),
                    });
                }
                cas.insert(host.clone(), pem);
            }
        }
        Ok(Self {
            hosts: registries.clone(),
            cas,
            anonymous: Default::default(),
            credentialed: Default::default(),
            salt: rand::random(),
            http: Default::default(),
            authorizations: Default::default(),
        })
    }

    fn client_config(&self, host: &str) -> ClientConfig {
        let insecure = self.hosts.get(host).is_some_and(|r| r.insecure);
        ClientConfig {
            protocol: if insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates: self
                .cas
                .get(host)
                .map(|pem| {
                    vec![oci_client::client::Certificate {
                        encoding: oci_client::client::CertificateEncoding::Pem,
                        data: pem.clone(),
                    }]
                })
                .unwrap_or_default(),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(30)),
            ..ClientConfig::default()
        }
    }

    fn credentials_key(&self, host: &str, c: &Credentials) -> (String, String) {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.salt);
        for part in [c.username.as_bytes(), c.password.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        (host.to_owned(), format!("{:x}", h.finalize()))
    }

    /// The host's shared anonymous client, or the client for these credentials (for the
    /// token step).
    fn client_for(
        &self,
        host: &str,
        credentials: Option<&Credentials>,
    ) -> (oci_client::Client, RegistryAuth) {
        match credentials {
            None => {
                let mut m = self.anonymous.lock().unwrap();
                let c = match m.get(host) {
                    Some(c) => c.clone(),
                    None => {
                        let c = oci_client::Client::new(self.client_config(host));
                        insert_bounded(&mut m, MAX_HOSTS, host.to_owned(), c.clone());
                        c
                    }
                };
                (c, RegistryAuth::Anonymous)
            }
            Some(c) => {
                let auth = match c.kind {
                    SecretKind::RegistryToken => RegistryAuth::Bearer(c.password.clone()),
                    // An identity token never gets here (the runtime exchanges it).
                    SecretKind::Password | SecretKind::IdentityToken => {
                        RegistryAuth::Basic(c.username.clone(), c.password.clone())
                    }
                };
                let key = self.credentials_key(host, c);
                let mut m = self.credentialed.lock().unwrap();
                if let Some(client) = m.get(&key) {
                    return (client.clone(), auth);
                }
                let client = oci_client::Client::new(self.client_config(host));
                insert_bounded(&mut m, MAX_CREDENTIALED_CLIENTS, key, client.clone());
                (client, auth)
            }
        }
    }

    fn forget_client(&self, host: &str, credentials: Option<&Credentials>) {
        if let Some(c) = credentials {
            let key = self.credentials_key(host, c);
            self.credentialed.lock().unwrap().remove(&key);
        }
    }

    /// The HTTP client for `host`, made on first use with the host's CA.
    fn http_for(&self, image: &ImageRef, host: &str) -> Result<reqwest::Client, RegistryError> {
        let mut m = self.http.lock().unwrap();
        if let Some(c) = m.get(host) {
            return Ok(c.clone());
        }
        let c = http::client(self.cas.get(host).map(Vec::as_slice)).map_err(|e| {
            RegistryError::new(
                image,
                RegistryErrorKind::Tls,
                "TLS setup failed",
                error_chain(&e),
            )
        })?;
        insert_bounded(&mut m, MAX_HOSTS, host.to_owned(), c.clone());
        Ok(c)
    }

    /// The `Authorization` value for manifest requests of `image` at `host` with these
    /// credentials: a bearer token from the registry's token step (done by oci-client), the
    /// credentials themselves for a registry that takes basic auth, or none. Reused for
    /// [`AUTHORIZATION_TTL`] unless `refresh`.
    async fn authorization(
        &self,
        image: &ImageRef,
        host: &str,
        credentials: Option<&Credentials>,
        refresh: bool,
    ) -> Result<Option<String>, RegistryError> {
        let at = image.to_oci_at(host);
        let who = credentials
            .map(|c| self.credentials_key(host, c).1)
            .unwrap_or_default();
        let key = (host.to_owned(), who, at.repository().to_owned());
        if !refresh {
            if let Some((v, when)) = self.authorizations.lock().unwrap().get(&key) {
                if when.elapsed() < AUTHORIZATION_TTL {
                    return Ok(v.clone());
                }
            }
        }
        let (client, auth) = self.client_for(host, credentials);
        let token = client
            .auth(&at, &auth, oci_client::RegistryOperation::Pull)
            .await
            .map_err(|e| {
                self.forget_client(host, credentials);
                Self::classify_token_step(image, host, e)
            })?;
        let value = match (token, &auth) {
            (Some(t), _) => Some(format!("Bearer {t}")),
            (None, RegistryAuth::Bearer(t)) => Some(format!("Bearer {t}")),
            (None, RegistryAuth::Basic(user, password)) => {
                use base64::Engine;
                let pair = format!("{user}:{password}");
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ))
            }
            (None, RegistryAuth::Anonymous) => None,
        };
        insert_bounded(
            &mut self.authorizations.lock().unwrap(),
            MAX_AUTHORIZATIONS,
            key,
            (value.clone(), Instant::now()),
        );
        Ok(value)
    }

    /// One manifest of `image` at `host` by `reference` (tag or digest): HEAD, or GET for its
    /// bytes. A refused token is renewed once.
    async fn fetch(
        &self,
        image: &ImageRef,
        host: &str,
        credentials: Option<&Credentials>,
        reference: &str,
        head: bool,
    ) -> Result<(Option<String>, Vec<u8>), RegistryError> {
        let at = image.to_oci_at(host);
        let insecure = self.hosts.get(host).is_some_and(|r| r.insecure);
        let url = format!(
            "{}://{}/v2/{}/manifests/{reference}",
            if insecure { "http" } else { "https" },
            at.resolve_registry(),
            at.repository()
        );
        let client = self.http_for(image, host)?;
        for attempt in 0..2 {
            let authorization = self
                .authorization(image, host, credentials, attempt > 0)
                .await?;
            let answer = http::manifest(&client, &url, head, authorization.as_deref())
                .await
                .map_err(|f| Self::failed(image, f))?;
            match answer {
                http::Answer::Found { digest, body } => {
                    // What was asked by digest must be what came (a registry on plain HTTP,
                    // or a mirror, could send anything).
                    if !head {
                        if let Some(want) = reference.strip_prefix("sha256:") {
                            use sha2::{Digest, Sha256};
                            let got = format!("{:x}", Sha256::digest(&body));
                            if got != want {
                                return Err(RegistryError::new(
                                    image,
                                    RegistryErrorKind::Other,
                                    "manifest does not match its digest",
                                    format!("asked for sha256:{want}, got sha256:{got}"),
                                ));
                            }
                        }
                    }
                    return Ok((digest, body));
                }
                http::Answer::Status { code: 401, .. } if attempt == 0 => continue,
                http::Answer::Status {
                    code,
                    retry_after,
                    body,
                } => {
                    if matches!(code, 401 | 403) {
                        self.forget_client(host, credentials);
                    }
                    return Err(Self::refused(image, code, retry_after, body));
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// A manifest request that got no answer.
    fn failed(image: &ImageRef, f: http::Failure) -> RegistryError {
        use RegistryErrorKind::*;
        let (kind, what, detail) = match f {
            http::Failure::TooLarge(n) => (
                Other,
                "manifest too large",
                format!(
                    "{n} bytes or more, over the {} MiB limit",
                    http::MAX_MANIFEST >> 20
                ),
            ),
            http::Failure::Request(e) => {
                let chain = error_chain(&e);
                let (kind, what) = if e.is_redirect() {
                    (Other, "too many redirects (a redirect loop)")
                } else if chain.contains("certificate") || chain.contains("tls") {
                    (Tls, "TLS verification failed")
                } else if e.is_timeout() {
                    (Unreachable, "timed out")
                } else if e.is_connect() {
                    (Unreachable, "unreachable")
                } else {
                    (Unreachable, "request failed")
                };
                (kind, what, chain)
            }
        };
        RegistryError::new(image, kind, what, detail)
    }

    /// A manifest request answered with another status than 200.
    fn refused(
        image: &ImageRef,
        code: u16,
        retry_after: Option<Duration>,
        body: String,
    ) -> RegistryError {
        use RegistryErrorKind::*;
        let (kind, what) = match code {
            401 | 403 => (Unauthorized, "access denied (wrong or missing credentials)"),
            404 => (NotFound, "repository or tag not found"),
            429 => (Server, "rate limited"),
            500..=599 => (Server, "registry error"),
            _ => (Other, "unexpected answer"),
        };
        let said: String = body.chars().take(200).collect();
        let mut detail = format!("HTTP {code}");
        if let Some(r) = retry_after {
            detail.push_str(&format!(" (Retry-After {}s)", r.as_secs()));
        }
        if !said.is_empty() {
            detail.push_str(": ");
            detail.push_str(&said);
        }
        RegistryError {
            retry_after,
            ..RegistryError::new(image, kind, what, detail)
        }
    }

    /// A manifest's bytes as JSON, or an error naming the image.
    fn parse(image: &ImageRef, body: &[u8]) -> Result<serde_json::Value, RegistryError> {
        serde_json::from_slice(body).map_err(|e| {
            RegistryError::new(
                image,
                RegistryErrorKind::Other,
                "malformed manifest",
                e.to_string(),
            )
        })
    }

    /// A failure of the token step: the token service unreachable, or the credentials refused.
    fn classify_token_step(
        image: &ImageRef,
        host: &str,
        err: OciDistributionError,
    ) -> RegistryError {
        if let OciDistributionError::RequestError(e) = &err {
            let elsewhere = e.url().is_some_and(|u| {
                let at = match u.port() {
                    Some(p) => format!("{}:{p}", u.host_str().unwrap_or("")),
                    None => u.host_str().unwrap_or("").to_owned(),
                };
                at != host
            });
            if elsewhere {
                return RegistryError::new(
                    image,
                    RegistryErrorKind::TokenService,
                    "token service unreachable",
                    error_chain(e),
                );
            }
        }
        Self::classify(image, err)
    }

    fn classify(image: &ImageRef, err: OciDistributionError) -> RegistryError {
        use RegistryErrorKind::*;
        let (kind, what) = match &err {
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => {
                (Unauthorized, "access denied (wrong or missing credentials)")
            }
            OciDistributionError::ImageManifestNotFoundError(_) => (NotFound, "not found"),
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<String> = envelope
                    .errors
                    .iter()
                    .map(|e| format!("{:?}", e.code).to_ascii_uppercase())
                    .collect();
                if codes
                    .iter()
                    .any(|c| c.contains("UNAUTHORIZED") || c.contains("DENIED"))
                {
                    (Unauthorized, "access denied (wrong or missing credentials)")
                } else if codes.iter().any(|c| c.contains("UNKNOWN")) {
                    (NotFound, "repository or tag not found")
                } else {
                    (Other, "request refused")
                }
            }
            OciDistributionError::ServerError { code, .. } => match code {
                401 | 403 => (Unauthorized, "access denied (wrong or missing credentials)"),
                404 => (NotFound, "repository or tag not found"),
                429 | 500..=599 => (Server, "registry error"),
                _ => (Other, "unexpected answer"),
            },
            OciDistributionError::RequestError(e) => {
                let chain = error_chain(e);
                if chain.contains("certificate") || chain.contains("tls") {
                    (Tls, "TLS verification failed")
                } else if e.is_connect() || e.is_timeout() {
                    (Unreachable, "unreachable")
                } else {
                    (Unreachable, "request failed")
                }
            }
            _ => (Other, "unexpected answer"),
        };
        let detail = match &err {
            OciDistributionError::RequestError(e) => error_chain(e),
            other => other.to_string(),
        };
        RegistryError::new(image, kind, what, detail)
    }
}

/// Inserts into a map of things made for request-named keys (hosts, credentials), clearing it
/// first when it holds `cap` already: what callers name must not grow the daemon.
fn insert_bounded<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, cap: usize, k: K, v: V) {
    if map.len() >= cap && !map.contains_key(&k) {
        map.clear();
    }
    map.insert(k, v);
}

/// An error and its sources on one line: reqwest's top-level message alone hides the cause.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

/// The tag or digest a reference asks for.
fn wanted(image: &ImageRef) -> String {
    let r = image.to_oci();
    r.digest().or(r.tag()).unwrap_or("latest").to_owned()
}

/// This host's platform as OCI names it (`amd64`, `arm64`, …).
fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[async_trait]
impl Registry for OciRegistry {
    async fn resolve(
        &self,
        image: &ImageRef,
        credentials: Option<&Credentials>,
    ) -> Result<String, RegistryError> {
        let mirrors = self
            .hosts
            .get(image.registry())
            .map(|r| r.mirrors.clone())
            .unwrap_or_default();
        let wanted = wanted(image);
        let registry = image.registry().to_owned();
        for host in mirrors.iter().chain(std::iter::once(&registry)) {
            let found: Result<String, RegistryError> = async {
                let (digest, _) = self.fetch(image, host, credentials, &wanted, true).await?;
                match digest {
                    Some(d) => Ok(d),
                    // No digest header: the digest of the manifest's bytes.
                    None => {
                        use sha2::{Digest, Sha256};
                        let (_, body) =
                            self.fetch(image, host, credentials, &wanted, false).await?;
                        Ok(format!("sha256:{:x}", Sha256::digest(&body)))
                    }
                }
            }
            .await;
            match found {
                Err(e) if host != &registry => {
                    tracing::debug!(mirror = %host, image = %image, "mirror did not resolve, trying the next: {}", e.what);
                }
                other => return other,
            }
        }
        unreachable!("the registry itself is the last host tried")
    }

    async fn manifest(
        &self,
        image: &ImageRef,
        credentials: Option<&Credentials>,
    ) -> Result<ImageManifest, RegistryError> {
        let host = image.registry();
        let (_, body) = self
            .fetch(image, host, credentials, &wanted(image), false)
            .await?;
        let mut m = Self::parse(image, &body)?;
        // A multi-platform image: the manifest of this host's platform.
        if let Some(list) = m["manifests"].as_array() {
            let arch = host_architecture();
            let digest = list
                .iter()
                .find(|d| d["platform"]["os"] == "linux" && d["platform"]["architecture"] == arch)
                .and_then(|d| d["digest"].as_str())
                .ok_or_else(|| {
                    RegistryError::new(
                        image,
                        RegistryErrorKind::NotFound,
                        "no manifest for this platform",
                        format!("the image has none for linux/{arch}"),
                    )
                })?
                .to_owned();
            let (_, body) = self.fetch(image, host, credentials, &digest, false).await?;
            m = Self::parse(image, &body)?;
        }
        let blob = |d: &serde_json::Value| -> Option<Blob> {
            Some(Blob {
                digest: d["digest"].as_str()?.to_owned(),
                size: d["size"].as_u64()?,
            })
        };
        let config = blob(&m["config"]);
        let layers: Option<Vec<Blob>> = m["layers"]
            .as_array()
            .map(|l| l.iter().map(blob).collect::<Option<_>>())
            .unwrap_or(Some(Vec::new()));
        match (config, layers) {
            (Some(config), Some(layers)) => Ok(ImageManifest { config, layers }),
            _ => Err(RegistryError::new(
                image,
                RegistryErrorKind::Other,
                "malformed manifest",
                "no config or layer descriptors with digest and size",
            )),
        }
    }
}

/// A scripted [`Registry`] for unit tests.
#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Answers `resolve` from a table of reference → digest; counts calls.
    #[derive(Default)]
    pub struct FakeRegistry {
        /// reference (normalised string) → manifest digest.
        pub digests: Mutex<HashMap<String, String>>,
        /// When set, every request fails as unreachable.
        pub down: std::sync::atomic::AtomicBool,
        /// Number of `resolve` calls.
        pub resolves: AtomicUsize,
        /// reference → size, for `manifest` (one layer of that size, an empty config).
        pub sizes: Mutex<HashMap<String, u64>>,
        /// Number of `manifest` calls.
        pub size_checks: AtomicUsize,
    }

    impl FakeRegistry {
        /// Sets what `reference` resolves to.
        pub fn set(&self, reference: &str, digest: &str) {
            self.digests
                .lock()
                .unwrap()
                .insert(reference.to_owned(), digest.to_owned());
        }
    }

    #[async_trait]
    impl Registry for FakeRegistry {
        async fn resolve(
            &self,
            image: &ImageRef,
            _credentials: Option<&Credentials>,
        ) -> Result<String, RegistryError> {
            self.resolves.fetch_add(1, Ordering::SeqCst);
            let err = |kind, what| RegistryError::new(image, kind, what, "fake");
            if self.down.load(Ordering::SeqCst) {
                return Err(err(RegistryErrorKind::Unreachable, "unreachable"));
            }
            self.digests
                .lock()
                .unwrap()
                .get(&image.to_string())
                .cloned()
                .ok_or_else(|| err(RegistryErrorKind::NotFound, "repository or tag not found"))
        }

        async fn manifest(
            &self,
            image: &ImageRef,
            _credentials: Option<&Credentials>,
        ) -> Result<ImageManifest, RegistryError> {
            self.size_checks.fetch_add(1, Ordering::SeqCst);
            self.sizes
                .lock()
                .unwrap()
                .get(&image.to_string())
                .map(|&size| ImageManifest {
                    config: Blob {
                        digest: format!("sha256:{:064x}", 0),
                        size: 0,
                    },
                    layers: vec![Blob {
                        digest: format!("sha256:{:064x}", size),
                        size,
                    }],
                })
                .ok_or_else(|| {
                    RegistryError::new(
                        image,
                        RegistryErrorKind::NotFound,
                        "repository or tag not found",
                        "fake",
                    )
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_keyed_by_what_requests_name_stay_bounded() {
        let mut m = HashMap::new();
        for i in 0..10 {
            insert_bounded(&mut m, 3, format!("reg{i}.example"), i);
            assert!(m.len() <= 3);
        }
        // Replacing a key already there keeps the others.
        insert_bounded(&mut m, 3, "reg9.example".to_owned(), 99);
        assert_eq!(m.get("reg9.example"), Some(&99));
    }
}
