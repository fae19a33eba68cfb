//! The shape of the source tree holds: modules import only from their own layer or below
//! (cli → ops → build / ingest → lake → project → base), and no modules import each other in
//! a circle. Read from the `crate::` paths of every file under src/, in the spirit of
//! rust-analyzer's tidy tests.

use std::collections::{BTreeMap, BTreeSet};

use crate::support::{repo, walk};

/// The layers, bottom up, by top-level module: a file may use its own layer and those below.
/// `cli`, `main` and `lib` sit above every layer.
const LAYERS: &[(&str, &[&str])] = &[
    ("base", &["error", "progress", "render"]),
    ("project", &["project"]),
    ("lake", &["lake"]),
    ("ingest", &["ingest"]),
    ("build", &["build"]),
    ("ops", &["ops"]),
];

/// The layer of a module path (`lake::catalog` is in `lake`).
fn layer_of(module: &str) -> Option<usize> {
    let top = module.split("::").next().unwrap_or(module);
    LAYERS.iter().position(|(_, tops)| tops.contains(&top))
}

/// A module path, as far as the tree names rooms: the top folder and the file or folder under
/// it (`lake::catalog`, `build::materialize`, `ingest::parse`), or a top-level file (`error`).
fn module_of(segments: &[String]) -> String {
    segments
        .iter()
        .take(2)
        .filter(|s| *s != "mod")
        .cloned()
        .collect::<Vec<_>>()
        .join("::")
}

/// The module each file under `src` is in, from its path.
fn module_of_file(rel: &std::path::Path) -> String {
    let segments: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    module_of(&segments)
}

/// Module → the modules its files name as `crate::…` paths.
fn imports(src: &std::path::Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    walk(src, &mut |p| {
        if p.extension().is_none_or(|e| e != "rs") {
            return;
        }
        let module = module_of_file(p.strip_prefix(src).unwrap());
        let text = std::fs::read_to_string(p).unwrap();
        let entry = out.entry(module.clone()).or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + 7..];
                let path: Vec<String> = rest
                    .split("::")
                    .map(|s| {
                        s.chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect::<String>()
                    })
                    .take_while(|s| {
                        !s.is_empty() && s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                    })
                    .collect();
                let used = module_of(&path);
                if !used.is_empty() && used != module {
                    entry.insert(used);
                }
            }
            assert!(
                !code.contains("use crate::{"),
                "{}: name each import's full path (`use crate::lake::catalog::…`), so this test sees it",
                p.display()
            );
        }
    });
    out
}

/// Imports against the layers, and circles among modules, in `src`.
fn violations(src: &std::path::Path) -> Vec<String> {
    let graph = imports(src);
    let mut bad = Vec::new();
    for (module, deps) in &graph {
        // The binary and the facade sit above everything.
        if matches!(module.split("::").next(), Some("main" | "cli" | "lib")) {
            continue;
        }
        let Some(mine) = layer_of(module) else {
            bad.push(format!(
                "src/{module}: not in any layer of tests/it/architecture.rs"
            ));
            continue;
        };
        for d in deps {
            match layer_of(d) {
                Some(theirs) if theirs <= mine => {}
                Some(theirs) => bad.push(format!(
                    "{module} ({}) uses {d} ({}), a layer above it",
                    LAYERS[mine].0, LAYERS[theirs].0
                )),
                None => bad.push(format!("{module} uses crate::{d}, which is in no layer")),
            }
        }
    }
    // No circle, whatever the layers.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
        bad: &mut Vec<String>,
    ) {
        match state.get(n) {
            Some(2) => return,
            Some(1) => {
                let i = path.iter().position(|p| p == n).unwrap_or(0);
                bad.push(format!("import cycle: {} -> {n}", path[i..].join(" -> ")));
                return;
            }
            _ => {}
        }
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if g.contains_key(d) {
                visit(d, g, state, path, bad);
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        visit(n, &graph, &mut state, &mut Vec::new(), &mut bad);
    }
    bad
}

#[test]
fn imports_run_one_way_and_never_in_a_circle() {
    // The reader sees the tree: every room, and an import it must find.
    let graph = imports(&repo().join("src"));
    for room in [
        "lake::catalog",
        "build::pipeline",
        "ingest::parse",
        "ops::erasure",
        "cli::commands",
    ] {
        assert!(
            graph.contains_key(room),
            "{room} not found: {:?}",
            graph.keys()
        );
    }
    assert!(graph["build::pipeline"].contains("ingest"), "{graph:?}");
    let bad = violations(&repo().join("src"));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_layer_check_catches_an_import_against_the_direction() {
    // A copy of src/ where the project layer reaches up into the build layer.
    let tmp = tempfile::tempdir().unwrap();
    crate::support::copy_dir(&repo().join("src"), tmp.path());
    let config = tmp.path().join("project/config.rs");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}\n#[allow(unused_imports)]\nuse crate::build::models::Dag;\n"),
    )
    .unwrap();
    let bad = violations(tmp.path());
    assert!(
        bad.iter()
            .any(|b| b.contains("project::config (project) uses build::models (build)")),
        "{bad:?}"
    );
    assert!(bad.iter().any(|b| b.starts_with("import cycle")), "{bad:?}");
}
