//! Blob reads in byte ranges, for cimage's own fetch of big layers: the [`BlobSource`] of
//! [`OciRegistry`].
//!
//! A blob is opened with a GET of its first range at the first host that has it (the
//! registry's mirrors in order, then the registry), with the same `Authorization` as manifest
//! requests. Redirects are followed by hand (blob GETs are often sent on to object storage):
//! the later ranges go straight to where the first one led, and the registry's
//! `Authorization` is never sent to another host. A `206` answer means ranges work; a `200`
//! is the whole blob in one stream, and the fetch takes it as that. A refused token is renewed
//! once per read; a `429`/`503` carries its `Retry-After`.

use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{AUTHORIZATION, CONTENT_RANGE, LOCATION, RANGE, RETRY_AFTER};
use reqwest::Url;

use super::classify::{self, error_chain};
use super::client::OciRegistry;
use super::{Blob, BlobBody, BlobSource, OpenBlob, RangeReader, RegistryError, RegistryErrorKind};
use crate::credentials::Credentials;
use crate::reference::ImageRef;

/// Redirects followed at most for one read.
const MAX_REDIRECTS: usize = 5;

/// One blob being read: where it is read from, with what.
struct Reader {
    registry: OciRegistry,
    image: ImageRef,
    /// The host (mirror or registry) that answered the first range.
    host: String,
    credentials: Option<Credentials>,
    client: reqwest::Client,
    /// The blob's URL at that host.
    origin: Url,
    /// Where the first read was led (the origin, or where its redirects ended).
    target: Mutex<Url>,
    size: u64,
}

/// What one GET answered, after redirects.
enum Got {
    Body(BlobBody),
    Refused(u16, Option<Duration>, String),
}

impl Reader {
    fn fail(&self, kind: RegistryErrorKind, what: &'static str, detail: String) -> RegistryError {
        let mut e = RegistryError::new(&self.image, kind, what, detail);
        e.registry = self.host.clone();
        e
    }

    /// GETs `range` from `from`, following redirects; `authorization` goes only to the
    /// origin's host. Returns the answer and where it came from.
    async fn get(
        &self,
        from: Url,
        range: &Range<u64>,
        authorization: Option<&str>,
    ) -> Result<(Got, Url), RegistryError> {
        let mut url = from;
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.client.get(url.clone());
            if !(range.start == 0 && range.end == self.size) {
                req = req.header(RANGE, format!("bytes={}-{}", range.start, range.end - 1));
            }
            if same_origin(&url, &self.origin) {
                if let Some(a) = authorization {
                    req = req.header(AUTHORIZATION, a);
                }
            }
            let res = req.send().await.map_err(|e| self.request_failed(e))?;
            let code = res.status().as_u16();
            match code {
                301 | 302 | 303 | 307 | 308 => {
                    let to = res
                        .headers()
                        .get(LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|l| url.join(l).ok())
                        .ok_or_else(|| {
                            self.fail(
                                RegistryErrorKind::Other,
                                "redirect without a usable Location",
                                format!("HTTP {code} for a blob read"),
                            )
                        })?;
                    url = to;
                }
                206 => {
                    let start = res
                        .headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(range_start);
                    if start != Some(range.start) {
                        return Err(self.fail(
                            RegistryErrorKind::Other,
                            "a range answered from the wrong offset",
                            format!(
                                "asked bytes from {}, got Content-Range {start:?}",
                                range.start
                            ),
                        ));
                    }
                    return Ok((Got::Body(self.body(res, false)), url));
                }
                200 => return Ok((Got::Body(self.body(res, true)), url)),
                _ => {
                    let retry_after = matches!(code, 429 | 503)
                        .then(|| {
                            res.headers()
                                .get(RETRY_AFTER)?
                                .to_str()
                                .ok()
                                .and_then(super::http::retry_after)
                        })
                        .flatten();
                    let said = res.text().await.unwrap_or_default();
                    let said: String = said.trim().chars().take(200).collect();
                    return Ok((Got::Refused(code, retry_after, said), url));
                }
            }
        }
        Err(self.fail(
            RegistryErrorKind::Other,
            "too many redirects (a redirect loop)",
            format!("more than {MAX_REDIRECTS} for a blob read"),
        ))
    }

    fn request_failed(&self, e: reqwest::Error) -> RegistryError {
        let mut err = classify::failed(&self.image, super::http::Failure::Request(e));
        err.registry = self.host.clone();
        err
    }

    /// The answer's bytes as a stream of chunks.
    fn body(&self, res: reqwest::Response, whole: bool) -> BlobBody {
        let image = self.image.clone();
        let host = self.host.clone();
        let chunks = futures::stream::unfold(Some(res), move |res| {
            let (image, host) = (image.clone(), host.clone());
            async move {
                let mut res = res?;
                match res.chunk().await {
                    Ok(Some(c)) => Some((Ok(c), Some(res))),
                    Ok(None) => None,
                    Err(e) => {
                        let mut err = RegistryError::new(
                            &image,
                            RegistryErrorKind::Unreachable,
                            "blob read broke off",
                            error_chain(&e),
                        );
                        err.registry = host;
                        Some((Err(err), None))
                    }
                }
            }
        });
        BlobBody {
            whole,
            chunks: Box::pin(chunks),
        }
    }

    /// Reads `range`, from where the first read was led; a refused token is renewed once (a
    /// presigned target that refuses is left for the fetch to retry).
    async fn read_range(&self, range: Range<u64>) -> Result<BlobBody, RegistryError> {
        let target = self.target.lock().unwrap().clone();
        for attempt in 0..2 {
            let authorization = match same_origin(&target, &self.origin) {
                true => {
                    self.registry
                        .authorization(
                            &self.image,
                            &self.host,
                            self.credentials.as_ref(),
                            attempt > 0,
                        )
                        .await?
                }
                false => None,
            };
            let (got, _) = self
                .get(target.clone(), &range, authorization.as_deref())
                .await?;
            match got {
                Got::Body(b) => return Ok(b),
                Got::Refused(401, ..) if attempt == 0 && same_origin(&target, &self.origin) => {
                    continue
                }
                Got::Refused(code, retry_after, said) => {
                    let mut e = classify::refused(&self.image, code, retry_after, said);
                    e.registry = self.host.clone();
                    return Err(e);
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }
}

#[async_trait]
impl RangeReader for Reader {
    fn host(&self) -> &str {
        &self.host
    }

    async fn read(&self, range: Range<u64>) -> Result<BlobBody, RegistryError> {
        self.read_range(range).await
    }
}

/// Whether two URLs are on one origin (scheme, host and port): only then does a request
/// carry the registry's `Authorization`.
fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// The first byte of a `Content-Range: bytes a-b/n` value.
fn range_start(v: &str) -> Option<u64> {
    let v = v.trim().strip_prefix("bytes")?.trim_start();
    v.split('-').next()?.trim().parse().ok()
}

impl OciRegistry {
    /// Opens blob `blob` of `image` at `host` with a GET of `first`.
    async fn open_at(
        &self,
        image: &ImageRef,
        host: &str,
        credentials: Option<&Credentials>,
        blob: &Blob,
        first: &Range<u64>,
    ) -> Result<OpenBlob, RegistryError> {
        let at = image.to_oci_at(host);
        let url = format!(
            "{}://{}/v2/{}/blobs/{}",
            if self.is_insecure(host) {
                "http"
            } else {
                "https"
            },
            at.resolve_registry(),
            at.repository(),
            blob.digest
        );
        let origin = Url::parse(&url).map_err(|e| {
            RegistryError::new(
                image,
                RegistryErrorKind::Other,
                "bad blob URL",
                e.to_string(),
            )
        })?;
        let reader = Reader {
            registry: self.clone(),
            image: image.clone(),
            host: host.to_owned(),
            credentials: credentials.cloned(),
            client: self.blob_http_for(image, host)?,
            target: Mutex::new(origin.clone()),
            origin,
            size: blob.size,
        };
        for attempt in 0..2 {
            let authorization = self
                .authorization(image, host, credentials, attempt > 0)
                .await?;
            let (got, led_to) = reader
                .get(reader.origin.clone(), first, authorization.as_deref())
                .await?;
            match got {
                Got::Body(body) => {
                    *reader.target.lock().unwrap() = led_to;
                    return Ok(OpenBlob {
                        reader: std::sync::Arc::new(reader),
                        first: body,
                    });
                }
                Got::Refused(401, ..) if attempt == 0 => continue,
                Got::Refused(code, retry_after, said) => {
                    let mut e = classify::refused(image, code, retry_after, said);
                    e.registry = host.to_owned();
                    return Err(e);
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }
}

#[async_trait]
impl BlobSource for OciRegistry {
    async fn open(
        &self,
        image: &ImageRef,
        blob: &Blob,
        credentials: Option<&Credentials>,
        first: Range<u64>,
    ) -> Result<OpenBlob, RegistryError> {
        let registry = image.registry();
        for host in &self.hosts_of(image) {
            match self.open_at(image, host, credentials, blob, &first).await {
                Err(e) if host != registry => {
                    tracing::debug!(mirror = %host, image = %image, digest = %blob.digest, "mirror did not give the blob, trying the next: {}", e.what);
                }
                other => return other,
            }
        }
        unreachable!("the registry itself is the last host tried")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_stays_on_its_origin() {
        let o = Url::parse("https://reg.example:5000/v2/a/blobs/sha256:1").unwrap();
        assert!(same_origin(
            &o,
            &Url::parse("https://reg.example:5000/other").unwrap()
        ));
        assert!(!same_origin(
            &o,
            &Url::parse("https://reg.example/x").unwrap()
        ));
        assert!(!same_origin(
            &o,
            &Url::parse("http://reg.example:5000/x").unwrap()
        ));
        assert!(!same_origin(
            &o,
            &Url::parse("https://s3.example:5000/x").unwrap()
        ));
        let d = Url::parse("https://hub.example/x").unwrap();
        assert!(same_origin(
            &d,
            &Url::parse("https://hub.example:443/y").unwrap()
        ));
    }

    #[test]
    fn content_range_gives_its_start() {
        assert_eq!(range_start("bytes 100-199/1000"), Some(100));
        assert_eq!(range_start(" bytes 0-0/*"), Some(0));
        assert_eq!(range_start("items 1-2/3"), None);
    }
}
