//! SCD2 snapshots: a history with valid_from, valid_to and is_current per key, built in full or
//! merged with the rows whose tracked columns (check) or updated_at (timestamp) changed. It must
//! not write other materializations.

use super::*;

impl Materializer<'_> {
    pub(super) fn scd2_parts(&self, m: &Model, df_cols: &[String]) -> (String, String, String) {
        let cfg = &m.config;
        let keys = cfg
            .unique_key
            .iter()
            .map(|k| q(k))
            .collect::<Vec<_>>()
            .join(", ");
        let hash_cols: Vec<&String> = if cfg.check_cols.is_empty() {
            df_cols
                .iter()
                .filter(|c| {
                    !cfg.unique_key.contains(c)
                        && Some(*c) != cfg.updated_at.as_ref()
                        && !c.starts_with('_')
                })
                .collect()
        } else {
            cfg.check_cols.iter().collect()
        };
        let hash = format!(
            "md5(concat_ws('|', {}))",
            hash_cols
                .iter()
                .map(|c| format!("coalesce(cast({} as varchar), '\\u0000')", q(c)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let vt = match (&cfg.updated_at, cfg.strategy) {
            (Some(u), _) => q(u),
            (None, _) => format!(
                "arrow_cast('{}', 'Timestamp(Microsecond, Some(\"UTC\"))')",
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            ),
        };
        (keys, hash, vt)
    }

    pub(super) async fn model_columns(&self, m: &Model, sql: &str) -> Result<Vec<String>> {
        let df = self.ctx.sql(sql).await.map_err(|e| sql_error(m, e))?;
        Ok(columns_of(&df))
    }

    /// SCD2 from scratch: every distinct version of each key, in time order.
    pub(super) async fn scd2_full(&self, m: &Model, sql: &str) -> Result<DataFrame> {
        let cols = self.model_columns(m, sql).await?;
        let (keys, hash, vt) = self.scd2_parts(m, &cols);
        let c = cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ");
        // One ordered pass over (key, time) instead of windows partitioned by key: DataFusion
        // keeps state per window partition, and a history has about one partition per row.
        // A row's neighbour in that order belongs to the same key when every key column
        // matches (NULL-safe). (Splitting the order into buckets of keys would run two windows'
        // sorts in one pool: docs/decisions/0018.)
        let w = format!("over (order by {keys}, __vt)");
        let key_cols = &m.config.unique_key;
        let prev_keys = key_cols
            .iter()
            .enumerate()
            .map(|(i, k)| format!("lag({}) {w} as __pk{i}", q(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let next_keys = key_cols
            .iter()
            .enumerate()
            .map(|(i, k)| format!("lead({}) {w} as __nk{i}", q(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let same = |p: &str| {
            key_cols
                .iter()
                .enumerate()
                .map(|(i, k)| format!("({p}{i} is not distinct from {})", q(k)))
                .collect::<Vec<_>>()
                .join(" and ")
        };
        let (same_prev, same_next) = (same("__pk"), same("__nk"));
        let full = format!(
            "with src as ({sql}), \
             h as (select *, {vt} as __vt, {hash} as _scd_hash from src), \
             o as (select *, lag(_scd_hash) {w} as __prev, {prev_keys} from h), \
             k as (select * from o where not ({same_prev}) or __prev is null or __prev <> _scd_hash), \
             n as (select *, lead(__vt) {w} as __next, {next_keys} from k), \
             v as (select *, case when {same_next} then __next end as __valid_to from n) \
             select {c}, _scd_hash, __vt as valid_from, __valid_to as valid_to, \
               __valid_to is null as is_current \
             from v"
        );
        self.ctx.sql(&full).await.map_err(|e| sql_error(m, e))
    }

    /// SCD2 increment: close the current version of changed keys and insert their new versions,
    /// in one MERGE on (key, valid_from).
    pub(super) async fn scd2_merge(
        &self,
        m: &Model,
        t: &TableRef,
        target: DeltaTable,
        sql: &str,
        state: &ModelState,
        metrics: &mut ModelMetrics,
    ) -> Result<DeltaTable> {
        let cols = self.model_columns(m, sql).await?;
        let (keys, hash, vt) = self.scd2_parts(m, &cols);
        let c = cols.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ");
        let key_join = m
            .config
            .unique_key
            .iter()
            .map(|k| format!("t.{c} = nk.{c}", c = q(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let staged_sql = format!(
            "with n as (select *, {vt} as __vt, {hash} as _scd_hash from ({sql}) src), \
             nk as (select distinct {keys} from n), \
             cur as (select t.* from {t} t join nk on {key_join} where t.is_current), \
             seq as (select {c}, _scd_hash, valid_from as __vt, 0 as __new from cur \
                     union all select {c}, _scd_hash, __vt, 1 as __new from n), \
             o as (select *, lag(_scd_hash) over (partition by {keys} order by __vt, __new) as __prev from seq), \
             k as (select * from o where __new = 0 or __prev is null or __prev <> _scd_hash), \
             f as (select *, lead(__vt) over (partition by {keys} order by __vt, __new) as __next from k) \
             select {c}, _scd_hash, __vt as valid_from, __next as valid_to, __next is null as is_current \
             from f where __new = 1 or __next is not null"
        );
        let staged = self
            .ctx
            .sql(&staged_sql)
            .await
            .map_err(|e| sql_error(m, e))?;
        let batches = staged.collect().await?;
        if batches.iter().all(|b| b.num_rows() == 0) {
            return self.record_state(m, t, target, state).await;
        }
        let staged = self.ctx.read_batches(batches)?;
        let mut all_cols = cols.clone();
        all_cols.extend(["_scd_hash", "valid_from", "valid_to", "is_current"].map(String::from));
        let key_eq = m
            .config
            .unique_key
            .iter()
            .map(|k| format!("t.{c} = s.{c}", c = q(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let (table, mm) = target
            .merge(staged, format!("{key_eq} AND t.valid_from = s.valid_from"))
            .with_writer_properties(model_writer_properties())
            .with_source_alias("s")
            .with_target_alias("t")
            .with_commit_properties(self.props(m, state))
            .when_matched_update(|u| {
                u.update("valid_to", "s.valid_to")
                    .update("is_current", "s.is_current")
            })
            .and_then(|b| {
                b.when_not_matched_insert(|mut i| {
                    for c in &all_cols {
                        i = i.set(c.as_str(), format!("s.{}", q(c)));
                    }
                    i
                })
            })
            .map_err(|e| Error::delta(t.to_string(), e))?
            .await
            .map_err(|e| Error::delta(t.to_string(), e))?;
        merge_metrics(metrics, &mm);
        Ok(table)
    }
}
