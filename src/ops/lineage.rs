//! `silt lineage`: a column's upstream tree down to the landing fields, or every column that
//! depends on it (`--downstream`), from the project's current plans or as a past run stored
//! them (`--run`); and `--changed`, the columns and models a change to the project affects,
//! against the lineage the last run stored. It must not compute lineage itself
//! (build/lineage.rs does) nor write anything.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::build::lineage::{ColumnLineage, Kind, Lineage, split_id};
use crate::build::models::Dag;
use crate::error::{Error, Result};
use crate::lake::Silt;

/// One column in a lineage tree.
#[derive(Debug, Clone, Serialize)]
pub struct Tree {
    /// `layer.table.column`
    pub column: String,
    /// How its parent in the tree uses it (upstream) or it uses its parent (downstream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<Kind>,
    pub data_type: String,
    pub pii: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pseudonymized: Option<String>,
    /// A source column: `glob: field` of the landing files it is read from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub landing: Option<String>,
    pub children: Vec<Tree>,
}

/// The project's lineage now (planned), or as run `run` stored it.
pub async fn load(silt: &Silt, run: Option<&str>) -> Result<Lineage> {
    match run {
        None => {
            let dag = Dag::load(&silt.project)?;
            crate::build::lineage::compute(&silt.project, &dag).await
        }
        Some(id) => {
            let runs = crate::lake::meta::read::<crate::lake::meta::runs::RunRecord>(&silt.catalog)
                .await?;
            let Some(r) = runs
                .iter()
                .find(|r| r.run_id == id || r.run_id.starts_with(id))
            else {
                return Err(Error::Usage(format!(
                    "no run '{id}' in the run log: `silt runs` lists them"
                )));
            };
            let l = crate::build::lineage::stored_at_run(&silt.catalog, &r.run_id, r.started_at)
                .await?;
            if l.tables.is_empty() {
                return Err(Error::Usage(format!(
                    "no lineage was stored as of run '{id}' (a run stores it when it builds a model)"
                )));
            }
            Ok(l)
        }
    }
}

/// The columns `target` names: `layer.table.column`, or every column of `layer.table`.
pub fn targets(l: &Lineage, target: &str) -> Result<Vec<String>> {
    if let Some((t, c)) = split_id(target)
        && let Some(table) = l.table(t)
    {
        if table.columns.iter().any(|x| x.name == c) {
            return Ok(vec![target.to_string()]);
        }
        let names: Vec<String> = table.columns.iter().map(|x| x.name.clone()).collect();
        return Err(Error::Usage(format!(
            "{t} has no column '{c}'{}; its columns: {}",
            crate::lake::catalog::closest(c, names.clone())
                .map(|n| format!(" (did you mean '{n}'?)"))
                .unwrap_or_default(),
            names.join(", ")
        )));
    }
    if let Some(table) = l.table(target) {
        if let Some(e) = &table.error {
            return Err(Error::Usage(format!(
                "{target} has no lineage: its SQL does not plan: {e}"
            )));
        }
        return Ok(table
            .columns
            .iter()
            .map(|c| format!("{target}.{}", c.name))
            .collect());
    }
    let known: Vec<String> = l.tables.iter().map(|t| t.table.clone()).collect();
    let table_part = split_id(target).map(|(t, _)| t).unwrap_or(target);
    Err(Error::Usage(format!(
        "'{target}' is not a column (layer.table.column) or table of this project{}",
        crate::lake::catalog::closest(table_part, known)
            .map(|n| format!(" (did you mean '{n}'?)"))
            .unwrap_or_default()
    )))
}

fn node(l: &Lineage, id: &str, kind: Option<Kind>) -> Tree {
    let found = l.column(id);
    let (c, landing): (Option<&ColumnLineage>, Option<String>) = match found {
        Some((t, c)) => (
            Some(c),
            match (&t.landing, &c.landing_field) {
                (Some(g), Some(f)) => Some(format!("{g}: {f}")),
                _ => None,
            },
        ),
        None => (None, None),
    };
    Tree {
        column: id.to_string(),
        kind,
        data_type: c.map(|c| c.data_type.clone()).unwrap_or_default(),
        pii: c.is_some_and(|c| c.pii),
        pseudonymized: c.and_then(|c| c.pseudonymized.clone()),
        landing,
        children: vec![],
    }
}

/// Where `id` comes from: its upstream columns, each down to its source columns and their
/// landing fields. Filter and key columns are listed but not followed.
pub fn upstream(l: &Lineage, id: &str) -> Tree {
    fn walk(l: &Lineage, id: &str, kind: Option<Kind>, depth: usize) -> Tree {
        let mut t = node(l, id, kind);
        if depth > 64 || kind == Some(Kind::Filter) {
            return t;
        }
        if let Some((_, c)) = l.column(id) {
            for d in &c.deps {
                if d.id() == id {
                    continue;
                }
                t.children.push(walk(l, &d.id(), Some(d.kind), depth + 1));
            }
        }
        t
    }
    walk(l, id, None, 0)
}

/// What depends on `id`: every column computed from it or whose rows it decides, transitively.
pub fn downstream(l: &Lineage, id: &str) -> Tree {
    fn walk(l: &Lineage, id: &str, kind: Option<Kind>, depth: usize) -> Tree {
        let mut t = node(l, id, kind);
        if depth > 64 {
            return t;
        }
        for (reader, k) in l.readers_of(id) {
            if reader == id {
                continue;
            }
            t.children.push(walk(l, &reader, Some(k), depth + 1));
        }
        t
    }
    walk(l, id, None, 0)
}

/// A tree as text, one column per line.
pub fn render_tree(t: &Tree) -> String {
    fn line(t: &Tree) -> String {
        let mut s = t.column.clone();
        let mut tags = Vec::new();
        if let Some(k) = t.kind {
            tags.push(match k {
                Kind::Filter => "filter/key".to_string(),
                k => k.to_string(),
            });
        }
        if !t.data_type.is_empty() {
            tags.push(t.data_type.clone());
        }
        if t.pii {
            tags.push("PII".into());
        }
        if let Some(p) = &t.pseudonymized {
            tags.push(format!("pseudonymized: {p}"));
        }
        if !tags.is_empty() {
            s.push_str(&format!("  ({})", tags.join(", ")));
        }
        s
    }
    fn walk(t: &Tree, prefix: &str, out: &mut String) {
        let n = t.children.len() + usize::from(t.landing.is_some());
        let mut i = 0;
        if let Some(l) = &t.landing {
            i += 1;
            let last = i == n;
            out.push_str(&format!(
                "{prefix}{}landing {l}\n",
                if last { "└─ " } else { "├─ " }
            ));
        }
        for c in &t.children {
            i += 1;
            let last = i == n;
            out.push_str(&format!(
                "{prefix}{}{}\n",
                if last { "└─ " } else { "├─ " },
                line(c)
            ));
            walk(
                c,
                &format!("{prefix}{}", if last { "   " } else { "│  " }),
                out,
            );
        }
    }
    let mut out = line(t);
    out.push('\n');
    walk(t, "", &mut out);
    out
}

/// What a change to the project affects, against the lineage the last run stored.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Changes {
    /// Tables whose own SQL, config or contract changed how columns are computed.
    pub changed: Vec<ChangedTable>,
    /// Every column downstream of a changed one (not itself changed), by table.
    pub affected: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChangedTable {
    pub table: String,
    /// new | changed | removed
    pub change: String,
    /// Columns computed differently (or new).
    pub columns: Vec<String>,
    /// Columns no longer output.
    pub removed_columns: Vec<String>,
}

/// `silt lineage --changed`.
pub async fn changed(silt: &Silt) -> Result<Changes> {
    let stored = crate::build::lineage::stored(&silt.catalog, None).await?;
    let now = load(silt, None).await?;
    Ok(diff(&stored, &now))
}

/// The changes from `before` to `after`, and what they affect downstream in `after`.
pub fn diff(before: &Lineage, after: &Lineage) -> Changes {
    let mut out = Changes::default();
    let mut seeds: BTreeSet<String> = BTreeSet::new();
    for t in &after.tables {
        if t.error.is_some() {
            continue;
        }
        match before.table(&t.table) {
            None => {
                let columns: Vec<String> = t.columns.iter().map(|c| c.name.clone()).collect();
                seeds.extend(columns.iter().map(|c| format!("{}.{c}", t.table)));
                out.changed.push(ChangedTable {
                    table: t.table.clone(),
                    change: "new".into(),
                    columns,
                    removed_columns: vec![],
                });
            }
            Some(b) => {
                let old: BTreeMap<&str, &ColumnLineage> =
                    b.columns.iter().map(|c| (c.name.as_str(), c)).collect();
                let columns: Vec<String> = t
                    .columns
                    .iter()
                    .filter(|c| old.get(c.name.as_str()).is_none_or(|o| o.sig != c.sig))
                    .map(|c| c.name.clone())
                    .collect();
                let removed_columns: Vec<String> = b
                    .columns
                    .iter()
                    .filter(|c| !t.columns.iter().any(|x| x.name == c.name))
                    .map(|c| c.name.clone())
                    .collect();
                if columns.is_empty() && removed_columns.is_empty() {
                    continue;
                }
                seeds.extend(columns.iter().map(|c| format!("{}.{c}", t.table)));
                // A removed column affects what read it.
                for c in &removed_columns {
                    for (r, _) in before.readers_of(&format!("{}.{c}", t.table)) {
                        seeds.insert(r);
                    }
                }
                out.changed.push(ChangedTable {
                    table: t.table.clone(),
                    change: "changed".into(),
                    columns,
                    removed_columns,
                });
            }
        }
    }
    for b in &before.tables {
        if after.table(&b.table).is_none() {
            out.changed.push(ChangedTable {
                table: b.table.clone(),
                change: "removed".into(),
                columns: vec![],
                removed_columns: b.columns.iter().map(|c| c.name.clone()).collect(),
            });
            for c in &b.columns {
                for (r, _) in before.readers_of(&format!("{}.{}", b.table, c.name)) {
                    seeds.insert(r);
                }
            }
        }
    }
    let changed_ids: BTreeSet<String> = out
        .changed
        .iter()
        .flat_map(|t| t.columns.iter().map(move |c| format!("{}.{c}", t.table)))
        .collect();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut stack: Vec<String> = seeds.into_iter().collect();
    while let Some(id) = stack.pop() {
        for (r, _) in after.readers_of(&id) {
            if seen.insert(r.clone()) {
                stack.push(r);
            }
        }
        if !changed_ids.contains(&id) && after.column(&id).is_some() {
            seen.insert(id);
        }
    }
    for id in seen {
        if changed_ids.contains(&id) {
            continue;
        }
        if let Some((t, c)) = split_id(&id) {
            out.affected
                .entry(t.to_string())
                .or_default()
                .push(c.to_string());
        }
    }
    out
}

/// `--changed` as text.
pub fn render_changes(c: &Changes) -> String {
    if c.changed.is_empty() {
        return "no change since the last run's lineage\n".into();
    }
    let mut out = String::from("changed:\n");
    for t in &c.changed {
        out.push_str(&format!("  {} ({})", t.table, t.change));
        if !t.columns.is_empty() && t.change != "new" {
            out.push_str(&format!(": {}", t.columns.join(", ")));
        }
        if !t.removed_columns.is_empty() && t.change != "removed" {
            out.push_str(&format!("; removed: {}", t.removed_columns.join(", ")));
        }
        out.push('\n');
    }
    if c.affected.is_empty() {
        out.push_str("affected downstream: nothing\n");
    } else {
        out.push_str("affected downstream:\n");
        for (t, cols) in &c.affected {
            out.push_str(&format!("  {t}: {}\n", cols.join(", ")));
        }
    }
    out
}
