//! The shape of the source tree holds: modules import only from their own layer or below
//! (cli → ops → build / ingest → lake → project → base), and no modules import each other in
//! a circle. Read from the `crate::` paths of every file under src/, in the spirit of
//! rust-analyzer's tidy tests.

use std::collections::{BTreeMap, BTreeSet};

use crate::support::{repo, walk};

/// Each module's layer; a module may use its own layer and those below.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "base",
        &["error", "contract", "render", "failpoint", "sql_text"],
    ),
    ("project", &["config"]),
    (
        "lake",
        &[
            "storage",
            "catalog",
            "commit",
            "lease",
            "audit",
            "runs",
            "time_travel",
        ],
    ),
    (
        "build and ingest",
        &["ingest", "models", "quality", "pseudonym", "materialize"],
    ),
    (
        "ops",
        &[
            "pipeline",
            "erasure",
            "export",
            "query",
            "profile",
            "freshness",
            "scaffold",
            "watch",
            "maintenance",
        ],
    ),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&module))
}

/// Module (top-level name under src/) → the modules its files name as `crate::<module>`.
fn imports(src: &std::path::Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    walk(src, &mut |p| {
        if p.extension().is_none_or(|e| e != "rs") {
            return;
        }
        let rel = p.strip_prefix(src).unwrap();
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let text = std::fs::read_to_string(p).unwrap();
        let entry = out.entry(module.clone()).or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + 7..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    entry.insert(name);
                }
            }
            // `use crate::{a, b}` names several at once.
            if let Some(i) = code.find("use crate::{") {
                for name in code[i + 12..].split(['}', ',', ' ']) {
                    let name: String = name
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != module {
                        entry.insert(name);
                    }
                }
            }
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
        if matches!(module.as_str(), "main" | "cli" | "lib") {
            continue;
        }
        let Some(mine) = layer_of(module) else {
            bad.push(format!(
                "src/{module}: not in any layer of tests/it/architecture.rs"
            ));
            continue;
        };
        for d in deps {
            // The ops layer takes the `Silt` handle (project, roots, catalog) from the facade.
            if d == "Silt" && mine >= layer_of("pipeline").unwrap() {
                continue;
            }
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
    let bad = violations(&repo().join("src"));
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_layer_check_catches_an_import_against_the_direction() {
    // A copy of src/ where the project layer reaches up into the build layer.
    let tmp = tempfile::tempdir().unwrap();
    crate::support::copy_dir(&repo().join("src"), tmp.path());
    let config = tmp.path().join("config.rs");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}\n#[allow(unused_imports)]\nuse crate::models::Dag;\n"),
    )
    .unwrap();
    let bad = violations(tmp.path());
    assert!(
        bad.iter()
            .any(|b| b.contains("config (project) uses models (build and ingest)")),
        "{bad:?}"
    );
    assert!(bad.iter().any(|b| b.starts_with("import cycle")), "{bad:?}");
}
