//! The pull decision, as pure functions over what the runtime holds.
//!
//! | policy        | image present                                      | image absent          |
//! |---------------|----------------------------------------------------|-----------------------|
//! | Never         | use it                                             | error, nothing contacted |
//! | IfNotPresent  | use it                                             | pull                  |
//! | Always        | HEAD the tag; same digest → use it, else pull      | pull                  |
//! | unset         | `ImageCache.DefaultPullPolicy`: IfNotPresent (default), Always, or ByTag (Always for `:latest`/untagged, IfNotPresent otherwise) ||
//!
//! A `@sha256:` reference is immutable: present means current, so it is never re-pulled.
//!
//! Credentials (as Kubernetes KEP-2535): an image first pulled with credentials is served to a
//! request only if that request's credential fingerprint was recorded for it, or its registry
//! confirms the request's credentials can read it; otherwise the request is treated as if the
//! image were absent. See [`access`].

use std::fmt;
use std::str::FromStr;

use crate::reference::ImageRef;

/// When to contact the registry for an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PullPolicy {
    /// Check the registry every time; pull when the tag moved.
    Always,
    /// Pull only when the runtime does not have the image.
    IfNotPresent,
    /// Never pull; fail when the runtime does not have the image.
    Never,
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        })
    }
}

/// A policy name that is none of those known (`--policy`, the API's string forms).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnknownPolicy {
    /// Not a pull policy.
    #[error("unknown pull policy {0:?} (expected Always, IfNotPresent or Never)")]
    Pull(String),
    /// Not a default pull policy.
    #[error("unknown default pull policy {0:?} (expected IfNotPresent, Always or ByTag)")]
    Default(String),
}

impl FromStr for PullPolicy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, UnknownPolicy> {
        match s.to_ascii_lowercase().as_str() {
            "always" => Ok(Self::Always),
            "ifnotpresent" => Ok(Self::IfNotPresent),
            "never" => Ok(Self::Never),
            _ => Err(UnknownPolicy::Pull(crate::units::quote_short(s))),
        }
    }
}

/// The policy for requests that name none (`ImageCache.DefaultPullPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultPolicy {
    /// IfNotPresent for every reference: CraneSched's default.
    #[default]
    IfNotPresent,
    /// Always for every tag.
    Always,
    /// Kubernetes' convention: Always for `:latest` or untagged references, IfNotPresent for
    /// other tags.
    ByTag,
}

impl FromStr for DefaultPolicy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, UnknownPolicy> {
        match s.to_ascii_lowercase().as_str() {
            "ifnotpresent" => Ok(Self::IfNotPresent),
            "always" => Ok(Self::Always),
            "bytag" => Ok(Self::ByTag),
            _ => Err(UnknownPolicy::Default(crate::units::quote_short(s))),
        }
    }
}

/// The policy that applies to a request: the one it names, else the node's default. A digest
/// reference is immutable whatever the policy (see [`decide`]).
pub fn effective(
    requested: Option<PullPolicy>,
    image: &ImageRef,
    default: DefaultPolicy,
) -> PullPolicy {
    requested.unwrap_or(match default {
        DefaultPolicy::IfNotPresent => PullPolicy::IfNotPresent,
        DefaultPolicy::Always => PullPolicy::Always,
        DefaultPolicy::ByTag if image.is_latest() => PullPolicy::Always,
        DefaultPolicy::ByTag => PullPolicy::IfNotPresent,
    })
}

/// What to do about an image. `T` is the runtime's copy, carried by the decisions that use it,
/// so no caller has to assume it is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<T> {
    /// Serve the runtime's copy (subject to the credential rule); the registry is not contacted
    /// for freshness.
    UseCached(T),
    /// Call the runtime's PullImage.
    Pull,
    /// Ask the registry for the tag's digest; [`is_current`] then says whether the copy serves.
    Resolve(T),
    /// Fail: the image is absent and the policy forbids pulling.
    NotPresent,
}

/// Decides from the policy and the runtime's copy of the image, if it has one.
pub fn decide<T>(policy: PullPolicy, image: &ImageRef, present: Option<T>) -> Decision<T> {
    match (policy, present) {
        (PullPolicy::Never, None) => Decision::NotPresent,
        (_, None) => Decision::Pull,
        (PullPolicy::Always, Some(c)) if image.digest().is_none() => Decision::Resolve(c),
        (_, Some(c)) => Decision::UseCached(c),
    }
}

/// After a [`Decision::Resolve`]: the cached copy is current when the registry's digest for the
/// tag is one of the digests the runtime recorded for this repository.
pub fn is_current(image: &ImageRef, cached_repo_digests: &[String], resolved: &str) -> bool {
    let name = image.name();
    cached_repo_digests
        .iter()
        .filter_map(|rd| rd.split_once('@'))
        .any(|(n, d)| n == name && d == resolved)
}

/// When a cached image needs the request to prove access (`ImageCache.Auth.Verify`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Only images first pulled with credentials (the default).
    #[default]
    IfPulledWithCredentials,
    /// Every image, anonymous ones included (anonymous requests prove access anonymously).
    Always,
    /// Never: every cached image is served to every request.
    Never,
}

/// Whether a request may have a cached image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Serve it.
    Granted,
    /// Ask the registry with the request's credentials first.
    CheckWithRegistry,
}

/// The credential rule for a cached image: `credentialed` and `fingerprints` from its index
/// record, `request` the request's credential fingerprint (`None`: anonymous).
pub fn access(
    credentialed: bool,
    fingerprints: &[String],
    request: Option<&str>,
    verify: Verify,
) -> Access {
    let needs_proof = match verify {
        Verify::Never => false,
        Verify::IfPulledWithCredentials => credentialed,
        Verify::Always => true,
    };
    let known = request.is_some_and(|fp| fingerprints.iter().any(|f| f == fp));
    if !needs_proof || known {
        Access::Granted
    } else {
        Access::CheckWithRegistry
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::*;

    #[test]
    fn the_credential_rule() {
        let fps = vec!["fp-alice".to_string()];
        use Verify::*;
        for (credentialed, request, verify, want) in [
            (false, None, IfPulledWithCredentials, Access::Granted),
            (
                true,
                Some("fp-alice"),
                IfPulledWithCredentials,
                Access::Granted,
            ),
            (
                true,
                Some("fp-bob"),
                IfPulledWithCredentials,
                Access::CheckWithRegistry,
            ),
            (
                true,
                None,
                IfPulledWithCredentials,
                Access::CheckWithRegistry,
            ),
            (false, None, Always, Access::CheckWithRegistry),
            (false, Some("fp-alice"), Always, Access::Granted),
            (true, None, Never, Access::Granted),
        ] {
            assert_eq!(
                access(credentialed, &fps, request, verify),
                want,
                "{credentialed} {request:?} {verify:?}"
            );
        }
    }
    use PullPolicy::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn r(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn the_policy_table() {
        let tagged = r("127.0.0.1:5000/app:1");
        let digest = r(&format!("127.0.0.1:5000/app@{D}"));
        for (policy, image, present, want) in [
            (Never, &tagged, true, UseCached(())),
            (Never, &tagged, false, NotPresent),
            (Never, &digest, false, NotPresent),
            (IfNotPresent, &tagged, true, UseCached(())),
            (IfNotPresent, &tagged, false, Pull),
            (Always, &tagged, true, Resolve(())),
            (Always, &tagged, false, Pull),
            // A digest names immutable content: present means current under every policy.
            (Always, &digest, true, UseCached(())),
            (Always, &digest, false, Pull),
            (IfNotPresent, &digest, true, UseCached(())),
        ] {
            assert_eq!(
                decide(policy, image, present.then_some(())),
                want,
                "{policy} {image} {present}"
            );
        }
    }

    #[test]
    fn default_policy_by_tag() {
        for (image, want) in [
            ("busybox", Always),
            ("busybox:latest", Always),
            ("127.0.0.1:5000/app", Always),
            ("127.0.0.1:5000/app:latest", Always),
            ("127.0.0.1:5000/app:1", IfNotPresent),
            ("127.0.0.1:5000/latest:1", IfNotPresent),
        ] {
            assert_eq!(
                effective(None, &r(image), DefaultPolicy::ByTag),
                want,
                "{image}"
            );
            assert_eq!(
                effective(None, &r(image), DefaultPolicy::IfNotPresent),
                IfNotPresent,
                "{image}"
            );
            assert_eq!(effective(None, &r(image), DefaultPolicy::Always), Always);
        }
        let d = r(&format!("127.0.0.1:5000/app@{D}"));
        assert_eq!(effective(None, &d, DefaultPolicy::ByTag), IfNotPresent);
        for default in [
            DefaultPolicy::IfNotPresent,
            DefaultPolicy::Always,
            DefaultPolicy::ByTag,
        ] {
            assert_eq!(effective(Some(Never), &r("busybox"), default), Never);
        }
        assert_eq!("bytag".parse(), Ok(DefaultPolicy::ByTag));
        assert!("sometimes".parse::<DefaultPolicy>().is_err());
    }

    #[test]
    fn always_uses_cache_only_when_digest_unchanged() {
        let image = r("127.0.0.1:5000/app:1");
        let cached = vec![
            "127.0.0.1:5000/other@sha256:bb".to_string(),
            "127.0.0.1:5000/app@sha256:aa".to_string(),
        ];
        assert!(is_current(&image, &cached, "sha256:aa"));
        assert!(!is_current(&image, &cached, "sha256:cc"));
        // The same digest under another repository does not make this tag current.
        assert!(!is_current(&image, &cached, "sha256:bb"));
        assert!(!is_current(&image, &[], "sha256:aa"));
    }

    #[test]
    fn policy_names_parse_case_insensitively() {
        assert_eq!("Always".parse::<PullPolicy>().unwrap(), Always);
        assert_eq!("ifnotpresent".parse::<PullPolicy>().unwrap(), IfNotPresent);
        assert_eq!("NEVER".parse::<PullPolicy>().unwrap(), Never);
        assert!("sometimes"
            .parse::<PullPolicy>()
            .unwrap_err()
            .to_string()
            .contains("Always"));
    }
}
