//! What a failed registry request means: each failure of a manifest request or of the token
//! step becomes a [`RegistryError`] of one kind (refused, absent, down, TLS, …) with the
//! registry's own words, never a credential.

use std::time::Duration;

use oci_client::errors::OciDistributionError;

use super::http;
use super::{RegistryError, RegistryErrorKind};
use crate::reference::ImageRef;

/// A manifest request that got no answer.
pub(super) fn failed(image: &ImageRef, f: http::Failure) -> RegistryError {
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
pub(super) fn refused(
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
pub(super) fn parse(image: &ImageRef, body: &[u8]) -> Result<serde_json::Value, RegistryError> {
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
pub(super) fn classify_token_step(
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
    classify(image, err)
}

pub(super) fn classify(image: &ImageRef, err: OciDistributionError) -> RegistryError {
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

/// An error and its sources on one line: reqwest's top-level message alone hides the cause.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
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
