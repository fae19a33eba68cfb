//! `silt build` and `silt run`: models in dag order (ingest first for `run`), with a failed
//! model's downstream skipped and independent branches still built, then one `_silt/runs`
//! entry. It must not write tables itself (materialize.rs and ingest do) nor print.

use std::collections::BTreeSet;
use std::time::Instant;

use crate::Silt;
use crate::error::{Error, Result};
use crate::ingest::IngestReport;
use crate::materialize::{Materializer, ModelMetrics};
use crate::models::Dag;

#[derive(Debug, Default)]
pub struct RunOptions {
    pub select: Vec<String>,
    pub full_refresh: bool,
    /// Ingest landing files first (`silt run`).
    pub ingest: bool,
    /// Build no model (ingest only).
    pub no_models: bool,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub ingest: Option<IngestReport>,
    pub models: Vec<ModelMetrics>,
    pub elapsed_ms: u64,
    /// Errors of failed models (and rejected landing files), by model.
    #[serde(skip)]
    pub errors: Vec<(String, Error)>,
}

impl RunReport {
    /// The exit code the run deserves: the most severe error's, or 0.
    pub fn exit_code(&self) -> i32 {
        self.errors
            .iter()
            .map(|(_, e)| e.exit_code())
            .max()
            .unwrap_or(0)
    }
}

/// Run ingest (optionally) and build the selected models.
pub async fn run(
    silt: &Silt,
    opts: RunOptions,
    progress: Option<indicatif::ProgressBar>,
) -> Result<RunReport> {
    let started = Instant::now();
    let started_at = chrono::Utc::now().timestamp_micros();
    let run_id = uuid::Uuid::now_v7().to_string();
    let mut report = RunReport {
        run_id: run_id.clone(),
        ..Default::default()
    };
    // Load the dag first: a broken model is a usage error before anything is written.
    let dag = Dag::load(&silt.project)?;
    let selected = if opts.no_models {
        Vec::new()
    } else {
        dag.select(&opts.select)?
    };
    let mut ingest_row = None;
    if opts.ingest {
        let mut b = silt.ingest();
        if let Some(p) = &progress {
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
                    status: "built".into(),
                    mode: "incremental".into(),
                    rows_inserted: rows,
                    ms: r.elapsed_ms,
                    message: Some(format!("{files} landing file(s), batch {}", r.batch_id)),
                    ..Default::default()
                },
            ));
        }
        report.ingest = Some(r);
    }
    build_models(
        silt,
        &dag,
        &selected,
        opts.full_refresh,
        progress,
        &mut report,
    )
    .await?;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    let mut changed: Vec<ModelMetrics> = report
        .models
        .iter()
        .filter(|m| m.status != "up_to_date")
        .cloned()
        .collect();
    let mut totals = (0, 0);
    if let Some((rows, q, row)) = ingest_row {
        totals = (rows, q);
        changed.insert(0, row);
    }
    crate::runs::record(&silt.catalog, &run_id, started_at, &changed, totals).await?;
    Ok(report)
}

async fn build_models(
    silt: &Silt,
    dag: &Dag,
    selected: &[String],
    full_refresh: bool,
    progress: Option<indicatif::ProgressBar>,
    report: &mut RunReport,
) -> Result<()> {
    let ctx = silt.catalog.session().await?;
    let mat = Materializer {
        catalog: &silt.catalog,
        dag,
        ctx: &ctx,
        run_id: &report.run_id,
        full_refresh,
    };
    let mut broken: BTreeSet<String> = BTreeSet::new();
    if let Some(p) = &progress {
        p.set_length(selected.len() as u64);
        p.set_position(0);
    }
    for name in selected {
        let m = &dag.models[name];
        if let Some(p) = &progress {
            p.set_message(m.table().to_string());
        }
        if let Some(up) = m.refs.iter().find(|r| broken.contains(*r)) {
            broken.insert(name.clone());
            report.models.push(ModelMetrics {
                model: name.clone(),
                table: m.table().to_string(),
                status: "skipped".into(),
                mode: "none".into(),
                message: Some(format!("upstream {up} failed")),
                ..Default::default()
            });
        } else {
            match mat.build(m).await {
                Ok(metrics) => report.models.push(metrics),
                Err(e) => {
                    broken.insert(name.clone());
                    report.models.push(ModelMetrics {
                        model: name.clone(),
                        table: m.table().to_string(),
                        status: "failed".into(),
                        mode: "none".into(),
                        message: Some(e.to_string()),
                        ..Default::default()
                    });
                    report.errors.push((name.clone(), e));
                }
            }
        }
        if let Some(p) = &progress {
            p.inc(1);
        }
    }
    Ok(())
}
