//! What a user reads and acts on, on data nobody here designed (the airline table of
//! outside.rs): configuration checked when the project loads, errors that name the file, line
//! and what exists, a run that tests what an interrupted run left untested, and reports that
//! say what happened (runs, freshness, profiles, per-model progress, vacuum, dag).

use serde_json::Value;

use crate::support::datasets::{
    FLIGHTS_TOML, files_under, flights, month, orders_project, project, write,
};
use crate::support::{json, kill_at_failpoint, model};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_test_naming_a_source_as_a_model_stops_the_run_before_anything_builds() {
    let p = flights();
    write(
        p.path(),
        "sql/gold/fct_origin_month.sql",
        "{{ config(materialized='table', tests=[{'type': 'relationships', 'column': 'origin', 'to': 'flights', 'field': 'origin'}]) }}\n\
         select origin, count(*) as flights from {{ ref('stg_flights') }} group by origin\n",
    );
    let out = p.run(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert!(
        err.contains("sql/gold/fct_origin_month.sql") && err.contains("'bronze.flights'"),
        "{err}"
    );
    assert!(
        !p.lake().join("bronze").exists(),
        "nothing was ingested or built"
    );
    // A typo of a model is named with the closest one.
    write(
        p.path(),
        "sql/gold/fct_origin_month.sql",
        "{{ config(materialized='table', tests=[{'type': 'relationships', 'column': 'origin', 'to': 'stg_flight'}]) }}\n\
         select origin, count(*) as flights from {{ ref('stg_flights') }} group by origin\n",
    );
    let err = stderr_of(&p.run(&["run"]));
    assert!(err.contains("did you mean 'stg_flights'"), "{err}");
}

#[test]
fn a_run_after_an_interrupted_run_tests_the_builds_it_left_untested() {
    let p = flights();
    write(
        p.path(),
        "sql/silver/stg_flights.sql",
        &crate::support::datasets::STG_FLIGHTS.replace(
            "partition_by='flight_month') }}",
            "partition_by='flight_month', tests=[{'type': 'expression', 'expression': 'dep_delay < 40'}]) }}",
        ),
    );
    // Killed after stg_flights is built, before its tests ran.
    kill_at_failpoint(p.cmd(&["run"]), "run.built");
    let out = p.run(&["--json", "run"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(model(&r, "stg_flights")["status"], "up_to_date", "{r}");
    let tests: Vec<&Value> = r["tests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["subject"] == "silver.stg_flights")
        .collect();
    assert_eq!(tests.len(), 1, "{r}");
    assert_eq!(tests[0]["status"], "fail", "{r}");
    assert!(tests[0]["failing_rows"].as_u64().unwrap() > 0);
    // Its downstream stays unbuilt while the test fails; a tested build is not tested again
    // by a run with nothing to build.
    let again = p.run(&["--json", "run"]);
    assert_eq!(again.status.code(), Some(1));
    let fixed = crate::support::datasets::STG_FLIGHTS.replace(
        "partition_by='flight_month') }}",
        "partition_by='flight_month', tests=[{'type': 'expression', 'expression': 'dep_delay < 100'}]) }}",
    );
    write(p.path(), "sql/silver/stg_flights.sql", &fixed);
    p.ok(&["run"]);
    let quiet = json(&p, &["run"]);
    assert!(quiet["tests"].as_array().unwrap().is_empty(), "{quiet}");
}

#[test]
fn versions_that_cannot_be_read_say_which_can() {
    let p = flights();
    p.ok(&["run"]);
    let out = p.run(&[
        "query",
        "select count(*) from silver.stg_flights version as of 9",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert!(err.contains("versions are 0 to 0"), "{err}");
    assert_eq!(
        err.matches("error").count(),
        1,
        "one message, no log line: {err}"
    );
    assert!(
        !err.contains("ERROR") && !err.contains("LogSegment"),
        "{err}"
    );
    let out = p.run(&["diff", "silver.stg_flights", "--from", "5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("has no version 5"),
        "{}",
        stderr_of(&out)
    );
    // A version whose files a vacuum deleted.
    write(
        &p.landing(),
        "flights/2024_03.csv",
        &month(201, "2024-03", 10, 0),
    );
    p.ok(&["run"]);
    p.ok(&["optimize", "silver.stg_flights", "--zorder", "origin"]);
    p.ok(&[
        "vacuum",
        "silver.stg_flights",
        "--retain-hours",
        "0",
        "--force",
    ]);
    let out = p.run(&[
        "query",
        "select count(*) from silver.stg_flights version as of 0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert!(
        err.contains("no longer readable") && err.contains("vacuum on"),
        "{err}"
    );
}

#[test]
fn sql_errors_name_the_file_line_and_the_table_the_user_meant() {
    let p = flights();
    p.ok(&["run"]);
    // A syntax error on line 9 of the file, after a config block of five lines.
    write(
        p.path(),
        "sql/gold/fct_origin_month.sql",
        "{{ config(\n    materialized='table',\n    description='Flights per origin and month'\n)\n}}\n\n\
         select origin, flight_month,\n    count(*) as flights\nfrom {{ ref('stg_flights') }} where where origin <> ''\ngroup by origin, flight_month\n",
    );
    let out = p.run(&["build", "--select", "fct_origin_month"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert!(err.contains("sql/gold/fct_origin_month.sql:9:"), "{err}");
    // A mistyped table, named as written, with the closest one.
    let out = p.run(&["query", "select * from silver.stg_flight"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert!(
        err.contains("table 'silver.stg_flight' not found")
            && err.contains("did you mean 'silver.stg_flights'")
            && !err.contains("datafusion."),
        "{err}"
    );
    let err = stderr_of(&p.run(&["query", "select * from flights"]));
    assert!(err.contains("did you mean 'bronze.flights'"), "{err}");
    // Comma lists are comma lists everywhere.
    write(
        &p.landing(),
        "flights/2024_03.csv",
        &month(201, "2024-03", 5, 0),
    );
    p.ok(&["run", "--select", "stg_flights"]);
    let d = p.ok(&[
        "diff",
        "silver.stg_flights",
        "--from",
        "0",
        "--key",
        "flight_id,flight_month",
    ]);
    assert!(
        d.contains("5 added") && d.contains("key: flight_id, flight_month"),
        "{d}"
    );
}

#[test]
fn csv_fields_keep_their_spaces_unless_trim_is_set() {
    let p = project(&[("sql/bronze/flights.toml", FLIGHTS_TOML)]);
    write(
        &p.landing(),
        "flights/f.csv",
        "flight_id,flight_date,carrier,origin,dep_delay\n 1 ,2024-01-05, AA,JFK , 7 \n",
    );
    p.ok(&["ingest"]);
    let rows = p.query("select flight_id, carrier, origin, dep_delay from bronze.flights");
    assert_eq!(rows[0]["carrier"], " AA");
    assert_eq!(rows[0]["origin"], "JFK ");
    assert_eq!(rows[0]["flight_id"], 1);
    assert_eq!(rows[0]["dep_delay"], 7);
}

#[test]
fn profile_masks_pii_columns() {
    let p = orders_project();
    p.ok(&["ingest"]);
    let cols: Value =
        serde_json::from_str(&p.ok(&["--json", "profile", "bronze.customers"])).unwrap();
    let col = |n: &str| {
        cols.as_array()
            .unwrap()
            .iter()
            .find(|c| c["column"] == n)
            .unwrap()
            .clone()
    };
    let name = col("c_name");
    assert_eq!(name["masked"], true);
    for v in [&name["min"], &name["max"], &name["top"][0][0]] {
        let v = v.as_str().unwrap();
        assert!(
            v.starts_with('C') && v[1..].chars().all(|c| c == '*'),
            "{v}"
        );
    }
    let bal = col("c_acctbal");
    assert_eq!(bal["masked"], false);
    assert!(bal["max"].as_str().unwrap().contains("8727"), "{bal}");
    let text = p.ok(&["profile", "bronze.customers"]);
    assert!(!text.contains("Customer#000000042"), "{text}");
}

#[test]
fn runs_and_progress_say_what_happened() {
    let p = flights();
    let out = p.run(&["run"]);
    assert!(out.status.success());
    let err = stderr_of(&out);
    // A line per model as it finishes: position, table, mode, what it did, time.
    assert!(
        err.lines().any(|l| l.contains("1/2")
            && l.contains("silver.stg_flights")
            && l.contains("full")
            && l.contains(" s")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("2/2") && l.contains("gold.fct_origin_month")),
        "{err}"
    );
    // -v speaks of silt's own steps, not of its dependencies'.
    write(
        &p.landing(),
        "flights/2024_03.csv",
        &month(201, "2024-03", 5, 0),
    );
    let err = stderr_of(&p.run(&["-vv", "run"]));
    assert!(err.contains("silt"), "{err}");
    assert!(
        !err.contains("delta_kernel")
            && !err.contains("deltalake_core")
            && !err.contains("datafusion"),
        "{err}"
    );
}

#[test]
fn forget_rebuilds_appear_as_a_run() {
    let p = orders_project();
    p.ok(&["run"]);
    let f = json(&p, &["forget", "42"]);
    let runs = json(&p, &["runs", "--limit", "1"]);
    let r = &runs.as_array().unwrap()[0];
    assert_eq!(r["command"], "forget", "{runs}");
    assert_eq!(
        r["run_id"].as_str().unwrap(),
        format!("erasure-{}", f["request_id"].as_str().unwrap())
    );
    let d = json(&p, &["runs", "--run", r["run_id"].as_str().unwrap()]);
    let models: Vec<&str> = d
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["model"].as_str().unwrap())
        .collect();
    assert!(
        models.contains(&"stg_lineitem") && models.contains(&"order_volume"),
        "{d}"
    );
    // A vacuum after the forget reports only the files it found and deleted.
    let before = files_under(&p.lake().join("bronze/lineitem"));
    let v = json(
        &p,
        &[
            "vacuum",
            "bronze.lineitem",
            "--retain-hours",
            "0",
            "--force",
        ],
    );
    for f in v[0]["files_deleted"].as_array().unwrap() {
        let path = p.lake().join("bronze/lineitem").join(f.as_str().unwrap());
        assert!(
            before.contains(&path.display().to_string()),
            "{f} did not exist"
        );
        assert!(!path.exists());
    }
}

#[test]
fn freshness_says_how_to_configure_it_and_ages_read_as_days() {
    let p = flights();
    p.ok(&["run"]);
    let out = p.ok(&["freshness"]);
    assert!(
        out.contains("no source declares [freshness]") && out.contains("warn_after"),
        "{out}"
    );
    let toml =
        format!("{FLIGHTS_TOML}\n[freshness]\ncolumn = \"flight_date\"\nwarn_after = \"2 days\"\n");
    write(p.path(), "sql/bronze/flights.toml", &toml);
    let rows = json(&p, &["freshness"]);
    let age = rows[0]["age"].as_str().unwrap();
    assert!(age.contains('d') && age.ends_with('h'), "{rows}");
    assert_eq!(rows[0]["status"], "warn");
    let text = p.ok(&["freshness"]);
    assert!(text.contains(age) && !text.contains("hours)"), "{text}");
}

#[test]
fn small_reports_show_what_they_promise() {
    let p = flights();
    p.ok(&["run"]);
    // A result without rows prints its header.
    let out = p.ok(&[
        "query",
        "select flight_id, origin from silver.stg_flights where false",
    ]);
    assert!(
        out.contains("flight_id") && out.contains("origin") && out.contains("(0 rows)"),
        "{out}"
    );
    let out = p.ok(&[
        "query",
        "select flight_id from silver.stg_flights where false",
        "--format",
        "csv",
    ]);
    assert_eq!(out.trim(), "flight_id");
    // vacuum --dry-run lists the files.
    write(
        &p.landing(),
        "flights/2024_03.csv",
        &month(201, "2024-03", 5, 0),
    );
    p.ok(&["run"]);
    p.ok(&["optimize", "silver.stg_flights", "--zorder", "origin"]);
    let out = p.ok(&[
        "vacuum",
        "silver.stg_flights",
        "--retain-hours",
        "0",
        "--dry-run",
    ]);
    assert!(
        out.contains("would be deleted") && out.contains(".parquet"),
        "{out}"
    );
    // The dag draws siblings with ├─.
    write(
        p.path(),
        "sql/gold/fct_carrier.sql",
        "select carrier, count(*) as flights from {{ ref('stg_flights') }} group by carrier\n",
    );
    let dag = p.ok(&["dag"]);
    assert!(
        dag.contains("├─ gold.fct_carrier") && dag.contains("└─ gold.fct_origin_month"),
        "{dag}"
    );
    assert!(dag.contains("└─ silver.stg_flights"), "{dag}");
}

#[test]
fn the_default_memory_pool_is_a_share_of_the_machine() {
    let total: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap()
        * 1024;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    let usable = cgroup.map_or(total, |c| c.min(total));
    let pool = silt::project::config::EngineSection::default().memory_limit_bytes() as u64;
    assert_eq!(pool, (usable / 16).clamp(256 << 20, 4 << 30));
    // Set explicitly, it is what the file says.
    let set = silt::project::config::EngineSection {
        memory_limit_mb: Some(300),
        ..Default::default()
    };
    assert_eq!(set.memory_limit_bytes(), 300 << 20);
    // Zero is not "unlimited" nor "automatic": a configuration error naming the fix.
    let p = flights();
    let toml = std::fs::read_to_string(p.path().join("silt.toml")).unwrap();
    write(
        p.path(),
        "silt.toml",
        &format!("{toml}\n[engine]\nmemory_limit_mb = 0\n"),
    );
    let out = p.run(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("memory_limit_mb = 0"),
        "{}",
        stderr_of(&out)
    );
}
