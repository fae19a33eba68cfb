//! silt's own MERGE of a model's staged rows (merge.rs stages them: `upsert` rows replace or add
//! a key, `delete` rows remove one), file by file. The target files of the staged rows'
//! partitions are scanned on their key columns; only the files holding a staged key are
//! rewritten without those rows ([`crate::lake::rewrite::FileRewrite`], one file at a time per
//! core); the upsert rows are written beside them; one commit removes the old files and adds
//! the new. delta-rs's MERGE held every scanned file's rows until its end (its `MergeBarrier`),
//! so its memory grew with the touched partitions and with the deliveries they had taken; here
//! memory holds the staged rows, their keys and one batch per file being rewritten. A key
//! matches on the unique key and the partition values (NULL partition values match each other;
//! a NULL in another key column matches nothing, as `=` does). It must not decide which rows to
//! stage (merge.rs does) nor when a MERGE is the way to build (mod.rs does).

use std::collections::HashMap;

use arrow::array::{ArrayRef, AsArray, BooleanArray, StringArray};
use arrow::row::{RowConverter, SortField};
use deltalake::kernel::Action;
use deltalake::operations::merge::MergeMetrics;

use super::*;
use crate::lake::rewrite::{self, FileRewrite};

/// The staged keys of one partition: key row → the staged row's index.
type KeyRows = Arc<HashMap<Vec<u8>, u32>>;

/// Why silt's own MERGE does not apply to a target (delta-rs's MERGE then runs).
pub(super) fn own_merge_blocker(
    target: &DeltaTable,
    m: &Model,
    cols: &[String],
    evolve: bool,
) -> Option<&'static str> {
    if evolve {
        return Some("the table gains columns");
    }
    let Ok(snap) = target.snapshot() else {
        return Some("the table has no snapshot");
    };
    let meta = snap.metadata();
    if meta
        .configuration()
        .get("delta.columnMapping.mode")
        .is_some_and(|v| v != "none")
    {
        return Some("the table maps column names");
    }
    if snap
        .schema()
        .fields()
        .any(|f| !cols.iter().any(|c| c == f.name()))
    {
        // An update keeps the columns the model no longer yields; a row replaced whole would not.
        return Some("the table has columns the model does not yield");
    }
    let config = meta.configuration();
    if config
        .get("delta.enableChangeDataFeed")
        .is_some_and(|v| v == "true")
    {
        return Some("the table records its change data feed");
    }
    if config.keys().any(|k| k.starts_with("delta.constraints.")) {
        return Some("the table has check constraints");
    }
    if snap
        .schema()
        .fields()
        .any(|f| f.metadata().contains_key("delta.generationExpression"))
    {
        return Some("the table has generated columns");
    }
    // The MERGE matches on the table's partition columns; delta-rs's predicate names the
    // model's `partition_by`. They agree for tables silt built (a change rebuilds in full).
    let parts = meta.partition_columns();
    if parts.iter().ne(m.config.partition_by.iter()) {
        return Some("the table is partitioned other than the model says");
    }
    if m.config.unique_key.is_empty() || m.config.unique_key.iter().all(|k| parts.contains(k)) {
        return Some("the unique key is the partition");
    }
    if snap
        .log_data()
        .iter()
        .any(|f| f.deletion_vector_descriptor().is_some())
    {
        return Some("the table has deletion vectors");
    }
    None
}

/// `cols` of `batch` cast to `schema`'s types.
fn typed(
    batch: &RecordBatch,
    cols: &[String],
    schema: &arrow::datatypes::Schema,
) -> Result<Vec<ArrayRef>> {
    cols.iter()
        .map(|c| {
            let a = batch
                .column_by_name(c)
                .ok_or_else(|| Error::Internal(format!("column {c} missing from the rows")))?;
            cast_strictly(a, schema.field_with_name(c)?.data_type())
        })
        .collect()
}

/// `a` cast to `t`, failing on a value that does not fit (as delta-rs's MERGE casts), never
/// turning it into NULL.
fn cast_strictly(a: &ArrayRef, t: &DataType) -> Result<ArrayRef> {
    let options = arrow::compute::CastOptions {
        safe: false,
        ..Default::default()
    };
    Ok(arrow::compute::cast_with_options(a, t, &options)?)
}

/// Whether a column of this type has exact min/max statistics in the Delta log (strings are
/// truncated, timestamps rounded to milliseconds, decimals written as floating point).
fn exact_stats(t: &DataType) -> bool {
    t.is_integer() || matches!(t, DataType::Date32 | DataType::Date64)
}

/// A file's min and max of `column` from its add action's statistics, typed as `t`; None when
/// they are missing or unreadable (the file is then read).
fn file_range(
    stats: Option<&str>,
    column: &str,
    t: &DataType,
) -> Option<(ScalarValue, ScalarValue)> {
    let stats: serde_json::Value = serde_json::from_str(stats?).ok()?;
    let typed = |v: &serde_json::Value| -> Option<ScalarValue> {
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return None,
        };
        let a: ArrayRef = Arc::new(StringArray::from(vec![text]));
        let a = arrow::compute::cast(&a, t).ok()?;
        (!a.is_null(0))
            .then(|| ScalarValue::try_from_array(&a, 0).ok())
            .flatten()
    };
    Some((
        typed(stats.get("minValues")?.get(column)?)?,
        typed(stats.get("maxValues")?.get(column)?)?,
    ))
}

/// Whether row `i` has a NULL in any of `cols`.
fn any_null(cols: &[ArrayRef], i: usize) -> bool {
    cols.iter().any(|c| c.is_null(i))
}

/// The rows of `batch` whose key (the non-partition unique key columns) is staged in `keys`;
/// `on_match` gets each such row's staged index.
fn staged_rows(
    batch: &RecordBatch,
    key_cols: &[String],
    schema: &arrow::datatypes::Schema,
    conv: &RowConverter,
    keys: &KeyRows,
    mut on_match: impl FnMut(u32),
) -> Result<BooleanArray> {
    if key_cols.iter().any(|c| batch.column_by_name(c).is_none()) {
        // A file written before the key column existed holds NULL keys: nothing matches.
        return Ok(BooleanArray::from(vec![false; batch.num_rows()]));
    }
    let cols = typed(batch, key_cols, schema)?;
    let rows = conv.convert_columns(&cols)?;
    Ok((0..batch.num_rows())
        .map(|i| {
            let hit = !any_null(&cols, i)
                && keys
                    .get(rows.row(i).as_ref())
                    .inspect(|&&s| on_match(s))
                    .is_some();
            Some(hit)
        })
        .collect())
}

/// The staged indices of the rows of one file (`path`, read on its key columns) whose key is
/// staged in `keys`.
async fn scan_keys(
    lake: crate::lake::storage::Storage,
    rel: String,
    path: String,
    keys: KeyRows,
    kconv: Arc<RowConverter>,
    schema: arrow::datatypes::SchemaRef,
    key_cols: Arc<Vec<String>>,
) -> Result<Vec<u32>> {
    let data = lake.get_file(&rel, &path).await?;
    let mut matched = Vec::new();
    for b in rewrite::decode_parquet_for(data, &path, Some(&key_cols))? {
        staged_rows(&b, &key_cols, &schema, &kconv, &keys, |s| matched.push(s))?;
    }
    Ok(matched)
}

impl Materializer<'_> {
    /// The MERGE of `staged` (the model's columns and `__silt_op`) into `target`, rewriting
    /// only the files that hold a staged key. The metrics are delta-rs's, counted alike.
    pub(super) async fn merge_files(
        &self,
        m: &Model,
        t: &TableRef,
        target: DeltaTable,
        staged: Vec<RecordBatch>,
        predicate: &str,
        state: &ModelState,
    ) -> Result<(DeltaTable, MergeMetrics)> {
        let started = Instant::now();
        let err = |e: deltalake::DeltaTableError| Error::delta(t.to_string(), e);
        let snap = target.snapshot().map_err(err)?.clone();
        let eager = snap.snapshot().clone();
        let schema = eager.arrow_schema();
        let parts: Vec<String> = eager.metadata().partition_columns().to_vec();
        let key_cols: Vec<String> = m
            .config
            .unique_key
            .iter()
            .filter(|k| !parts.contains(k))
            .cloned()
            .collect();
        let fields = |cols: &[String]| -> Result<Vec<SortField>> {
            cols.iter()
                .map(|c| {
                    Ok(SortField::new(
                        schema.field_with_name(c)?.data_type().clone(),
                    ))
                })
                .collect()
        };
        let kconv = Arc::new(RowConverter::new(fields(&key_cols)?)?);
        let staged = match staged.first() {
            Some(b) => arrow::compute::concat_batches(&b.schema(), &staged)?,
            None => RecordBatch::new_empty(schema.clone()),
        };
        let n = staged.num_rows();
        let upsert: Vec<bool> = match staged.column_by_name("__silt_op") {
            Some(op) => {
                let op = arrow::compute::cast(op, &DataType::Utf8)?;
                let op = op.as_string::<i32>();
                (0..n)
                    .map(|i| op.is_valid(i) && op.value(i) == "upsert")
                    .collect()
            }
            None => vec![true; n],
        };
        // The partition values of a row, as one row of `parts` (empty when unpartitioned).
        let pconv = match parts.is_empty() {
            true => None,
            false => Some(RowConverter::new(fields(&parts)?)?),
        };
        let prow_of = |cols: &[ArrayRef]| -> Result<Vec<Vec<u8>>> {
            Ok(match &pconv {
                Some(c) => {
                    let rows = c.convert_columns(cols)?;
                    (0..rows.num_rows())
                        .map(|i| rows.row(i).as_ref().to_vec())
                        .collect()
                }
                None => vec![Vec::new(); cols.first().map_or(0, |c| c.len())],
            })
        };
        // The staged keys by partition, and the range of the first key column in each.
        let mut groups: HashMap<Vec<u8>, HashMap<Vec<u8>, u32>> = HashMap::new();
        let mut ranges: HashMap<Vec<u8>, (ScalarValue, ScalarValue)> = HashMap::new();
        let first_type = schema.field_with_name(&key_cols[0])?.data_type().clone();
        if n > 0 {
            let kcols = typed(&staged, &key_cols, &schema)?;
            let krows = kconv.convert_columns(&kcols)?;
            let prows = if parts.is_empty() {
                vec![Vec::new(); n]
            } else {
                prow_of(&typed(&staged, &parts, &schema)?)?
            };
            for (i, prow) in prows.into_iter().enumerate() {
                if any_null(&kcols, i) {
                    continue;
                }
                if exact_stats(&first_type) {
                    let v = ScalarValue::try_from_array(&kcols[0], i)?;
                    let r = ranges
                        .entry(prow.clone())
                        .or_insert_with(|| (v.clone(), v.clone()));
                    if v < r.0 {
                        r.0 = v;
                    } else if v > r.1 {
                        r.1 = v;
                    }
                }
                groups
                    .entry(prow)
                    .or_default()
                    .insert(krows.row(i).as_ref().to_vec(), i as u32);
            }
        }
        let groups: HashMap<Vec<u8>, KeyRows> =
            groups.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        // The files of the staged rows' partitions whose statistics do not rule the keys out.
        let mut candidates = Vec::new();
        let mut skipped = 0usize;
        for f in snap.log_data().iter() {
            let prow = if parts.is_empty() {
                Vec::new()
            } else {
                let raw = f.partition_values_map();
                let cols = parts
                    .iter()
                    .map(|p| {
                        let text: ArrayRef =
                            Arc::new(StringArray::from(vec![raw.get(p).cloned().flatten()]));
                        cast_strictly(&text, schema.field_with_name(p)?.data_type())
                    })
                    .collect::<Result<Vec<_>>>()?;
                prow_of(&cols)?.remove(0)
            };
            let Some(keys) = groups.get(&prow) else {
                skipped += 1;
                continue;
            };
            if let Some((lo, hi)) = ranges.get(&prow)
                && let Some((min, max)) =
                    file_range(f.stats().as_deref(), &key_cols[0], &first_type)
                && (max < *lo || min > *hi)
            {
                skipped += 1;
                continue;
            }
            candidates.push((f.path().to_string(), f.remove_action(true), keys.clone()));
        }
        let scanned = candidates.len();
        // Their key columns, read file by file: the files holding a staged key.
        let lake = self.catalog.lake();
        let rel = t.rel_path();
        let key_cols = Arc::new(key_cols);
        let mut scans = Vec::new();
        for (path, _, keys) in &candidates {
            scans.push(scan_keys(
                lake.clone(),
                rel.clone(),
                path.clone(),
                keys.clone(),
                kconv.clone(),
                schema.clone(),
                key_cols.clone(),
            ));
        }
        let mut replaced = vec![false; n];
        let (mut updated, mut deleted) = (0usize, 0usize);
        let mut hits = Vec::new();
        let found = rewrite::each_in_a_task(scans.into_iter(), "merge scan").await;
        for (c, matched) in candidates.into_iter().zip(found) {
            let matched = matched?;
            if matched.is_empty() {
                continue;
            }
            for s in matched {
                replaced[s as usize] = true;
                if upsert[s as usize] {
                    updated += 1;
                } else {
                    deleted += 1;
                }
            }
            hits.push(c);
        }
        let scan_ms = started.elapsed().as_millis() as u64;
        tracing::debug!(model = %m.name, ms = scan_ms, files = hits.len(), "merge: files holding staged keys");
        // Those files without the staged keys' rows.
        let writer_config =
            rewrite::writer_config(&eager, schema.clone(), Some(model_writer_properties()));
        let ctx = rewrite::reading_session(lake)?;
        let partition_columns = Arc::new(parts.clone());
        let mut jobs = Vec::new();
        for (path, _, keys) in &hits {
            let (keys, kconv, schema2, key_cols) = (
                keys.clone(),
                kconv.clone(),
                schema.clone(),
                key_cols.clone(),
            );
            let drop: rewrite::DropRows = Arc::new(move |b: &RecordBatch| {
                staged_rows(b, &key_cols, &schema2, &kconv, &keys, |_| {})
            });
            jobs.push(
                FileRewrite {
                    table: target.clone(),
                    ctx: ctx.clone(),
                    path: path.clone(),
                    drop,
                    target: schema.clone(),
                    writer_config: writer_config.clone(),
                    t: t.clone(),
                    lake: lake.clone(),
                    partition_columns: partition_columns.clone(),
                }
                .run(),
            );
        }
        let mut adds = Vec::new();
        let mut copied = 0u64;
        for w in rewrite::each_in_a_task(jobs.into_iter(), "merge rewrite").await {
            let w = w?;
            copied += w.kept;
            adds.extend(w.adds);
        }
        // The upserts, in the table's columns and types.
        let keep = BooleanArray::from(upsert.clone());
        let rows = arrow::compute::filter_record_batch(&staged, &keep)?;
        let inserted = (0..n).filter(|&i| upsert[i] && !replaced[i]).count();
        if rows.num_rows() > 0 {
            let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
            let rows = RecordBatch::try_new(schema.clone(), typed(&rows, &names, &schema)?)?;
            let mut writer = deltalake::datafile::writer::DeltaWriter::new(
                target.log_store().object_store(None),
                writer_config.clone(),
            );
            if parts.is_empty() {
                writer.write(&rows).await.map_err(err)?;
            } else {
                for g in crate::lake::files::split(&rows, &parts)? {
                    let values = crate::lake::files::partition_values(&g.rows, &parts)?;
                    writer.write_partition(g.rows, &values).await.map_err(err)?;
                }
            }
            adds.extend(writer.close().await.map_err(err)?);
        }
        let metrics = MergeMetrics {
            num_source_rows: n,
            num_target_rows_inserted: inserted,
            num_target_rows_updated: updated,
            num_target_rows_deleted: deleted,
            num_target_rows_copied: copied as usize,
            num_output_rows: copied as usize + rows.num_rows(),
            num_target_files_scanned: scanned,
            num_target_files_skipped_during_scan: skipped,
            num_target_files_added: adds.len(),
            num_target_files_removed: hits.len(),
            execution_time_ms: started.elapsed().as_millis() as u64,
            scan_time_ms: scan_ms,
            rewrite_time_ms: started.elapsed().as_millis() as u64 - scan_ms,
        };
        let mut actions: Vec<Action> = hits.into_iter().map(|h| Action::Remove(h.1)).collect();
        actions.extend(adds.into_iter().map(Action::Add));
        let mut meta = self.commit_metadata(m, state);
        meta.push((
            "operationMetrics".to_string(),
            serde_json::to_value(&metrics).unwrap_or_default(),
        ));
        let table = crate::lake::commit::commit_actions(
            target,
            t,
            actions,
            CommitProperties::default().with_metadata(meta),
            deltalake::protocol::DeltaOperation::Merge {
                predicate: None,
                merge_predicate: Some(predicate.to_string()),
                matched_predicates: Vec::new(),
                not_matched_predicates: Vec::new(),
                not_matched_by_source_predicates: Vec::new(),
            },
        )
        .await?;
        Ok((table, metrics))
    }
}
