//! Image references, normalised the way CRI runtimes name images
//! (`busybox` → `docker.io/library/busybox:latest`), so that the index, the runtime and the
//! registry all speak of an image by the same string.

use std::fmt;

/// A parsed, normalised image reference: `registry/repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
    /// Whether the input named a tag explicitly (`busybox` and `busybox:latest` both pull
    /// `latest`, but only the second was asked for by tag).
    explicit_tag: bool,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct InvalidReference {
    /// What was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ImageRef {
    /// Parses and normalises a reference. Rejects empty, malformed, upper-case and
    /// whitespace-containing input before anything is contacted.
    pub fn parse(input: &str) -> Result<Self, InvalidReference> {
        let bad = |reason: &str| InvalidReference {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        if input.trim().is_empty() {
            return Err(bad("empty reference"));
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace"));
        }
        if input.contains("://") {
            return Err(bad(
                "a reference has no URL scheme; write host[:port]/repository[:tag]",
            ));
        }
        let parsed: oci_client::Reference = input
            .parse()
            .map_err(|e: oci_client::ParseError| bad(&e.to_string()))?;
        let digest = parsed.digest().map(str::to_owned);
        let name_part = input.split('@').next().unwrap_or(input);
        let last_component = name_part.rsplit('/').next().unwrap_or(name_part);
        let explicit_tag = last_component.contains(':');
        // A digest reference without a tag keeps no tag: the digest alone names the image.
        let tag = if digest.is_some() && !explicit_tag {
            None
        } else {
            parsed.tag().map(str::to_owned)
        };
        Ok(Self {
            registry: parsed.registry().to_owned(),
            repository: parsed.repository().to_owned(),
            tag,
            digest,
            explicit_tag,
        })
    }

    /// Registry host, e.g. `docker.io` or `127.0.0.1:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Repository path within the registry, e.g. `library/busybox`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// `registry/repository`: the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The tag, if the reference has one (`latest` when none was written and there is no digest).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest (`sha256:…`), if the reference pins one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// True for `:latest` or for a reference written without tag and digest.
    pub fn is_latest(&self) -> bool {
        self.digest.is_none() && (!self.explicit_tag || self.tag.as_deref() == Some("latest"))
    }

    /// The same reference as an oci-client [`oci_client::Reference`].
    pub fn to_oci(&self) -> oci_client::Reference {
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => oci_client::Reference::with_tag_and_digest(
                self.registry.clone(),
                self.repository.clone(),
                t.clone(),
                d.clone(),
            ),
            (None, Some(d)) => oci_client::Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                d.clone(),
            ),
            (t, None) => oci_client::Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                t.clone().unwrap_or_else(|| "latest".into()),
            ),
        }
    }

    /// Finds this repository's manifest digest among a runtime image's `repo_digests`
    /// (entries look like `registry/repository@sha256:…`).
    pub fn digest_in<'a>(&self, repo_digests: &'a [String]) -> Option<&'a str> {
        let name = self.name();
        repo_digests.iter().find_map(|rd| {
            let (n, d) = rd.split_once('@')?;
            (n == name).then_some(d)
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalises_like_the_runtime() {
        for (input, want, latest) in [
            ("busybox", "docker.io/library/busybox:latest", true),
            ("busybox:latest", "docker.io/library/busybox:latest", true),
            ("busybox:1.36", "docker.io/library/busybox:1.36", false),
            ("user/app:2", "docker.io/user/app:2", false),
            ("127.0.0.1:5000/app:1", "127.0.0.1:5000/app:1", false),
            ("127.0.0.1:5000/app", "127.0.0.1:5000/app:latest", true),
            ("localhost/ns/app:v1", "localhost/ns/app:v1", false),
            ("quay.io/org/app:v1", "quay.io/org/app:v1", false),
        ] {
            let r = ImageRef::parse(input).unwrap();
            assert_eq!(r.to_string(), want, "{input}");
            assert_eq!(r.is_latest(), latest, "{input}");
        }
    }

    #[test]
    fn digest_references() {
        let r = ImageRef::parse(&format!("127.0.0.1:5000/app@{D}")).unwrap();
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.tag(), None);
        assert!(!r.is_latest());
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/app@{D}"));
        let r = ImageRef::parse(&format!("127.0.0.1:5000/app:1@{D}")).unwrap();
        assert_eq!(r.tag(), Some("1"));
        assert_eq!(r.digest(), Some(D));
    }

    #[test]
    fn rejects_malformed_input() {
        for bad in [
            "",
            "   ",
            "Busybox",
            "busy box",
            "app:",
            "app@sha256:123",
            "http://127.0.0.1:5000/app",
            "app:bad/tag",
            "-app",
        ] {
            let e = ImageRef::parse(bad).unwrap_err();
            assert!(
                e.to_string().contains("invalid image reference"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn finds_its_digest_among_repo_digests() {
        let r = ImageRef::parse("127.0.0.1:5000/app:1").unwrap();
        let rds = vec![
            format!("127.0.0.1:5000/other@{D}"),
            "127.0.0.1:5000/app@sha256:aa".to_string(),
        ];
        assert_eq!(r.digest_in(&rds), Some("sha256:aa"));
        assert_eq!(r.digest_in(&rds[..1]), None);
    }
}
