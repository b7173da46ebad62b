//! A container image's file tree as runc sees it before anything is mounted, read straight from
//! the layer directories of its snapshot (topmost first) with overlayfs' rules: a whiteout
//! hides what lies below, an opaque directory hides the directories below, a non-directory
//! hides everything below. Nothing is mounted and no symlink of the image is ever followed on
//! the host: a directory is only looked into in the layers where it is a real directory.
//!
//! [`resolve`] follows a path through the image's symlinks the way runc's `securejoin` does for
//! a mount destination: a symlink's target is read inside the image's root (an absolute one
//! starts again from it), `..` is lexical and stops at the root, a missing component is taken
//! as it is, and more than 255 links fail.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::runtime::{Landing, LandingError};

/// What a path is in one layer, or in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Entry {
    /// Not there: look below (in one layer); absent (in the image).
    Missing,
    /// A whiteout: deleted here, absent whatever lies below.
    Whiteout,
    /// A directory, and whether it is opaque (hides what lies below).
    Dir { opaque: bool },
    /// A regular file.
    File,
    /// A symlink, to this target (the image's bytes, as they are).
    Symlink(OsString),
    /// Something else (a device node, a socket).
    Other,
}

/// What `path` is in the one layer it names (never following a symlink at its end).
pub(super) fn entry(path: &Path) -> Entry {
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return Entry::Missing;
    };
    let t = md.file_type();
    if t.is_symlink() {
        return Entry::Symlink(
            std::fs::read_link(path)
                .unwrap_or_default()
                .into_os_string(),
        );
    }
    if t.is_char_device() {
        use std::os::unix::fs::MetadataExt;
        return match md.rdev() {
            0 => Entry::Whiteout,
            _ => Entry::Other,
        };
    }
    if t.is_dir() {
        return Entry::Dir {
            opaque: is_opaque(path),
        };
    }
    if t.is_file() {
        return Entry::File;
    }
    Entry::Other
}

/// Whether an overlay directory is opaque (`trusted.overlay.opaque` is `y`).
fn is_opaque(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut v = [0u8; 4];
    // SAFETY: NUL-terminated path and name; the buffer's length is passed.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            v.as_mut_ptr().cast(),
            v.len(),
        )
    };
    n == 1 && v[0] == b'y'
}

/// A symlink target as it may be shown: cut and escaped (the image chooses it, and it reaches
/// errors and the log).
pub(super) fn show_target(target: &OsStr) -> String {
    crate::units::quote_short(&target.to_string_lossy())
        .escape_debug()
        .to_string()
}

/// What the path made of `parts` is in the image whose layers are `layers` (topmost first).
pub(super) fn lookup(layers: &[PathBuf], parts: &[OsString]) -> Entry {
    // The directories (one per layer, topmost first) in which the current directory is seen.
    let mut dirs: Vec<PathBuf> = layers.to_vec();
    for (i, part) in parts.iter().enumerate() {
        let mut next = Vec::new();
        let mut found: Option<Entry> = None;
        for d in &dirs {
            let here = d.join(part);
            match entry(&here) {
                Entry::Missing => continue,
                Entry::Whiteout => break,
                Entry::Dir { opaque } => {
                    next.push(here);
                    found.get_or_insert(Entry::Dir { opaque: false });
                    if opaque {
                        break;
                    }
                }
                other => {
                    // A non-directory above directories hides them; below one, it is hidden.
                    if next.is_empty() {
                        found = Some(other);
                    }
                    break;
                }
            }
        }
        match found {
            None => return Entry::Missing,
            Some(Entry::Dir { .. }) => dirs = next,
            // Below a file: as runc's lookup, which takes "not a directory" as absent.
            Some(_) if i + 1 < parts.len() => return Entry::Missing,
            Some(other) => return other,
        }
    }
    Entry::Dir { opaque: false }
}

/// The path made of `parts`, as text.
fn show(parts: &[OsString]) -> String {
    let mut s = String::from("/");
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            s.push('/');
        }
        s.push_str(&p.to_string_lossy());
    }
    s
}

/// The components of a path, in order.
fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = OsString> + '_ {
    path.split(|b| *b == b'/')
        .map(|c| OsString::from_vec(c.to_vec()))
}

/// Most symlinks followed for one path, as runc's `securejoin` allows.
const MAX_LINKS: usize = 255;

/// Where `path` lands in the image, as runc resolves a mount destination (see the module's
/// doc). Fails on a symlink loop.
pub(super) fn resolve(layers: &[PathBuf], path: &str) -> Result<Landing, LandingError> {
    let mut done: Vec<OsString> = Vec::new();
    let mut todo: VecDeque<OsString> = components(path.as_bytes()).collect();
    let mut looked_at = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        match c.as_bytes() {
            b"" | b"." => continue,
            b".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        done.push(c);
        looked_at.push(show(&done));
        if let Entry::Symlink(target) = lookup(layers, &done) {
            links += 1;
            if links > MAX_LINKS {
                return Err(LandingError::SymlinkLoop {
                    limit: MAX_LINKS,
                    at: show(&done),
                });
            }
            done.pop();
            if target.as_bytes().starts_with(b"/") {
                done.clear();
            }
            for part in components(target.as_bytes()).rev() {
                todo.push_front(part);
            }
        }
    }
    Ok(Landing {
        path: show(&done),
        looked_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn layer(root: &Path, name: &str) -> PathBuf {
        let l = root.join(name);
        std::fs::create_dir_all(&l).unwrap();
        l
    }

    fn lands(layers: &[PathBuf], path: &str) -> String {
        resolve(layers, path).unwrap().path
    }

    #[test]
    fn destinations_resolve_through_the_images_symlinks_as_runc_resolves_them() {
        let t = tempfile::tempdir().unwrap();
        let (top, base) = (layer(t.path(), "top"), layer(t.path(), "base"));
        let all = vec![top.clone(), base.clone()];
        std::fs::create_dir_all(base.join("etc")).unwrap();
        std::fs::write(base.join("etc/group"), "").unwrap();
        std::fs::create_dir_all(base.join("a")).unwrap();
        // An absolute link to the root, a relative one climbing out, a chain.
        symlink("/", base.join("a/b")).unwrap();
        symlink("../../../..", base.join("a/up")).unwrap();
        symlink("b/etc", base.join("a/c")).unwrap();
        assert_eq!(lands(&all, "/a/b/etc"), "/etc");
        assert_eq!(lands(&all, "/a/up/etc"), "/etc");
        assert_eq!(lands(&all, "/a/c"), "/etc");
        assert_eq!(lands(&all, "/a/c/group"), "/etc/group");
        assert_eq!(lands(&all, "//a/./b/../etc/"), "/etc");
        // What was looked at: every prefix read from the image, in order.
        assert_eq!(
            resolve(&all, "/a/b/etc").unwrap().looked_at,
            ["/a", "/a/b", "/etc"]
        );
        // A missing component is taken as it is; so is one below a regular file.
        assert_eq!(lands(&all, "/data/x"), "/data/x");
        assert_eq!(lands(&all, "/etc/group/x"), "/etc/group/x");
        // A link in a lower layer hidden by a directory above, then by a whiteout.
        std::fs::create_dir_all(top.join("a/b")).unwrap();
        assert_eq!(lands(&all, "/a/b/etc"), "/a/b/etc");
        std::fs::remove_dir(top.join("a/b")).unwrap();
        nix_whiteout(&top.join("a/c"));
        assert_eq!(lands(&all, "/a/c"), "/a/c");
        // A loop fails.
        symlink("/loop", base.join("loop")).unwrap();
        assert!(resolve(&all, "/loop/x")
            .unwrap_err()
            .to_string()
            .contains("symlinks"));
    }

    #[test]
    fn an_opaque_or_replaced_directory_hides_the_links_below() {
        let t = tempfile::tempdir().unwrap();
        let (top, base) = (layer(t.path(), "top"), layer(t.path(), "base"));
        let all = vec![top.clone(), base.clone()];
        std::fs::create_dir_all(base.join("d")).unwrap();
        symlink("/etc", base.join("d/e")).unwrap();
        assert_eq!(lands(&all, "/d/e"), "/etc");
        // A regular file in the top layer where the lower one has a directory.
        std::fs::write(top.join("d"), "").unwrap();
        assert_eq!(lands(&all, "/d/e"), "/d/e");
        assert_eq!(lookup(&all, &[OsString::from("d")]), Entry::File);
        // A symlink above a directory: the link counts, the directory is never looked into.
        std::fs::remove_file(top.join("d")).unwrap();
        symlink("/srv", top.join("d")).unwrap();
        assert_eq!(lands(&all, "/d/e"), "/srv/e");
    }

    /// An overlayfs whiteout (a 0:0 character device) at `path` (mknod: the tests run as
    /// root, as the testbed needs).
    fn nix_whiteout(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) };
        assert_eq!(rc, 0, "mknod needs root, as the tests of the testbed run");
    }
}
