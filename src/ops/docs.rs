//! `silt docs`: a static documentation site of the project in one folder (HTML, JS, JSON; no
//! server, no network): every table with its description, columns and types, PII marks, tests
//! and their last results, freshness, rows and version, the model SQL, and an interactive dag
//! with column lineage (Cytoscape.js, vendored into the binary). It must not write the lake
//! and must not compute lineage itself (build/lineage.rs does).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::build::lineage::{Dep, Lineage};
use crate::build::models::Dag;
use crate::error::{Error, Result};
use crate::lake::Silt;
use crate::lake::catalog::TableRef;
use crate::lake::meta::runs::RunRecord;

const INDEX_HTML: &str = include_str!("docs/index.html");
const APP_JS: &str = include_str!("docs/app.js");
const CYTOSCAPE_JS: &str = include_str!("docs/cytoscape.min.js");
const CYTOSCAPE_LICENSE: &str = include_str!("docs/LICENSE-cytoscape.txt");

/// Everything the page shows, written as `data.json` and `data.js`.
#[derive(Debug, Clone, Serialize)]
pub struct Site {
    pub project: String,
    pub generated_at: String,
    pub tables: Vec<DocTable>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DocTable {
    /// `layer.name`
    pub table: String,
    pub layer: String,
    /// `source` or the model's materialization.
    pub kind: String,
    pub description: Option<String>,
    pub file: String,
    /// A model's SQL as written (its template).
    pub sql: Option<String>,
    /// A source's landing glob and format.
    pub landing: Option<String>,
    pub columns: Vec<DocColumn>,
    pub tests: Vec<DocTest>,
    pub freshness: Option<crate::ops::freshness::Freshness>,
    /// Version, rows, files and bytes in the lake (absent when not built yet).
    pub stats: Option<crate::lake::catalog::TableInfo>,
    /// Tables it reads.
    pub upstream: Vec<String>,
    /// The model's SQL does not plan (its build reports it too).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DocColumn {
    pub name: String,
    pub data_type: String,
    pub description: Option<String>,
    pub pii: bool,
    pub pseudonymized: Option<String>,
    pub landing_field: Option<String>,
    pub deps: Vec<Dep>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DocTest {
    pub name: String,
    pub kind: String,
    pub severity: String,
    /// pass | warn | fail, from the last run that tested it.
    pub status: Option<String>,
    pub failing_rows: Option<u64>,
    pub tested_at: Option<String>,
}

/// What `silt docs` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct DocsReport {
    pub out: PathBuf,
    pub index: PathBuf,
    pub tables: usize,
    pub files: Vec<String>,
}

/// Gather the site's data: the project's lineage and config, and what the lake knows.
pub async fn site(silt: &Silt) -> Result<Site> {
    let project = &silt.project;
    let dag = Dag::load(project)?;
    let lineage: Lineage = crate::build::lineage::compute(project, &dag).await?;
    let stats: BTreeMap<String, crate::lake::catalog::TableInfo> = silt
        .catalog
        .describe_all()
        .await?
        .into_iter()
        .map(|t| (t.table.clone(), t))
        .collect();
    // The last result of each test, by (test, subject).
    let mut last: BTreeMap<(String, String), RunRecord> = BTreeMap::new();
    for r in crate::lake::meta::read::<RunRecord>(&silt.catalog).await? {
        if r.materialized != "test" {
            continue;
        }
        let k = (r.model.clone(), r.table_name.clone());
        match last.get(&k) {
            Some(x) if x.started_at > r.started_at => {}
            _ => {
                last.insert(k, r);
            }
        }
    }
    let freshness: BTreeMap<String, crate::ops::freshness::Freshness> =
        match crate::ops::freshness::freshness(silt, chrono::Utc::now()).await {
            Ok(f) => f.into_iter().map(|f| (f.source.clone(), f)).collect(),
            Err(e) => {
                tracing::warn!("docs: freshness not measured: {e}");
                BTreeMap::new()
            }
        };
    let test_of = |t: &crate::build::quality::DataTest| {
        let r = last.get(&(t.name.clone(), t.subject.clone()));
        DocTest {
            name: t.name.clone(),
            kind: t.kind.clone(),
            severity: t.severity.to_string(),
            status: r.map(|r| r.status.clone()),
            failing_rows: r.and_then(|r| r.failing_rows),
            tested_at: r.map(|r| micros_text(r.started_at)),
        }
    };
    let mut tables = Vec::new();
    for t in &lineage.tables {
        let tref = TableRef::parse(&t.table)?;
        let mut tests = Vec::new();
        let (description, sql, landing, freshness_of) = match project.sources.get(&tref.name) {
            Some(src) if t.kind == "source" => {
                for spec in &src.tests {
                    if let Ok(dt) = crate::build::quality::compile(spec, &tref, &src.file, &|to| {
                        dag.resolve(to)
                    }) {
                        tests.push(test_of(&dt));
                    }
                }
                (
                    src.description.clone(),
                    None,
                    Some(format!("{} ({})", src.glob_text, format_name(&src.format))),
                    freshness.get(&src.name).cloned(),
                )
            }
            _ => {
                let m = dag.models.get(&tref.name);
                if let Some(m) = m {
                    for dt in dag.model_tests(m).unwrap_or_default() {
                        tests.push(test_of(&dt));
                    }
                    for (dt, st) in dag.singular_tests() {
                        if st.refs.contains(&m.name) {
                            tests.push(test_of(&dt));
                        }
                    }
                }
                (
                    m.and_then(|m| m.config.description.clone()),
                    m.map(|m| m.template.clone()),
                    None,
                    None,
                )
            }
        };
        let upstream: BTreeSet<String> = t
            .columns
            .iter()
            .flat_map(|c| c.deps.iter().map(|d| d.table.clone()))
            .filter(|u| *u != t.table)
            .chain(
                dag.models
                    .get(&tref.name)
                    .filter(|_| t.kind != "source")
                    .into_iter()
                    .flat_map(|m| {
                        m.refs
                            .iter()
                            .map(|r| dag.models[r].table().to_string())
                            .chain(m.sources.iter().map(|s| format!("bronze.{s}")))
                    }),
            )
            .collect();
        tables.push(DocTable {
            table: t.table.clone(),
            layer: tref.layer.schema_name().to_string(),
            kind: t.kind.clone(),
            description,
            file: t.file.clone(),
            sql,
            landing,
            columns: t
                .columns
                .iter()
                .map(|c| DocColumn {
                    name: c.name.clone(),
                    data_type: c.data_type.clone(),
                    description: c.description.clone(),
                    pii: c.pii,
                    pseudonymized: c.pseudonymized.clone(),
                    landing_field: c.landing_field.clone(),
                    deps: c.deps.clone(),
                })
                .collect(),
            tests,
            freshness: freshness_of,
            stats: stats.get(&t.table).cloned(),
            upstream: upstream.into_iter().collect(),
            error: t.error.clone(),
        });
    }
    Ok(Site {
        project: project.file.project.name.clone(),
        generated_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        tables,
    })
}

fn format_name(f: &crate::project::config::Format) -> String {
    serde_json::to_value(f)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_else(|| format!("{f:?}").to_lowercase())
}

fn micros_text(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// `silt docs --out DIR`: write the site into `out` (created; files of an earlier site are
/// replaced).
pub async fn generate(silt: &Silt, out: &Path) -> Result<DocsReport> {
    let site = site(silt).await?;
    std::fs::create_dir_all(out).map_err(|e| Error::io("create the docs folder", out, e))?;
    let json =
        serde_json::to_string(&site).map_err(|e| Error::Internal(format!("docs data: {e}")))?;
    // `data.js` for the page (a file:// page cannot fetch JSON), `data.json` for machines.
    // `</` is escaped so no string in the data can close the script.
    let js = format!("window.SILT_DOCS = {};\n", json.replace("</", "<\\/"));
    let files: [(&str, &str); 6] = [
        ("index.html", INDEX_HTML),
        ("app.js", APP_JS),
        ("cytoscape.min.js", CYTOSCAPE_JS),
        ("LICENSE-cytoscape.txt", CYTOSCAPE_LICENSE),
        ("data.js", &js),
        ("data.json", &json),
    ];
    for (name, body) in files {
        let p = out.join(name);
        std::fs::write(&p, body).map_err(|e| Error::io("write", &p, e))?;
    }
    Ok(DocsReport {
        out: out.to_path_buf(),
        index: out.join("index.html"),
        tables: site.tables.len(),
        files: files.iter().map(|(n, _)| n.to_string()).collect(),
    })
}
