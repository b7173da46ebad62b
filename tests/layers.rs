//! The architecture, checked: the import graph of `src/` follows the layers of the README's source
//! layout, every arrow pointing down; the files inside one module import each other without a
//! circle; and only `api` and `cri` speak gRPC.
//!
//! Imports are read from the code itself (comments, strings and inline unit tests left out):
//! every path that starts at `crate::`, `super::` or `self::`, in `use` declarations (grouped and
//! nested trees included) and in qualified paths alike, is resolved to the file that defines it.
//!
//! `cargo test --test layers -- --nocapture` prints both graphs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each module's layer; a module may import only modules of a lower layer, so modules of one
/// layer never use each other (launcher and prewarm, for instance).
const LAYERS: &[(&str, u8)] = &[
    // leaves
    ("units", 0),
    ("names", 1),
    ("reference", 1),
    ("clock", 1),
    ("metrics", 1),
    ("background", 1),
    ("credentials", 1),
    ("identity", 1),
    ("store", 1),
    ("config", 2),
    ("policy", 2),
    ("runtime", 2),
    ("registry", 2),
    ("cri", 3),
    ("fetch", 3),
    ("cache", 4),
    ("puller", 5),
    ("launcher", 6),
    ("prewarm", 6),
    ("expect", 6),
    ("api", 7),
];

/// Modules that may name tonic (the gRPC edges of the daemon).
const GRPC: &[&str] = &["api", "cri"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            // The daemon's binary sits above everything; `tests/` folders hold unit tests.
            let dir = path.file_name().unwrap();
            if dir != "bin" && dir != "tests" {
                sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            let name = path.file_name().unwrap().to_str().unwrap();
            // Test-only files: the unit tests and their shared rig.
            if name != "tests.rs" && name != "testing.rs" {
                out.push(path);
            }
        }
    }
}

/// The module path a file defines: `src/cache/mod.rs` → `cache`, `src/cache/gone.rs` →
/// `cache::gone`, `src/registry.rs` → `registry`, `src/lib.rs` → the crate root (empty).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_str().unwrap().to_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts
}

/// The code of a file with comments, string and character literals blanked, and without its
/// inline `#[cfg(test)] mod tests { … }`.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            i += 2;
            while i < c.len() && !(c[i] == '*' && c.get(i + 1) == Some(&'/')) {
                i += 1;
            }
            i += 2;
            out.push(' ');
        } else if c[i] == 'r' && (next == Some('"') || next == Some('#')) && !ident_before(&c, i) {
            // A raw string: r"…", r#"…"#, …
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= c.len() {
                    break;
                }
                if c[j] == '"' && (0..hashes).all(|h| c.get(j + 1 + h) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            i = j;
            out.push_str("\"\"");
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c[i] == '\'' && (next == Some('\\') || c.get(i + 2) == Some(&'\'')) {
            // A character literal ('x', '\n', '\''); a lifetime ('a) is kept.
            i += 1;
            if c.get(i) == Some(&'\\') {
                i += 1;
            }
            i += 1;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn ident_before(c: &[char], i: usize) -> bool {
    i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_')
}

/// Every path in `code` that starts at `crate`, `super` or `self`, with its groups expanded:
/// `use crate::{a::X, b::{c, d}}` gives `crate a X`, `crate b c` and `crate b d`. Each path is
/// its segments, the anchor first (`super` repeated for `super::super::`).
fn paths(code: &str) -> Vec<Vec<String>> {
    let tokens = tokenize(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i].as_str();
        let starts = matches!(t, "crate" | "super" | "self")
            && tokens.get(i + 1).map(String::as_str) == Some("::")
            // `$crate::` in macros, `foo::self` in a use group: not a path's start.
            && (i == 0 || !matches!(tokens[i - 1].as_str(), "::" | "$"));
        if starts {
            let mut prefix = vec![t.to_owned()];
            i = tree(&tokens, i + 2, &mut prefix, &mut out);
        } else {
            i += 1;
        }
    }
    out
}

/// Identifiers, `::`, and single punctuation characters.
fn tokenize(code: &str) -> Vec<String> {
    let c: Vec<char> = code.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if c[i].is_alphanumeric() || c[i] == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            tokens.push(c[start..i].iter().collect());
        } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
            tokens.push("::".to_owned());
            i += 2;
        } else if c[i].is_whitespace() {
            i += 1;
        } else {
            tokens.push(c[i].to_string());
            i += 1;
        }
    }
    tokens
}

/// Reads one use tree (or the rest of a qualified path) at `tokens[i]`, after `prefix::`; pushes
/// each full path to `out` and returns the index after the tree.
fn tree(
    tokens: &[String],
    mut i: usize,
    prefix: &mut Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    let depth = prefix.len();
    loop {
        match tokens.get(i).map(String::as_str) {
            Some("{") => {
                i += 1;
                loop {
                    match tokens.get(i).map(String::as_str) {
                        Some("}") => {
                            i += 1;
                            break;
                        }
                        Some(",") => i += 1,
                        None => break,
                        Some(_) => i = tree(tokens, i, prefix, out),
                    }
                }
                prefix.truncate(depth);
                return i;
            }
            Some("*") => {
                out.push(prefix.clone());
                prefix.truncate(depth);
                return i + 1;
            }
            Some(t) if t.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                // `self` inside a group names the group's own prefix.
                if t != "self" {
                    prefix.push(t.to_owned());
                }
                i += 1;
                if tokens.get(i).map(String::as_str) == Some("::") {
                    i += 1;
                    continue;
                }
                out.push(prefix.clone());
                prefix.truncate(depth);
                // `use a::B as C`: the alias names nothing new.
                if tokens.get(i).map(String::as_str) == Some("as") {
                    i += 2;
                }
                return i;
            }
            _ => {
                out.push(prefix.clone());
                prefix.truncate(depth);
                return i;
            }
        }
    }
}

/// A path from [`paths`] made absolute (from the crate root), as seen from the file whose
/// module path is `from`.
fn absolute(path: &[String], from: &[String]) -> Vec<String> {
    let mut base: Vec<String> = match path[0].as_str() {
        "crate" => Vec::new(),
        _ => from.to_vec(),
    };
    let mut rest = &path[1..];
    if path[0] == "super" {
        base.pop();
    }
    while rest.first().map(String::as_str) == Some("super") {
        base.pop();
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    base
}

/// The file a path lands in: the longest prefix of it that is one of `files`.
fn file_of<'a>(path: &[String], files: &'a BTreeSet<Vec<String>>) -> Option<&'a Vec<String>> {
    (1..=path.len())
        .rev()
        .find_map(|n| files.get(&path[..n].to_vec()))
}

struct Graph {
    /// Top-level module → the top-level modules it imports.
    modules: BTreeMap<String, BTreeSet<String>>,
    /// File (module path) → files of the same top-level module it imports, roots left out.
    files: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
    /// Files outside the gRPC edges that name tonic.
    grpc: Vec<String>,
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut list = Vec::new();
    sources(&src, &mut list);
    let known: BTreeSet<Vec<String>> = list.iter().map(|f| module_path(&src, f)).collect();
    let mut g = Graph {
        modules: BTreeMap::new(),
        files: BTreeMap::new(),
        grpc: Vec::new(),
    };
    for f in &list {
        let from = module_path(&src, f);
        let Some(top) = from.first().cloned() else {
            continue; // lib.rs declares the modules
        };
        let text = code(&std::fs::read_to_string(f).unwrap());
        let deps = g.modules.entry(top.clone()).or_default();
        // A module's root file (`mod.rs`, or `registry.rs` beside `registry/`) declares its
        // files and re-exports from them: it is the module's face, not a file among the others,
        // so it takes no part in the circle check between files.
        let is_root = from.len() == 1;
        for p in paths(&text) {
            let to = absolute(&p, &from);
            let Some(to_top) = to.first() else { continue };
            if *to_top != top {
                deps.insert(to_top.clone());
                continue;
            }
            if let Some(target) = file_of(&to, &known) {
                if !is_root && target.len() > 1 && *target != from {
                    g.files
                        .entry(from.clone())
                        .or_default()
                        .insert(target.clone());
                }
            }
        }
        if text.contains("tonic::") && !GRPC.contains(&top.as_str()) {
            g.grpc.push(f.display().to_string());
        }
    }
    g
}

/// Every circle in `edges`, each as the files along it (the first repeated at the end).
fn circles(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    fn visit(
        at: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
        found: &mut Vec<Vec<String>>,
    ) {
        if let Some(pos) = stack.iter().position(|s| s == at) {
            let mut c: Vec<String> = stack[pos..].iter().map(|p| p.join("::")).collect();
            c.push(at.join("::"));
            found.push(c);
            return;
        }
        if done.contains(at) {
            return;
        }
        stack.push(at.clone());
        for next in edges.get(at).into_iter().flatten() {
            visit(next, edges, stack, done, found);
        }
        stack.pop();
        done.insert(at.clone());
    }
    let mut found = Vec::new();
    let mut done = BTreeSet::new();
    for start in edges.keys() {
        visit(start, edges, &mut Vec::new(), &mut done, &mut found);
    }
    found
}

#[test]
fn every_import_points_down_a_layer_and_only_the_edges_speak_grpc() {
    let layer: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let g = graph();
    let mut wrong = Vec::new();
    for (from, deps) in &g.modules {
        println!(
            "{from:12} -> {}",
            deps.iter().cloned().collect::<Vec<_>>().join(" ")
        );
        let Some(&lf) = layer.get(from.as_str()) else {
            wrong.push(format!("module {from} has no layer in tests/layers.rs"));
            continue;
        };
        for to in deps {
            match layer.get(to.as_str()) {
                None => wrong.push(format!("{from} -> {to}: {to} has no layer")),
                Some(&lt) if lt >= lf => wrong.push(format!(
                    "{from} (layer {lf}) -> {to} (layer {lt}): imports must point down"
                )),
                Some(_) => {}
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
    assert!(
        g.grpc.is_empty(),
        "tonic outside api/ and cri/: {:?}",
        g.grpc
    );
}

#[test]
fn no_circle_between_the_files_of_a_module() {
    let g = graph();
    for (from, deps) in &g.files {
        let deps: Vec<String> = deps.iter().map(|d| d.join("::")).collect();
        println!("{:24} -> {}", from.join("::"), deps.join(" "));
    }
    let found = circles(&g.files);
    let shown: Vec<String> = found.iter().map(|c| c.join(" -> ")).collect();
    assert!(
        found.is_empty(),
        "files that import each other (put what both need in a file below both):\n{}",
        shown.join("\n")
    );
}

fn strings(paths: Vec<Vec<String>>) -> Vec<String> {
    paths.into_iter().map(|p| p.join("::")).collect()
}

#[test]
fn the_path_reader_sees_groups_nesting_and_relative_paths() {
    let text = code(
        "use crate::{a, b::{c, d::E}, f::*};\n\
         use super::{index::ImageRecord, self as parent};\n\
         use super::super::evict::Reason;\n\
         // use crate::commented::Out;\n\
         let s = \"crate::in_a_string\"; let c = '\"'; let r = r#\"crate::raw\"#;\n\
         fn f<'a>(x: &'a str) -> crate::units::Size { self::local::g(); crate::names::check(x) }\n\
         macro_rules! m { () => { $crate::macros::x() } }\n",
    );
    assert_eq!(
        strings(paths(&text)),
        [
            "crate::a",
            "crate::b::c",
            "crate::b::d::E",
            "crate::f",
            "super::index::ImageRecord",
            "super",
            "super::super::evict::Reason",
            "crate::units::Size",
            "self::local::g",
            "crate::names::check",
        ]
    );
    let from = ["cache".to_owned(), "gone".to_owned()];
    let abs = |p: &str| absolute(&p.split("::").map(str::to_owned).collect::<Vec<_>>(), &from);
    assert_eq!(
        abs("super::index::ImageRecord").join("::"),
        "cache::index::ImageRecord"
    );
    assert_eq!(abs("super::super::evict::X").join("::"), "evict::X");
    assert_eq!(abs("self::inner::Y").join("::"), "cache::gone::inner::Y");
    assert_eq!(abs("crate::cache::index").join("::"), "cache::index");
}

#[test]
fn a_circle_between_two_files_is_found() {
    let p = |s: &str| s.split("::").map(str::to_owned).collect::<Vec<_>>();
    let mut edges = BTreeMap::new();
    edges.insert(p("cache::gone"), BTreeSet::from([p("cache::index")]));
    edges.insert(p("cache::index"), BTreeSet::from([p("cache::gone")]));
    edges.insert(p("cache::gc"), BTreeSet::from([p("cache::index")]));
    let found = circles(&edges);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains(&"cache::gone".to_owned()));
    assert!(found[0].contains(&"cache::index".to_owned()));
    edges.remove(&p("cache::index"));
    assert!(circles(&edges).is_empty());
}
