//! `silt build`, `silt run` and `silt test`: ingest (for `run`), source tests, then models in
//! dag order (independent ones side by side, up to `[engine] threads`), each followed by its
//! tests; a failed model or an error-severity test failure skips the downstream while
//! independent branches still build; then singular tests and one `_silt/runs` entry. It must
//! not write data tables itself (materialize.rs and ingest do) nor print.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use datafusion::prelude::SessionContext;

use crate::build::materialize::{Materializer, ModelMetrics, ModelState};
use crate::build::models::{Dag, Model};
use crate::build::quality::{TestResult, TestStatus};
use crate::error::{Error, Result};
use crate::ingest::IngestReport;
use crate::lake::Silt;
use crate::lake::catalog::TableRef;
use crate::lake::meta::runs::{self, BuildCounts, BuildMode, ModelStatus, RunRecord};
use crate::progress::{Progress, SharedProgress};

#[derive(Default)]
pub struct RunOptions {
    pub select: Vec<String>,
    pub full_refresh: bool,
    /// Ingest landing files first (`silt run`).
    pub ingest: bool,
    /// Build no model (ingest only).
    pub no_models: bool,
    /// Told of each model as it finishes: its metrics, its position (1-based) and how many
    /// models the run has. The library prints nothing; the caller decides what a person sees.
    pub on_model: Option<OnModel>,
    /// Told of the ingest's bytes and of each model as it starts and ends.
    pub progress: Option<SharedProgress>,
}

/// What is told of each finished model of a run: its metrics, position and the run's size.
pub type ModelDone = dyn Fn(&ModelMetrics, u64, usize) + Send + Sync;

/// A callback for each finished model of a run.
pub type OnModel = Box<ModelDone>;

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("select", &self.select)
            .field("full_refresh", &self.full_refresh)
            .field("ingest", &self.ingest)
            .field("no_models", &self.no_models)
            .finish()
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub ingest: Option<IngestReport>,
    pub models: Vec<ModelMetrics>,
    pub tests: Vec<TestResult>,
    pub elapsed_ms: u64,
    /// Errors of failed models, tests that could not run, and rejected landing files.
    #[serde(skip)]
    pub errors: Vec<(String, Error)>,
}

impl RunReport {
    /// The exit code the run deserves: the most severe error's; 1 when an error-severity test
    /// or anomaly check failed; else 0.
    pub fn exit_code(&self) -> i32 {
        let anomalies = self
            .ingest
            .as_ref()
            .is_some_and(|i| !i.failed_sources().is_empty());
        let tests = i32::from(self.tests.iter().any(|t| t.status == TestStatus::Fail) || anomalies);
        self.errors
            .iter()
            .map(|(_, e)| e.exit_code())
            .max()
            .unwrap_or(0)
            .max(tests)
    }
}

fn new_report() -> RunReport {
    RunReport {
        run_id: uuid::Uuid::now_v7().to_string(),
        ..Default::default()
    }
}

/// Run the tests of every source whose bronze table exists; returns the sources that failed.
async fn source_tests(
    silt: &Silt,
    dag: &Dag,
    ctx: &SessionContext,
    report: &mut RunReport,
) -> Result<BTreeSet<String>> {
    let mut failed = BTreeSet::new();
    for src in silt.project.sources.values() {
        if src.tests.is_empty()
            || silt
                .catalog
                .open(&TableRef::bronze(&src.name))
                .await?
                .is_none()
        {
            continue;
        }
        for spec in &src.tests {
            let t = crate::build::quality::compile(
                spec,
                &TableRef::bronze(&src.name),
                &src.file,
                &|to| dag.resolve(to),
            )?;
            match crate::build::quality::run(ctx, &t).await {
                Ok(r) => {
                    if r.status == TestStatus::Fail {
                        failed.insert(src.name.clone());
                    }
                    report.tests.push(r);
                }
                Err(e) => {
                    failed.insert(src.name.clone());
                    report.errors.push((t.name.clone(), e));
                }
            }
        }
    }
    Ok(failed)
}

/// Run ingest (optionally) and build the selected models.
pub async fn run(silt: &Silt, opts: RunOptions) -> Result<RunReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now().timestamp_micros();
    let mut report = new_report();
    // Load the dag first: a broken model is a usage error before anything is written.
    let dag = Dag::load(&silt.project)?;
    let selected = if opts.no_models {
        Vec::new()
    } else if Dag::uses_state(&opts.select) {
        let modified = modified_models(silt, &dag).await?;
        dag.select_with_state(&opts.select, Some(&modified))?
    } else {
        dag.select(&opts.select)?
    };
    // Column lineage from the models' plans, and the PII check on it: a model computing a
    // column from PII that it neither pseudonymizes nor declares fails the run here.
    let began = Instant::now();
    let lineage = crate::build::lineage::compute(&silt.project, &dag).await?;
    crate::build::lineage::check_pii(&lineage)?;
    tracing::info!(
        ms = began.elapsed().as_millis() as u64,
        "column lineage planned and PII flow checked"
    );
    let mut ingest_row = None;
    if opts.ingest {
        let mut b = silt.ingest();
        if let Some(p) = &opts.progress {
            b = b.with_progress(p.clone());
        }
        let mut r = b.execute().await?;
        for e in std::mem::take(&mut r.rejected) {
            report.errors.push(("ingest".into(), e));
        }
        let (rows, quarantined, files) = r.sources.iter().fold((0, 0, 0), |a, s| {
            (a.0 + s.rows, a.1 + s.quarantined, a.2 + s.files_ingested)
        });
        if files > 0 {
            ingest_row = Some((
                rows,
                quarantined,
                ModelMetrics {
                    model: "ingest".into(),
                    table: "bronze.*".into(),
                    materialized: "ingest".into(),
                    status: ModelStatus::Built,
                    mode: BuildMode::Incremental,
                    counts: BuildCounts {
                        rows_inserted: rows,
                        ..Default::default()
                    },
                    ms: r.elapsed_ms,
                    message: Some(format!("{files} landing file(s), batch {}", r.batch_id)),
                    ..Default::default()
                },
            ));
        }
        report.ingest = Some(r);
    }
    let ctx = silt.catalog.session().await?;
    let mut broken_sources = BTreeSet::new();
    if !selected.is_empty() {
        broken_sources = source_tests(silt, &dag, &ctx, &mut report).await?;
    }
    if let Some(i) = &report.ingest {
        broken_sources.extend(i.failed_sources());
    }
    build_models(
        silt,
        &dag,
        &selected,
        opts.full_refresh,
        opts.progress.as_deref(),
        opts.on_model.as_deref(),
        &ctx,
        &broken_sources,
        &mut report,
    )
    .await?;
    // Lineage changes only with a model's SQL or config, which rebuilds the model: a run that
    // built nothing stores nothing (and reads no `_silt.lineage`, keeping idle runs cheap).
    if report.models.iter().any(|m| m.status == ModelStatus::Built) {
        let began = Instant::now();
        let stored = crate::build::lineage::store(&silt.catalog, &report.run_id, &lineage).await?;
        tracing::info!(
            tables = stored,
            ms = began.elapsed().as_millis() as u64,
            "column lineage stored"
        );
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    let command = if opts.ingest { "run" } else { "build" };
    record_run(silt, command, started_at, &report, ingest_row).await?;
    Ok(report)
}

/// `silt test`: the tests of the selected models (with no selection: every test).
pub async fn test(silt: &Silt, select: &[String]) -> Result<RunReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now().timestamp_micros();
    let mut report = new_report();
    let dag = Dag::load(&silt.project)?;
    let selected: BTreeSet<String> = if Dag::uses_state(select) {
        let modified = modified_models(silt, &dag).await?;
        dag.select_with_state(select, Some(&modified))?
    } else {
        dag.select(select)?
    }
    .into_iter()
    .collect();
    let ctx = silt.catalog.session().await?;
    if select.is_empty() {
        source_tests(silt, &dag, &ctx, &mut report).await?;
    }
    for name in dag.order.iter().filter(|n| selected.contains(*n)) {
        let m = &dag.models[name];
        let Some(table) = silt.catalog.open(&m.table()).await? else {
            report.errors.push((
                name.clone(),
                Error::Usage(format!(
                    "{} is not built yet: run `silt build` first",
                    m.table()
                )),
            ));
            continue;
        };
        let tested = Tested {
            version: table.version(),
            state: crate::build::materialize::last_state(&table)
                .await?
                .unwrap_or_default(),
        };
        let tests = dag.model_tests(m)?;
        model_tests(&ctx, &tests, &tested, &mut report).await;
        mark_tested(silt, m, &tested).await;
    }
    pii_flow(silt, &dag, &mut report).await?;
    for (t, st) in dag.singular_tests() {
        if select.is_empty()
            || (!st.refs.is_empty() && st.refs.iter().all(|r| selected.contains(r)))
        {
            match crate::build::quality::run(&ctx, &t).await {
                Ok(r) => report.tests.push(r),
                Err(e) => report.errors.push((t.name.clone(), e)),
            }
        }
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    record_run(silt, "test", started_at, &report, None).await?;
    Ok(report)
}

/// The PII check as test results: one failure per model column computed from PII that is
/// neither pseudonymized nor declared PII (the path in its sample), or one pass.
async fn pii_flow(silt: &Silt, dag: &Dag, report: &mut RunReport) -> Result<()> {
    let began = Instant::now();
    let lineage = crate::build::lineage::compute(&silt.project, dag).await?;
    let leaks = lineage.pii_leaks();
    let result = |subject: String, status: TestStatus, sample: String, failing: u64| TestResult {
        name: "pii_flow".into(),
        subject,
        kind: "pii_flow".into(),
        severity: crate::build::quality::Severity::Error,
        status,
        scope: crate::build::quality::TestScope::Table,
        failing_rows: failing,
        sample,
        ms: began.elapsed().as_millis() as u64,
        table_version: None,
        built_from: Default::default(),
    };
    if leaks.is_empty() {
        report
            .tests
            .push(result("project".into(), TestStatus::Pass, String::new(), 0));
    }
    for l in leaks {
        report.tests.push(result(
            format!("{}.{}", l.table, l.column),
            TestStatus::Fail,
            l.message(),
            1,
        ));
    }
    Ok(())
}

/// One `_silt/runs` entry, when the run changed something or a test did not pass; a run that
/// found everything up to date and passing writes nothing. Rows keep the order things ran in:
/// ingest, then each model followed by its tests.
async fn record_run(
    silt: &Silt,
    command: &str,
    started_at: i64,
    report: &RunReport,
    ingest_row: Option<(u64, u64, ModelMetrics)>,
) -> Result<()> {
    let changed = report
        .models
        .iter()
        .any(|m| m.status != ModelStatus::UpToDate);
    let tests_speak = report.tests.iter().any(|t| t.status != TestStatus::Pass);
    // A build tested for the first time (an earlier run stopped before its tests) is recorded,
    // so the next run knows it was.
    let first_tests = report.tests.iter().any(|t| t.table_version.is_some());
    if !changed && !tests_speak && !first_tests && ingest_row.is_none() {
        return Ok(());
    }
    let mut rows: Vec<RunRecord> = Vec::new();
    if let Some((ingested, quarantined, row)) = ingest_row {
        rows.push(RunRecord {
            ingested_rows: ingested,
            quarantined_rows: quarantined,
            ..RunRecord::from(&row)
        });
    }
    let test_row = |t: &TestResult| RunRecord {
        model: t.name.clone(),
        table_name: t.subject.clone(),
        materialized: "test".into(),
        status: t.status.to_string(),
        mode: t.scope.to_string(),
        ms: t.ms,
        version: t.table_version.map(|v| v as i64),
        upstream_versions: serde_json::to_string(&t.built_from).unwrap_or_default(),
        ok: t.status != TestStatus::Fail,
        severity: Some(t.severity.to_string()),
        // Not the failing rows themselves: they may hold a subject's data, and the run log is
        // not erased.
        failing_rows: Some(t.failing_rows),
        ..Default::default()
    };
    // Each model, then the tests of its table that ran after it.
    let mut placed = vec![false; report.tests.len()];
    for m in report
        .models
        .iter()
        .filter(|m| m.status != ModelStatus::UpToDate)
    {
        rows.push(RunRecord::from(m));
        for (i, t) in report.tests.iter().enumerate() {
            if !placed[i] && t.subject == m.table {
                placed[i] = true;
                rows.push(test_row(t));
            }
        }
    }
    for (i, t) in report.tests.iter().enumerate() {
        if !placed[i] {
            rows.push(test_row(t));
        }
    }
    runs::record(&silt.catalog, &report.run_id, command, started_at, rows).await
}

/// The build a model's tests check: the table's version and the upstream versions it was
/// built from (its build state).
#[derive(Debug, Clone, Default)]
struct Tested {
    version: Option<u64>,
    state: ModelState,
}

impl Tested {
    fn of(m: &ModelMetrics) -> Self {
        Tested {
            version: m.version,
            state: ModelState {
                upstream: m.upstream.clone(),
                sql_hash: m.sql_hash.clone(),
            },
        }
    }
}

/// Record that `m`'s build was tested; a failure to record only means it is tested again.
async fn mark_tested(silt: &Silt, m: &crate::build::models::Model, tested: &Tested) {
    if let Err(e) =
        crate::lake::meta::runs::mark_tested(silt.catalog.lake(), &m.table(), &tested.state).await
    {
        tracing::warn!(
            "{}: recording that its build was tested failed ({e}); it is tested again next run",
            m.name
        );
    }
}

/// Run a model's tests into the report; false when one failed (error severity) or could not run.
async fn model_tests(
    ctx: &SessionContext,
    tests: &[crate::build::quality::DataTest],
    tested: &Tested,
    report: &mut RunReport,
) -> bool {
    let mut ok = true;
    for t in tests {
        match crate::build::quality::run(ctx, t).await {
            Ok(mut r) => {
                ok &= r.status != TestStatus::Fail;
                r.table_version = tested.version;
                r.built_from = tested.state.upstream.clone();
                report.tests.push(r);
            }
            Err(e) => {
                ok = false;
                report.errors.push((t.name.clone(), e));
            }
        }
    }
    ok
}

/// What a build running in a task of its own needs, owned (the task outlives no borrow).
#[derive(Clone)]
struct BuildInputs {
    catalog: crate::lake::catalog::Catalog,
    dag: std::sync::Arc<Dag>,
    run_id: String,
    full_refresh: bool,
    pii: std::sync::Arc<BTreeSet<String>>,
    hmac_key: Option<String>,
    changes: std::sync::Arc<crate::build::materialize::ChangeCache>,
    rebuild_changed: bool,
}

impl BuildInputs {
    /// A materializer of this run working in `ctx`.
    fn materializer<'a>(&'a self, ctx: &'a SessionContext) -> Materializer<'a> {
        Materializer {
            catalog: &self.catalog,
            dag: &self.dag,
            ctx,
            run_id: &self.run_id,
            full_refresh: self.full_refresh,
            pii: &self.pii,
            hmac_key: self.hmac_key.as_deref(),
            changes: self.changes.clone(),
            rebuild_changed: self.rebuild_changed,
        }
    }

    /// Build `name` in a session of its own over `ctx`'s engine and lake schemas.
    async fn build(self, ctx: SessionContext, name: String) -> Result<ModelMetrics> {
        let ctx = crate::lake::catalog::scratch_session(&ctx)?;
        self.materializer(&ctx).build(&self.dag.models[&name]).await
    }
}

/// Build the selected models: each as soon as every selected model it reads is built and
/// tested, up to `[engine] threads` at once, each in a task and a session of its own. What
/// decides (tests, skips, the report) happens here, one model at a time; the report lists the
/// models in dag order whatever order they finished in.
#[allow(clippy::too_many_arguments)]
async fn build_models(
    silt: &Silt,
    dag: &Dag,
    selected: &[String],
    full_refresh: bool,
    progress: Option<&dyn Progress>,
    on_model: Option<&ModelDone>,
    ctx: &SessionContext,
    broken_sources: &BTreeSet<String>,
    report: &mut RunReport,
) -> Result<()> {
    let inputs = BuildInputs {
        catalog: silt.catalog.clone(),
        dag: std::sync::Arc::new(dag.clone()),
        run_id: report.run_id.clone(),
        full_refresh,
        pii: std::sync::Arc::new(silt.project.no_stats_columns()),
        hmac_key: silt.project.file.gdpr.hmac_key.clone(),
        changes: Default::default(),
        rebuild_changed: silt.env.is_some(),
    };
    let first_model = report.models.len();
    let mut run = ModelRun {
        silt,
        dag,
        ctx,
        mat: inputs.materializer(ctx),
        broken_sources,
        report,
        broken: BTreeSet::new(),
        deferred: BTreeMap::new(),
        built: BTreeSet::new(),
    };
    if let Some(p) = progress {
        p.start(selected.len() as u64);
    }
    let threads = silt.catalog.engine().model_threads().max(1);
    let in_selection: BTreeSet<&String> = selected.iter().collect();
    let mut waiting: Vec<&String> = selected.iter().collect();
    let mut settled: BTreeSet<String> = BTreeSet::new();
    let mut running: BTreeMap<String, Instant> = BTreeMap::new();
    let mut tasks: tokio::task::JoinSet<(String, Result<ModelMetrics>)> =
        tokio::task::JoinSet::new();
    let mut failure: Option<Error> = None;
    let mut done = 0u64;
    let tell = |run: &ModelRun<'_>, name: &String, done: u64| {
        if let Some(p) = progress {
            p.advance(1);
        }
        if let (Some(f), Some(mm)) = (
            on_model,
            run.report.models.iter().rev().find(|mm| mm.model == *name),
        ) {
            f(mm, done, selected.len());
        }
    };
    // The progress label: the tables being built now.
    let show_running = |running: &BTreeMap<String, Instant>| {
        if let Some(p) = progress {
            let now: Vec<String> = running
                .keys()
                .map(|n| dag.models[n].table().to_string())
                .collect();
            p.working_on(&now.join(", "));
        }
    };
    loop {
        // Start what can start, in dag order: every selected model it reads is settled, and
        // so is every selected model of an earlier layer (silver before gold, as one build at
        // a time had it: a relationships test or SQL naming `silver.x` without `ref` sees `x`
        // built).
        let mut i = 0;
        while failure.is_none() && running.len() < threads && i < waiting.len() {
            let name = waiting[i];
            let m = &dag.models[name];
            let ready = m
                .refs
                .iter()
                .all(|r| !in_selection.contains(r) || settled.contains(r))
                && selected
                    .iter()
                    .all(|o| dag.models[o].layer >= m.layer || settled.contains(o));
            if !ready {
                i += 1;
                continue;
            }
            waiting.remove(i);
            match run.prepare(name).await {
                Ok(true) => {
                    running.insert(name.clone(), Instant::now());
                    show_running(&running);
                    let (inputs, ctx, name) = (inputs.clone(), ctx.clone(), name.clone());
                    tasks.spawn(async move {
                        let r = inputs.build(ctx, name.clone()).await;
                        (name, r)
                    });
                }
                Ok(false) => {
                    settled.insert(name.clone());
                    done += 1;
                    tell(&run, name, done);
                }
                Err(e) => failure = Some(e),
            }
        }
        let Some(joined) = tasks.join_next().await else {
            break;
        };
        let (name, result) = match joined {
            Ok(r) => r,
            Err(e) => {
                // A build that panicked: what it read and wrote is unknown, so nothing more
                // starts; the builds still running finish first.
                failure.get_or_insert(Error::Internal(format!("a model build stopped: {e}")));
                continue;
            }
        };
        crate::lake::memory::release_freed_memory();
        let began = running.remove(&name).unwrap_or_else(Instant::now);
        if !running.is_empty() {
            show_running(&running);
        }
        if let Err(e) = run.finish(&name, began, result).await {
            failure.get_or_insert(e);
        }
        settled.insert(name.clone());
        done += 1;
        tell(&run, &name, done);
    }
    if let Some(e) = failure {
        return Err(e);
    }
    // Dag order in the report, as a run one model at a time would list them.
    let position: BTreeMap<&String, usize> =
        selected.iter().enumerate().map(|(i, n)| (n, i)).collect();
    run.report.models[first_model..]
        .sort_by_key(|mm| position.get(&mm.model).copied().unwrap_or(usize::MAX));
    run.singular_tests(selected).await
}

/// What a run decides about its models, one at a time: deferred tests, skips, the report.
struct ModelRun<'a> {
    silt: &'a Silt,
    dag: &'a Dag,
    ctx: &'a SessionContext,
    mat: Materializer<'a>,
    broken_sources: &'a BTreeSet<String>,
    report: &'a mut RunReport,
    /// Models that failed, whose tests failed at error severity, or that were skipped: what
    /// reads them is skipped.
    broken: BTreeSet<String>,
    /// An up-to-date model's tests wait until a model reading it is about to build: they gate
    /// that build (a failing model stays failing across runs), and a run with nothing to build
    /// tests nothing (`silt test` checks every table).
    deferred: BTreeMap<String, (Vec<crate::build::quality::DataTest>, Tested)>,
    built: BTreeSet<String>,
}

impl ModelRun<'_> {
    /// Before `name` builds: the deferred tests of the up-to-date models it reads run (when it
    /// is not up to date itself), and it is skipped when an upstream failed. True when it is
    /// to be built.
    async fn prepare(&mut self, name: &String) -> Result<bool> {
        let m = &self.dag.models[name];
        let waiting: Vec<String> = m
            .refs
            .iter()
            .filter(|r| self.deferred.contains_key(*r))
            .cloned()
            .collect();
        if !waiting.is_empty() && !self.mat.up_to_date(m).await? {
            for r in waiting {
                let (tests, tested) = self.deferred.remove(&r).unwrap_or_default();
                if !model_tests(self.ctx, &tests, &tested, self.report).await {
                    self.broken.insert(r);
                }
            }
        }
        let bad_up = m
            .refs
            .iter()
            .find(|r| self.broken.contains(*r))
            .map(|r| self.dag.models[r].table().to_string())
            .or_else(|| {
                m.sources
                    .iter()
                    .find(|s| self.broken_sources.contains(*s))
                    .map(|s| format!("bronze.{s}"))
            });
        if let Some(up) = bad_up {
            self.broken.insert(name.clone());
            self.report.models.push(ModelMetrics {
                model: name.to_string(),
                table: m.table().to_string(),
                status: ModelStatus::Skipped,
                mode: BuildMode::None,
                message: Some(format!("upstream {up} failed")),
                ..Default::default()
            });
            return Ok(false);
        }
        Ok(true)
    }

    /// After `name`'s build (begun at `began`): record it, then test it. An error here (the
    /// test log unreadable) stops the run, as it did before builds ran side by side.
    async fn finish(
        &mut self,
        name: &String,
        began: Instant,
        result: Result<ModelMetrics>,
    ) -> Result<()> {
        let m = &self.dag.models[name];
        match result {
            Ok(metrics) if metrics.status == ModelStatus::UpToDate => {
                self.up_to_date(m, metrics).await?
            }
            Ok(metrics) => self.built(m, metrics).await,
            Err(e) => {
                self.broken.insert(name.clone());
                self.report.models.push(ModelMetrics {
                    model: name.clone(),
                    table: m.table().to_string(),
                    status: ModelStatus::Failed,
                    mode: BuildMode::None,
                    message: Some(e.to_string()),
                    ms: began.elapsed().as_millis() as u64,
                    ..Default::default()
                });
                self.report.errors.push((name.clone(), e));
            }
        }
        Ok(())
    }

    /// An up-to-date model: its tests wait for a model reading it, unless its build was never
    /// tested (an earlier run stopped, or was killed, in between): then they run now.
    async fn up_to_date(&mut self, m: &Model, metrics: ModelMetrics) -> Result<()> {
        let tested = Tested::of(&metrics);
        self.report.models.push(metrics);
        match self.dag.model_tests_of(m, None) {
            // No tests, nothing to wait for (and no second look at its state).
            Ok(tests) if tests.is_empty() => {}
            Ok(tests) => {
                let last = runs::last_tested(self.silt.catalog.lake(), &m.table()).await?;
                if last.as_ref() == Some(&tested.state) {
                    self.deferred.insert(m.name.clone(), (tests, tested));
                } else {
                    self.test(m, Ok(tests), &tested).await;
                }
            }
            Err(e) => self.test(m, Err(e), &tested).await,
        }
        Ok(())
    }

    /// A model just built: its tests run right after it; an error-severity failure stops its
    /// downstream (the model itself stays built, as in dbt). After an incremental build they
    /// check the rows it wrote (`silt test` checks all).
    async fn built(&mut self, m: &Model, metrics: ModelMetrics) {
        crate::lake::failpoint::hit("run.built");
        self.built.insert(m.name.clone());
        let tested = Tested::of(&metrics);
        let written = match self.mat.register_written(m, &metrics).await {
            Ok(Some(w)) => {
                Some(crate::build::quality::WrittenScope::new(self.ctx, w, &m.config.tests).await)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("{}: testing the whole table ({e})", m.name);
                None
            }
        };
        self.report.models.push(metrics);
        let tests = self.dag.model_tests_of(m, written.as_ref());
        self.test(m, tests, &tested).await;
        if let Some(w) = &written {
            self.mat.forget_written(&w.relation);
        }
    }

    /// Run `m`'s tests (or record why they could not be compiled) and mark its build tested;
    /// a failure at error severity breaks it for what reads it.
    async fn test(
        &mut self,
        m: &Model,
        tests: Result<Vec<crate::build::quality::DataTest>>,
        tested: &Tested,
    ) {
        match tests {
            Ok(tests) => {
                if !model_tests(self.ctx, &tests, tested, self.report).await {
                    self.broken.insert(m.name.clone());
                }
                mark_tested(self.silt, m, tested).await;
            }
            Err(e) => {
                self.broken.insert(m.name.clone());
                self.report.errors.push((m.name.clone(), e));
            }
        }
    }

    /// Singular tests over models of this selection that all built cleanly: only when every
    /// model a test reads was part of this selection (a stale model would make a
    /// reconciliation fail for no reason), and one of them was built (over unchanged tables
    /// it would say again what it said when they were built).
    async fn singular_tests(&mut self, selected: &[String]) -> Result<()> {
        let selected_set: BTreeSet<&String> = selected.iter().collect();
        for (t, st) in self.dag.singular_tests() {
            let touches = !st.refs.is_empty()
                && st.refs.iter().all(|r| selected_set.contains(r))
                && st.refs.iter().any(|r| self.built.contains(r));
            let clean = st.refs.iter().all(|r| !self.broken.contains(r))
                && st.sources.iter().all(|s| !self.broken_sources.contains(s));
            let mut exists = true;
            for r in &st.refs {
                exists &= self
                    .silt
                    .catalog
                    .open(&self.dag.models[r].table())
                    .await?
                    .is_some();
            }
            if touches && clean && exists {
                match crate::build::quality::run(self.ctx, &t).await {
                    Ok(r) => self.report.tests.push(r),
                    Err(e) => self.report.errors.push((t.name.clone(), e)),
                }
            }
        }
        Ok(())
    }
}

/// The models whose SQL or config differ from those the base lake last built them with
/// (`state:modified`): the source an environment was cloned from, or the lake itself. A model
/// the base never built counts as modified.
pub async fn modified_models(silt: &Silt, dag: &Dag) -> Result<BTreeSet<String>> {
    let base = match silt.check_env().await? {
        Some(rec) => silt.sibling(&rec.from).await?,
        None => silt.clone(),
    };
    let mut out = BTreeSet::new();
    for (name, m) in &dag.models {
        let table = base.lake.delta_table(&m.table().rel_path()).await?;
        let built = crate::build::materialize::last_state(&table).await?;
        if built.is_none_or(|s| s.sql_hash != crate::build::materialize::sql_hash(m)) {
            out.insert(name.clone());
        }
    }
    Ok(out)
}
