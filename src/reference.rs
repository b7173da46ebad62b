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

/// Shortest image id prefix a lookup of the node's images accepts (`cimage rm 3f2a1b`): the
/// cache tries it against the ids it holds before reading it as a reference.
pub const MIN_ID_PREFIX: usize = 6;

/// Shortest image id prefix that names a local image everywhere, a pull included: a shorter
/// hex string may be a repository (`docker.io/library/cafe00`) and is read as one.
pub const MIN_LOCAL_ID_PREFIX: usize = 12;

/// How a string names an image by the runtime's id, if it does: the one rule for ids that the
/// puller, the cache's lookups and the CLI's argument checks share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageId<'a> {
    /// `sha256:` and 64 lower-case hex digits: a whole id.
    Full(&'a str),
    /// [`MIN_ID_PREFIX`] to 64 lower-case hex digits: the start of an id.
    Prefix(&'a str),
}

impl<'a> ImageId<'a> {
    /// Reads `s` as an image id or id prefix.
    pub fn parse(s: &'a str) -> Option<Self> {
        let hex = |x: &str| {
            x.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        match s.strip_prefix("sha256:") {
            Some(rest) => (rest.len() == 64 && hex(rest)).then_some(ImageId::Full(s)),
            None => {
                ((MIN_ID_PREFIX..=64).contains(&s.len()) && hex(s)).then_some(ImageId::Prefix(s))
            }
        }
    }

    /// Whether it names a local image outright: a whole id, or a prefix of at least
    /// [`MIN_LOCAL_ID_PREFIX`] digits (shorter ones may be repositories).
    pub fn is_local(self) -> bool {
        match self {
            ImageId::Full(_) => true,
            ImageId::Prefix(p) => p.len() >= MIN_LOCAL_ID_PREFIX,
        }
    }
}

/// Whether `s` names a local image by id rather than a registry reference: `sha256:` and 64
/// hex digits, or an id prefix of 12 to 64 hex digits. Such an image is looked up in the
/// runtime and never pulled; a shorter hex string is an ordinary repository name.
pub fn local_image_id(s: &str) -> Option<&str> {
    ImageId::parse(s).filter(|id| id.is_local()).map(|_| s)
}

/// Longest reference accepted: the name is at most 255 characters; with a tag (128) and a
/// digest this is ample.
pub const MAX_REFERENCE_LEN: usize = 1024;

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct InvalidReference {
    /// What was given (at most 200 characters of it: errors never echo a whole hostile input).
    pub input: String,
    /// What is wrong with it.
    pub reason: Malformed,
}

/// What is wrong with a reference; every piece of the input it quotes is cut to 200 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Nothing but whitespace.
    #[error("empty reference")]
    Empty,
    /// Longer than [`MAX_REFERENCE_LEN`].
    #[error("longer than {MAX_REFERENCE_LEN} characters")]
    TooLong,
    /// Whitespace or control characters anywhere.
    #[error("contains whitespace or control characters")]
    Whitespace,
    /// A URL (`https://…`) instead of a reference.
    #[error("a reference has no URL scheme; write host[:port]/repository[:tag]")]
    Scheme,
    /// A digest without its algorithm.
    #[error("digest must be algorithm:hex, e.g. sha256:…")]
    DigestForm,
    /// A digest algorithm other than sha256, sha384, sha512.
    #[error("unsupported digest algorithm {0:?}")]
    DigestAlgorithm(String),
    /// A digest of the wrong length or case.
    #[error("{algorithm} digest must be {digits} lower-case hex digits")]
    DigestHex {
        /// `sha256`, `sha384` or `sha512`.
        algorithm: &'static str,
        /// How many hex digits it needs.
        digits: usize,
    },
    /// A tag outside the grammar.
    #[error("tag {0:?} must be 1-128 of A-Z a-z 0-9 _ . - and not start with . or -")]
    Tag(String),
    /// A registry port outside 1-65535.
    #[error("registry {0:?} has an invalid port (1-65535)")]
    Port(String),
    /// A registry host name outside the grammar.
    #[error("registry {0:?} is not a valid host name")]
    Host(String),
    /// A repository path component outside the grammar.
    #[error("repository component {0:?} must be lower-case letters and digits, separated by . _ __ or -")]
    Component(String),
    /// Registry and repository together longer than 255 characters.
    #[error("name is longer than 255 characters")]
    NameTooLong,
}

/// A piece of the input as an error may quote it.
fn piece(s: &str) -> String {
    crate::units::quote_short(s)
}

impl ImageRef {
    /// Parses and normalises a reference. Rejects empty, malformed, upper-case and
    /// whitespace-containing input before anything is contacted.
    ///
    /// The grammar is the distribution reference grammar, checked by hand rather than with a
    /// regular expression: a CLI invocation parses one reference, and compiling the grammar's
    /// regex costs more than the rest of the command.
    pub fn parse(input: &str) -> Result<Self, InvalidReference> {
        let bad = |reason: Malformed| InvalidReference {
            input: crate::units::quote_short(input),
            reason,
        };
        if input.trim().is_empty() {
            return Err(bad(Malformed::Empty));
        }
        if input.len() > MAX_REFERENCE_LEN {
            return Err(bad(Malformed::TooLong));
        }
        if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(Malformed::Whitespace));
        }
        if input.contains("://") {
            return Err(bad(Malformed::Scheme));
        }
        let (name_tag, digest) = match input.split_once('@') {
            Some((n, d)) => (n, Some(check_digest(d).map_err(bad)?)),
            None => (input, None),
        };
        // A tag follows the last ':' only if no '/' comes after it (else the ':' is a port).
        let (name, tag) = match name_tag.rfind(':') {
            Some(i) if !name_tag[i..].contains('/') => (&name_tag[..i], Some(&name_tag[i + 1..])),
            _ => (name_tag, None),
        };
        if let Some(t) = tag {
            check_tag(t).map_err(bad)?;
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                check_domain(first).map_err(bad)?;
                (first.to_owned(), rest.to_owned())
            }
            _ if name.contains('/') => ("docker.io".to_owned(), name.to_owned()),
            _ => ("docker.io".to_owned(), format!("library/{name}")),
        };
        for component in path.split('/') {
            check_path_component(component).map_err(bad)?;
        }
        if registry.len() + 1 + path.len() > 255 {
            return Err(bad(Malformed::NameTooLong));
        }
        let explicit_tag = tag.is_some();
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_owned()),
        };
        Ok(Self {
            registry,
            repository: path,
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

    /// The same repository, tag and digest at another registry host (a mirror).
    pub fn to_oci_at(&self, host: &str) -> oci_client::Reference {
        let mut at = self.clone();
        at.registry = host.to_owned();
        // Docker Hub's official images live under library/ on mirrors too.
        at.to_oci()
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

/// `sha256:<64 hex>` (or sha384/sha512 with their lengths).
fn check_digest(d: &str) -> Result<String, Malformed> {
    let (alg, hex) = d.split_once(':').ok_or(Malformed::DigestForm)?;
    let (algorithm, digits) = match alg {
        "sha256" => ("sha256", 64),
        "sha384" => ("sha384", 96),
        "sha512" => ("sha512", 128),
        _ => return Err(Malformed::DigestAlgorithm(piece(alg))),
    };
    if hex.len() != digits || !hex.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')) {
        return Err(Malformed::DigestHex { algorithm, digits });
    }
    Ok(d.to_owned())
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn check_tag(t: &str) -> Result<(), Malformed> {
    let mut chars = t.chars();
    let first_ok = matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_');
    if !first_ok
        || t.len() > 128
        || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(Malformed::Tag(piece(t)));
    }
    Ok(())
}

/// `host[.host…][:port]`, each label alphanumerics with inner hyphens.
fn check_domain(d: &str) -> Result<(), Malformed> {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    if let Some(p) = port {
        let port_ok = !p.is_empty()
            && p.len() <= 5
            && p.chars().all(|c| c.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n));
        if !port_ok {
            return Err(Malformed::Port(piece(d)));
        }
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if !host.split('.').all(label_ok) {
        return Err(Malformed::Host(piece(d)));
    }
    Ok(())
}

/// Lower-case alphanumerics separated by `.`, `_`, `__` or runs of `-`.
fn check_path_component(c: &str) -> Result<(), Malformed> {
    let err = || Err(Malformed::Component(piece(c)));
    let bytes = c.as_bytes();
    if bytes.is_empty() || !is_alnum(bytes[0]) || !is_alnum(bytes[bytes.len() - 1]) {
        return err();
    }
    let mut i = 0;
    while i < bytes.len() {
        if is_alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !is_alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return err();
        }
    }
    Ok(())
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
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
            (
                "localhost:5000/a/b/c:1.0-rc_1",
                "localhost:5000/a/b/c:1.0-rc_1",
                false,
            ),
            (
                "my-registry.example.com/team__x/app-name.v2:T_1",
                "my-registry.example.com/team__x/app-name.v2:T_1",
                false,
            ),
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
            "app__-x:1",
            "reg.io:port/app",
            "app:.hidden",
            "a//b",
            "app@sha256:XYZ",
            "127.0.0.1:99999/app:1",
            "127.0.0.1:0/app:1",
            "app:1\nINFO forged log line",
            "app\0:1",
        ] {
            let e = ImageRef::parse(bad).unwrap_err();
            assert!(
                e.to_string().contains("invalid image reference"),
                "{bad}: {e}"
            );
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
        // A huge input gets a short, one-line error.
        let huge = format!("{}\n", "a".repeat(100_000));
        let e = ImageRef::parse(&huge).unwrap_err().to_string();
        assert!(e.len() < 300 && !e.contains('\n'), "{} chars", e.len());
        assert!(ImageRef::parse("127.0.0.1:65535/app:1").is_ok());
    }

    #[test]
    fn image_ids_name_local_images() {
        let full = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(local_image_id(&full), Some(full.as_str()));
        assert_eq!(local_image_id("abcdef012345"), Some("abcdef012345"));
        assert_eq!(ImageId::parse("abcdef"), Some(ImageId::Prefix("abcdef")));
        assert_eq!(ImageId::parse(&full), Some(ImageId::Full(full.as_str())));
        assert_eq!(ImageId::parse("abcde"), None);
        for not in [
            "abcdef01234",
            "sha256:abc",
            "busybox",
            "ABCDEF012345",
            "abcdef01234g",
        ] {
            assert_eq!(local_image_id(not), None, "{not}");
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
