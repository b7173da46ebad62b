//! cimage's own manifest requests: a HEAD to resolve a tag, a GET to read what a pull will
//! download; a blob's HEAD, for its real length; and the client of blob range reads. They are made with reqwest directly (oci-client does the token step) so that each
//! has an overall time limit and a size cap (a registry that answers a 100 MB manifest, or
//! trickles one byte a second, costs cimage nothing), and so that a rate limit's `Retry-After`
//! is seen.

use std::time::Duration;

use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, RETRY_AFTER};

/// Largest manifest read (containerd refuses larger ones too).
pub(super) const MAX_MANIFEST: u64 = 4 << 20;
/// Longest a manifest request may take in all, redirects and body included.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Redirects followed at most.
const MAX_REDIRECTS: usize = 5;

/// The manifest media types cimage reads, most specific last.
pub(super) const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// What a registry answered to a manifest request.
#[derive(Debug)]
pub(super) enum Answer {
    /// 200: the manifest's digest header, (for a GET) its bytes, and the announced length.
    Found {
        digest: Option<String>,
        body: Vec<u8>,
        length: Option<u64>,
    },
    /// Any other status: its code, the registry's `Retry-After` (for 429 and 503), and the
    /// start of its body.
    Status {
        code: u16,
        retry_after: Option<Duration>,
        body: String,
    },
}

/// Why a request got no answer: the connection, TLS, a timeout, a redirect loop, or a manifest
/// over the cap.
#[derive(Debug)]
pub(super) enum Failure {
    /// reqwest's error (connect, TLS, timeout, redirects).
    Request(reqwest::Error),
    /// The manifest is larger than [`MAX_MANIFEST`] (as announced or as read).
    TooLarge(u64),
}

/// A client for one registry host: its TLS roots, time limits and redirect limit.
pub(super) fn client(extra_root_pem: Option<&[u8]>) -> Result<reqwest::Client, reqwest::Error> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
        .user_agent(concat!("cimage/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = extra_root_pem {
        b = b.tls_certs_merge(reqwest::Certificate::from_pem_bundle(pem)?);
    }
    b.build()
}

/// The HTTP client of blob reads for one host: its CA, no overall time limit (a range takes
/// as long as it takes; the fetch cuts a read whose bytes stop), redirects left to the reader.
pub(super) fn blob_client(
    extra_root_pem: Option<&[u8]>,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(120))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("cimage/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = extra_root_pem {
        b = b.tls_certs_merge(reqwest::Certificate::from_pem_bundle(pem)?);
    }
    b.build()
}

/// One manifest request (`head`: HEAD, else GET) with an optional `Authorization` value.
pub(super) async fn manifest(
    client: &reqwest::Client,
    url: &str,
    head: bool,
    authorization: Option<&str>,
) -> Result<Answer, Failure> {
    let mut req = if head {
        client.head(url)
    } else {
        client.get(url)
    };
    req = req.header(ACCEPT, MANIFEST_TYPES);
    if let Some(a) = authorization {
        req = req.header(AUTHORIZATION, a);
    }
    let mut res = req.send().await.map_err(Failure::Request)?;
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    if let Some(n) = announced(&headers).filter(|n| *n > MAX_MANIFEST) {
        if status == 200 {
            return Err(Failure::TooLarge(n));
        }
    }
    // Error bodies are read up to a few KiB only; a manifest up to the cap.
    let cap = if status == 200 { MAX_MANIFEST } else { 4 << 10 };
    let mut body = Vec::new();
    if !head {
        while let Some(chunk) = res.chunk().await.map_err(Failure::Request)? {
            if (body.len() + chunk.len()) as u64 > cap {
                if status == 200 {
                    return Err(Failure::TooLarge(body.len() as u64 + chunk.len() as u64));
                }
                break;
            }
            body.extend_from_slice(&chunk);
        }
    }
    if status == 200 {
        return Ok(Answer::Found {
            digest: header(&headers, "docker-content-digest"),
            body,
            length: announced(&headers),
        });
    }
    Ok(Answer::Status {
        code: status,
        retry_after: matches!(status, 429 | 503)
            .then(|| {
                headers
                    .get(RETRY_AFTER)?
                    .to_str()
                    .ok()
                    .and_then(retry_after)
            })
            .flatten(),
        body: String::from_utf8_lossy(&body).trim().to_owned(),
    })
}

/// A blob's HEAD (redirects followed) with an optional `Authorization` value: its length is
/// the `Content-Length` of the answer.
pub(super) async fn blob(
    client: &reqwest::Client,
    url: &str,
    authorization: Option<&str>,
) -> Result<Answer, Failure> {
    let mut req = client.head(url);
    if let Some(a) = authorization {
        req = req.header(AUTHORIZATION, a);
    }
    let res = req.send().await.map_err(Failure::Request)?;
    let status = res.status().as_u16();
    let headers = res.headers();
    if status == 200 {
        return Ok(Answer::Found {
            digest: header(headers, "docker-content-digest"),
            body: Vec::new(),
            length: announced(headers),
        });
    }
    Ok(Answer::Status {
        code: status,
        retry_after: None,
        body: String::new(),
    })
}

fn announced(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    Some(h.get(name)?.to_str().ok()?.trim().to_owned())
}

/// A `Retry-After` value: seconds, or an HTTP date (the wait until then).
pub(super) fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let wait = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
    Some(Duration::from_millis(wait.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let d = retry_after(&soon).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        assert_eq!(retry_after("soon"), None);
    }
}
