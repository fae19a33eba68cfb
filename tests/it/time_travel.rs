//! Time travel: VERSION / TIMESTAMP AS OF in queries and models, history, restore, diff and
//! `--as-of-run`, with exact expected rows.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::support::{Manifest, Project, copy_dir, repo};

struct Two {
    p: Project,
    first_run: String,
    second_run: String,
}

/// The reference pipeline, then the second landing batch.
fn two_runs() -> Two {
    let p = Project::reference();
    let r1: Value = serde_json::from_str(&p.ok(&["--json", "run"])).unwrap();
    copy_dir(&repo().join("fixtures/batch2"), &p.landing());
    let r2: Value = serde_json::from_str(&p.ok(&["--json", "run"])).unwrap();
    Two {
        p,
        first_run: r1["run_id"].as_str().unwrap().into(),
        second_run: r2["run_id"].as_str().unwrap().into(),
    }
}

#[test]
fn version_and_timestamp_as_of_in_queries_and_models() {
    let m = Manifest::load();
    let t = two_runs();
    let p = &t.p;
    let v0 = m.good_rows("fees/");
    let new = m.batch2["new_fees"].as_i64().unwrap();
    assert_eq!(
        p.count("select count(*) from silver.stg_fees VERSION AS OF 0"),
        v0
    );
    assert_eq!(p.count("select count(*) from silver.stg_fees"), v0 + new);
    // A timestamp between the two commits reads version 0.
    let h: Value = serde_json::from_str(&p.ok(&["--json", "history", "silver.stg_fees"])).unwrap();
    // Midway between the two commits (file times are coarser than commit timestamps).
    let ts = |i: usize| {
        chrono::DateTime::parse_from_rfc3339(h[i]["timestamp"].as_str().unwrap()).unwrap()
    };
    let (t0, t1) = (ts(1), ts(0));
    let before = (t0 + (t1 - t0) / 2).to_rfc3339();
    assert_eq!(
        p.count(&format!(
            "select count(*) from silver.stg_fees TIMESTAMP AS OF '{before}'"
        )),
        v0
    );
    // Joins of one table at two versions.
    let moved = m.batch2["moved"].as_str().unwrap();
    let rows = p.query(&format!(
        "select a.fee_month as was, b.fee_month as now from silver.stg_fees VERSION AS OF 0 a \
         join silver.stg_fees VERSION AS OF 1 b on a.fee_id = b.fee_id where a.fee_id = '{moved}'"
    ));
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0]["was"].as_str(), rows[0]["now"].as_str()),
        (Some("2026-06"), Some("2026-07"))
    );
    // Inside a model.
    std::fs::write(
        p.path().join("sql/gold/fees_at_v0.sql"),
        "{{ config(materialized='table') }}\nselect count(*) as n from {{ ref('stg_fees') }} VERSION AS OF 0\n",
    )
    .unwrap();
    p.ok(&["build", "--select", "fees_at_v0"]);
    assert_eq!(p.count("select n from gold.fees_at_v0"), v0);
    // A version that does not exist is a clear error.
    let out = p.run(&["query", "select * from silver.stg_fees VERSION AS OF 99"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("silver.stg_fees")
            || String::from_utf8_lossy(&out.stderr).contains("99")
    );
}

#[test]
fn history_lists_versions_with_operation_run_and_metrics() {
    let t = two_runs();
    let h: Value =
        serde_json::from_str(&t.p.ok(&["--json", "history", "silver.stg_fees"])).unwrap();
    let h = h.as_array().unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(
        (
            h[0]["version"].as_u64(),
            h[0]["operation"].as_str(),
            h[0]["run"].as_str()
        ),
        (Some(1), Some("MERGE"), Some(t.second_run.as_str()))
    );
    assert_eq!(
        (
            h[1]["version"].as_u64(),
            h[1]["operation"].as_str(),
            h[1]["run"].as_str()
        ),
        (Some(0), Some("WRITE"), Some(t.first_run.as_str()))
    );
    assert_eq!(h[0]["metrics"]["num_target_rows_updated"], 3);
    assert_eq!(h[0]["metrics"]["num_target_rows_deleted"], 1);
}

#[test]
fn diff_names_added_and_changed_rows_by_key() {
    let m = Manifest::load();
    let t = two_runs();
    let d: Value = serde_json::from_str(&t.p.ok(&[
        "--json",
        "diff",
        "silver.stg_fees",
        "--from",
        "0",
        "--to",
        "1",
    ]))
    .unwrap();
    assert_eq!(d["key"], serde_json::json!(["fee_id"]));
    let ids = |v: &Value| -> BTreeSet<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["fee_id"].as_str().unwrap().to_string())
            .collect()
    };
    let changed: BTreeSet<String> = d["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[1]["fee_id"].as_str().unwrap().to_string())
        .collect();
    let mut want_changed: BTreeSet<String> = m.batch2["corrected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    want_changed.insert(m.batch2["moved"].as_str().unwrap().to_string());
    assert_eq!(changed, want_changed);
    assert!(d["removed"].as_array().unwrap().is_empty());
    let added = ids(&d["added"]);
    assert_eq!(added.len() as i64, m.batch2["new_fees"].as_i64().unwrap());
    let july: BTreeSet<String> = t
        .p
        .query("select fee_id from silver.stg_fees where fee_month = '2026-07' and fee_id not in (select fee_id from silver.stg_fees VERSION AS OF 0)")
        .iter()
        .map(|r| r["fee_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(added, july);
    // The corrected amounts: +10.00 each.
    for pair in d["changed"].as_array().unwrap() {
        if pair[1]["note"] == "corrected amount" {
            let (a, b) = (
                pair[0]["fee_amount"].as_f64().unwrap(),
                pair[1]["fee_amount"].as_f64().unwrap(),
            );
            assert!((b - a - 10.0).abs() < 1e-9, "{pair}");
        }
    }
}

#[test]
fn restore_brings_back_a_version_and_the_next_run_catches_up() {
    let m = Manifest::load();
    let t = two_runs();
    let p = &t.p;
    let current = p.count("select count(*) from silver.stg_fees");
    p.ok(&["restore", "silver.stg_fees", "--version", "0"]);
    assert_eq!(
        p.count("select count(*) from silver.stg_fees"),
        m.good_rows("fees/")
    );
    let h: Value = serde_json::from_str(&p.ok(&["--json", "history", "silver.stg_fees"])).unwrap();
    assert_eq!(h[0]["operation"], "RESTORE");
    // The restored table carries the build state of version 0: the next run re-applies batch 2.
    let r: Value = serde_json::from_str(&p.ok(&["--json", "run", "--select", "stg_fees"])).unwrap();
    assert_eq!(r["models"][0]["mode"], "incremental");
    assert_eq!(p.count("select count(*) from silver.stg_fees"), current);
}

#[test]
fn as_of_run_reads_every_table_as_that_run_left_it() {
    let m = Manifest::load();
    let t = two_runs();
    let p = &t.p;
    let sql = "select (select count(*) from bronze.fees) as bronze, (select count(*) from silver.stg_fees) as silver, \
               (select cast(sum(revenue) as varchar) from gold.fct_monthly_revenue) as revenue, \
               (select count(*) from silver.clients) as versions";
    let at_first: Value = serde_json::from_str(&p.ok(&[
        "query",
        sql,
        "--as-of-run",
        &t.first_run,
        "--format",
        "json",
    ]))
    .unwrap();
    let fees = m.good_rows("fees/");
    assert_eq!(at_first[0]["bronze"], fees);
    assert_eq!(at_first[0]["silver"], fees);
    assert_eq!(at_first[0]["versions"], m.good_rows("clients/"));
    let rev_v0 = p.query(
        "select cast(sum(revenue) as varchar) as r from gold.fct_monthly_revenue VERSION AS OF 0",
    );
    assert_eq!(at_first[0]["revenue"], rev_v0[0]["r"]);
    let now: Value = serde_json::from_str(&p.ok(&[
        "query",
        sql,
        "--as-of-run",
        &t.second_run,
        "--format",
        "json",
    ]))
    .unwrap();
    let latest: Value = serde_json::from_str(&p.ok(&["query", sql, "--format", "json"])).unwrap();
    assert_eq!(now, latest);
    assert_ne!(now, at_first);
    let out = p.run(&["query", "select 1", "--as-of-run", "no-such-run"]);
    assert_eq!(out.status.code(), Some(2));
}
