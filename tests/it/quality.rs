//! Data tests, contracts, freshness, anomaly checks and profiles (issue: tests guard every layer).

use serde_json::Value;

use crate::support::{Project, model, repo};

fn test<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("test {name} in {report}"))
}

fn write(p: &Project, rel: &str, text: &str) {
    let path = p.path().join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn every_builtin_test_type_has_a_passing_and_a_failing_case() {
    let p = Project::reference();
    p.ok(&["run"]);
    write(
        &p,
        "sql/gold/qa_probe.sql",
        r#"{{ config(materialized='table', tests=[
    {'type': 'not_null', 'column': 'a', 'name': 'nn_pass'},
    {'type': 'not_null', 'column': 'b', 'name': 'nn_fail'},
    {'type': 'not_null', 'column': 'b', 'where': 'a = 1', 'name': 'nn_where_pass'},
    {'type': 'unique', 'column': 'a', 'name': 'uq_pass'},
    {'type': 'unique', 'columns': ['c', 'client_id'], 'name': 'uq_multi_pass'},
    {'type': 'unique', 'columns': ['c'], 'name': 'uq_fail'},
    {'type': 'accepted_values', 'column': 'c', 'values': ['x', 'y'], 'name': 'av_pass'},
    {'type': 'accepted_values', 'column': 'c', 'values': ['x'], 'name': 'av_fail'},
    {'type': 'relationships', 'column': 'client_id', 'to': 'clients', 'name': 'rel_pass'},
    {'type': 'relationships', 'column': 'b', 'to': 'silver.advisers', 'field': 'adviser_id', 'name': 'rel_fail'},
    {'type': 'expression', 'expression': 'a > 0', 'name': 'ex_pass'},
    {'type': 'expression', 'expression': 'a > 1', 'name': 'ex_warn', 'severity': 'warn'},
]) }}
select 1 as a, 'p' as b, 'x' as c, 'C0001' as client_id
union all select 2, null, 'y', 'C0002'
union all select 3, 'q', 'y', 'C0003'
"#,
    );
    write(
        &p,
        "sql/tests/always_fails.sql",
        "select client_id from {{ ref('qa_probe') }} where a = 3\n",
    );
    // The build itself reports the failures (exit 1) and leaves the table built.
    assert_eq!(
        p.run(&["build", "--select", "qa_probe"]).status.code(),
        Some(1)
    );
    let out = p.exits(&["--json", "test"], 1);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    for (name, status, rows) in [
        ("nn_pass", "pass", 0),
        ("nn_fail", "fail", 1),
        ("nn_where_pass", "pass", 0),
        ("uq_pass", "pass", 0),
        ("uq_multi_pass", "pass", 0),
        ("uq_fail", "fail", 1),
        ("av_pass", "pass", 0),
        ("av_fail", "fail", 2),
        ("rel_pass", "pass", 0),
        ("rel_fail", "fail", 2),
        ("ex_pass", "pass", 0),
        ("ex_warn", "warn", 1),
        ("always_fails", "fail", 1),
        ("one_nino_per_client", "pass", 0),
        ("fee_total_reconciles_to_ltv", "pass", 0),
        ("silver_fees_within_5pct_of_bronze", "pass", 0),
        ("accepted_values_stg_fees_currency", "pass", 0),
    ] {
        let t = test(&r, name);
        assert_eq!(
            (
                t["status"].as_str().unwrap(),
                t["failing_rows"].as_u64().unwrap()
            ),
            (status, rows),
            "{name}: {t}"
        );
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FAIL av_fail on gold.qa_probe: 2 failing row(s)"),
        "{err}"
    );
    // Results are in the run log.
    let logged =
        p.count("select count(*) from _silt.runs where materialized = 'test' and status = 'fail'");
    assert!(logged >= 5, "{logged}");
}

#[test]
fn a_planted_bad_value_fails_the_run_names_the_test_and_stops_downstream() {
    let p = Project::reference();
    let f = p.landing().join("fees/fees_2026_01.csv");
    let text = std::fs::read_to_string(&f).unwrap();
    let planted = text.replacen(",GBP,", ",XXX,", 1);
    assert_ne!(planted, text);
    std::fs::write(&f, planted).unwrap();
    let out = p.run(&["--json", "run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FAIL accepted_values_stg_fees_currency on silver.stg_fees: 1 failing row(s)"),
        "{err}"
    );
    assert!(err.contains("XXX"), "the failing row is shown: {err}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(model(&r, "stg_fees")["status"], "built");
    for skipped in [
        "dim_clients",
        "rpt_client_ltv",
        "rpt_cohort_ltv",
        "rpt_adviser_ltv",
        "fct_monthly_revenue",
    ] {
        assert_eq!(model(&r, skipped)["status"], "skipped", "{skipped}");
        assert!(!p.lake().join("gold").join(skipped).exists());
    }
    for built in ["clients", "advisers"] {
        assert_eq!(model(&r, built)["status"], "built", "{built}");
    }
}

fn log_of(p: &Project, table: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p.lake().join(table).join("_delta_log"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_contract_mismatch_fails_before_any_write_and_schema_change_is_opt_in() {
    let p = Project::reference();
    p.ok(&["run"]);
    let model_file = p.path().join("sql/silver/stg_fees.sql");
    let original = std::fs::read_to_string(&model_file).unwrap();
    // The declared type no longer matches the output.
    std::fs::write(
        &model_file,
        original.replace(
            "'fee_amount': 'decimal(12,2)'",
            "'fee_amount': 'decimal(10,2)'",
        ),
    )
    .unwrap();
    crate::support::copy_dir(&repo().join("fixtures/batch2"), &p.landing());
    let before = log_of(&p, "silver/stg_fees");
    let out = p.run(&["run", "--select", "stg_fees"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("sql/silver/stg_fees.sql")
            && err.contains("fee_amount")
            && err.contains("contract"),
        "{err}"
    );
    assert_eq!(
        log_of(&p, "silver/stg_fees"),
        before,
        "the table version is unchanged"
    );

    // A new output column under on_schema_change = fail (the default) is refused…
    let widened = original
        .replace(
            "_ingested_at as loaded_at",
            "_ingested_at as loaded_at,\n    _batch_id as batch_id",
        )
        .replace(
            "'loaded_at': 'timestamp'",
            "'loaded_at': 'timestamp', 'batch_id': 'string'",
        );
    std::fs::write(&model_file, &widened).unwrap();
    let out = p.run(&["build", "--select", "stg_fees"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("batch_id") && err.contains("on_schema_change"),
        "{err}"
    );
    assert_eq!(log_of(&p, "silver/stg_fees"), before);
    // …and appended when asked for.
    std::fs::write(
        &model_file,
        widened.replace(
            "partition_by='fee_month',",
            "partition_by='fee_month',\n    on_schema_change='append_new_columns',",
        ),
    )
    .unwrap();
    p.ok(&["build", "--select", "stg_fees"]);
    assert!(p.count("select count(*) from silver.stg_fees where batch_id is not null") > 0);
}

#[test]
fn freshness_reports_ok_warn_and_error() {
    let p = Project::reference();
    p.ok(&["ingest"]);
    let fees = p.path().join("sql/bronze/fees.toml");
    // The reference declares a [freshness] block: take it out, each case writes its own.
    let text = std::fs::read_to_string(&fees).unwrap();
    let start = text.find("[freshness]").unwrap();
    let end = text[start..]
        .find("\n\n")
        .map(|e| start + e)
        .unwrap_or(text.len());
    let base = format!("{}{}", &text[..start], &text[end..]);
    let with = |extra: &str| std::fs::write(&fees, format!("{base}\n{extra}\n")).unwrap();
    let status = |p: &Project| -> (Option<i32>, Value) {
        let out = p.run(&["--json", "freshness"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            out.status.code(),
            v.as_array()
                .unwrap()
                .iter()
                .find(|r| r["source"] == "fees")
                .unwrap()
                .clone(),
        )
    };
    with(
        "[freshness]\ncolumn = \"fee_date\"\nwarn_after = \"1 days\"\nerror_after = \"100000 days\"",
    );
    let (code, r) = status(&p);
    assert_eq!((code, r["status"].as_str()), (Some(0), Some("warn")), "{r}");
    assert_eq!(
        r["latest"],
        p.query("select cast(max(fee_date) as varchar) as m from bronze.fees")[0]["m"]
    );
    with("[freshness]\ncolumn = \"fee_date\"\nerror_after = \"30 days\"");
    let (code, r) = status(&p);
    assert_eq!(
        (code, r["status"].as_str()),
        (Some(1), Some("error")),
        "{r}"
    );
    with("[freshness]\nwarn_after = \"1 hours\"");
    let (code, r) = status(&p);
    assert_eq!(
        (code, r["status"].as_str(), r["measured"].as_str()),
        (Some(0), Some("ok"), Some("arrival")),
        "{r}"
    );
}

fn daily_project() -> Project {
    let p = Project::empty_reference();
    write(
        &p,
        "sql/bronze/daily.toml",
        r#"glob = "daily/*.csv"
format = "csv"
[anomaly]
date_column = "day"
min_batches = 3
severity = "error"
[[columns]]
name = "day"
type = "date"
nullable = false
[[columns]]
name = "value"
type = "int64"
"#,
    );
    p
}

fn daily_file(p: &Project, name: &str, days: &[i64], per_day: usize) {
    let mut s = String::from("day,value\n");
    for d in days {
        let date =
            chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap() + chrono::Duration::days(*d);
        for i in 0..per_day {
            s.push_str(&format!("{date},{i}\n"));
        }
    }
    let path = p.landing().join("daily").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, s).unwrap();
}

#[test]
fn a_10x_batch_trips_the_volume_check_and_a_missing_day_the_gap_check() {
    let p = daily_project();
    for k in 0..4 {
        daily_file(
            &p,
            &format!("d{k}.csv"),
            &(k * 10..k * 10 + 10).collect::<Vec<_>>(),
            1,
        );
        let out = p.run(&["ingest", "--source", "daily"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "batch {k}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Ten times the trailing mean (10 rows): 100 rows over ten consecutive days.
    daily_file(&p, "big.csv", &(40..50).collect::<Vec<_>>(), 10);
    let out = p.run(&["ingest", "--source", "daily"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("anomaly (fail): daily: volume") && err.contains("100 rows"),
        "{err}"
    );
    assert!(!err.contains(": gap"), "{err}");
    // A normal-sized batch with one day missing.
    let mut days: Vec<i64> = (50..61).collect();
    days.retain(|d| *d != 55);
    daily_file(&p, "gap.csv", &days, 1);
    let out = p.run(&["ingest", "--source", "daily"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let missing = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap() + chrono::Duration::days(55);
    assert!(
        err.contains("daily: gap on day") && err.contains(&missing.to_string()),
        "{err}"
    );
}

#[test]
fn profile_matches_independently_computed_values() {
    let p = Project::reference();
    p.ok(&["ingest"]);
    let prof: Value =
        serde_json::from_str(&p.ok(&["--json", "profile", "bronze.fees", "--top", "2"])).unwrap();
    let col = |n: &str| {
        prof.as_array()
            .unwrap()
            .iter()
            .find(|c| c["column"] == n)
            .unwrap()
            .clone()
    };
    let facts = p.query(
        "select count(*) as n, count(*) - count(note) as note_nulls, count(distinct client_id) as clients, \
         cast(min(fee_date) as varchar) as dmin, cast(max(fee_date) as varchar) as dmax, \
         cast(avg(cast(fee_amount as double)) as double) as mean, count(distinct note) as notes from bronze.fees",
    );
    let f = &facts[0];
    assert_eq!(col("fee_id")["rows"], f["n"]);
    assert_eq!(col("fee_id")["distinct"], f["n"]);
    assert_eq!(col("note")["nulls"], f["note_nulls"]);
    assert_eq!(col("note")["distinct"], f["notes"]);
    assert_eq!(col("client_id")["distinct"], f["clients"]);
    assert_eq!(col("fee_date")["min"], f["dmin"]);
    assert_eq!(col("fee_date")["max"], f["dmax"]);
    let mean = col("fee_amount")["mean"].as_f64().unwrap();
    assert!(
        (mean - f["mean"].as_f64().unwrap()).abs() < 1e-6,
        "{mean} vs {}",
        f["mean"]
    );
    assert_eq!(col("currency")["top"], serde_json::json!([["GBP", f["n"]]]));
    let top_client = p.query(
        "select client_id, count(*) as n from bronze.fees group by 1 order by 2 desc, 1 limit 1",
    );
    assert_eq!(
        col("client_id")["top"][0],
        serde_json::json!([top_client[0]["client_id"], top_client[0]["n"]])
    );
    // A landing file, through its source's contract.
    let lf: Value =
        serde_json::from_str(&p.ok(&["--json", "profile", "fees/fees_2026_01.csv"])).unwrap();
    assert_eq!(lf[0]["rows"], 60);
}

#[test]
fn after_an_incremental_build_tests_check_the_rows_it_wrote() {
    let p = Project::reference();
    p.ok(&["run"]);
    // A late delivery: one new fee in a bad currency, and a correction of an existing fee.
    let fee = p.query("select fee_id, client_id, adviser_id, cast(fee_date as varchar) as d from silver.stg_fees order by fee_id limit 1");
    let f = &fee[0];
    std::fs::write(
        p.landing().join("fees/fees_2026_07_late.csv"),
        format!(
            "fee_id,client_id,adviser_id,fee_date,fee_amount,currency,note\n\
             F999001,{c},{a},2026-07-30,12.50,XXX,late fee\n\
             {id},{c},{a},{d},99.99,GBP,corrected\n",
            id = f["fee_id"].as_str().unwrap(),
            c = f["client_id"].as_str().unwrap(),
            a = f["adviser_id"].as_str().unwrap(),
            d = f["d"].as_str().unwrap(),
        ),
    )
    .unwrap();
    let out = p.exits(&["--json", "run"], 1);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(model(&r, "stg_fees")["mode"], "incremental");
    let written = p.count(&format!(
        "select count(*) from silver.stg_fees where fee_month in ('2026-07', '{}')",
        &f["d"].as_str().unwrap()[..7]
    ));
    for (name, status, rows) in [
        ("accepted_values_stg_fees_currency", "fail", 1),
        ("unique_stg_fees_fee_id", "pass", 0),
        ("not_null_stg_fees_fee_id", "pass", 0),
        ("relationships_stg_fees_client_id_to_clients", "pass", 0),
    ] {
        let t = test(&r, name);
        assert_eq!(
            (
                t["scope"].as_str().unwrap(),
                t["status"].as_str().unwrap(),
                t["failing_rows"].as_u64().unwrap()
            ),
            ("written", status, rows),
            "{name}: {t}"
        );
    }
    assert!(
        written > 2,
        "the rewritten partitions hold more than the two delivered rows"
    );
    // `silt test` checks whole tables, with the same verdicts.
    let out = p.run(&["--json", "test"]);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = test(&r, "accepted_values_stg_fees_currency");
    assert_eq!(
        (
            t["scope"].as_str().unwrap(),
            t["failing_rows"].as_u64().unwrap()
        ),
        ("table", 1),
        "{t}"
    );
    assert_eq!(test(&r, "unique_stg_fees_fee_id")["status"], "pass");
}

#[test]
fn a_scoped_unique_test_counts_written_keys_across_the_whole_table() {
    use silt::build::quality::{TestSpec, WrittenScope, compile_scoped, run};
    use silt::lake::catalog::{Layer, TableRef};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ctx = datafusion::prelude::SessionContext::new();
        for sql in [
            "create schema silver",
            // k1 is duplicated in the table (once in rows written now, once in an older file);
            // k2 is duplicated only among rows written before; k3 is written now, once.
            "create table silver.t as values ('k1', 1, 'a'), ('k1', 2, 'a'), ('k2', 3, 'b'), ('k2', 4, 'b'), ('k3', 5, 'c'), (null, 6, 'd'), (null, 7, 'd')",
            "create table w as values ('k1', 2, 'a'), ('k3', 5, 'c'), (null, 7, 'd')",
        ] {
            ctx.sql(sql).await.unwrap().collect().await.unwrap();
        }
        let spec: TestSpec =
            serde_json::from_value(serde_json::json!({"type": "unique", "column": "column1"})).unwrap();
        let table = TableRef::new(Layer::Silver, "t");
        #[allow(clippy::result_large_err)] // the library's resolver signature
        let none = |_: &str| -> silt::Result<TableRef> { unreachable!() };
        let w = WrittenScope::new(&ctx, "w".into(), std::slice::from_ref(&spec)).await;
        // The written keys lie between k1 and k3: the table is read between those bounds (and
        // its NULL keys, which the bounds leave out).
        assert_eq!(
            w.ranges.get("column1"),
            Some(&("'k1'".to_string(), "'k3'".to_string()))
        );
        let scoped = compile_scoped(&spec, &table, "t.sql", Some(&w), &none).unwrap();
        assert!(scoped.sql.contains("between 'k1' and 'k3'"), "{}", scoped.sql);
        let whole = compile_scoped(&spec, &table, "t.sql", None, &none).unwrap();
        let r = run(&ctx, &scoped).await.unwrap();
        // k1 and the NULL key: written now and present twice in the table. Not k2.
        assert_eq!((r.status.as_str(), r.failing_rows, r.scope.as_str()), ("fail", 2, "written"), "{}", r.sample);
        assert!(r.sample.contains("k1") && !r.sample.contains("k2"), "{}", r.sample);
        let r = run(&ctx, &whole).await.unwrap();
        assert_eq!((r.failing_rows, r.scope.as_str()), (3, "table"));
        // The same over two columns (each pair of columns compared NULL-safely).
        let spec: TestSpec = serde_json::from_value(
            serde_json::json!({"type": "unique", "columns": ["column1", "column3"]}),
        )
        .unwrap();
        let w = WrittenScope::new(&ctx, "w".into(), std::slice::from_ref(&spec)).await;
        let scoped = compile_scoped(&spec, &table, "t.sql", Some(&w), &none).unwrap();
        let r = run(&ctx, &scoped).await.unwrap();
        assert_eq!((r.status.as_str(), r.failing_rows), ("fail", 2), "{}", r.sample);
        assert!(r.sample.contains("k1") && !r.sample.contains("k2"), "{}", r.sample);
        // A key type without a literal here (a float) leaves the table unbounded: same verdict.
        for sql in [
            "create table silver.f as values (1.5, 'a'), (1.5, 'b'), (2.5, 'c'), (2.5, 'd'), (9.5, 'e')",
            "create table wf as values (1.5, 'b'), (9.5, 'e')",
        ] {
            ctx.sql(sql).await.unwrap().collect().await.unwrap();
        }
        let spec: TestSpec =
            serde_json::from_value(serde_json::json!({"type": "unique", "column": "column1"})).unwrap();
        let w = WrittenScope::new(&ctx, "wf".into(), std::slice::from_ref(&spec)).await;
        assert!(w.ranges.is_empty(), "{:?}", w.ranges);
        let scoped =
            compile_scoped(&spec, &TableRef::new(Layer::Silver, "f"), "t.sql", Some(&w), &none).unwrap();
        let r = run(&ctx, &scoped).await.unwrap();
        assert_eq!((r.status.as_str(), r.failing_rows), ("fail", 1), "{}", r.sample);
    });
}
