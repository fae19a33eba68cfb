//! `silt forget --verify`: every object under the lake and landing roots of the tables and
//! sources in scope scanned for the subjects' keys and PII values, live or retained, data files
//! and log entries. It must not write.

use super::*;

/// `silt forget --verify`: every object under the lake and landing roots.
pub async fn verify(silt: &Silt, ids: &[String]) -> Result<VerifyReport> {
    let key = key_of(silt)?;
    let dag = Dag::load(&silt.project)?;
    // The keys that subject_via sources reached the subjects through, as an erasure of them
    // recorded (the parent rows they came from are gone by now).
    let wanted: HashSet<String> = ids.iter().map(|i| hmac_hex(&key, i.trim())).collect();
    let mut stored: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in audit_entries(&silt.catalog).await? {
        if e.subject_hmacs.split(',').any(|h| wanted.contains(h)) {
            for (src, hs) in e.key_hmacs {
                stored.entry(src).or_default().extend(hs);
            }
        }
    }
    let plan = Plan::resolve(silt, &dag, ids, &key, &stored).await?;
    let mut report = VerifyReport::default();
    let headers = verify_landing(silt, &plan, &mut report).await?;
    // The lake: every data file and log entry of the tables in scope, live or retained.
    let mut tables: Vec<TableRef> = plan
        .models
        .iter()
        .map(|(name, _)| dag.models[name].table())
        .collect();
    for name in &plan.sources {
        tables.push(TableRef::bronze(name));
        tables.push(TableRef::quarantine(name));
    }
    for t in tables {
        let none = HashMap::new();
        let Some(how) = plan.matcher(&t, headers.get(&t.name).unwrap_or(&none)) else {
            continue;
        };
        if how.columns().is_empty() {
            continue;
        }
        verify_table(silt, &t, &how, &plan.needles, &mut report).await?;
    }
    Ok(report)
}

/// Scan the landing files of the sources in scope for records an erasure would drop; the CSV
/// headers read on the way (per source, per file), which the quarantine's raw records are
/// read by.
pub(super) async fn verify_landing(
    silt: &Silt,
    plan: &Plan,
    report: &mut VerifyReport,
) -> Result<HashMap<String, HashMap<String, Vec<String>>>> {
    let mut headers: HashMap<String, HashMap<String, Vec<String>>> = HashMap::new();
    let (landing, skipped) = silt.landing.list_landing().await?;
    report.unreadable = skipped;
    for name in &plan.sources {
        let src = &silt.project.sources[name];
        let keys = plan.keys_of(name).expect("a source in scope has keys");
        let rec = Records::new(src, &keys, &plan.needles);
        for o in &landing {
            let Some(rel) = silt.landing.relative(&o.location) else {
                continue;
            };
            if !src.glob.is_match(&rel) {
                continue;
            }
            report.objects_scanned += 1;
            let data = silt.landing.get(&o.location).await?;
            if src.format == Format::Csv
                && src.parse.header
                && let Some(h) = csv_header(&data, src)
            {
                headers
                    .entry(name.clone())
                    .or_default()
                    .insert(rel.clone(), h);
            }
            if let Some((_, dropped)) = without_subjects(&data, &rec) {
                report.findings.push(Finding {
                    location: format!("landing:{rel}"),
                    kind: format!("{dropped} subject record(s)"),
                    column: None,
                });
            }
        }
    }
    Ok(headers)
}

/// Scan every object under table `t` (data files live or retained, log entries): a subject's
/// key or PII value in a data file, or in a log entry's file statistics, is a finding.
pub(super) async fn verify_table(
    silt: &Silt,
    t: &TableRef,
    how: &Matcher,
    n: &Needles,
    report: &mut VerifyReport,
) -> Result<()> {
    let no_doomed = HashSet::new();
    let rel = t.rel_path();
    for o in silt.lake.list(&rel).await? {
        let Some(full) = silt.lake.relative(&o.location) else {
            continue;
        };
        let Some(inner) = full.strip_prefix(&format!("{rel}/")) else {
            continue;
        };
        let location = format!("lake:{full}");
        report.objects_scanned += 1;
        let data = silt.lake.get(&o.location).await?;
        if let Some(log) = inner.strip_prefix("_delta_log/") {
            if log_mentions(log, data, &no_doomed, how, n)? {
                report.findings.push(Finding {
                    location,
                    kind: "file statistics".into(),
                    column: None,
                });
            }
            continue;
        }
        if !inner.ends_with(".parquet") {
            continue;
        }
        report.parquet_files += 1;
        let batches = match decode_parquet(data.clone(), &full) {
            Ok(b) => b,
            Err(e) => {
                report.findings.push(Finding {
                    location,
                    kind: format!("unreadable Parquet ({e})"),
                    column: None,
                });
                continue;
            }
        };
        let mut seen: BTreeSet<(String, Option<String>)> = BTreeSet::new();
        for b in batches {
            seen.extend(findings_in(&b, how, n));
        }
        for (kind, column) in seen {
            report.findings.push(Finding {
                location: location.clone(),
                kind,
                column,
            });
        }
    }
    Ok(())
}

/// What of the subjects one batch of a data file holds: (what, column).
pub(super) fn findings_in(
    b: &RecordBatch,
    how: &Matcher,
    n: &Needles,
) -> BTreeSet<(String, Option<String>)> {
    let mut seen = BTreeSet::new();
    match how {
        Matcher::Columns(scope) => {
            for (c, set) in &scope.keys {
                if let Some(a) = b.column_by_name(c)
                    && set.mask(a).into_iter().any(|m| m == Some(true))
                {
                    seen.insert(("subject key".into(), Some(c.clone())));
                }
            }
            // PII on rows keyed to nobody (a row of another subject that shares a name is not
            // a finding).
            let pii_only = Scope {
                keys: scope.keys.clone(),
                pii: vec![],
            };
            let keyed = pii_only.mask(b, n);
            for c in &scope.pii {
                let one = Scope {
                    keys: scope.keys.clone(),
                    pii: vec![c.clone()],
                };
                if one.mask(b, n).into_iter().zip(&keyed).any(|(m, k)| m && !k) {
                    seen.insert(("PII value".into(), Some(c.clone())));
                }
            }
        }
        Matcher::Raw(_) => {
            if how.mask(b, n).true_count() > 0 {
                seen.insert(("subject record".into(), Some("raw_record".into())));
            }
        }
    }
    seen
}
