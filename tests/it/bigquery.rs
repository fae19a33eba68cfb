//! `silt export bigquery` against bqemulator (PyPI, DuckDB-backed) on 127.0.0.1, installed by
//! tests/emulators/setup.sh: exported gold equals Delta row for row; a second export after an
//! incremental run sends only the changed partitions (checked in the emulator's job list); after
//! `silt forget` the client is gone from BigQuery too; the Arrow → BigQuery type mapping.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::datatypes::{DataType, Field, Fields, TimeUnit};
use serde_json::{Value, json};

use crate::support::{Project, copy_dir, repo};

const PROJECT: &str = "silt-test";

/// bqemulator on a free port, stopped on drop.
struct BqEmu {
    child: Child,
    port: u16,
    rt: tokio::runtime::Runtime,
}

impl BqEmu {
    fn start() -> BqEmu {
        let python = crate::support::emulators::emulator_python();
        let home = python.parent().unwrap().join("home");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new(&python)
            .args([
                "-c",
                "import sys; from bqemulator.cli import main; sys.argv = ['bqemulator'] + sys.argv[1:]; main()",
                "start",
                "--rest-host",
                "127.0.0.1",
                "--rest-port",
                &port.to_string(),
                "--grpc-host",
                "127.0.0.1",
                "--grpc-port",
                "0",
                "--project",
                PROJECT,
                "--log-level",
                "error",
            ])
            .env("HOME", &home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bqemulator");
        let emu = BqEmu {
            child,
            port,
            rt: tokio::runtime::Runtime::new().unwrap(),
        };
        let started = Instant::now();
        loop {
            if emu.get("/datasets").is_some() {
                return emu;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "bqemulator did not start on 127.0.0.1:{port}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/bigquery/v2/projects/{PROJECT}{path}",
            self.port
        )
    }

    fn get(&self, path: &str) -> Option<Value> {
        let url = self.url(path);
        self.rt.block_on(async {
            let r = reqwest::get(&url).await.ok()?;
            if !r.status().is_success() {
                return None;
            }
            serde_json::from_str(&r.text().await.ok()?).ok()
        })
    }

    /// Rows of a query, every value as text (None for NULL).
    fn query(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        let url = self.url("/queries");
        let v: Value = self.rt.block_on(async {
            let r = reqwest::Client::new()
                .post(&url)
                .header("Content-Type", "application/json")
                .body(
                    json!({"query": sql, "useLegacySql": false, "maxResults": 100000}).to_string(),
                )
                .send()
                .await
                .unwrap();
            serde_json::from_str(&r.text().await.unwrap()).unwrap()
        });
        assert!(v.get("errors").is_none(), "{sql}: {v}");
        v["rows"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|r| {
                r["f"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["v"].as_str().map(String::from))
                    .collect()
            })
            .collect()
    }

    fn jobs(&self) -> Vec<Value> {
        self.get("/jobs?maxResults=10000")
            .and_then(|v| v["jobs"].as_array().cloned())
            .unwrap_or_default()
    }
}

impl Drop for BqEmu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with_bigquery(p: &Project, emu: &BqEmu) {
    let mut toml = std::fs::read_to_string(p.path().join("silt.toml")).unwrap();
    toml.push_str(&format!(
        "\n[bigquery]\nproject = \"{PROJECT}\"\ndataset = \"gold\"\nlocation = \"EU\"\nendpoint = \"http://127.0.0.1:{}\"\n",
        emu.port
    ));
    std::fs::write(p.path().join("silt.toml"), toml).unwrap();
}

/// One value as comparable text: numbers with a point to 2 decimals (NUMERIC prints 9).
fn norm(v: Option<String>) -> String {
    match v {
        None => "NULL".into(),
        Some(s) if s.contains(['.', 'E']) && s.parse::<f64>().is_ok() => {
            format!("{:.2}", s.parse::<f64>().unwrap())
        }
        Some(s) => s,
    }
}

/// A gold table's rows, sorted, from Delta and from BigQuery.
fn both(p: &Project, emu: &BqEmu, t: &str) -> (Vec<String>, Vec<String>) {
    let cols: Vec<String> = p.query(&format!("select * from gold.{t} limit 1"))[0]
        .keys()
        .cloned()
        .collect();
    let list = |q: char| {
        cols.iter()
            .map(|c| format!("{q}{c}{q}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut delta: Vec<String> = p
        .query(&format!("select {} from gold.{t}", list('"')))
        .into_iter()
        .map(|r| {
            r.values()
                .map(|v| {
                    norm(match v {
                        Value::Null => None,
                        Value::String(s) => Some(s.clone()),
                        other => Some(other.to_string()),
                    })
                })
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    let mut bq: Vec<String> = emu
        .query(&format!("select {} from gold.{t}", list('`')))
        .into_iter()
        .map(|r| r.into_iter().map(norm).collect::<Vec<_>>().join("|"))
        .collect();
    delta.sort();
    bq.sort();
    (delta, bq)
}

fn assert_gold_equal(p: &Project, emu: &BqEmu) {
    for t in crate::support::golden::GOLD {
        let (delta, bq) = both(p, emu, t);
        assert!(!delta.is_empty(), "gold.{t} is empty");
        assert_eq!(bq, delta, "BigQuery gold.{t} differs from Delta");
    }
}

fn export(p: &Project) -> Value {
    serde_json::from_str(&p.ok(&["--json", "export", "bigquery"])).unwrap()
}

fn entry<'a>(r: &'a Value, model: &str) -> &'a Value {
    r["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["model"] == model)
        .unwrap()
}

#[test]
fn export_sends_changed_partitions_only_and_forgets_with_the_lake() {
    let emu = BqEmu::start();
    let p = Project::reference();
    with_bigquery(&p, &emu);
    p.ok(&["run"]);
    let first = export(&p);
    for t in crate::support::golden::GOLD {
        assert_eq!(entry(&first, t)["mode"], "created", "{t}");
    }
    assert_gold_equal(&p, &emu);
    // Tables carry the Delta layout and the model's column descriptions.
    let rev = emu
        .get("/datasets/gold/tables/fct_monthly_revenue")
        .unwrap();
    assert_eq!(rev["clustering"]["fields"], json!(["fee_month"]), "{rev}");
    let ltv = emu.get("/datasets/gold/tables/rpt_client_ltv").unwrap();
    let desc = ltv["schema"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "ltv_total")
        .unwrap()["description"]
        .clone();
    assert_eq!(desc, "Net fees of the client to date (refunds negative)");

    // No change: nothing is sent.
    let jobs_before = emu.jobs().len();
    let again = export(&p);
    for t in crate::support::golden::GOLD {
        assert_eq!(entry(&again, t)["mode"], "up_to_date", "{t}");
    }
    assert_eq!(emu.jobs().len(), jobs_before, "a no-op export ran jobs");

    // An incremental run: only the months it touched go to BigQuery.
    copy_dir(&repo().join("fixtures/batch2"), &p.landing());
    let run: Value = serde_json::from_str(&p.ok(&["--json", "run"])).unwrap();
    let touched: BTreeSet<String> = run["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "fct_monthly_revenue")
        .unwrap()["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let all_months = p.count("select count(distinct fee_month) from gold.fct_monthly_revenue");
    assert!(!touched.is_empty() && (touched.len() as i64) < all_months);
    let jobs_before: BTreeSet<String> = emu
        .jobs()
        .iter()
        .map(|j| j["jobReference"]["jobId"].as_str().unwrap().to_string())
        .collect();
    let second = export(&p);
    let rev = entry(&second, "fct_monthly_revenue");
    assert_eq!(rev["mode"], "partitions");
    let sent: BTreeSet<String> = rev["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(sent, touched);
    let list = sent
        .iter()
        .map(|m| format!("'{m}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let in_touched = p.count(&format!(
        "select count(*) from gold.fct_monthly_revenue where fee_month in ({list})"
    ));
    assert_eq!(rev["rows_sent"].as_i64().unwrap(), in_touched);
    // The emulator's job list: the staging load for the revenue table carried only those rows.
    let new_jobs: Vec<Value> = emu
        .jobs()
        .into_iter()
        .filter(|j| !jobs_before.contains(j["jobReference"]["jobId"].as_str().unwrap()))
        .collect();
    let stage_load = new_jobs
        .iter()
        .find(|j| {
            j["configuration"]["load"]["destinationTable"]["tableId"]
                == "fct_monthly_revenue__silt_stage"
        })
        .unwrap_or_else(|| panic!("no staging load in {new_jobs:?}"));
    let loaded = stage_load["statistics"]["load"]["outputRows"]
        .as_str()
        .map(|s| s.parse::<i64>().unwrap());
    if let Some(n) = loaded {
        assert_eq!(n, in_touched);
    }
    assert!(
        !new_jobs.iter().any(
            |j| j["configuration"]["load"]["destinationTable"]["tableId"] == "fct_monthly_revenue"
        ),
        "the revenue table was reloaded whole"
    );
    assert_gold_equal(&p, &emu);

    // GDPR: after forget (and export), BigQuery forgets too.
    let subject = "C0085";
    assert!(
        !emu.query(&format!(
            "select client_id from gold.dim_clients where client_id = '{subject}'"
        ))
        .is_empty()
    );
    // With export_after_run, the erasure itself publishes the rewritten partitions.
    let mut toml = std::fs::read_to_string(p.path().join("silt.toml")).unwrap();
    toml.push_str("export_after_run = true\n");
    std::fs::write(p.path().join("silt.toml"), toml).unwrap();
    let out = p.ok(&["forget", subject]);
    assert!(out.contains("exported in"), "{out}");
    assert!(
        emu.query(&format!(
            "select client_id from gold.dim_clients where client_id = '{subject}'"
        ))
        .is_empty()
    );
    assert!(
        emu.query(&format!(
            "select client_id from gold.rpt_client_ltv where client_id = '{subject}'"
        ))
        .is_empty()
    );
    assert_gold_equal(&p, &emu);
}

#[test]
fn unsupported_types_fail_before_any_upload() {
    let emu = BqEmu::start();
    let p = Project::reference();
    with_bigquery(&p, &emu);
    std::fs::write(
        p.path().join("sql/gold/odd_types.sql"),
        "{{ config(materialized='table') }}\nselect 1 as id, make_array(make_array(1, 2), make_array(3)) as nested",
    )
    .unwrap();
    p.ok(&["run"]);
    let out = p.run(&["export", "bigquery"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gold.odd_types") && err.contains("nested") && err.contains("list of lists"),
        "{err}"
    );
    assert!(emu.jobs().is_empty(), "something was uploaded");
    assert!(
        emu.get("/datasets/gold").is_none(),
        "the dataset was created"
    );
}

fn f(name: &str, t: DataType) -> Field {
    Field::new(name, t, true)
}

#[test]
fn arrow_to_bigquery_type_mapping() {
    use silt::ops::export::bq_field;
    let ty = |t: DataType| {
        let b = bq_field(&f("c", t)).unwrap();
        (b.ty, b.mode, b.precision, b.scale)
    };
    let s = |x: &str| Some(x.to_string());
    // Every type the reference models produce.
    assert_eq!(ty(DataType::Utf8View).0, "STRING");
    assert_eq!(ty(DataType::Utf8).0, "STRING");
    assert_eq!(
        ty(DataType::Dictionary(
            Box::new(DataType::UInt16),
            Box::new(DataType::Utf8)
        ))
        .0,
        "STRING"
    );
    assert_eq!(ty(DataType::Int64).0, "INT64");
    assert_eq!(ty(DataType::Date32).0, "DATE");
    assert_eq!(
        ty(DataType::Decimal128(18, 2)),
        ("NUMERIC".into(), "NULLABLE".into(), s("18"), s("2"))
    );
    assert_eq!(
        ty(DataType::Timestamp(
            TimeUnit::Microsecond,
            Some("UTC".into())
        ))
        .0,
        "TIMESTAMP"
    );
    assert_eq!(ty(DataType::Boolean).0, "BOOL");
    // The rest of the mapping.
    assert_eq!(ty(DataType::Int32).0, "INT64");
    assert_eq!(ty(DataType::UInt32).0, "INT64");
    assert_eq!(ty(DataType::Float32).0, "FLOAT64");
    assert_eq!(ty(DataType::Float64).0, "FLOAT64");
    assert_eq!(ty(DataType::Binary).0, "BYTES");
    assert_eq!(
        ty(DataType::Timestamp(TimeUnit::Microsecond, None)).0,
        "DATETIME"
    );
    assert_eq!(ty(DataType::Decimal128(38, 9)).0, "NUMERIC");
    assert_eq!(ty(DataType::Decimal128(38, 2)).0, "BIGNUMERIC");
    assert_eq!(ty(DataType::Decimal128(20, 10)).0, "BIGNUMERIC");
    assert_eq!(ty(DataType::Decimal256(76, 38)).0, "BIGNUMERIC");
    let list = bq_field(&f(
        "tags",
        DataType::List(std::sync::Arc::new(f("item", DataType::Utf8))),
    ))
    .unwrap();
    assert_eq!(
        (list.ty.as_str(), list.mode.as_str()),
        ("STRING", "REPEATED")
    );
    let rec = bq_field(&f(
        "address",
        DataType::Struct(Fields::from(vec![
            f("line1", DataType::Utf8),
            Field::new("n", DataType::Int32, false),
        ])),
    ))
    .unwrap();
    assert_eq!(rec.ty, "RECORD");
    assert_eq!(rec.fields.len(), 2);
    assert_eq!(
        (rec.fields[1].ty.as_str(), rec.fields[1].mode.as_str()),
        ("INT64", "REQUIRED")
    );
    assert_eq!(
        bq_field(&Field::new("k", DataType::Utf8, false))
            .unwrap()
            .mode,
        "REQUIRED"
    );
    // Unsupported types are clear errors naming the column.
    for t in [
        DataType::UInt64,
        DataType::Duration(TimeUnit::Second),
        DataType::Decimal256(76, 0),
        DataType::List(std::sync::Arc::new(f(
            "i",
            DataType::List(std::sync::Arc::new(f("j", DataType::Int64))),
        ))),
    ] {
        let e = bq_field(&f("odd", t.clone())).unwrap_err().to_string();
        assert!(e.contains("odd"), "{t}: {e}");
    }
}
