//! Checks a build passes before anything is written: the increment unique by key (a duplicate
//! would make the MERGE fail half-way, or a table hold a key twice), and the output against the
//! model's declared contract. It must not write.

use super::*;

/// Arrow types that are the same for a contract (string encodings, timezone spellings).
pub(super) fn same_type(a: &DataType, b: &DataType) -> bool {
    use DataType::*;
    match (a, b) {
        (Utf8 | Utf8View | LargeUtf8, Utf8 | Utf8View | LargeUtf8) => true,
        (Timestamp(u1, z1), Timestamp(u2, z2)) => {
            let utc = |z: &Option<Arc<str>>| {
                z.as_deref()
                    .is_some_and(|z| matches!(z, "UTC" | "+00:00" | "Z"))
            };
            u1 == u2 && (z1 == z2 || (utc(z1) && utc(z2)))
        }
        (List(x) | LargeList(x) | ListView(x), List(y) | LargeList(y) | ListView(y)) => {
            same_type(x.data_type(), y.data_type())
        }
        (Struct(x), Struct(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y.iter())
                    .all(|(f, g)| f.name() == g.name() && same_type(f.data_type(), g.data_type()))
        }
        _ => a == b,
    }
}

/// The model's output against its declared contract: same columns, same types.
pub(super) fn check_contract(
    m: &Model,
    schema: &arrow::datatypes::Schema,
    contract: &BTreeMap<String, String>,
) -> Result<()> {
    let mut problems = Vec::new();
    for (name, ty) in contract {
        let want = crate::project::contract::ColumnType::parse(ty)
            .map_err(|e| Error::config(&m.file, format!("contract: column '{name}': {e}")))?;
        match schema.field_with_name(name) {
            Err(_) => problems.push(format!("column '{name}' ({ty}) is missing from the output")),
            Ok(f) if !same_type(f.data_type(), &want.to_arrow()) => problems.push(format!(
                "column '{name}' is {} but the contract says {ty}",
                f.data_type()
            )),
            Ok(_) => {}
        }
    }
    for f in schema.fields() {
        if !contract.contains_key(f.name()) {
            problems.push(format!(
                "column '{}' ({}) is not in the contract",
                f.name(),
                f.data_type()
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::config(
        &m.file,
        format!(
            "the output breaks the model's contract; nothing was written:\n  {}",
            problems.join("\n  ")
        ),
    ))
}

/// The most bytes of candidate rows [`Materializer::keys_that_may_repeat`] holds before it
/// leaves the check to the grouped count over every key (which spills).
const CANDIDATES_BYTES: usize = 64 << 20;

impl Materializer<'_> {
    /// The key columns of the rows of `df` whose key may occur more than once: every row of a
    /// repeated key, and the rows of keys seen once whose hash shares a bit with another
    /// (`lake/duplicate_hashes.rs`), a few percent. None when they hold more than
    /// `CANDIDATES_BYTES` (the table is far from unique): check every key.
    async fn keys_that_may_repeat(
        &self,
        m: &Model,
        df: &DataFrame,
    ) -> Result<Option<Vec<RecordBatch>>> {
        use crate::lake::duplicate_hashes::DuplicateFilterExec;
        let keys: Vec<&str> = m.config.unique_key.iter().map(String::as_str).collect();
        let keys_df = df
            .clone()
            .select_columns(&keys)
            .map_err(|e| sql_error(m, e))?;
        // Two plans of the same rows: one counted, one split (a plan's operators keep state
        // per execution, so one plan cannot be read twice).
        let counted = keys_df
            .clone()
            .create_physical_plan()
            .await
            .map_err(|e| sql_error(m, e))?;
        let rows_plan = keys_df
            .create_physical_plan()
            .await
            .map_err(|e| sql_error(m, e))?;
        let columns: Vec<usize> = (0..keys.len()).collect();
        let split =
            DuplicateFilterExec::try_new(rows_plan, counted, columns.clone(), columns, true, None)?;
        let mut rows =
            datafusion::physical_plan::execute_stream(Arc::new(split), self.ctx.task_ctx())?;
        let (mut batches, mut bytes) = (Vec::new(), 0);
        while let Some(b) = rows.next().await {
            let b = b.map_err(|e| sql_error(m, e))?;
            bytes += b.get_array_memory_size();
            if bytes > CANDIDATES_BYTES {
                return Ok(None);
            }
            batches.push(b);
        }
        Ok(Some(batches))
    }

    pub(super) async fn check_unique(
        &self,
        m: &Model,
        df: &DataFrame,
        incremental: bool,
    ) -> Result<()> {
        // A snapshot's full build may carry several versions per key; only its increments and
        // incremental models must be unique.
        if m.config.materialized == Materialized::Snapshot && !incremental {
            return Ok(());
        }
        let keys = m
            .config
            .unique_key
            .iter()
            .map(|k| q(k))
            .collect::<Vec<_>>()
            .join(", ");
        let name = "__silt_check";
        // A full build's check reads the whole table: first only the rows whose key may
        // repeat (their key hash shares a bit with another row's), which are few.
        let checked = if incremental {
            df.clone()
        } else {
            match self.keys_that_may_repeat(m, df).await? {
                Some(rows) if rows.is_empty() => return Ok(()),
                Some(rows) => self.ctx.read_batches(rows)?,
                None => df.clone(),
            }
        };
        let _ = self.ctx.deregister_table(name);
        self.ctx.register_table(name, checked.into_view())?;
        let dup = self
            .ctx
            .sql(&format!("select {keys}, count(*) as n from {name} group by {keys} having count(*) > 1 limit 5"))
            .await
            .map_err(|e| sql_error(m, e))?
            .collect()
            .await
            .map_err(|e| sql_error(m, e));
        let _ = self.ctx.deregister_table(name);
        let dup = dup?;
        let n: usize = dup.iter().map(|b| b.num_rows()).sum();
        if n > 0 {
            // A key leading to a data subject is not written into a message: messages go to the
            // run log, which an erasure does not rewrite.
            let personal = m.config.unique_key.iter().any(|k| {
                self.pii.contains(k)
                    || m.config.pii.contains(k)
                    || m.config.subject_key.as_ref() == Some(k)
            });
            let shown = if personal {
                format!(
                    "{n}{} key value(s) repeat (not shown: the key leads to a data subject; list them with `silt query` on the model's upstream)",
                    if n >= 5 { "+" } else { "" }
                )
            } else {
                format!("duplicates:\n{}", crate::render::table(&dup))
            };
            return Err(Error::config(
                &m.file,
                format!(
                    "unique_key ({}) is not unique in the model's output; {shown}",
                    m.config.unique_key.join(", "),
                ),
            ));
        }
        Ok(())
    }
}
