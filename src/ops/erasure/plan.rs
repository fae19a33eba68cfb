//! The scope of an erasure, resolved before anything is written: the sources in scope and how
//! each reaches a subject (subject_key, or subject_via through a parent), the subjects' PII
//! values wherever they are, and the models that carry their keys. A source holding subject data
//! without a declared path stops the request here. It must not write.

use super::*;

/// Which tables an erasure reaches, and how it matches rows in each. A table is in scope only
/// through a declared key: a source's `subject_key`, a source's `subject_via` (the keys of its
/// parent's subject rows), a model column named like a key of an upstream in scope or that
/// is such a key copied under another name (column lineage), or a model's
/// `config(subject_key=…)`. Models reading a table in scope without such a column are
/// rebuilt; no other table is read.
#[derive(Debug, Default)]
pub struct Plan {
    /// In-scope sources, parents before the sources that reach subjects through them.
    pub sources: Vec<String>,
    pub(super) source_scopes: HashMap<String, Arc<Scope>>,
    /// Models reading a table in scope (directly or through other models) or declaring a
    /// subject key, in dag order, with their key columns (empty: rebuilt, not erased in place).
    pub models: Vec<(String, Arc<Scope>)>,
    /// The subjects' PII values (and the ids, for unstructured text).
    pub needles: Arc<Needles>,
    /// Values derived through `subject_via`, per source, as HMACs for the audit.
    pub(super) derived_hmacs: BTreeMap<String, Vec<String>>,
    /// The subjects' PII values as HMACs, for the audit.
    pub(super) pii_hmacs: Vec<String>,
    /// Sources that declare PII but no path to a subject (not searched).
    pub warnings: Vec<String>,
    pub(super) source_defs: HashMap<String, Source>,
}

impl Plan {
    /// Resolve the scope of an erasure of `ids`: validate that every source holding subject
    /// data declares how (a configuration error before anything is rewritten), derive the
    /// `subject_via` keys and read the subjects' PII values from bronze (live and retained
    /// files), and find the models that carry the keys. `stored`: per source, HMACs of derived
    /// keys an earlier run of the same request recorded.
    pub async fn resolve(
        silt: &Silt,
        dag: &Dag,
        ids: &[String],
        hmac_key: &str,
        stored: &BTreeMap<String, Vec<String>>,
    ) -> Result<Plan> {
        let project = &silt.project;
        check_paths(project)?;
        let mut plan = Plan {
            source_defs: project.sources.clone().into_iter().collect(),
            ..Default::default()
        };
        let mut id_set = KeySet {
            hmac_key: Some(hmac_key.to_string()),
            ..Default::default()
        };
        for i in ids {
            id_set.insert(i);
        }
        let id_set = Arc::new(id_set);
        plan.scope_sources(silt, &id_set, hmac_key, stored).await?;
        let mut needles = Needles {
            ids: id_set.text.iter().cloned().collect(),
            pii_hmacs: stored
                .get(PII_HMACS)
                .into_iter()
                .flatten()
                .cloned()
                .collect(),
            hmac_key: Some(hmac_key.to_string()),
            ..Default::default()
        };
        plan.pii_from_bronze(silt, &mut needles).await?;
        plan.pii_not_in_bronze(silt, &mut needles).await?;
        plan.pii_hmacs = needles.pii_hmac_list(hmac_key);
        plan.needles = Arc::new(needles);
        plan.scope_models(silt, dag, &id_set).await?;
        for s in project.sources.values() {
            if !plan.source_scopes.contains_key(&s.name)
                && s.holds_subjects.is_none()
                && !s.pii.is_empty()
            {
                plan.warnings.push(format!(
                    "bronze.{}: declares PII columns ({}) but no subject_key or subject_via, so silt forget does not search it (declare holds_subjects = false in {} to say it holds no subject's data)",
                    s.name,
                    s.pii.join(", "),
                    s.file
                ));
            }
        }
        Ok(plan)
    }

    /// The sources in scope, parents before their `subject_via` children, each with the key
    /// it matches subjects by: its subject key (the ids), or the keys of the parent's rows of
    /// the subjects (derived from bronze, plus `stored` ones of an earlier run).
    pub(super) async fn scope_sources(
        &mut self,
        silt: &Silt,
        id_set: &Arc<KeySet>,
        hmac_key: &str,
        stored: &BTreeMap<String, Vec<String>>,
    ) -> Result<()> {
        let mut order: Vec<&Source> = Vec::new();
        let mut pending: Vec<&Source> = silt
            .project
            .sources
            .values()
            .filter(|s| s.subject_key.is_some() || s.subject_via.is_some())
            .collect();
        while !pending.is_empty() {
            let before = pending.len();
            pending.retain(|s| {
                let ready = match &s.subject_via {
                    None => true,
                    Some(v) => order.iter().any(|o| o.name == v.parent()),
                };
                if ready {
                    order.push(s);
                }
                !ready
            });
            if pending.len() == before {
                break; // check_paths has ruled cycles out
            }
        }
        for s in &order {
            let keys = match (&s.subject_key, &s.subject_via) {
                (Some(k), _) => (k.clone(), id_set.clone()),
                (None, Some(v)) => {
                    let parent = &self.source_scopes[v.parent()];
                    let mut set =
                        derive(silt, &TableRef::bronze(v.parent()), parent, &v.key).await?;
                    set.hmac_key = Some(hmac_key.to_string());
                    set.hmacs
                        .extend(stored.get(&s.name).into_iter().flatten().cloned());
                    let set = Arc::new(set);
                    self.derived_hmacs
                        .insert(s.name.clone(), set.hmacs(hmac_key));
                    (v.column.clone(), set)
                }
                (None, None) => continue,
            };
            let scope = Arc::new(Scope {
                keys: vec![keys],
                pii: s.pii.clone(),
            });
            self.sources.push(s.name.clone());
            self.source_scopes.insert(s.name.clone(), scope);
        }
        Ok(())
    }

    /// The subjects' PII values, from every file (live or retained) of the sources in scope:
    /// what is still anywhere is found.
    pub(super) async fn pii_from_bronze(&self, silt: &Silt, needles: &mut Needles) -> Result<()> {
        for name in &self.sources {
            let src = &silt.project.sources[name];
            if src.pii.is_empty() {
                continue;
            }
            let key_only = Scope {
                keys: self.source_scopes[name].keys.clone(),
                pii: vec![],
            };
            let t = TableRef::bronze(name);
            let cols: Vec<String> = key_only
                .columns()
                .into_iter()
                .chain(src.pii.clone())
                .collect();
            for (inner, loc) in data_files(silt, &t).await? {
                for b in decode_parquet_for(silt.lake.get(&loc).await?, &inner, Some(&cols))? {
                    let mask = BooleanArray::from(key_only.mask(&b, &Needles::default()));
                    if mask.true_count() == 0 {
                        continue;
                    }
                    let b = arrow::compute::filter_record_batch(&b, &mask)?;
                    for p in &src.pii {
                        let Some(c) = b.column_by_name(p) else {
                            continue;
                        };
                        if !matches!(
                            c.data_type(),
                            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                        ) {
                            continue;
                        }
                        for v in cells(c).unwrap_or_default().into_iter().flatten() {
                            let v = v.trim().to_string();
                            if v.chars().count() >= 4 {
                                needles.pii.insert(v);
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The subjects' PII values from their records that never reached bronze: quarantined
    /// ones, and landing files not ingested yet (a quarantined twin without the id still
    /// carries the name and email).
    pub(super) async fn pii_not_in_bronze(&self, silt: &Silt, needles: &mut Needles) -> Result<()> {
        let listed = silt.landing.list_landing().await?.0;
        for name in &self.sources {
            let src = &silt.project.sources[name];
            if src.pii.is_empty() {
                continue;
            }
            let keys = self.keys_of(name).expect("a source in scope has keys");
            let rec = Records::new(src, &keys, needles);
            let mut found: Vec<String> = Vec::new();
            let fallback: Vec<String> = src.columns.iter().map(|c| c.source.clone()).collect();
            let q = TableRef::quarantine(name);
            let cols = ["raw_record".to_string()];
            for (inner, loc) in data_files(silt, &q).await? {
                for b in decode_parquet_for(silt.lake.get(&loc).await?, &inner, Some(&cols))? {
                    let Some(raw) = b
                        .column_by_name("raw_record")
                        .and_then(|c| arrow::compute::cast(c, &DataType::Utf8).ok())
                    else {
                        continue;
                    };
                    let raw = raw.as_string::<i32>();
                    for i in 0..raw.len() {
                        if raw.is_valid(i) {
                            found.extend(rec.pii_of_raw(raw.value(i), Some(&fallback)));
                        }
                    }
                }
            }
            for m in &listed {
                if silt
                    .landing
                    .relative(&m.location)
                    .is_some_and(|rel| src.glob.is_match(&rel))
                {
                    let data = silt.landing.get(&m.location).await?;
                    if keys.hmacs.is_empty() && !keys.find_in(&String::from_utf8_lossy(&data)) {
                        continue;
                    }
                    found.extend(rec.pii_of_file(&data));
                }
            }
            needles.pii.extend(found);
        }
        Ok(())
    }

    /// Models, in dag order, with the key columns they carry from upstream tables in scope:
    /// a source's key, and the key its subject_via children reach subjects through (a model
    /// of orders that keeps o_orderkey but not the customer key still holds the subjects'
    /// orders), and its own subject_key.
    pub(super) async fn scope_models(
        &mut self,
        silt: &Silt,
        dag: &Dag,
        id_set: &Arc<KeySet>,
    ) -> Result<()> {
        let project = &silt.project;
        let mut inherited: HashMap<String, Vec<(String, Arc<KeySet>)>> = self
            .source_scopes
            .iter()
            .map(|(n, sc)| (n.clone(), sc.keys.clone()))
            .collect();
        for name in &self.sources {
            if let Some(v) = &project.sources[name].subject_via
                && let Some(set) = self.keys_of(name)
            {
                inherited
                    .entry(v.parent().to_string())
                    .or_default()
                    .push((v.key.clone(), set));
            }
        }
        let project_pii = project.pii_columns();
        // Column lineage finds a key a model renamed (`o_custkey as buyer`); without a plan
        // (a model that does not plan fails its own build) keys are matched by name alone.
        let lineage = crate::build::lineage::compute(project, dag).await.ok();
        let mut model_keys: HashMap<String, Vec<(String, Arc<KeySet>)>> = HashMap::new();
        for name in &dag.order {
            let m = &dag.models[name];
            // (upstream table, key column, keys)
            let mut upstream: Vec<(String, String, Arc<KeySet>)> = Vec::new();
            let mut reached = false;
            for s in &m.sources {
                if let Some(keys) = inherited.get(s) {
                    reached = true;
                    upstream.extend(
                        keys.iter()
                            .map(|(c, set)| (format!("bronze.{s}"), c.clone(), set.clone())),
                    );
                }
            }
            for r in &m.refs {
                if let Some(k) = model_keys.get(r) {
                    reached = true;
                    let t = dag.models[r].table().to_string();
                    upstream.extend(k.iter().map(|(c, set)| (t.clone(), c.clone(), set.clone())));
                }
            }
            if let Some(k) = &m.config.subject_key {
                reached = true;
                upstream.push((String::new(), k.clone(), id_set.clone()));
            }
            if !reached {
                continue;
            }
            let schema = match silt.lake.delta_table(&m.table().rel_path()).await? {
                t if t.version().is_some() => Some(
                    t.snapshot()
                        .map_err(|e| Error::delta(m.table().to_string(), e))?
                        .snapshot()
                        .arrow_schema(),
                ),
                _ => None,
            };
            let has = |c: &str| {
                schema
                    .as_ref()
                    .is_some_and(|s| s.field_with_name(c).is_ok())
            };
            let lineage_of = lineage
                .as_ref()
                .and_then(|l| l.table(&m.table().to_string()));
            let mut keys: Vec<(String, Arc<KeySet>)> = Vec::new();
            for (from, c, set) in upstream {
                let mut names: Vec<String> = Vec::new();
                if has(&c) {
                    names.push(c.clone());
                }
                // A column that is that key copied, and nothing else (a union of customer
                // and product ids is no customer key).
                for col in lineage_of.iter().flat_map(|t| t.columns.iter()) {
                    let mut data = col
                        .deps
                        .iter()
                        .filter(|d| d.kind != crate::build::lineage::Kind::Filter);
                    let only_the_key = data.next().is_some_and(|d| {
                        d.kind == crate::build::lineage::Kind::Copied
                            && d.table == from
                            && d.column == c
                    }) && data.next().is_none();
                    if only_the_key && has(&col.name) && !names.contains(&col.name) {
                        names.push(col.name.clone());
                    }
                }
                for n in names {
                    if !keys.iter().any(|(k, s)| *k == n && Arc::ptr_eq(s, &set)) {
                        keys.push((n, set.clone()));
                    }
                }
            }
            let pii: Vec<String> = project_pii
                .iter()
                .chain(m.config.pii.iter())
                .filter(|c| has(c) && !m.config.pseudonymize.contains_key(*c))
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            model_keys.insert(name.clone(), keys.clone());
            self.models
                .push((name.clone(), Arc::new(Scope { keys, pii })));
        }
        Ok(())
    }

    /// How rows of `t` are matched, when `t` is in scope.
    pub(super) fn matcher(
        &self,
        t: &TableRef,
        headers: &HashMap<String, Vec<String>>,
    ) -> Option<Matcher> {
        match t.layer {
            Layer::Bronze => self
                .source_scopes
                .get(&t.name)
                .map(|s| Matcher::Columns(s.clone())),
            Layer::Quarantine => {
                let scope = self.source_scopes.get(&t.name)?;
                let src = self.source(t)?.clone();
                let mut counts: HashMap<&Vec<String>, usize> = HashMap::new();
                for h in headers.values() {
                    *counts.entry(h).or_default() += 1;
                }
                let fallback = counts
                    .into_iter()
                    .max_by_key(|(h, n)| (*n, (*h).clone()))
                    .map(|(h, _)| h.clone())
                    .unwrap_or_else(|| src.columns.iter().map(|c| c.source.clone()).collect());
                Some(Matcher::Raw(Arc::new(RawScope {
                    src,
                    keys: scope.keys.first()?.1.clone(),
                    headers: headers.clone(),
                    fallback,
                })))
            }
            Layer::Silver | Layer::Gold => self
                .models
                .iter()
                .find(|(n, _)| *n == t.name)
                .map(|(_, s)| Matcher::Columns(s.clone())),
            Layer::Silt => None,
        }
    }

    pub(super) fn source(&self, t: &TableRef) -> Option<&Source> {
        self.source_defs.get(&t.name)
    }

    /// The key set of an in-scope source's records.
    pub(super) fn keys_of(&self, source: &str) -> Option<Arc<KeySet>> {
        self.source_scopes
            .get(source)
            .and_then(|s| s.keys.first())
            .map(|k| k.1.clone())
    }
}

/// The values of column `key` on the rows of `t` (every data file, live or retained) that
/// belong to a subject by `scope`: the keys a `subject_via` child reaches subjects through.
pub(super) async fn derive(silt: &Silt, t: &TableRef, scope: &Scope, key: &str) -> Result<KeySet> {
    let mut set = KeySet::default();
    let cols: Vec<String> = scope
        .keys
        .iter()
        .map(|k| k.0.clone())
        .chain([key.to_string()])
        .collect();
    let key_only = Scope {
        keys: scope.keys.clone(),
        pii: vec![],
    };
    for (inner, loc) in data_files(silt, t).await? {
        for b in decode_parquet_for(silt.lake.get(&loc).await?, &inner, Some(&cols))? {
            let Some(values) = b.column_by_name(key) else {
                continue;
            };
            let mask = key_only.mask(&b, &Needles::default());
            if !mask.iter().any(|m| *m) {
                continue;
            }
            let values = arrow::compute::cast(values, &DataType::Utf8)?;
            let values = values.as_string::<i32>();
            for (i, m) in mask.into_iter().enumerate() {
                if m && values.is_valid(i) {
                    set.insert(values.value(i));
                }
            }
        }
    }
    Ok(set)
}

/// Every source that holds subject data declares how it reaches a subject: a configuration
/// error (before anything is rewritten) when a source without `subject_key`/`subject_via`
/// has a column named like a subject key of another source, a column named like the primary
/// key of a source in scope, or a relationships test to one.
pub(super) fn check_paths(project: &crate::project::config::Project) -> Result<()> {
    let in_scope: Vec<&Source> = project
        .sources
        .values()
        .filter(|s| s.subject_key.is_some() || s.subject_via.is_some())
        .collect();
    let mut problems = Vec::new();
    for s in project.sources.values() {
        if s.subject_key.is_some() || s.subject_via.is_some() || s.holds_subjects == Some(false) {
            continue;
        }
        let has = |c: &str| s.columns.iter().any(|x| x.name == c);
        // A column of the source's own primary key is its own identity (`id` in two sources
        // says nothing), not a reference to another source's key.
        let refers = |c: &str| has(c) && !s.primary_key.iter().any(|k| k == c);
        let mut fix: Option<String> = None;
        for p in &in_scope {
            if let Some(k) = &p.subject_key
                && has(k)
            {
                fix = Some(format!(
                    "column '{k}' is the subject key of source '{}': add subject_key = \"{k}\"",
                    p.name
                ));
                break;
            }
            if let [pk] = p.primary_key.as_slice()
                && refers(pk)
            {
                fix = Some(format!(
                    "column '{pk}' is the key of source '{}', whose rows belong to subjects: add subject_via = {{ column = \"{pk}\", table = \"{}\", key = \"{pk}\" }}",
                    p.name, p.name
                ));
                break;
            }
        }
        if fix.is_none() {
            for t in s.tests.iter().filter(|t| t.kind == "relationships") {
                let (Some(col), Some(to)) = (&t.column, &t.to) else {
                    continue;
                };
                let to = to.strip_prefix("bronze.").unwrap_or(to);
                if let Some(p) = in_scope.iter().find(|p| p.name == to) {
                    let key = t.field.clone().unwrap_or_else(|| col.clone());
                    fix = Some(format!(
                        "its relationships test leads '{col}' to source '{}', whose rows belong to subjects: add subject_via = {{ column = \"{col}\", table = \"{}\", key = \"{key}\" }}",
                        p.name, p.name
                    ));
                    break;
                }
            }
        }
        if let Some(f) = fix {
            problems.push(format!(
                "{}: source '{}' holds data of the subjects but declares no path to them; {f} (or holds_subjects = false if its rows belong to no subject)",
                s.file, s.name
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::config(
        "sql/bronze",
        format!(
            "silt forget cannot reach every table holding the subjects' data; nothing was changed:\n  {}",
            problems.join("\n  ")
        ),
    ))
}
