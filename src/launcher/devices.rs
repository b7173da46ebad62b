//! Which devices a step may have: only those the node lists in
//! `ImageCache.Launcher.AllowedDevices` (paths and globs such as `/dev/nvidia*`, matched against
//! the resolved device path), and each must be a character or block device node. A directory is
//! refused: the runtime would pass every node under it. CDI names are refused on runtimes without
//! CDI support (containerd before 1.7 ignores them silently).

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use super::request::SpecError;
use crate::runtime::{DeviceSpec, RuntimeVersion};

/// Whether the runtime honours CDI device names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CdiSupport {
    /// It does (containerd 1.7 or newer, CRI-O).
    Supported,
    /// It does not; the string names the runtime and its version.
    Unsupported(String),
}

impl CdiSupport {
    /// From the runtime's own name and version: containerd gained CDI in 1.7; CRI-O has had it
    /// since before any version cimage meets.
    pub fn of(v: &RuntimeVersion) -> Self {
        match (v.name.as_str(), v.major_minor()) {
            ("containerd", Some(mm)) if mm < (1, 7) => {
                Self::Unsupported(format!("{} {}", v.name, v.version))
            }
            ("containerd", None) => Self::Unsupported(format!("{} {}", v.name, v.version)),
            _ => Self::Supported,
        }
    }
}

/// Shell-style glob match: `*` is any run of characters but `/`, `?` one character but `/`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], t) || (!t.is_empty() && t[0] != b'/' && go(p, &t[1..])),
            (Some(b'?'), Some(c)) if *c != b'/' => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), text.as_bytes())
}

fn allowed_by(allowed: &[String], name: &str) -> bool {
    allowed.iter().any(|p| glob_match(p, name))
}

fn not_allowed(d: &str, what: &str, allowed: &[String]) -> SpecError {
    SpecError::Denied(format!(
        "device {d}{what} is not in ImageCache.Launcher.AllowedDevices ({})",
        if allowed.is_empty() {
            "none allowed on this node".to_owned()
        } else {
            allowed.join(", ")
        }
    ))
}

/// Checks the devices a step asks for: device nodes by path and CDI names, each allowed by
/// `allowed`. Returns the device nodes (resolved host path → the path asked for inside) and the
/// CDI names.
pub fn check(
    requested: &[String],
    allowed: &[String],
    cdi: &CdiSupport,
) -> Result<(Vec<DeviceSpec>, Vec<String>), SpecError> {
    let mut nodes = Vec::new();
    let mut cdi_names = Vec::new();
    for d in requested {
        if let Some((kind, name)) = d.split_once('=') {
            if !kind.contains('/') || name.is_empty() || d.chars().any(|c| c.is_control()) {
                return Err(SpecError::Invalid(format!(
                    "device {d:?} is neither a /dev path nor a CDI name (vendor.com/class=name)"
                )));
            }
            if let CdiSupport::Unsupported(runtime) = cdi {
                return Err(SpecError::Denied(format!(
                    "device {d} is a CDI name, but the runtime ({runtime}) does not support CDI \
                     and would ignore it (containerd supports CDI from 1.7); list the device \
                     nodes (e.g. /dev/nvidia0, /dev/nvidiactl, /dev/nvidia-uvm) in \
                     ImageCache.Launcher.AllowedDevices and ask for them by path"
                )));
            }
            if !allowed_by(allowed, d) {
                return Err(not_allowed(d, "", allowed));
            }
            cdi_names.push(d.clone());
            continue;
        }
        if !d.starts_with('/') || d.chars().any(|c| c.is_control()) {
            return Err(SpecError::Invalid(format!(
                "device {d:?} must be an absolute /dev path or a CDI name"
            )));
        }
        let real = Path::new(d)
            .canonicalize()
            .map_err(|e| SpecError::Invalid(format!("device {d} cannot be used: {e}")))?;
        let is_node = std::fs::metadata(&real)
            .map(|m| m.file_type().is_char_device() || m.file_type().is_block_device())
            .unwrap_or(false);
        if !is_node {
            return Err(SpecError::Denied(format!(
                "device {d} resolves to {}, which is not a character or block device node",
                real.display()
            )));
        }
        let real_str = real.to_string_lossy();
        if !allowed_by(allowed, &real_str) {
            let what = if real_str == d.as_str() {
                String::new()
            } else {
                format!(" (resolved to {real_str})")
            };
            return Err(not_allowed(d, &what, allowed));
        }
        // Inside, the device appears where it really is on the host: a path the caller chose
        // could name any file of the image.
        nodes.push(DeviceSpec {
            container_path: real_str.into_owned(),
            host_path: real,
        });
    }
    Ok((nodes, cdi_names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_stay_within_one_path_component() {
        assert!(glob_match("/dev/nvidia*", "/dev/nvidia0"));
        assert!(glob_match("/dev/nvidia*", "/dev/nvidiactl"));
        assert!(glob_match("/dev/tty?", "/dev/tty1"));
        assert!(!glob_match("/dev/nvidia*", "/dev/nvidia0/../sda"));
        assert!(!glob_match("/dev/*", "/dev/dri/card0"));
        assert!(!glob_match("/dev/null", "/dev/nullx"));
        assert!(glob_match("nvidia.com/gpu=*", "nvidia.com/gpu=0"));
    }

    #[test]
    fn only_allowed_device_nodes_pass() {
        let allowed = vec!["/dev/null".to_string(), "/dev/zero".to_string()];
        let ok = check(&["/dev/null".into()], &allowed, &CdiSupport::Supported).unwrap();
        assert_eq!(ok.0[0].host_path, Path::new("/dev/null"));
        for (d, want) in [
            ("/dev/full", "not in ImageCache.Launcher.AllowedDevices"),
            ("/dev", "not a character or block device"),
            ("/etc/passwd", "not a character or block device"),
            ("/dev/no-such-device", "cannot be used"),
            ("dev/null", "absolute"),
        ] {
            let e = check(&[d.into()], &allowed, &CdiSupport::Supported)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{d}: {e}");
        }
        let e = check(&["/dev/null".into()], &[], &CdiSupport::Supported)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none allowed"), "{e}");
    }

    #[test]
    fn cdi_names_need_a_runtime_that_supports_them() {
        let allowed = vec!["nvidia.com/gpu=*".to_string()];
        let old = CdiSupport::of(&RuntimeVersion {
            name: "containerd".into(),
            version: "v1.6.20".into(),
        });
        let e = check(&["nvidia.com/gpu=0".into()], &allowed, &old)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not support CDI") && e.contains("AllowedDevices"),
            "{e}"
        );
        let new = CdiSupport::of(&RuntimeVersion {
            name: "containerd".into(),
            version: "v1.7.2".into(),
        });
        assert_eq!(new, CdiSupport::Supported);
        let (_, names) = check(&["nvidia.com/gpu=0".into()], &allowed, &new).unwrap();
        assert_eq!(names, ["nvidia.com/gpu=0"]);
        assert!(check(&["gpu=0".into()], &allowed, &new).is_err());
        assert!(check(&["amd.com/gpu=0".into()], &allowed, &new).is_err());
    }
}
