//! `silt export bigquery`: publish gold tables to BigQuery, sending only the partitions that
//! changed since the version recorded in `_silt/exports` (Delta file sets compared between the
//! two versions), each change applied atomically (one load job, or a staging load plus one MERGE
//! that replaces the changed partitions). Arrow → BigQuery schema mapping lives here too. It must
//! not write lake tables other than `_silt/exports` and must not build object stores.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use serde::Serialize;
use serde_json::{Value, json};

use crate::build::models::Dag;
use crate::error::{Error, Result};
use crate::lake::Silt;
use crate::lake::catalog::{Layer, TableRef};
use crate::lake::meta::exports::{self, ExportRow};
use crate::project::config::BigQuerySection;

/// One BigQuery column.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BqField {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<BqField>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The BigQuery column for an Arrow field; an unsupported type is an error naming the column.
pub fn bq_field(f: &Field) -> Result<BqField> {
    let mut out = BqField {
        name: f.name().clone(),
        ty: String::new(),
        mode: if f.is_nullable() {
            "NULLABLE"
        } else {
            "REQUIRED"
        }
        .into(),
        precision: None,
        scale: None,
        fields: vec![],
        description: None,
    };
    let unsupported = |why: &str| {
        Err(Error::Usage(format!(
            "column {} has type {} which BigQuery cannot hold{why}; cast it in the model",
            f.name(),
            f.data_type()
        )))
    };
    let elem = |inner: &Field| -> Result<BqField> {
        if matches!(
            inner.data_type(),
            DataType::List(_) | DataType::LargeList(_)
        ) {
            return Err(Error::Usage(format!(
                "column {} is a list of lists, which BigQuery cannot hold (REPEATED of REPEATED); wrap the inner list in a struct in the model",
                f.name()
            )));
        }
        let mut e = bq_field(&Field::new(f.name(), inner.data_type().clone(), true))?;
        e.mode = "REPEATED".into();
        Ok(e)
    };
    out.ty = match f.data_type() {
        DataType::Boolean => "BOOL".into(),
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => "INT64".into(),
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => "INT64".into(),
        DataType::UInt64 => return unsupported(" (UInt64 may exceed INT64)"),
        DataType::Float16 | DataType::Float32 | DataType::Float64 => "FLOAT64".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "STRING".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "BYTES".into(),
        DataType::FixedSizeBinary(_) => "BYTES".into(),
        DataType::Date32 | DataType::Date64 => "DATE".into(),
        DataType::Timestamp(_, None) => "DATETIME".into(),
        DataType::Timestamp(_, Some(_)) => "TIMESTAMP".into(),
        DataType::Time32(_) | DataType::Time64(_) => "TIME".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => {
            let (p, s) = (*p as i64, *s as i64);
            if s < 0 {
                return unsupported(" (negative scale)");
            }
            out.precision = Some(p.to_string());
            out.scale = Some(s.to_string());
            if p - s <= 29 && s <= 9 {
                "NUMERIC".into()
            } else if p - s <= 38 && s <= 38 {
                "BIGNUMERIC".into()
            } else {
                return unsupported(" (more than 38 digits before or after the point)");
            }
        }
        DataType::Struct(fields) => {
            out.fields = fields.iter().map(|c| bq_field(c)).collect::<Result<_>>()?;
            "RECORD".into()
        }
        DataType::List(inner) | DataType::LargeList(inner) | DataType::FixedSizeList(inner, _) => {
            return elem(inner);
        }
        DataType::Dictionary(_, v) => {
            return bq_field(&Field::new(f.name(), v.as_ref().clone(), f.is_nullable()));
        }
        _ => return unsupported(""),
    };
    Ok(out)
}

/// The Arrow type written to Parquet for a BigQuery load (views and dictionaries flattened).
fn load_type(t: &DataType) -> DataType {
    match t {
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
        DataType::Dictionary(_, v) => load_type(v),
        DataType::Float16 => DataType::Float64,
        DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::Int8
        | DataType::Int16 => DataType::Int64,
        other => other.clone(),
    }
}

/// How a table was sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, strum::Display)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ExportMode {
    /// Nothing changed since the last export: nothing sent.
    #[default]
    UpToDate,
    /// The whole table, replacing the warehouse's in one load job.
    Full,
    /// Only the partitions that changed, replaced in one MERGE.
    Partitions,
    /// The warehouse table did not exist: created, then sent whole.
    Created,
}

/// What one table's export did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableExport {
    pub model: String,
    pub target: String,
    pub mode: ExportMode,
    pub from_version: Option<u64>,
    pub version: u64,
    pub partitions: Vec<String>,
    pub rows_sent: u64,
    pub bytes_sent: u64,
    pub jobs: Vec<String>,
    pub ms: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ExportReport {
    pub tables: Vec<TableExport>,
    pub elapsed_ms: u64,
}

/// A BigQuery REST client.
struct Bq {
    http: reqwest::Client,
    base: String,
    project: String,
    dataset: String,
    token: Option<String>,
}

fn is_loopback(url: &str) -> bool {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(String::from))
        .is_some_and(|h| h == "127.0.0.1" || h == "localhost" || h == "[::1]")
}

impl Bq {
    async fn new(cfg: &BigQuerySection) -> Result<Bq> {
        let base = cfg
            .endpoint
            .clone()
            .unwrap_or_else(|| "https://bigquery.googleapis.com".into())
            .trim_end_matches('/')
            .to_string();
        let key = cfg.credentials.clone().or_else(|| {
            std::env::var("GOOGLE_APPLICATION_CREDENTIALS")
                .ok()
                .filter(|s| !s.is_empty())
        });
        let scopes = ["https://www.googleapis.com/auth/bigquery"];
        let auth_err = |e: gcp_auth::Error| Error::Usage(format!("BigQuery credentials: {e}"));
        // Explicit providers only: never gcp_auth::provider(), which may ask a metadata server.
        let token = if is_loopback(&base) && key.is_none() {
            None
        } else if let Some(k) = key.as_deref().filter(|_| !is_loopback(&base)) {
            use gcp_auth::TokenProvider;
            let sa = gcp_auth::CustomServiceAccount::from_file(k).map_err(auth_err)?;
            Some(
                sa.token(&scopes)
                    .await
                    .map_err(auth_err)?
                    .as_str()
                    .to_string(),
            )
        } else if is_loopback(&base) {
            None
        } else {
            use gcp_auth::TokenProvider;
            let adc = gcp_auth::ConfigDefaultCredentials::new().await.map_err(|e| {
                Error::Usage(format!(
                    "no BigQuery credentials: set [bigquery] credentials, GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login` ({e})"
                ))
            })?;
            Some(
                adc.token(&scopes)
                    .await
                    .map_err(auth_err)?
                    .as_str()
                    .to_string(),
            )
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| Error::Warehouse(format!("HTTP client: {e}")))?;
        Ok(Bq {
            http,
            base,
            project: cfg.project.clone(),
            dataset: cfg.dataset.clone(),
            token,
        })
    }

    fn api(&self, path: &str) -> String {
        format!("{}/bigquery/v2/projects/{}{path}", self.base, self.project)
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<(u16, Value)> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req
            .send()
            .await
            .map_err(|e| Error::Warehouse(format!("BigQuery {what}: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| Error::Warehouse(format!("BigQuery {what}: {e}")))?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }

    fn fail(what: &str, status: u16, v: &Value) -> Error {
        let e = &v["error"];
        let reason = e["errors"][0]["reason"].as_str().unwrap_or("");
        let msg = e["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| v.to_string());
        let hint = match status {
            401 | 403 => " (check the credentials and the BigQuery roles of the account)",
            429 => " (quota: retry later or raise the quota)",
            _ => "",
        };
        Error::Warehouse(format!(
            "BigQuery {what}: HTTP {status} {reason}: {msg}{hint}"
        ))
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        what: &str,
    ) -> Result<Option<Value>> {
        let mut req = self.http.request(method, self.api(path));
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(serde_json::to_vec(&b).unwrap_or_default());
        }
        let (status, v) = self.send(req, what).await?;
        match status {
            200..=299 => Ok(Some(v)),
            404 => Ok(None),
            _ => Err(Self::fail(what, status, &v)),
        }
    }

    async fn ensure_dataset(&self, location: Option<&str>) -> Result<()> {
        let path = format!("/datasets/{}", self.dataset);
        if self
            .call(reqwest::Method::GET, &path, None, "get dataset")
            .await?
            .is_some()
        {
            return Ok(());
        }
        let mut body =
            json!({"datasetReference": {"projectId": self.project, "datasetId": self.dataset}});
        if let Some(l) = location {
            body["location"] = json!(l);
        }
        self.call(
            reqwest::Method::POST,
            "/datasets",
            Some(body),
            "create dataset",
        )
        .await?;
        Ok(())
    }

    async fn table(&self, name: &str) -> Result<Option<Value>> {
        self.call(
            reqwest::Method::GET,
            &format!("/datasets/{}/tables/{name}", self.dataset),
            None,
            &format!("get table {name}"),
        )
        .await
    }

    async fn create_table(
        &self,
        name: &str,
        fields: &[BqField],
        layout: &Layout,
        description: Option<&str>,
    ) -> Result<()> {
        let mut body = json!({
            "tableReference": {"projectId": self.project, "datasetId": self.dataset, "tableId": name},
            "schema": {"fields": fields},
        });
        if let Some(d) = description {
            body["description"] = json!(d);
        }
        if let Some(p) = &layout.time_partition {
            body["timePartitioning"] = json!({"type": "DAY", "field": p});
        }
        if !layout.clustering.is_empty() {
            body["clustering"] = json!({"fields": layout.clustering});
        }
        self.call(
            reqwest::Method::POST,
            &format!("/datasets/{}/tables", self.dataset),
            Some(body),
            &format!("create table {name}"),
        )
        .await?;
        Ok(())
    }

    async fn wait(&self, job: Value, what: &str) -> Result<String> {
        let id = job["jobReference"]["jobId"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let location = job["jobReference"]["location"].as_str().map(String::from);
        let mut j = job;
        let started = Instant::now();
        while j["status"]["state"] != "DONE" {
            if started.elapsed() > Duration::from_secs(600) {
                return Err(Error::Warehouse(format!(
                    "BigQuery {what}: job {id} not done after 10 minutes"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut path = format!("/jobs/{id}");
            if let Some(l) = &location {
                path.push_str(&format!("?location={l}"));
            }
            j = self
                .call(reqwest::Method::GET, &path, None, what)
                .await?
                .ok_or_else(|| Error::Warehouse(format!("BigQuery {what}: job {id} vanished")))?;
        }
        if let Some(e) = j["status"]["errorResult"].as_object() {
            return Err(Error::Warehouse(format!(
                "BigQuery {what}: job {id} failed: {}: {}",
                e.get("reason").and_then(|v| v.as_str()).unwrap_or(""),
                e.get("message").and_then(|v| v.as_str()).unwrap_or("")
            )));
        }
        Ok(id)
    }

    /// Load Parquet bytes into `table`, WRITE_TRUNCATE: from a staging object under a gs:// lake
    /// (BigQuery reads it from GCS), else through the multipart upload.
    async fn load(
        &self,
        lake: &crate::lake::storage::Storage,
        table: &str,
        parquet: Vec<u8>,
    ) -> Result<String> {
        if lake.url().scheme() != "gs" {
            return self.upload(table, parquet).await;
        }
        let rel = format!("_silt/staging/export-{}.parquet", uuid::Uuid::now_v7());
        let path = lake.path(&rel);
        lake.put(&path, bytes::Bytes::from(parquet)).await?;
        let uri = lake.url_of(&rel).to_string();
        let body = json!({"configuration": {"load": {
            "destinationTable": {"projectId": self.project, "datasetId": self.dataset, "tableId": table},
            "sourceUris": [uri],
            "sourceFormat": "PARQUET",
            "writeDisposition": "WRITE_TRUNCATE",
            "parquetOptions": {"enableListInference": true},
        }}});
        let what = format!("load into {}.{table} from {uri}", self.dataset);
        let job = self
            .call(reqwest::Method::POST, "/jobs", Some(body), &what)
            .await;
        let result = match job {
            Ok(Some(v)) => self.wait(v, &what).await,
            Ok(None) => Err(Error::Warehouse(format!("BigQuery {what}: no job"))),
            Err(e) => Err(e),
        };
        lake.delete(&path).await?;
        result
    }

    /// Load Parquet bytes into `table` through the multipart upload, WRITE_TRUNCATE.
    async fn upload(&self, table: &str, parquet: Vec<u8>) -> Result<String> {
        let meta = json!({"configuration": {"load": {
            "destinationTable": {"projectId": self.project, "datasetId": self.dataset, "tableId": table},
            "sourceFormat": "PARQUET",
            "writeDisposition": "WRITE_TRUNCATE",
            "parquetOptions": {"enableListInference": true},
        }}});
        let boundary = format!("silt{}", uuid::Uuid::new_v4().simple());
        let mut body = format!(
            "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .into_bytes();
        body.extend_from_slice(&parquet);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let url = format!(
            "{}/upload/bigquery/v2/projects/{}/jobs?uploadType=multipart",
            self.base, self.project
        );
        let req = self
            .http
            .post(url)
            .header(
                "Content-Type",
                format!("multipart/related; boundary={boundary}"),
            )
            .body(body);
        let what = format!("load into {}.{table}", self.dataset);
        let (status, v) = self.send(req, &what).await?;
        if !(200..=299).contains(&status) {
            return Err(Self::fail(&what, status, &v));
        }
        self.wait(v, &what).await
    }

    async fn query(&self, sql: &str, what: &str) -> Result<String> {
        let body = json!({"configuration": {"query": {"query": sql, "useLegacySql": false}}});
        let v = self
            .call(reqwest::Method::POST, "/jobs", Some(body), what)
            .await?
            .ok_or_else(|| Error::Warehouse(format!("BigQuery {what}: no job")))?;
        self.wait(v, what).await
    }
}

/// How a BigQuery table mirrors the Delta table's layout.
struct Layout {
    time_partition: Option<String>,
    clustering: Vec<String>,
}

fn to_parquet(batches: &[RecordBatch], schema: &Arc<Schema>) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(&mut buf, schema.clone(), None).map_err(|e| {
            Error::Parquet {
                what: "parquet".into(),
                source: e,
            }
        })?;
    for b in batches {
        let cols = schema
            .fields()
            .iter()
            .zip(b.columns())
            .map(|(f, c)| arrow::compute::cast(c, f.data_type()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        w.write(&RecordBatch::try_new(schema.clone(), cols)?)
            .map_err(|e| Error::Parquet {
                what: "parquet".into(),
                source: e,
            })?;
    }
    w.close().map_err(|e| Error::Parquet {
        what: "parquet".into(),
        source: e,
    })?;
    Ok(buf)
}

/// Run `sql` and encode its rows as one Parquet file for a load job; counts go to `te`.
async fn rows_as_parquet(
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
    schema: &Arc<Schema>,
    te: &mut TableExport,
) -> Result<Vec<u8>> {
    let batches = ctx.sql(sql).await?.collect().await?;
    te.rows_sent = batches.iter().map(|b| b.num_rows() as u64).sum();
    let data = to_parquet(&batches, schema)?;
    te.bytes_sent = data.len() as u64;
    Ok(data)
}

fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Record what each table's export sent, so the next export starts from it.
async fn record(silt: &Silt, rows: &[TableExport]) -> Result<()> {
    let at = chrono::Utc::now().timestamp_micros();
    let rows: Vec<ExportRow> = rows
        .iter()
        .map(|r| ExportRow {
            model: r.model.clone(),
            target: r.target.clone(),
            mode: r.mode.to_string(),
            version: r.version as i64,
            partitions: r.partitions.join(","),
            rows_sent: r.rows_sent as i64,
            jobs: r.jobs.join(","),
            at,
        })
        .collect();
    exports::record(&silt.lake, &rows).await
}

/// `silt export bigquery [--select …]`.
pub async fn bigquery(silt: &Silt, select: &[String]) -> Result<ExportReport> {
    let started = Instant::now();
    let cfg = silt.project.file.bigquery.clone().ok_or_else(|| {
        Error::config(
            "silt.toml",
            "no [bigquery] section: add project and dataset (and endpoint for an emulator)",
        )
    })?;
    let dag = Dag::load(&silt.project)?;
    let wanted: Vec<String> = if !select.is_empty() {
        dag.select(select)?
    } else if !cfg.models.is_empty() {
        dag.select(&cfg.models)?
    } else {
        dag.order
            .iter()
            .filter(|n| dag.models[*n].layer == Layer::Gold)
            .cloned()
            .collect()
    };
    // Check every schema before sending anything.
    let mut plans = Vec::new();
    for name in &wanted {
        plans.push(Planned::of(silt, &dag.models[name]).await?);
    }
    let run = Exporter {
        silt,
        bq: Bq::new(&cfg).await?,
        last: exports::last_versions(&silt.catalog).await?,
        ctx: silt.catalog.session().await?,
        cfg,
    };
    run.bq.ensure_dataset(run.cfg.location.as_deref()).await?;
    let mut report = ExportReport::default();
    for plan in plans {
        report.tables.push(run.table(plan).await?);
    }
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// A model to export: its Delta table at the version to send, and its BigQuery columns.
struct Planned {
    m: crate::build::models::Model,
    t: TableRef,
    delta: deltalake::DeltaTable,
    version: u64,
    arrow_schema: Arc<Schema>,
    fields: Vec<BqField>,
    parts: Vec<String>,
}

impl Planned {
    /// The export of `m`, or why it cannot be exported (not built, a type BigQuery lacks).
    async fn of(silt: &Silt, m: &crate::build::models::Model) -> Result<Planned> {
        let t = m.table();
        let delta = silt.lake.delta_table(&t.rel_path()).await?;
        let Some(version) = delta.version() else {
            return Err(Error::Usage(format!(
                "{t} is not built yet: run `silt build` first"
            )));
        };
        let snap = delta
            .snapshot()
            .map_err(|e| Error::delta(t.to_string(), e))?;
        let arrow_schema = snap.snapshot().arrow_schema();
        let mut fields = arrow_schema
            .fields()
            .iter()
            .map(|f| bq_field(f))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| Error::Usage(format!("{t}: {e}")))?;
        for f in fields.iter_mut() {
            f.description = m.config.columns.get(&f.name).cloned();
        }
        let parts: Vec<String> = snap.metadata().partition_columns().to_vec();
        Ok(Planned {
            m: m.clone(),
            t,
            delta,
            version,
            arrow_schema,
            fields,
            parts,
        })
    }

    /// How the BigQuery table mirrors the Delta table's partitioning: a date partition column
    /// becomes its time partitioning, the others (up to four) its clustering.
    fn layout(&self) -> Layout {
        let is_date = |p: &&String| {
            matches!(
                self.arrow_schema
                    .field_with_name(p)
                    .map(|f| f.data_type().clone()),
                Ok(DataType::Date32)
            )
        };
        Layout {
            time_partition: self.parts.iter().find(is_date).cloned(),
            clustering: self
                .parts
                .iter()
                .filter(|p| !is_date(p))
                .take(4)
                .cloned()
                .collect(),
        }
    }

    /// The partition values whose files changed since version `pv` (None: send everything,
    /// e.g. when `pv` was purged by an erasure or vacuumed, or the table is not partitioned by
    /// exactly one column).
    async fn changed_since(&self, silt: &Silt, pv: u64) -> Result<Option<BTreeSet<String>>> {
        if pv == self.version {
            return Ok(Some(BTreeSet::new()));
        }
        let (Some(p), 1) = (self.parts.first(), self.parts.len()) else {
            return Ok(None);
        };
        let t = &self.t;
        let Ok(then) = silt.lake.delta_table_at(&t.rel_path(), pv).await else {
            return Ok(None);
        };
        let files = |d: &deltalake::DeltaTable| -> Result<HashMap<String, Option<String>>> {
            let s = d.snapshot().map_err(|e| Error::delta(t.to_string(), e))?;
            Ok(s.log_data()
                .iter()
                .map(|f| {
                    (
                        f.path().to_string(),
                        f.partition_values_map().get(p).cloned().flatten(),
                    )
                })
                .collect())
        };
        let (a, b) = (files(&then)?, files(&self.delta)?);
        let mut c = BTreeSet::new();
        for (path, v) in a
            .iter()
            .filter(|(k, _)| !b.contains_key(*k))
            .chain(b.iter().filter(|(k, _)| !a.contains_key(*k)))
        {
            match v {
                Some(v) => {
                    c.insert(v.clone());
                }
                None => tracing::info!("{t}: {path} has no {p} value; full export"),
            }
        }
        Ok(Some(c))
    }
}

/// One export run: the warehouse client, the versions last exported, a session to read with.
struct Exporter<'a> {
    silt: &'a Silt,
    cfg: BigQuerySection,
    bq: Bq,
    last: HashMap<(String, String), u64>,
    ctx: datafusion::prelude::SessionContext,
}

impl Exporter<'_> {
    /// Export one table: create it in BigQuery if needed, then send what changed since its
    /// last export (nothing, its changed partitions, or all of it), and record the version.
    async fn table(&self, plan: Planned) -> Result<TableExport> {
        let t0 = Instant::now();
        let (cfg, bq) = (&self.cfg, &self.bq);
        let m = &plan.m;
        let bq_name = cfg
            .tables
            .get(&m.name)
            .cloned()
            .unwrap_or_else(|| m.name.clone());
        let target = format!("{}.{}.{}", cfg.project, cfg.dataset, bq_name);
        let prev = self.last.get(&(m.name.clone(), target.clone())).copied();
        let mut te = TableExport {
            model: m.name.clone(),
            target: target.clone(),
            from_version: prev,
            version: plan.version,
            ..Default::default()
        };
        let exists = bq.table(&bq_name).await?;
        let layout = plan.layout();
        if let Some(existing) = &exists {
            let names: Vec<&str> = existing["schema"]["fields"]
                .as_array()
                .map(|a| a.iter().filter_map(|f| f["name"].as_str()).collect())
                .unwrap_or_default();
            let want: Vec<&str> = plan.fields.iter().map(|f| f.name.as_str()).collect();
            if names != want {
                return Err(Error::Warehouse(format!(
                    "BigQuery table {target} has columns {names:?} but {} has {want:?}: drop or migrate the BigQuery table, then export again",
                    plan.t
                )));
            }
        } else {
            bq.create_table(
                &bq_name,
                &plan.fields,
                &layout,
                m.config.description.as_deref(),
            )
            .await?;
            te.mode = ExportMode::Created;
        }
        // Which partitions changed since the last export (None: everything).
        let changed = match prev {
            Some(pv) if exists.is_some() => plan.changed_since(self.silt, pv).await?,
            _ => None,
        };
        match changed {
            // Up to date (the default), unless just created.
            Some(c) if c.is_empty() => {}
            Some(c) => {
                self.replace_partitions(&plan, &bq_name, &layout, &c, &mut te)
                    .await?;
                te.partitions = c.into_iter().collect();
                te.mode = ExportMode::Partitions;
            }
            None => {
                let rel = format!("{}.{}", plan.t.layer.schema_name(), plan.t.name);
                let data = rows_as_parquet(
                    &self.ctx,
                    &format!("select * from {rel}"),
                    &load_schema(&plan.arrow_schema),
                    &mut te,
                )
                .await?;
                // One load job with WRITE_TRUNCATE: the whole table is replaced atomically.
                te.jobs
                    .push(bq.load(&self.silt.lake, &bq_name, data).await?);
                if te.mode != ExportMode::Created {
                    te.mode = ExportMode::Full;
                }
            }
        }
        te.ms = t0.elapsed().as_millis() as u64;
        if te.mode != ExportMode::UpToDate || prev != Some(plan.version) {
            record(self.silt, std::slice::from_ref(&te)).await?;
        }
        Ok(te)
    }

    /// Send the rows of the `changed` partitions to a staging table, then replace those
    /// partitions in one MERGE: the change lands atomically.
    async fn replace_partitions(
        &self,
        plan: &Planned,
        bq_name: &str,
        layout: &Layout,
        changed: &BTreeSet<String>,
        te: &mut TableExport,
    ) -> Result<()> {
        let (bq, p) = (&self.bq, &plan.parts[0]);
        let rel = format!("{}.{}", plan.t.layer.schema_name(), plan.t.name);
        let list = changed
            .iter()
            .map(|v| sql_str(v))
            .collect::<Vec<_>>()
            .join(", ");
        let dlist = changed
            .iter()
            .map(|v| crate::lake::sql_text::literal(v))
            .collect::<Vec<_>>()
            .join(", ");
        let string = plan.arrow_schema.field_with_name(p).is_ok_and(|f| {
            matches!(
                f.data_type(),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            )
        });
        let data = rows_as_parquet(
            &self.ctx,
            &format!(
                "select * from {rel} where {}",
                crate::lake::sql_text::partition_in(p, string, &dlist)
            ),
            &load_schema(&plan.arrow_schema),
            te,
        )
        .await?;
        let stage = format!("{bq_name}__silt_stage");
        if bq.table(&stage).await?.is_none() {
            let flat = Layout {
                time_partition: None,
                clustering: vec![],
            };
            bq.create_table(&stage, &plan.fields, &flat, Some("silt export staging"))
                .await?;
        }
        te.jobs.push(bq.load(&self.silt.lake, &stage, data).await?);
        let cols = plan
            .fields
            .iter()
            .map(|f| format!("`{}`", f.name))
            .collect::<Vec<_>>()
            .join(", ");
        let scols = plan
            .fields
            .iter()
            .map(|f| format!("S.`{}`", f.name))
            .collect::<Vec<_>>()
            .join(", ");
        let pexpr = if layout.time_partition.as_deref() == Some(p.as_str()) {
            format!("CAST(T.`{p}` AS STRING)")
        } else {
            format!("T.`{p}`")
        };
        // One DML statement: the changed partitions are replaced atomically.
        let sql = format!(
            "MERGE `{ds}.{bq_name}` T USING `{ds}.{stage}` S ON FALSE \
             WHEN NOT MATCHED BY SOURCE AND {pexpr} IN ({list}) THEN DELETE \
             WHEN NOT MATCHED THEN INSERT ({cols}) VALUES ({scols})",
            ds = self.cfg.dataset
        );
        te.jobs.push(
            bq.query(&sql, &format!("replace partitions of {}", te.target))
                .await?,
        );
        Ok(())
    }
}

/// The Arrow schema rows are sent in: each column as BigQuery loads it.
fn load_schema(schema: &Schema) -> Arc<Schema> {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_data_type(load_type(f.data_type())))
            .collect::<Vec<_>>(),
    ))
}
