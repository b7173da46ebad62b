//! [`OciRegistry`], the real [`Registry`]: one client per registry host with its own TLS
//! roots, clients and `Authorization` values for credentialed requests kept apart per
//! credentials, manifests fetched over reqwest (`http.rs`) after the token step of oci-client,
//! and mirrors tried in order before the registry itself.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;

use super::classify::{self, error_chain};
use super::http;
use super::{
    Blob, HostSettings, ImageManifest, Registry, RegistryError, RegistryErrorKind, SetupError,
};
use crate::credentials::{BoundedMap, Credentials, SecretKind};
use crate::reference::ImageRef;

/// [`Registry`] over reqwest (manifest requests) and oci-client (the token step).
///
/// Each registry host gets clients of its own, configured with its settings (plain HTTP for
/// `Insecure`, its `CaFile` as an extra root), so one registry's CA is never trusted for another.
/// Anonymous requests share the host's token client. An oci-client client remembers the first
/// credentials it saw for a registry, so requests with credentials get a client per (host,
/// credentials), kept (bounded) so that its bearer token is reused and dropped when the
/// registry refuses it: one tenant's credentials are never used for another's request.
#[derive(Clone)]
pub struct OciRegistry(std::sync::Arc<Shared>);

/// What every clone of an [`OciRegistry`] shares (a blob read in ranges holds one).
pub struct Shared {
    hosts: BTreeMap<String, HostSettings>,
    cas: BTreeMap<String, Vec<u8>>,
    anonymous: Mutex<BoundedMap<String, oci_client::Client>>,
    /// Clients for credentialed requests, one per (host, credentials), so that bearer tokens
    /// are reused until they expire. Keyed by a hash salted per process; never persisted.
    credentialed: Mutex<BoundedMap<(String, String), oci_client::Client>>,
    salt: [u8; 16],
    /// The HTTP client of cimage's own manifest requests, one per host (its TLS roots).
    http: Mutex<BoundedMap<String, reqwest::Client>>,
    /// `Authorization` values for manifest requests, per (host, credentials key, repository),
    /// with when they were obtained. In memory only.
    authorizations: Mutex<AuthorizationCache>,
    /// The HTTP client of blob reads, one per host: no overall time limit (a blob takes as
    /// long as it takes; a stalled read is cut by the fetch's own stall timeout).
    blob_http: Mutex<BoundedMap<String, reqwest::Client>>,
}

impl std::ops::Deref for OciRegistry {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// `Authorization` values by (host, credentials key, repository), with when each was obtained.
type AuthorizationCache = BoundedMap<(String, String, String), (Option<String>, Instant)>;

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
        Ok(Self(std::sync::Arc::new(Shared {
            hosts: registries.clone(),
            cas,
            anonymous: Mutex::new(BoundedMap::new(MAX_HOSTS)),
            credentialed: Mutex::new(BoundedMap::new(MAX_CREDENTIALED_CLIENTS)),
            salt: rand::random(),
            http: Mutex::new(BoundedMap::new(MAX_HOSTS)),
            authorizations: Mutex::new(BoundedMap::new(MAX_AUTHORIZATIONS)),
            blob_http: Mutex::new(BoundedMap::new(MAX_HOSTS)),
        })))
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
                let c = match m.get(&host.to_owned()) {
                    Some(c) => c.clone(),
                    None => {
                        let c = oci_client::Client::new(self.client_config(host));
                        m.insert(host.to_owned(), c.clone());
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
                m.insert(key, client.clone());
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
        self.cached_client(&self.http, image, host, http::client)
    }

    /// A client of `clients` for `host`, made by `make` with the host's CA on first use.
    fn cached_client(
        &self,
        clients: &Mutex<BoundedMap<String, reqwest::Client>>,
        image: &ImageRef,
        host: &str,
        make: fn(Option<&[u8]>) -> Result<reqwest::Client, reqwest::Error>,
    ) -> Result<reqwest::Client, RegistryError> {
        let mut m = clients.lock().unwrap();
        if let Some(c) = m.get(&host.to_owned()) {
            return Ok(c.clone());
        }
        let c = make(self.cas.get(host).map(Vec::as_slice)).map_err(|e| {
            RegistryError::new(
                image,
                RegistryErrorKind::Tls,
                "TLS setup failed",
                error_chain(&e),
            )
        })?;
        m.insert(host.to_owned(), c.clone());
        Ok(c)
    }

    /// Whether `host` is spoken to over plain HTTP (`Insecure`).
    pub(super) fn is_insecure(&self, host: &str) -> bool {
        self.hosts.get(host).is_some_and(|r| r.insecure)
    }

    /// The HTTP client of blob reads at `host`, made on first use with the host's CA.
    pub(super) fn blob_http_for(
        &self,
        image: &ImageRef,
        host: &str,
    ) -> Result<reqwest::Client, RegistryError> {
        self.cached_client(&self.blob_http, image, host, http::blob_client)
    }

    /// The `Authorization` value for manifest requests of `image` at `host` with these
    /// credentials: a bearer token from the registry's token step (done by oci-client), the
    /// credentials themselves for a registry that takes basic auth, or none. Reused for
    /// [`AUTHORIZATION_TTL`] unless `refresh`.
    pub(super) async fn authorization(
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
                classify::classify_token_step(image, host, e)
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
        self.authorizations
            .lock()
            .unwrap()
            .insert(key, (value.clone(), Instant::now()));
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
                .map_err(|f| classify::failed(image, f))?;
            match answer {
                http::Answer::Found { digest, body, .. } => {
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
                    return Err(classify::refused(image, code, retry_after, body));
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }
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

impl OciRegistry {
    /// The length of blob `digest` of `image` at `host`, from a HEAD. A refused token is
    /// renewed once.
    async fn blob_length_at(
        &self,
        image: &ImageRef,
        host: &str,
        credentials: Option<&Credentials>,
        digest: &str,
    ) -> Result<u64, RegistryError> {
        let at = image.to_oci_at(host);
        let insecure = self.hosts.get(host).is_some_and(|r| r.insecure);
        let url = format!(
            "{}://{}/v2/{}/blobs/{digest}",
            if insecure { "http" } else { "https" },
            at.resolve_registry(),
            at.repository()
        );
        let client = self.http_for(image, host)?;
        for attempt in 0..2 {
            let authorization = self
                .authorization(image, host, credentials, attempt > 0)
                .await?;
            let answer = http::blob(&client, &url, authorization.as_deref())
                .await
                .map_err(|f| classify::failed(image, f))?;
            match answer {
                http::Answer::Found {
                    length: Some(n), ..
                } => return Ok(n),
                http::Answer::Found { length: None, .. } => {
                    return Err(RegistryError::new(
                        image,
                        RegistryErrorKind::Other,
                        "blob without a length",
                        format!("HEAD of {digest} gave no Content-Length"),
                    ))
                }
                http::Answer::Status { code: 401, .. } if attempt == 0 => continue,
                http::Answer::Status {
                    code,
                    retry_after,
                    body,
                } => return Err(classify::refused(image, code, retry_after, body)),
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// The hosts asked about `image`, in order: its registry's mirrors, then the registry.
    pub(super) fn hosts_of(&self, image: &ImageRef) -> Vec<String> {
        let mut hosts = self
            .hosts
            .get(image.registry())
            .map(|r| r.mirrors.clone())
            .unwrap_or_default();
        hosts.push(image.registry().to_owned());
        hosts
    }

    /// The manifest of `image` for this host's platform, read from `host`.
    async fn manifest_at(
        &self,
        image: &ImageRef,
        host: &str,
        credentials: Option<&Credentials>,
    ) -> Result<ImageManifest, RegistryError> {
        let (_, body) = self
            .fetch(image, host, credentials, &wanted(image), false)
            .await?;
        let mut m = classify::parse(image, &body)?;
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
            m = classify::parse(image, &body)?;
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

#[async_trait]
impl Registry for OciRegistry {
    async fn resolve(
        &self,
        image: &ImageRef,
        credentials: Option<&Credentials>,
    ) -> Result<String, RegistryError> {
        let wanted = wanted(image);
        let registry = image.registry().to_owned();
        for host in &self.hosts_of(image) {
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
        // Where the runtime pulls from: the mirrors first, as for tags.
        let registry = image.registry();
        for host in &self.hosts_of(image) {
            match self.manifest_at(image, host, credentials).await {
                Err(e) if host != registry => {
                    tracing::debug!(mirror = %host, image = %image, "mirror did not give the manifest, trying the next: {}", e.what);
                }
                other => return other,
            }
        }
        unreachable!("the registry itself is the last host tried")
    }

    async fn blob_size(
        &self,
        image: &ImageRef,
        digest: &str,
        credentials: Option<&Credentials>,
    ) -> Result<u64, RegistryError> {
        let registry = image.registry();
        for host in &self.hosts_of(image) {
            match self.blob_length_at(image, host, credentials, digest).await {
                Err(e) if host != registry => {
                    tracing::debug!(mirror = %host, image = %image, "mirror did not give the blob's length, trying the next: {}", e.what);
                }
                other => return other,
            }
        }
        unreachable!("the registry itself is the last host tried")
    }
}
