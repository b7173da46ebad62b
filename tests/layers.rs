//! The architecture, checked: the import graph of `src/` (its top-level modules, from the
//! `crate::…` paths in non-test code) follows the layers of the README's source layout, every
//! arrow pointing down, and only `api` and `cri` speak gRPC.
//!
//! `cargo test --test layers -- --nocapture` prints the graph.

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
    ("cache", 4),
    ("puller", 5),
    ("launcher", 6),
    ("prewarm", 6),
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

/// The code of a file without comments and without its inline `#[cfg(test)] mod tests { … }`.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.trim_start().starts_with("//") {
            true => "",
            false => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_str()
        .unwrap();
    first.trim_end_matches(".rs").to_owned()
}

fn graph() -> (BTreeMap<String, BTreeSet<String>>, Vec<String>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut grpc = Vec::new();
    for f in files {
        let from = module_of(&src, &f);
        if from == "lib" {
            continue;
        }
        let text = code(&std::fs::read_to_string(&f).unwrap());
        let deps = edges.entry(from.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != from {
                deps.insert(name);
            }
        }
        if text.contains("tonic::") && !GRPC.contains(&from.as_str()) {
            grpc.push(f.display().to_string());
        }
    }
    (edges, grpc)
}

#[test]
fn every_import_points_down_a_layer_and_only_the_edges_speak_grpc() {
    let layer: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let (edges, grpc) = graph();
    let mut wrong = Vec::new();
    for (from, deps) in &edges {
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
    assert!(grpc.is_empty(), "tonic outside api/ and cri/: {grpc:?}");
}
