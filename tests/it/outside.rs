//! silt on data nobody here designed, in miniature: an airline on-time table (monthly CSV files)
//! and a TPC-H-like order schema with integer keys. The scenarios are the ones that broke for a
//! new user: a `recompute_by` model on its upstream's partition column, a changed landing file
//! followed by `optimize` and `vacuum`, a forget of a numeric id next to an unrelated table
//! holding that number, and a child table erased through `subject_via`.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::erasure::live_files;
use crate::support::datasets::{csv, files_under, flights, month, orders_project, write};
use crate::support::{Project, column_encodings, json, model, parquet_layout};

/// The gold table as a full rebuild from silver would make it.
fn expected_fct(p: &Project) -> String {
    csv(
        p,
        "select origin, flight_month, count(*) as flights, sum(dep_delay) as total_delay \
         from silver.stg_flights group by origin, flight_month",
    )
}

#[test]
fn recompute_by_on_the_upstream_partition_column_builds_incrementally() {
    let p = flights();
    p.ok(&["run"]);
    // A new month and a late flight in an old month: the MERGE into the partitioned upstream
    // hands its changed months to the recompute_by model.
    write(
        &p.landing(),
        "flights/2024_03.csv",
        &month(201, "2024-03", 40, 0),
    );
    write(
        &p.landing(),
        "flights/2024_01_late.csv",
        "flight_id,flight_date,carrier,origin,dep_delay\n999,2024-01-30,UA,JFK,45\n",
    );
    let r = json(&p, &["run"]);
    let fct = model(&r, "fct_origin_month");
    assert_eq!(fct["status"], "built", "{r}");
    assert_eq!(fct["mode"], "incremental", "{r}");
    assert_eq!(model(&r, "stg_flights")["mode"], "incremental");
    assert_eq!(
        csv(
            &p,
            "select origin, flight_month, flights, total_delay from gold.fct_origin_month"
        ),
        expected_fct(&p)
    );
    assert_eq!(
        p.count("select flights from gold.fct_origin_month where origin = 'JFK' and flight_month = '2024-01'"),
        p.count("select count(*) from bronze.flights where origin = 'JFK' and flight_date < date '2024-02-01'"),
    );
}

#[test]
fn a_changed_file_then_optimize_and_vacuum_leave_the_next_runs_whole() {
    let p = flights();
    p.ok(&["run"]);
    // The January file changes in place: its rows are ingested again (on_changed_file =
    // "ingest"), and the MERGE replaces them by key.
    write(
        &p.landing(),
        "flights/2024_01.csv",
        &month(1, "2024-01", 40, 5),
    );
    let r = json(&p, &["run"]);
    assert_eq!(model(&r, "stg_flights")["status"], "built", "{r}");
    assert_eq!(p.count("select count(*) from bronze.flights"), 120);
    assert_eq!(p.count("select count(*) from silver.stg_flights"), 80);
    let silver = csv(&p, "select * from silver.stg_flights");
    let gold = csv(&p, "select * from gold.fct_origin_month");

    // Compaction adds no rows: the next run finds nothing new in its files. The compacted file
    // is encoded as ingest writes bronze (LZ4), not with delta-rs's optimize settings (ZSTD).
    let bronze = p.lake().join("bronze/flights");
    let before = live_files(&bronze);
    let o = json(&p, &["optimize", "bronze.flights"]);
    assert!(o["files_removed"].as_u64().unwrap() > 1, "{o}");
    let compacted: Vec<String> = live_files(&bronze).difference(&before).cloned().collect();
    assert!(!compacted.is_empty(), "{o}");
    for f in compacted {
        let (codecs, _) = parquet_layout(&bronze.join(&f));
        assert_eq!(codecs, BTreeSet::from(["LZ4_RAW".to_string()]), "{f}");
        // And with its key encodings: the integer key and the line numbers delta-encoded.
        for column in ["flight_id", "_source_line"] {
            let encodings = column_encodings(&bronze.join(&f), column);
            assert!(
                encodings.contains("DELTA_BINARY_PACKED"),
                "{f} {column}: {encodings:?}"
            );
        }
    }
    let r = json(&p, &["run"]);
    let stg = model(&r, "stg_flights");
    assert_eq!(stg["rows_inserted"], 0, "{r}");
    assert_eq!(stg["rows_updated"], 0, "{r}");
    assert_eq!(csv(&p, "select * from silver.stg_flights"), silver);
    assert_eq!(csv(&p, "select * from gold.fct_origin_month"), gold);

    // Vacuum below the retention period needs --force.
    let out = p.run(&["vacuum", "silver.stg_flights", "--retain-hours", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--force"), "{err}");
    // Rewrite every file of the upstream (Z-order), then vacuum every older version away: the
    // files of the version fct_origin_month last read are gone.
    let z = json(
        &p,
        &["optimize", "silver.stg_flights", "--zorder", "origin"],
    );
    assert!(z["files_removed"].as_u64().unwrap() > 0, "{z}");
    // A model's Z-ordered files: Snappy, as its builds write them.
    let stg = p.lake().join("silver/stg_flights");
    for f in live_files(&stg) {
        let (codecs, _) = parquet_layout(&stg.join(&f));
        assert_eq!(codecs, BTreeSet::from(["SNAPPY".to_string()]), "{f}");
    }
    let v = json(
        &p,
        &[
            "vacuum",
            "silver.stg_flights",
            "--retain-hours",
            "0",
            "--force",
        ],
    );
    let deleted = v[0]["files_deleted"].as_array().unwrap();
    assert!(!deleted.is_empty(), "{v}");
    // The downstream build cannot read the version it last read: it rebuilds in full and
    // says why, instead of failing on a missing file.
    write(
        &p.landing(),
        "flights/2024_03.csv",
        &month(201, "2024-03", 40, 0),
    );
    let out = p.run(&["--json", "run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(model(&r, "fct_origin_month")["mode"], "full", "{r}");
    assert!(
        model(&r, "fct_origin_month")["message"]
            .as_str()
            .unwrap_or_default()
            .contains("vacuum"),
        "{r}"
    );
    assert_eq!(
        csv(
            &p,
            "select origin, flight_month, flights, total_delay from gold.fct_origin_month"
        ),
        expected_fct(&p)
    );
    // A vacuum reports only the files it deleted: running it again deletes (and reports) none.
    let again = json(
        &p,
        &[
            "vacuum",
            "silver.stg_flights",
            "--retain-hours",
            "0",
            "--force",
        ],
    );
    assert_eq!(
        again[0]["files_deleted"].as_array().unwrap().len(),
        0,
        "{again}"
    );
}

/// Every table's versions that can still be read, as `table@version`.
fn readable_versions(p: &Project, table: &str) -> BTreeSet<String> {
    let h = json(p, &["history", table]);
    h.as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .filter(|v| {
            p.run(&[
                "query",
                &format!("select count(*) from {table} version as of {v}"),
            ])
            .status
            .success()
        })
        .map(|v| format!("{table}@{v}"))
        .collect()
}

#[test]
fn forget_of_a_numeric_id_leaves_unrelated_numbers_and_follows_subject_via() {
    let p = orders_project();
    p.ok(&["run"]);
    let products_before = (
        readable_versions(&p, "bronze.products"),
        readable_versions(&p, "silver.products"),
        csv(&p, "select * from silver.products"),
    );
    let lake_products: Vec<String> = files_under(&p.lake().join("silver/products"));

    let r = json(&p, &["forget", "42"]);
    assert!(r["warnings"].as_array().unwrap().is_empty(), "{r}");
    let steps = r["steps"].as_array().unwrap();
    // No step touched a table that holds no subject.
    for s in steps {
        let t = s["table"].as_str().unwrap();
        assert!(!t.contains("products"), "{t} was touched: {s}");
        assert!(s["warnings"].as_array().unwrap().is_empty(), "{s}");
    }
    assert_eq!(
        (
            readable_versions(&p, "bronze.products"),
            readable_versions(&p, "silver.products"),
            csv(&p, "select * from silver.products"),
        ),
        products_before
    );
    assert_eq!(
        files_under(&p.lake().join("silver/products")),
        lake_products
    );

    // Customer 42 is gone as an integer: 420 and 41 stay, and so do their lines whose
    // quantity happens to be 42.
    assert_eq!(
        csv(&p, "select c_custkey from bronze.customers"),
        "c_custkey\n41\n420\n"
    );
    assert_eq!(
        csv(&p, "select o_orderkey from bronze.orders"),
        "o_orderkey\n1\n4\n"
    );
    // The child table, reached through orders 2 and 3, in bronze, in the model and in landing.
    let lines = "l_orderkey,l_linenumber\n1,1\n1,2\n4,1\n";
    assert_eq!(
        csv(&p, "select l_orderkey, l_linenumber from bronze.lineitem"),
        lines
    );
    assert_eq!(
        csv(
            &p,
            "select l_orderkey, l_linenumber from silver.stg_lineitem"
        ),
        lines
    );
    let landing = std::fs::read_to_string(p.landing().join("lineitem/lineitem_1.csv")).unwrap();
    assert_eq!(
        landing,
        "l_orderkey,l_linenumber,l_quantity\n1,1,42\n1,2,5\n4,1,42\n"
    );
    assert_eq!(
        csv(&p, "select o_orderkey from silver.order_amounts"),
        "o_orderkey\n1\n4\n"
    );
    assert_eq!(
        csv(&p, "select * from gold.order_volume"),
        "o_custkey,lines,quantity\n41,2,47\n420,1,42\n"
    );
    let v = p.ok(&["forget", "--verify", "42"]);
    assert!(v.contains(" 0 finding(s)"), "{v}");
    // The audit keeps the keys reached through subject_via only as HMACs.
    let audit = p.ok(&[
        "query",
        "select key_hmacs from _silt.erasures where status = 'started'",
        "--format",
        "csv",
    ]);
    assert!(audit.contains("lineitem"), "{audit}");
    assert!(
        !audit.contains("\"2\"") && !audit.contains("\"3\""),
        "{audit}"
    );

    // Verify sees a line of a forgotten order that comes back: the parent rows are gone, the
    // recorded HMACs still name its key.
    write(
        &p.landing(),
        "lineitem/lineitem_2.csv",
        "l_orderkey,l_linenumber,l_quantity\n3,2,9\n",
    );
    p.ok(&["ingest"]);
    p.exits(&["forget", "--verify", "42"], 1);
}

#[test]
fn a_source_holding_subject_data_without_a_path_stops_forget_before_any_write() {
    let p = orders_project();
    // Shipments carry the order key under the parent's name and declare no way to a subject.
    write(
        p.path(),
        "sql/bronze/shipments.toml",
        "glob = \"shipments/*.csv\"\nformat = \"csv\"\n\n[[columns]]\nname = \"o_orderkey\"\ntype = \"int64\"\n\n[[columns]]\nname = \"carrier\"\ntype = \"string\"\n",
    );
    write(
        &p.landing(),
        "shipments/s.csv",
        "o_orderkey,carrier\n2,UPS\n",
    );
    p.ok(&["run"]);
    let logs = p.log_files();
    let landing = files_under(&p.landing());
    let out = p.run(&["forget", "42"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("shipments") && err.contains("subject_via = { column = \"o_orderkey\", table = \"orders\", key = \"o_orderkey\" }"),
        "{err}"
    );
    assert_eq!(p.log_files(), logs, "nothing was written");
    assert_eq!(files_under(&p.landing()), landing);
    // Declared, the erasure reaches it.
    let toml = std::fs::read_to_string(p.path().join("sql/bronze/shipments.toml")).unwrap();
    write(
        p.path(),
        "sql/bronze/shipments.toml",
        &toml.replace(
            "format = \"csv\"\n",
            "format = \"csv\"\nsubject_via = { column = \"o_orderkey\", table = \"orders\", key = \"o_orderkey\" }\n",
        ),
    );
    p.ok(&["forget", "42"]);
    assert_eq!(p.count("select count(*) from bronze.shipments"), 0);
}

/// Partition values that need encoding in paths (a space, a colon, a slash, a percent sign):
/// erasure finds and rewrites their files, downstream builds read them incrementally, and
/// vacuum and time travel count them right.
#[test]
fn partition_values_that_need_encoding_survive_erasure_builds_and_vacuum() {
    let p = crate::support::datasets::slots_project();
    write(
        &p.landing(),
        "people/p1.csv",
        "pid,email,slot\n1,a@x.com,T 1:00/a%2B\n2,b@x.com,T 2:00\n3,c@x.com,T 1:00/a%2B\n",
    );
    p.ok(&["run"]);
    write(
        &p.landing(),
        "people/p2.csv",
        "pid,email,slot\n4,d@x.com,T 2:00\n",
    );
    let r = json(&p, &["run"]);
    assert_eq!(model(&r, "by_slot")["mode"], "incremental", "{r}");
    assert_eq!(
        csv(&p, "select slot, people from gold.by_slot"),
        "slot,people\nT 1:00/a%2B,2\nT 2:00,2\n"
    );
    let f = json(&p, &["forget", "1"]);
    assert!(
        f["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["table"] == "silver.stg_people"
                && s["action"] == "rewrite"
                && s["rows_deleted"] == 1),
        "{f}"
    );
    let v = p.ok(&["forget", "--verify", "1"]);
    assert!(v.contains(" 0 finding(s)"), "{v}");
    assert_eq!(
        csv(&p, "select slot, people from gold.by_slot"),
        "slot,people\nT 1:00/a%2B,1\nT 2:00,2\n"
    );
    // The current version's files all exist: time travel to it reads, vacuum deletes only
    // what the older versions needed.
    let h = json(&p, &["history", "silver.stg_people"]);
    let latest = h[0]["version"].as_u64().unwrap();
    p.ok(&[
        "query",
        &format!("select count(*) from silver.stg_people version as of {latest}"),
    ]);
    let v = json(
        &p,
        &[
            "vacuum",
            "silver.stg_people",
            "--retain-hours",
            "0",
            "--force",
        ],
    );
    for f in v[0]["files_deleted"].as_array().unwrap() {
        assert!(f.as_str().unwrap().starts_with("slot="), "{v}");
    }
    assert_eq!(p.count("select count(*) from silver.stg_people"), 3);
}

/// Silver as MERGEs of every delivery make it: the latest delivery of each flight.
fn latest_flights(p: &Project) -> String {
    csv(
        p,
        "select flight_id, flight_date, carrier, origin, dep_delay, to_char(flight_date, '%Y-%m') as flight_month \
         from (select *, row_number() over (partition by flight_id \
         order by _ingested_at desc, _source_file desc, _source_line desc) as r from bronze.flights) d \
         where r = 1",
    )
}

#[test]
fn an_incremental_merge_rewrites_only_the_files_that_hold_a_changed_key() {
    let p = flights();
    write(
        &p.landing(),
        "flights/2024_03.csv",
        &month(201, "2024-03", 40, 0),
    );
    let stg = p.lake().join("silver/stg_flights");
    let jan = |files: &BTreeSet<String>| -> BTreeSet<String> {
        files
            .iter()
            .filter(|f| f.starts_with("flight_month=2024-01/"))
            .cloned()
            .collect()
    };
    p.ok(&["run"]);
    let first = live_files(&stg);
    // Two more deliveries of new January flights: January holds three files, one per run.
    let mut runs = vec![first.clone()];
    for (name, first_id) in [("flights/2024_01_b.csv", 41), ("flights/2024_01_c.csv", 61)] {
        write(&p.landing(), name, &month(first_id, "2024-01", 20, 0));
        p.ok(&["run"]);
        runs.push(live_files(&stg));
    }
    let (second, before) = (runs[1].clone(), runs[2].clone());
    let (a, b, c) = (
        jan(&first),
        jan(&second)
            .difference(&jan(&first))
            .cloned()
            .collect::<BTreeSet<_>>(),
        jan(&before)
            .difference(&jan(&second))
            .cloned()
            .collect::<BTreeSet<_>>(),
    );
    assert_eq!((a.len(), b.len(), c.len()), (1, 1, 1), "{before:?}");
    // A correction: flight 5 (first January file) delayed more, flight 45 (second file) moved
    // to February, and a new flight in a new month. The third January file, February's and
    // March's hold no changed key.
    write(
        &p.landing(),
        "flights/2024_fix.csv",
        "flight_id,flight_date,carrier,origin,dep_delay\n\
         5,2024-01-05,AA,SFO,99\n45,2024-02-03,AA,JFK,7\n300,2024-04-01,UA,ORD,3\n",
    );
    let r = json(&p, &["run"]);
    let m = model(&r, "stg_flights");
    assert_eq!(m["mode"], "incremental", "{r}");
    assert_eq!(
        (&m["rows_updated"], &m["rows_inserted"], &m["rows_deleted"]),
        (&Value::from(1), &Value::from(2), &Value::from(1)),
        "{m}"
    );
    // Only the first two January files are read: the third's flight ids (statistics) lie
    // outside the staged January keys, February's outside flight 45, and March has no staged
    // row at all.
    assert_eq!(
        (&m["files_scanned"], &m["files_skipped"]),
        (&Value::from(2), &Value::from(3)),
        "{m}"
    );
    assert_eq!(m["files_removed"], 2, "{m}");
    // The first file (1 of 40 rows replaced) and the second (1 of 20 moved out) are rewritten.
    assert_eq!(m["rows_copied"], 39 + 19, "{m}");
    let after = live_files(&stg);
    let removed: BTreeSet<String> = before.difference(&after).cloned().collect();
    assert_eq!(removed, a.union(&b).cloned().collect(), "{m}");
    assert!(
        c.is_subset(&after),
        "the third January file is kept: {after:?}"
    );
    assert_eq!(
        csv(&p, "select * from silver.stg_flights"),
        latest_flights(&p)
    );
    assert_eq!(
        csv(
            &p,
            "select origin, flight_month, flights, total_delay from gold.fct_origin_month"
        ),
        expected_fct(&p)
    );
    let h: Value =
        serde_json::from_str(&p.ok(&["--json", "history", "silver.stg_flights"])).unwrap();
    assert_eq!(h[0]["operation"], "MERGE", "{h}");
    assert_eq!(h[0]["metrics"]["num_target_rows_updated"], 1, "{h}");
    assert_eq!(h[0]["metrics"]["num_target_files_removed"], 2, "{h}");
}

#[test]
fn a_merge_on_a_wide_decimal_key_does_not_trust_its_float_statistics() {
    // delta-rs writes decimal statistics as floating point (a decimal(38,0) above 2^63 as
    // i64::MAX): a file whose statistics seem to lie below the staged key still holds it.
    let p = crate::support::datasets::project(&[
        (
            "sql/bronze/accounts.toml",
            "glob = \"accounts/*.csv\"\nformat = \"csv\"\nprimary_key = [\"account\"]\n\n\
             [[columns]]\nname = \"account\"\ntype = \"decimal(38,0)\"\nnullable = false\n\n\
             [[columns]]\nname = \"status\"\ntype = \"string\"\n",
        ),
        (
            "sql/silver/accounts.sql",
            "{{ config(materialized='incremental', unique_key='account') }}\n\
             select account, status from {{ source('accounts') }}\n",
        ),
    ]);
    write(
        &p.landing(),
        "accounts/a.csv",
        "account,status\n100000000000000000001,open\n100000000000000000002,open\n100000000000000000003,open\n",
    );
    p.ok(&["run"]);
    write(
        &p.landing(),
        "accounts/b.csv",
        "account,status\n100000000000000000003,closed\n",
    );
    let r = json(&p, &["run"]);
    let m = model(&r, "accounts");
    assert_eq!(m["mode"], "incremental", "{r}");
    assert_eq!(
        (&m["rows_updated"], &m["rows_inserted"]),
        (&Value::from(1), &Value::from(0)),
        "{m}"
    );
    assert_eq!(
        csv(
            &p,
            "select cast(account as varchar) as account, status from silver.accounts"
        ),
        "account,status\n100000000000000000001,open\n100000000000000000002,open\n100000000000000000003,closed\n"
    );
}
