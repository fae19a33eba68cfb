//! SQL models: golden gold tables, incremental builds equal to full refreshes, partition-aware
//! MERGE read from the recorded metrics, no-op re-runs, model errors, selectors and the dag.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use crate::support::golden::{GOLD, sorted_csv};
use crate::support::{Manifest, Project, copy_dir, json, model, model_names, repo};

const SILVER: [&str; 3] = ["stg_fees", "clients", "advisers"];

/// A table's full content as CSV with sorted rows (a stable text to compare or check in).
fn table_csv(p: &Project, table: &str) -> String {
    sorted_csv(&p.ok(&[
        "query",
        &format!("select * from {table}"),
        "--format",
        "csv",
    ]))
}

#[test]
fn reference_gold_tables_match_golden_files() {
    let p = Project::reference();
    p.ok(&["run"]);
    let update = std::env::var("SILT_UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let mut diffs = Vec::new();
    for g in GOLD {
        let got = table_csv(&p, &format!("gold.{g}"));
        assert!(got.lines().count() > 1, "gold.{g} is empty");
        let path = repo().join("tests/golden").join(format!("{g}.csv"));
        if update {
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "{} is missing: run `SILT_UPDATE_GOLDEN=1 cargo test golden` and review the diff",
                path.display()
            )
        });
        if got != want {
            diffs.push(format!(
                "gold.{g} differs from {}:\n--- want\n{want}\n--- got\n{got}",
                path.display()
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{}\n(if the change is intended: SILT_UPDATE_GOLDEN=1 cargo test golden)",
        diffs.join("\n")
    );
}

#[test]
fn ltv_counts_refunds_and_preserves_the_fee_total() {
    let p = Project::reference();
    p.ok(&["run"]);
    let fees = p.query("select cast(sum(fee_amount) as varchar) as s, cast(sum(case when fee_amount < 0 then fee_amount end) as varchar) as r from silver.stg_fees");
    let ltv = p.query("select cast(sum(ltv_total) as varchar) as s from gold.rpt_client_ltv");
    let revenue = p.query("select cast(sum(revenue) as varchar) as s, cast(sum(refunds) as varchar) as r from gold.fct_monthly_revenue");
    assert_eq!(fees[0]["s"], ltv[0]["s"]);
    assert_eq!(fees[0]["s"], revenue[0]["s"]);
    assert_eq!(fees[0]["r"], revenue[0]["r"]);
    assert!(
        fees[0]["r"].as_str().unwrap().starts_with('-'),
        "the fixtures hold refunds"
    );
}

#[test]
fn second_batch_incrementally_equals_a_full_refresh() {
    let m = Manifest::load();
    let p = Project::reference();
    p.ok(&["run"]);
    copy_dir(&repo().join("fixtures/batch2"), &p.landing());
    let report = json(&p, &["run"]);
    assert_eq!(model(&report, "stg_fees")["mode"], "incremental");
    assert_eq!(model(&report, "clients")["mode"], "incremental");
    assert_eq!(model(&report, "fct_monthly_revenue")["mode"], "incremental");
    assert_eq!(
        model(&report, "fct_monthly_revenue")["partitions"],
        serde_json::json!(["2026-06", "2026-07"])
    );
    let b2 = &m.batch2;
    let stg = model(&report, "stg_fees");
    assert_eq!(
        stg["rows_updated"],
        b2["corrected"].as_array().unwrap().len()
    );
    assert_eq!(stg["rows_deleted"], 1, "the moved fee leaves its old month");
    assert_eq!(
        stg["rows_inserted"].as_u64().unwrap(),
        b2["new_fees"].as_u64().unwrap() + 1
    );

    let mut incremental = BTreeMap::new();
    for t in SILVER
        .iter()
        .map(|s| format!("silver.{s}"))
        .chain(GOLD.iter().map(|g| format!("gold.{g}")))
    {
        incremental.insert(t.clone(), table_csv(&p, &t));
    }
    let full = json(&p, &["build", "--full-refresh"]);
    assert!(
        full["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["mode"] == "full")
    );
    for (t, inc) in &incremental {
        assert_eq!(
            &table_csv(&p, t),
            inc,
            "{t}: incremental build differs from a full refresh"
        );
    }
    // The moved fee is once, in its new month; the corrections carry the new amounts.
    let moved = p.query(&format!(
        "select fee_month from silver.stg_fees where fee_id = '{}'",
        b2["moved"].as_str().unwrap()
    ));
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0]["fee_month"], "2026-07");
    for id in b2["corrected"].as_array().unwrap() {
        let r = p.query(&format!(
            "select note from silver.stg_fees where fee_id = '{}'",
            id.as_str().unwrap()
        ));
        assert_eq!(r[0]["note"], "corrected amount");
    }
    // SCD2: the changed profile has two versions, the unchanged one still one.
    let changed = p.query(&format!(
        "select email, is_current, valid_to is null as open from silver.clients where client_id = '{}' order by valid_from",
        b2["changed_client"].as_str().unwrap()
    ));
    assert_eq!(changed.len(), 2, "{changed:?}");
    assert_eq!(
        (changed[0]["is_current"].clone(), changed[0]["open"].clone()),
        (Value::Bool(false), Value::Bool(false))
    );
    assert_eq!(
        (changed[1]["is_current"].clone(), changed[1]["open"].clone()),
        (Value::Bool(true), Value::Bool(true))
    );
    // silver.clients pseudonymizes email: the new version carries the HMAC of the new address.
    let latest = p.query(&format!(
        "select email from bronze.clients where client_id = '{}' order by _ingested_at desc limit 1",
        b2["changed_client"].as_str().unwrap()
    ));
    let new_email = latest[0]["email"].as_str().unwrap();
    assert!(new_email.starts_with("new.address"), "{new_email}");
    assert_eq!(
        changed[1]["email"].as_str().unwrap(),
        silt::build::pseudonym::hmac_hex("adviser-fees-dev-key", new_email)
    );
    assert_ne!(changed[0]["email"], changed[1]["email"]);
    let unchanged = p.count(&format!(
        "select count(*) from silver.clients where client_id = '{}'",
        b2["unchanged_client"].as_str().unwrap()
    ));
    assert_eq!(unchanged, 1);
}

/// Active files of a Delta table by path, from its log (through deltalake).
fn active_files(table: &Path) -> BTreeMap<String, u64> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = url::Url::from_directory_path(table).unwrap();
        let t = deltalake::open_table(url).await.unwrap();
        t.snapshot()
            .unwrap()
            .log_data()
            .iter()
            .map(|f| (f.path().to_string(), f.size() as u64))
            .collect()
    })
}

#[test]
fn merge_of_a_one_month_batch_reads_and_rewrites_only_that_month() {
    let m = Manifest::load();
    let p = Project::reference();
    p.ok(&["run"]);
    let before = active_files(&p.lake().join("silver/stg_fees"));
    let months = before
        .keys()
        .filter(|f| f.starts_with("fee_month="))
        .map(|f| f.split('/').next().unwrap().to_string())
        .collect::<std::collections::BTreeSet<_>>();
    assert!(months.len() >= 6, "{months:?}");
    let march: Vec<&String> = before
        .keys()
        .filter(|f| f.starts_with("fee_month=2026-03/"))
        .collect();
    copy_dir(&repo().join("fixtures/march_fix"), &p.landing());
    let report = json(&p, &["run", "--select", "stg_fees"]);
    let stg = model(&report, "stg_fees");
    assert_eq!(stg["mode"], "incremental");
    assert_eq!(
        stg["rows_updated"],
        m.march_fix["corrected"].as_array().unwrap().len()
    );
    assert_eq!(stg["rows_inserted"], 0);
    assert_eq!(
        stg["files_scanned"],
        march.len(),
        "only March's files are read: {stg}"
    );
    assert_eq!(
        stg["files_skipped"].as_u64().unwrap() as usize,
        before.len() - march.len()
    );
    let after = active_files(&p.lake().join("silver/stg_fees"));
    let removed: Vec<&String> = before.keys().filter(|f| !after.contains_key(*f)).collect();
    let added: Vec<&String> = after.keys().filter(|f| !before.contains_key(*f)).collect();
    assert!(
        !removed.is_empty() && removed.iter().all(|f| f.starts_with("fee_month=2026-03/")),
        "{removed:?}"
    );
    assert!(
        !added.is_empty() && added.iter().all(|f| f.starts_with("fee_month=2026-03/")),
        "{added:?}"
    );
    let march_bytes: u64 = march.iter().map(|f| before[*f]).sum();
    assert_eq!(
        stg["bytes_removed"].as_u64().unwrap(),
        removed.iter().map(|f| before[*f]).sum::<u64>()
    );
    assert!(stg["bytes_removed"].as_u64().unwrap() <= march_bytes);
    // The metrics are in the run log too.
    let runs = p.query(&format!(
        "select files_scanned, files_removed, rows_updated from _silt.runs where run_id = '{}' and model = 'stg_fees'",
        report["run_id"].as_str().unwrap()
    ));
    assert_eq!(runs[0]["files_scanned"], march.len());
    assert_eq!(runs[0]["rows_updated"], 2);
}

#[test]
fn run_again_without_new_data_writes_no_version() {
    let p = Project::reference();
    p.ok(&["run"]);
    let before = p.log_files();
    let report = json(&p, &["run"]);
    assert!(
        report["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["status"] == "up_to_date"),
        "{report}"
    );
    assert_eq!(p.log_files(), before);
    // Nothing was built, so no model test and no singular test ran (source tests still do).
    let model_tests: Vec<&Value> = report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| !t["subject"].as_str().unwrap().starts_with("bronze."))
        .collect();
    assert!(model_tests.is_empty(), "{model_tests:?}");
}

#[test]
fn an_up_to_date_model_with_a_failing_test_keeps_its_downstream_skipped() {
    let p = Project::reference();
    p.ok(&["run"]);
    // A gate whose unique test fails: two rows with the same adviser.
    write_model(
        &p,
        "gold/qa_gate.sql",
        "{{ config(materialized='table', tests=[{'type': 'unique', 'column': 'adviser_id'}]) }}\n\
         select 'A_SAME' as adviser_id from {{ ref('stg_fees') }} limit 2\n",
    );
    write_model(
        &p,
        "gold/qa_after_gate.sql",
        "{{ config(materialized='table') }}\nselect count(*) as n from {{ ref('qa_gate') }}\n",
    );
    for round in ["first", "second"] {
        let out = p.run(&["--json", "run"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            model(&r, "qa_after_gate")["status"],
            "skipped",
            "{round}: {r}"
        );
        let t = r["tests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "unique_qa_gate_adviser_id")
            .unwrap_or_else(|| panic!("{round}: the gate's test in {r}"));
        assert_eq!(t["status"], "fail", "{round}: {t}");
    }
    // In the second round the gate was up to date: its test ran again because its downstream
    // was to be built, and the downstream never was.
    assert!(!p.lake().join("gold/qa_after_gate").exists());
}

#[test]
fn a_correction_that_moves_a_fee_to_another_client_recomputes_both() {
    let p = Project::reference();
    p.ok(&["run"]);
    let two = p.query(
        "select fee_id, client_id, adviser_id, cast(fee_date as varchar) as d from silver.stg_fees \
         where client_id in (select client_id from gold.dim_clients) order by client_id, fee_id limit 1",
    );
    let f = &two[0];
    let other = p.query(&format!(
        "select client_id from gold.dim_clients where client_id <> '{}' order by client_id limit 1",
        f["client_id"].as_str().unwrap()
    ));
    let to = other[0]["client_id"].as_str().unwrap().to_string();
    std::fs::write(
        p.landing().join("fees/fees_reassigned.csv"),
        format!(
            "fee_id,client_id,adviser_id,fee_date,fee_amount,currency,note\n{id},{to},{a},{d},1000.00,GBP,reassigned\n",
            id = f["fee_id"].as_str().unwrap(),
            a = f["adviser_id"].as_str().unwrap(),
            d = f["d"].as_str().unwrap(),
        ),
    )
    .unwrap();
    let report = json(&p, &["run"]);
    assert_eq!(model(&report, "rpt_client_ltv")["mode"], "incremental");
    let mut incremental = BTreeMap::new();
    for t in [
        "gold.dim_clients",
        "gold.rpt_client_ltv",
        "gold.rpt_cohort_ltv",
    ] {
        incremental.insert(t, table_csv(&p, t));
    }
    p.ok(&["build", "--full-refresh"]);
    for (t, inc) in &incremental {
        assert_eq!(
            &table_csv(&p, t),
            inc,
            "{t}: incremental build differs from a full refresh"
        );
    }
}

fn write_model(p: &Project, rel: &str, sql: &str) {
    std::fs::write(p.path().join("sql").join(rel), sql).unwrap();
}

#[test]
fn cycles_unknown_refs_and_sql_errors_name_the_file_exit_2_and_write_nothing() {
    let p = Project::reference();
    p.ok(&["run"]);
    let before = p.log_files();
    let data_logs = |p: &Project| {
        p.log_files()
            .into_iter()
            .filter(|f| !f.contains("/_silt/"))
            .collect::<Vec<_>>()
    };
    let data_before = data_logs(&p);
    for (file, sql, needle) in [
        (
            "gold/loop_a.sql",
            "select * from {{ ref('loop_b') }}",
            "cycle",
        ),
        (
            "gold/loop_b.sql",
            "select * from {{ ref('loop_a') }}",
            "cycle",
        ),
    ] {
        write_model(&p, file, sql);
        let _ = needle;
    }
    let out = p.run(&["build"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("sql/gold/loop_a.sql")
            && err.contains("cycle")
            && err.contains("loop_a -> loop_b -> loop_a"),
        "{err}"
    );
    assert_eq!(p.log_files(), before);
    std::fs::remove_file(p.path().join("sql/gold/loop_a.sql")).unwrap();
    std::fs::remove_file(p.path().join("sql/gold/loop_b.sql")).unwrap();

    write_model(
        &p,
        "gold/bad_ref.sql",
        "select * from {{ ref('no_such_model') }}",
    );
    let out = p.run(&["run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("sql/gold/bad_ref.sql") && err.contains("no_such_model"),
        "{err}"
    );
    assert_eq!(p.log_files(), before);
    std::fs::remove_file(p.path().join("sql/gold/bad_ref.sql")).unwrap();

    write_model(
        &p,
        "gold/bad_sql.sql",
        "select no_such_column from {{ ref('stg_fees') }}",
    );
    let out = p.run(&["build"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("sql/gold/bad_sql.sql") && err.contains("no_such_column"),
        "{err}"
    );
    assert!(!p.lake().join("gold/bad_sql").exists());
    assert_eq!(
        data_logs(&p),
        data_before,
        "no data table got a new version"
    );
}

#[test]
fn a_failed_model_skips_its_downstream_and_independent_branches_build() {
    let p = Project::reference();
    write_model(
        &p,
        "gold/dim_clients.sql",
        "select client_id, nonsense from {{ ref('clients') }}",
    );
    let out = p.run(&["--json", "run"]);
    assert_eq!(out.status.code(), Some(2));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(model(&report, "dim_clients")["status"], "failed");
    for skipped in ["rpt_client_ltv", "rpt_cohort_ltv", "rpt_adviser_ltv"] {
        assert_eq!(model(&report, skipped)["status"], "skipped", "{skipped}");
        assert!(!p.lake().join("gold").join(skipped).exists());
    }
    for built in ["stg_fees", "clients", "advisers", "fct_monthly_revenue"] {
        assert_eq!(model(&report, built)["status"], "built", "{built}");
    }
}

#[test]
fn selectors_pick_models_and_their_neighbours() {
    let p = Project::reference();
    p.ok(&["run"]);
    let names = model_names;
    let r = json(&p, &["build", "--select", "+rpt_cohort_ltv"]);
    assert_eq!(
        names(&r),
        [
            "clients",
            "stg_fees",
            "dim_clients",
            "rpt_client_ltv",
            "rpt_cohort_ltv"
        ]
    );
    let r = json(&p, &["build", "--select", "advisers+"]);
    assert_eq!(names(&r), ["advisers", "rpt_adviser_ltv"]);
    let r = json(&p, &["build", "--select", "silver"]);
    assert_eq!(names(&r), ["advisers", "clients", "stg_fees"]);
    let out = p.run(&["build", "--select", "nope"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn dag_renders_as_text_mermaid_dot_and_json() {
    let p = Project::reference();
    let text = p.ok(&["dag"]);
    assert!(
        text.contains("bronze.fees") && text.contains("silver.stg_fees [incremental]"),
        "{text}"
    );
    let mermaid = p.ok(&["dag", "--format", "mermaid"]);
    assert!(
        mermaid.starts_with("graph LR")
            && mermaid.contains("silver.stg_fees --> gold.fct_monthly_revenue"),
        "{mermaid}"
    );
    let dot = p.ok(&["dag", "--format", "dot"]);
    assert!(
        dot.contains("\"bronze.clients\" -> \"silver.clients\""),
        "{dot}"
    );
    let json: Value = serde_json::from_str(&p.ok(&["dag", "--format", "json"])).unwrap();
    let order: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    let pos = |n: &str| order.iter().position(|o| *o == n).unwrap();
    assert!(
        pos("stg_fees") < pos("dim_clients")
            && pos("dim_clients") < pos("rpt_client_ltv")
            && pos("rpt_client_ltv") < pos("rpt_adviser_ltv")
    );
}

#[test]
fn runs_lists_past_runs_with_metrics() {
    let p = Project::reference();
    let first = json(&p, &["run"]);
    copy_dir(&repo().join("fixtures/batch2"), &p.landing());
    let second = json(&p, &["run"]);
    // A failed run: a model whose SQL no longer plans.
    let broken = p.path().join("sql/gold/rpt_cohort_ltv.sql");
    let sql = std::fs::read_to_string(&broken).unwrap();
    std::fs::write(&broken, sql.replace("from ", "from no_such_table, ")).unwrap();
    let out = p.run(&[
        "--json",
        "run",
        "--full-refresh",
        "--select",
        "rpt_cohort_ltv",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let third: Value = serde_json::from_slice(&out.stdout).unwrap();
    std::fs::write(&broken, sql).unwrap();

    // --limit counts runs: one line each, newest first.
    let runs: Value = serde_json::from_str(&p.ok(&["--json", "runs", "--limit", "2"])).unwrap();
    let rows = runs.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{runs}");
    assert_eq!(rows[0]["run_id"], third["run_id"]);
    assert_eq!(rows[1]["run_id"], second["run_id"]);
    assert_eq!(rows[0]["status"], "failed");
    assert!(
        rows[0]["error"]
            .as_str()
            .unwrap()
            .contains("rpt_cohort_ltv")
            && rows[0]["error"].as_str().unwrap().contains("no_such_table"),
        "{runs}"
    );
    assert_eq!(rows[1]["status"], "ok");
    assert_eq!(rows[1]["command"], "run");
    let all: Value = serde_json::from_str(&p.ok(&["--json", "runs", "--limit", "10"])).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 3);
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|r| r["run_id"] == first["run_id"])
    );

    // One run's rows in the order they ran: each model followed by its tests, with severity
    // and failing rows in their own columns.
    let detail: Value = serde_json::from_str(&p.ok(&[
        "--json",
        "runs",
        "--run",
        second["run_id"].as_str().unwrap(),
    ]))
    .unwrap();
    let d = detail.as_array().unwrap();
    let names: Vec<&str> = d.iter().map(|r| r["model"].as_str().unwrap()).collect();
    let pos = |n: &str| {
        names
            .iter()
            .position(|x| *x == n)
            .unwrap_or_else(|| panic!("{n} in {names:?}"))
    };
    assert!(pos("ingest") < pos("stg_fees"));
    assert!(pos("stg_fees") < pos("unique_stg_fees_fee_id"));
    assert!(pos("unique_stg_fees_fee_id") < pos("dim_clients"));
    let stg = &d[pos("stg_fees")];
    assert_eq!(stg["mode"], "incremental");
    assert_eq!(stg["upd"], model(&second, "stg_fees")["rows_updated"]);
    let t = &d[pos("unique_stg_fees_fee_id")];
    assert_eq!(t["kind"], "test");
    assert_eq!(t["severity"], "error");
    assert_eq!(t["status"], "pass");
    assert_eq!(t["failing_rows"], 0);
    let warn = d
        .iter()
        .find(|r| r["model"] == "expression_stg_fees_expression")
        .expect("the warn-level test");
    assert_eq!(warn["severity"], "warn");
    assert_eq!(warn["status"], "pass");
    assert_eq!(warn["mode"], "written");
    let failed = p.ok(&["runs", "--run", third["run_id"].as_str().unwrap()]);
    assert!(
        failed.contains("failed") && failed.contains("no_such_table"),
        "{failed}"
    );
    let table = p.ok(&["runs"]);
    assert!(
        table.contains(second["run_id"].as_str().unwrap()) && table.contains("failed"),
        "{table}"
    );
}

#[test]
fn watch_ingests_dropped_files_and_stops_cleanly_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};
    let p = Project::reference();
    let mut child = p
        .cmd(&["watch", "--debounce-ms", "300", "--poll-seconds", "60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let wait_for = |needle: &str, secs: u64| -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
                let hit = l.contains(needle);
                seen.push(l);
                if hit {
                    return seen;
                }
            }
        }
        panic!("no '{needle}' within {secs}s; stderr so far: {seen:?}");
    };
    // The files already in the landing root are picked up first.
    wait_for("change(s)", 120);
    let before = p.count("select count(*) from bronze.fees");
    let dropped_at = Instant::now();
    copy_dir(
        &repo().join("fixtures/batch2/fees"),
        &p.landing().join("fees"),
    );
    let lines = wait_for("change(s)", 60);
    let took = dropped_at.elapsed();
    assert!(
        lines.last().unwrap().contains("ingested 1 file(s)")
            && lines
                .last()
                .unwrap()
                .contains("silver.stg_fees (incremental)"),
        "{lines:?}"
    );
    assert!(
        took < Duration::from_secs(30),
        "the drop was picked up after {took:?}"
    );
    let m = Manifest::load();
    let b2 = m.batch2["new_fees"].as_i64().unwrap()
        + m.batch2["corrected"].as_array().unwrap().len() as i64
        + 1;
    assert_eq!(p.count("select count(*) from bronze.fees"), before + b2);
    assert_eq!(
        p.count(&format!(
            "select count(*) from silver.stg_fees where fee_id = '{}' and fee_month = '2026-07'",
            m.batch2["moved"].as_str().unwrap()
        )),
        1
    );
    // Ctrl-C: a clean stop, exit 0.
    let st = std::process::Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "watch did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}

#[test]
fn model_tables_keep_no_statistics_on_pii_columns_or_subject_keys() {
    let p = Project::reference();
    p.ok(&["run"]);
    let mut adds = 0;
    crate::support::walk(&p.lake().join("silver/clients/_delta_log"), &mut |f| {
        if f.extension().is_none_or(|x| x != "json") {
            return;
        }
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let a: Value = serde_json::from_str(line).unwrap();
            let Some(stats) = a["add"]["stats"].as_str() else {
                continue;
            };
            adds += 1;
            let stats: Value = serde_json::from_str(stats).unwrap();
            let mins = stats["minValues"].as_object().unwrap();
            // Other columns keep their statistics; the subject key does not (an erased id
            // must not survive in a log entry or a checkpoint).
            assert!(mins.contains_key("signup_date"), "{stats}");
            for pii in [
                "client_id",
                "full_name",
                "email",
                "nino",
                "date_of_birth",
                "address_line1",
                "postcode",
            ] {
                assert!(
                    !mins.contains_key(pii),
                    "{pii} has statistics in silver.clients: {stats}"
                );
            }
            assert!(!stats.to_string().contains("@example.com"), "{stats}");
        }
    });
    assert!(adds > 0);
}

#[test]
fn a_join_beyond_the_engine_memory_limit_fails_the_model_and_says_what_to_raise() {
    let p = Project::reference();
    p.ok(&["run"]);
    write_model(
        &p,
        "gold/big_join.sql",
        "select count(*) as n from range(3000000) a join range(3000000) b on a.value = b.value",
    );
    let out = p
        .cmd(&["--json", "build", "--select", "big_join"])
        .env("SILT_ENGINE_MEMORY_LIMIT_MB", "16")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(model(&report, "big_join")["status"], "failed");
    assert!(err.contains("Resources exhausted"), "{err}");
    assert!(err.contains("fix: raise [engine] memory_limit_mb"), "{err}");
    assert!(
        !p.lake().join("gold/big_join/_delta_log").exists(),
        "nothing committed"
    );
    // With the default limit the same model builds.
    let r: Value =
        serde_json::from_str(&p.ok(&["--json", "build", "--select", "big_join"])).unwrap();
    assert_eq!(model(&r, "big_join")["status"], "built");
    assert_eq!(p.count("select n from gold.big_join"), 3_000_000);
}

/// `recompute_by`: a batch recomputes only the clients it changed, from their whole history;
/// a (client, adviser) row the new data no longer produces is deleted; the result equals a full
/// refresh; and a change in an upstream without the column rebuilds the model in full.
#[test]
fn recompute_by_rebuilds_only_the_changed_values_and_deletes_what_they_no_longer_produce() {
    let p = Project::reference();
    std::fs::write(
        p.path().join("sql/gold/client_adviser_fees.sql"),
        "{{ config(materialized='incremental', unique_key=['client_id', 'adviser_id'], recompute_by='client_id') }}\n\
         select f.client_id, f.adviser_id, a.team, count(*) as fees, sum(f.fee_amount) as total\n\
         from {{ ref('stg_fees') }} f join {{ ref('advisers') }} a on a.adviser_id = f.adviser_id\n\
         where f.fee_amount > 0\n\
         group by f.client_id, f.adviser_id, a.team\n",
    )
    .unwrap();
    let first = json(&p, &["run"]);
    assert_eq!(model(&first, "client_adviser_fees")["mode"], "full");
    assert_eq!(model(&first, "dim_clients")["mode"], "full");
    let before = p.count("select count(*) from gold.client_adviser_fees");

    // A (client, adviser) pair with a single positive fee: correcting it to a refund removes
    // the pair. And one new fee for another client.
    let single = p.query(
        "select f.* from silver.stg_fees f join (select client_id, adviser_id from silver.stg_fees \
         where fee_amount > 0 group by client_id, adviser_id having count(*) = 1) o \
         on o.client_id = f.client_id and o.adviser_id = f.adviser_id where f.fee_amount > 0 \
         order by f.fee_id limit 1",
    );
    let s = &single[0];
    let (cid, adv) = (
        s["client_id"].as_str().unwrap(),
        s["adviser_id"].as_str().unwrap(),
    );
    let other = p.query(&format!(
        "select client_id, adviser_id, cast(fee_date as varchar) as d from silver.stg_fees \
         where client_id <> '{cid}' and fee_amount > 0 order by fee_id limit 1"
    ));
    let o = &other[0];
    let (ocid, oadv) = (
        o["client_id"].as_str().unwrap(),
        o["adviser_id"].as_str().unwrap(),
    );
    // The same model over five clients only: its two changed rows are more than one in twenty,
    // so the build rewrites the table in one pass instead of a MERGE; the outcome must be the same.
    std::fs::write(
        p.path().join("sql/gold/few_client_adviser_fees.sql"),
        format!(
            "{{{{ config(materialized='incremental', unique_key=['client_id', 'adviser_id'], recompute_by='client_id') }}}}\n\
             select client_id, adviser_id, team, fees, total from ( \
             select f.client_id, f.adviser_id, a.team, count(*) as fees, sum(f.fee_amount) as total\n\
             from {{{{ ref('stg_fees') }}}} f join {{{{ ref('advisers') }}}} a on a.adviser_id = f.adviser_id\n\
             where f.fee_amount > 0 and f.client_id in ('{cid}', '{ocid}', 'C0001', 'C0002', 'C0003')\n\
             group by f.client_id, f.adviser_id, a.team) x\n"
        ),
    )
    .unwrap();
    let second = json(&p, &["run"]);
    assert_eq!(model(&second, "few_client_adviser_fees")["mode"], "full");
    let few_before = p.count("select count(*) from gold.few_client_adviser_fees");
    assert!(
        few_before < 40,
        "{few_before} rows: two changed rows must be one in twenty"
    );
    let pairs_of_other = p.count(&format!(
        "select count(*) from gold.client_adviser_fees where client_id = '{ocid}' and adviser_id = '{oadv}'"
    ));
    assert_eq!(pairs_of_other, 1);
    std::fs::write(
        p.landing().join("fees/fees_recompute_fix.csv"),
        format!(
            "fee_id,client_id,adviser_id,fee_date,fee_amount,currency,note\n\
             {},{cid},{adv},{},-5.00,GBP,refunded\n\
             F999901,{ocid},{oadv},{},12.34,GBP,new\n",
            s["fee_id"].as_str().unwrap(),
            p.query(&format!(
                "select cast(fee_date as varchar) as d from silver.stg_fees where fee_id = '{}'",
                s["fee_id"].as_str().unwrap()
            ))[0]["d"]
                .as_str()
                .unwrap(),
            o["d"].as_str().unwrap(),
        ),
    )
    .unwrap();
    let report = json(&p, &["run"]);
    let m = model(&report, "client_adviser_fees");
    assert_eq!(m["mode"], "incremental", "{m}");
    // Only the two clients' rows were recomputed; of those, one pair is gone and one changed.
    assert_eq!(m["rows_deleted"], 1, "{m}");
    assert_eq!(m["rows_updated"], 1, "{m}");
    assert_eq!(m["rows_inserted"], 0, "{m}");
    let few = model(&report, "few_client_adviser_fees");
    assert_eq!(few["mode"], "incremental", "{few}");
    assert_eq!(
        (
            few["rows_deleted"].clone(),
            few["rows_updated"].clone(),
            few["rows_inserted"].clone()
        ),
        (Value::from(1), Value::from(1), Value::from(0)),
        "{few}"
    );
    assert_eq!(
        few["message"],
        "2 value(s) of client_id recomputed; the table was rewritten in one pass"
    );
    assert_eq!(m["message"], "2 value(s) of client_id recomputed; merged");
    assert_eq!(
        p.count("select count(*) from gold.few_client_adviser_fees"),
        few_before - 1
    );
    for g in ["dim_clients", "rpt_client_ltv"] {
        assert_eq!(model(&report, g)["mode"], "incremental", "{g}");
    }
    assert_eq!(
        p.count(&format!(
            "select count(*) from gold.client_adviser_fees where client_id = '{cid}' and adviser_id = '{adv}'"
        )),
        0
    );
    assert_eq!(
        p.count("select count(*) from gold.client_adviser_fees"),
        before - 1
    );
    let fees_now = p.count(&format!(
        "select fees from gold.client_adviser_fees where client_id = '{ocid}' and adviser_id = '{oadv}'"
    ));
    let few_incremental = table_csv(&p, "gold.few_client_adviser_fees");
    let incremental = table_csv(&p, "gold.client_adviser_fees");
    let ltv = table_csv(&p, "gold.rpt_client_ltv");
    let dim = table_csv(&p, "gold.dim_clients");
    p.ok(&[
        "build",
        "--full-refresh",
        "--select",
        "client_adviser_fees,few_client_adviser_fees,dim_clients,rpt_client_ltv",
    ]);
    assert_eq!(
        table_csv(&p, "gold.few_client_adviser_fees"),
        few_incremental
    );
    assert_eq!(table_csv(&p, "gold.client_adviser_fees"), incremental);
    assert_eq!(table_csv(&p, "gold.rpt_client_ltv"), ltv);
    assert_eq!(table_csv(&p, "gold.dim_clients"), dim);
    assert!(fees_now >= 2, "the new fee counts: {fees_now}");

    // silver.advisers has no client_id: when it changes, any row may change, so a full rebuild.
    std::fs::write(
        p.landing().join("advisers/advisers_2026_09.ndjson"),
        format!("{{\"adviser_id\": \"{oadv}\", \"name\": \"Moved Adviser\", \"team\": \"Recompute\", \"region\": \"York\", \"joined_date\": \"2020-01-01\"}}\n"),
    )
    .unwrap();
    let report = json(&p, &["run"]);
    assert_eq!(model(&report, "client_adviser_fees")["mode"], "full");
    assert_eq!(
        p.count(&format!(
            "select count(*) from gold.client_adviser_fees where adviser_id = '{oadv}' and team <> 'Recompute'"
        )),
        0
    );
}

/// recompute_by is checked: it needs an incremental model and an output column of that name.
#[test]
fn recompute_by_without_its_column_or_on_a_table_is_a_config_error() {
    let p = Project::reference();
    std::fs::write(
        p.path().join("sql/gold/bad_recompute.sql"),
        "{{ config(materialized='table', recompute_by='client_id') }}\nselect 1 as a\n",
    )
    .unwrap();
    let out = p.run(&["build"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sql/gold/bad_recompute.sql")
            && err.contains("recompute_by goes with materialized='incremental'"),
        "{err}"
    );
    std::fs::write(
        p.path().join("sql/gold/bad_recompute.sql"),
        "{{ config(materialized='incremental', unique_key='a', recompute_by='client_id') }}\nselect client_id as a from {{ ref('stg_fees') }} group by client_id\n",
    )
    .unwrap();
    let out = p.exits(&["run"], 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sql/gold/bad_recompute.sql") && err.contains("has no column 'client_id'"),
        "{err}"
    );
}

/// A full build of an incremental model whose output breaks its unique_key fails naming the
/// duplicates, and is rolled back: a new table is left with no rows, an existing one goes back
/// to the version before (its rows intact), and the next run tries again.
#[test]
fn a_full_build_that_breaks_its_unique_key_is_rolled_back() {
    let p = Project::reference();
    let file = p.path().join("sql/gold/adviser_fee_keys.sql");
    let write = |sql: &str| std::fs::write(&file, sql).unwrap();
    write(
        "{{ config(materialized='incremental', unique_key='adviser_id') }}\n\
         select adviser_id, client_id from {{ ref('stg_fees') }}\n",
    );
    let out = p.run(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sql/gold/adviser_fee_keys.sql")
            && err.contains("unique_key (adviser_id) is not unique")
            && err.contains("rolled back: gold.adviser_fee_keys holds no rows"),
        "{err}"
    );
    assert_eq!(p.count("select count(*) from gold.adviser_fee_keys"), 0);
    // Fixed: it builds. Broken again with a full refresh: the good version comes back.
    write(
        "{{ config(materialized='incremental', unique_key='adviser_id') }}\n\
         select adviser_id, count(*) as fees from {{ ref('stg_fees') }} group by adviser_id\n",
    );
    let report = json(&p, &["run"]);
    assert_eq!(model(&report, "adviser_fee_keys")["mode"], "full");
    let good = table_csv(&p, "gold.adviser_fee_keys");
    assert!(good.lines().count() > 2, "{good}");
    write(
        "{{ config(materialized='incremental', unique_key='adviser_id') }}\n\
         select adviser_id, client_id as fees from {{ ref('stg_fees') }}\n",
    );
    let out = p.run(&["build", "--full-refresh", "--select", "adviser_fee_keys"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rolled back: gold.adviser_fee_keys is back at version"),
        "{err}"
    );
    assert_eq!(table_csv(&p, "gold.adviser_fee_keys"), good);
}

/// The check after a full build reads only the rows whose key hash shares a bit with another
/// row's, then counts those exactly: 200 k unique keys (some sharing bits) pass, and a single
/// repeated key among them is found and named.
#[test]
fn the_unique_key_check_of_a_full_build_finds_one_repeated_key_among_many() {
    let p = Project::reference();
    let file = p.path().join("sql/gold/many_keys.sql");
    let write = |sql: &str| std::fs::write(&file, sql).unwrap();
    write(
        "{{ config(materialized='incremental', unique_key=['k', 'part']) }}\n\
         select value as k, value % 7 as part from generate_series(1, 200000)\n",
    );
    let report = json(&p, &["build", "--select", "many_keys"]);
    assert_eq!(model(&report, "many_keys")["status"], "built", "{report}");
    assert_eq!(p.count("select count(*) from gold.many_keys"), 200_000);
    // value % 199999 over 1..=200000: every key once, but 1 (from 1 and from 200000).
    write(
        "{{ config(materialized='incremental', unique_key=['k']) }}\n\
         select value % 199999 as k, value as part from generate_series(1, 200000)\n",
    );
    let out = p.run(&["build", "--full-refresh", "--select", "many_keys"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unique_key (k) is not unique"), "{err}");
    // The one repeated key (1) and its count (2), and no other key.
    let shown: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with('│') || l.starts_with('|'))
        .collect();
    assert!(
        shown.iter().any(|l| l.contains(" 1 ") && l.contains(" 2 ")),
        "{err}"
    );
    assert_eq!(shown.len(), 2, "a header and one key: {err}");
}

/// A partition_overwrite build over more upstream rows than one chunk of the memory pool holds
/// runs one query per chunk of partitions, in one commit, and writes what one query would:
/// in a full build and in an incremental one that touches every partition.
#[test]
fn a_partition_overwrite_build_beyond_one_chunk_runs_a_query_per_chunk_in_one_commit() {
    let p = Project::reference();
    // 48,000 rows in 12 partitions of 4,000; a 16 MiB pool holds 8,192 rows per chunk.
    let events = |modulus: u32| {
        format!(
            "{{{{ config(materialized='table', partition_by='day') }}}}\n\
             select value as id, value % {modulus} as weight, cast(value % 12 as varchar) as day\n\
             from range(48000)\n"
        )
    };
    write_model(&p, "silver/many_events.sql", &events(7));
    write_model(
        &p,
        "gold/per_day.sql",
        "{{ config(materialized='partition_overwrite', partition_by='day') }}\n\
         select day, count(*) as n, count(distinct weight) as weights, sum(id) as total\n\
         from {{ ref('many_events') }} group by day\n",
    );
    let expected = |p: &Project| {
        sorted_csv(&p.ok(&[
            "query",
            "select day, count(*) as n, count(distinct weight) as weights, sum(id) as total \
             from silver.many_events group by day",
            "--format",
            "csv",
        ]))
    };
    let build = |p: &Project| -> Value {
        let out = p
            .cmd(&["--json", "build", "--select", "many_events+"])
            .env("SILT_ENGINE_MEMORY_LIMIT_MB", "16")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };

    let full = build(&p);
    let m = model(&full, "per_day");
    assert_eq!(m["mode"], "full");
    assert_eq!(m["chunks"], 6, "{m}");
    assert_eq!(m["version"], 0, "one commit");
    assert_eq!(m["rows_inserted"], 12);
    assert_eq!(table_csv(&p, "gold.per_day"), expected(&p));
    assert!(table_csv(&p, "gold.per_day").contains("\n0,4000,7,"));

    // New upstream rows in every partition: an incremental build of all 12, chunk by chunk.
    write_model(&p, "silver/many_events.sql", &events(5));
    let inc = build(&p);
    let m = model(&inc, "per_day");
    assert_eq!(m["mode"], "incremental");
    assert_eq!(m["chunks"], 6, "{m}");
    assert_eq!(m["partitions"].as_array().unwrap().len(), 12);
    assert_eq!(m["version"], 1, "one commit");
    assert_eq!(table_csv(&p, "gold.per_day"), expected(&p));
    assert!(table_csv(&p, "gold.per_day").contains("\n0,4000,5,"));

    // With the default pool the same build is one query.
    let r = json(&p, &["build", "--select", "per_day", "--full-refresh"]);
    assert_eq!(model(&r, "per_day")["chunks"], 1);
    assert_eq!(table_csv(&p, "gold.per_day"), expected(&p));
}

/// Builds that run side by side each get a session of their own: a scratch relation one
/// registers (a MERGE's source, an upstream's increment, both under fixed names) is not the
/// other's, while both read the lake's tables and share the engine's memory pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_side_by_side_keep_their_scratch_relations_apart() {
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use silt::lake::catalog::{Catalog, NEW_SCHEMA, scratch_session};
    use silt::lake::storage::{CloudOptions, Storage};
    use std::sync::Arc;

    let p = crate::support::datasets::orders_project();
    p.ok(&["run"]);
    let lake = Storage::new(
        &url::Url::from_directory_path(p.lake()).unwrap(),
        &CloudOptions::default(),
    )
    .unwrap();
    let ctx = Catalog::new(lake).session().await.unwrap();
    let (a, b) = (
        scratch_session(&ctx).unwrap(),
        scratch_session(&ctx).unwrap(),
    );
    let batch = |v: i64| {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![v]))]).unwrap()
    };
    a.register_batch("__silt_src", batch(1)).unwrap();
    b.register_batch("__silt_src", batch(2)).unwrap();
    for (s, v) in [(&a, 1), (&b, 2)] {
        let cat = s.catalog("datafusion").unwrap();
        let scratch: Arc<dyn datafusion::catalog::SchemaProvider> =
            Arc::new(datafusion::catalog::MemorySchemaProvider::new());
        cat.register_schema(NEW_SCHEMA, scratch.clone()).unwrap();
        scratch
            .register_table(
                "increment".into(),
                Arc::new(
                    datafusion::datasource::MemTable::try_new(
                        batch(v * 10).schema(),
                        vec![vec![batch(v * 10)]],
                    )
                    .unwrap(),
                ),
            )
            .unwrap();
    }
    for (s, v) in [(&a, 1i64), (&b, 2)] {
        let sql = format!(
            "select (select v from __silt_src) as src, (select v from {NEW_SCHEMA}.increment) as inc, \
             (select count(*) from silver.stg_lineitem) as lines"
        );
        let rows = s.sql(&sql).await.unwrap().collect().await.unwrap();
        let col = |i: usize| {
            rows[0]
                .column(i)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0)
        };
        assert_eq!((col(0), col(1), col(2)), (v, v * 10, 6), "session {v}");
    }
    // The session they came from has neither relation, and shares their memory pool.
    assert!(ctx.table("__silt_src").await.is_err());
    assert!(
        ctx.catalog("datafusion")
            .unwrap()
            .schema(NEW_SCHEMA)
            .is_none()
    );
    assert!(Arc::ptr_eq(
        &ctx.runtime_env().memory_pool,
        &a.runtime_env().memory_pool
    ));
}

/// A run on four threads builds the same tables as a run on one: three independent
/// incremental MERGEs side by side, a gold model after the one it reads, then a second
/// delivery (changed and new keys) merged incrementally; the report lists models in dag order.
#[test]
fn a_run_on_four_threads_builds_what_one_thread_builds() {
    use crate::support::datasets::{orders_project, write};
    let tables = [
        "silver.stg_lineitem",
        "silver.products",
        "silver.order_amounts",
        "gold.order_volume",
    ];
    let mut results = Vec::new();
    for threads in ["1", "4"] {
        let p = orders_project();
        let run = |p: &Project| {
            let out = p.ok_with_env(&["run", "--json"], &[("SILT_ENGINE_THREADS", threads)]);
            serde_json::from_str::<Value>(&out).unwrap()
        };
        let first = run(&p);
        write(
            &p.landing(),
            "lineitem/lineitem_2.csv",
            "l_orderkey,l_linenumber,l_quantity\n1,1,43\n4,2,8\n5,1,9\n",
        );
        write(
            &p.landing(),
            "orders/orders_2.ndjson",
            "{\"o_orderkey\": 2, \"o_custkey\": 42, \"o_totalprice\": \"21.00\"}\n\
             {\"o_orderkey\": 5, \"o_custkey\": 41, \"o_totalprice\": \"50.00\"}\n",
        );
        write(
            &p.landing(),
            "products/products_2.csv",
            "p_partkey,p_name,qty\n2,nut,40\n7,pin,1\n",
        );
        let second = run(&p);
        let order = model_names;
        for m in ["stg_lineitem", "products", "order_amounts"] {
            assert_eq!(model(&second, m)["mode"], "incremental", "{m} on {threads}");
        }
        let gold_after = |r: &Value| {
            let o = order(r);
            o.iter().position(|m| m == "order_volume") > o.iter().position(|m| m == "stg_lineitem")
        };
        assert!(gold_after(&first) && gold_after(&second), "{first}");
        let mut content: Vec<String> = tables.iter().map(|t| table_csv(&p, t)).collect();
        content.push(order(&first).join(","));
        content.push(order(&second).join(","));
        results.push(content);
    }
    assert_eq!(results[0], results[1]);
    // The second delivery is in: line (1,1) changed, order 5 and product 7 are new.
    assert!(results[1][0].contains("1,1,43"), "{}", results[1][0]);
    assert!(results[1][1].contains("7,pin,1"), "{}", results[1][1]);
    assert!(results[1][2].contains("5,50.00"), "{}", results[1][2]);
}

/// A re-delivery on outside-shaped data (composite key, NULLs in any column), into a plain and
/// a partitioned incremental model: the MERGE replaces only rows that differ, NULL counting as
/// equal to NULL and unequal to a value, and a key that changes partition leaves its old one.
#[test]
fn a_redelivery_merges_only_rows_that_differ_nulls_included() {
    use crate::support::datasets::{project, write};
    let select = "select order_id, line, grp, note, amount from (\n\
               select *, row_number() over (partition by order_id, line \
               order by _source_file desc, _source_line desc) as rn\n\
               from {{ source('items') }}) d\n\
             where rn = 1\n";
    let plain = format!(
        "{{{{ config(materialized='incremental', unique_key=['order_id', 'line']) }}}}\n{select}"
    );
    let by_grp = format!(
        "{{{{ config(materialized='incremental', unique_key=['order_id', 'line'], partition_by='grp') }}}}\n{select}"
    );
    let p = project(&[
        (
            "sql/bronze/items.toml",
            "glob = \"items/*.csv\"\nformat = \"csv\"\nprimary_key = [\"order_id\", \"line\"]\n\n\
             [[columns]]\nname = \"order_id\"\ntype = \"int64\"\nnullable = false\n\n\
             [[columns]]\nname = \"line\"\ntype = \"int32\"\nnullable = false\n\n\
             [[columns]]\nname = \"grp\"\ntype = \"string\"\n\n\
             [[columns]]\nname = \"note\"\ntype = \"string\"\n\n\
             [[columns]]\nname = \"amount\"\ntype = \"float64\"\n",
        ),
        ("sql/silver/items.sql", &plain),
        ("sql/silver/items_by_grp.sql", &by_grp),
    ]);
    let header = "order_id,line,grp,note,amount\n";
    write(
        &p.landing(),
        "items/a.csv",
        &format!(
            "{header}1,1,x,,1.5\n1,2,,n,2.0\n2,1,y,m,\n3,1,,,3.0\n3,2,z,q,4.0\n4,1,w,,5.0\n\
             6,1,,k,7.0\n7,1,z,,8.0\n8,1,w,,9.0\n"
        ),
    );
    p.ok(&["run"]);
    assert_eq!(p.count("select count(*) from silver.items"), 9);
    assert_eq!(p.count("select count(*) from silver.items_by_grp"), 9);
    // Two rows as they are (NULLs in two different columns); in their own group, one NULL
    // gaining a value, one value becoming NULL, one amount changed; lines moving group: to a
    // group this delivery has no other row of (2,1), out of the NULL group (6,1), into it
    // (7,1), between two groups it delivers rows of (8,1); one new line.
    let now = "1,1,x,,1.5\n1,2,,n,2.0\n2,1,u,m,\n3,1,,now,3.0\n3,2,z,,4.0\n4,1,w,,5.5\n\
               5,1,v,,6.0\n6,1,x,k,7.0\n7,1,,,8.0\n8,1,x,,9.0\n";
    write(&p.landing(), "items/b.csv", &format!("{header}{now}"));
    let report = json(&p, &["run"]);
    let items = model(&report, "items");
    assert_eq!(items["mode"], "incremental", "{items}");
    assert_eq!(items["rows_updated"], 7, "{items}");
    assert_eq!(items["rows_inserted"], 1, "{items}");
    let by_grp = model(&report, "items_by_grp");
    assert_eq!(by_grp["mode"], "incremental", "{by_grp}");
    // Each moved line is deleted from its old group and inserted into its new one.
    assert_eq!(by_grp["rows_updated"], 3, "{by_grp}");
    assert_eq!(by_grp["rows_inserted"], 5, "{by_grp}");
    assert_eq!(by_grp["rows_deleted"], 4, "{by_grp}");
    // The report names the groups the MERGE wrote to or removed rows from (the NULL group
    // is left out, as partition_overwrite's list leaves it out); the plain model has none.
    assert_eq!(
        by_grp["partitions"],
        serde_json::json!(["u", "v", "w", "x", "y", "z"]),
        "{by_grp}"
    );
    assert_eq!(items["partitions"], serde_json::json!([]), "{items}");
    let expected = sorted_csv(&format!("{header}{now}"));
    assert_eq!(table_csv(&p, "silver.items"), expected);
    assert_eq!(table_csv(&p, "silver.items_by_grp"), expected);
    // Everything again, exactly as the tables hold it: nothing to rewrite.
    write(&p.landing(), "items/c.csv", &format!("{header}{now}"));
    let report = json(&p, &["run"]);
    for name in ["items", "items_by_grp"] {
        let m = model(&report, name);
        assert_eq!(m["rows_updated"], 0, "{m}");
        assert_eq!(m["rows_inserted"], 0, "{m}");
        assert_eq!(m["files_removed"], 0, "{m}");
        assert_eq!(m["partitions"], serde_json::json!([]), "{m}");
    }
}
