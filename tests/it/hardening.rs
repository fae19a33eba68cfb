//! Inputs and commands that must not break the lake, leak personal data or step outside the
//! project's roots: statements that would write through `silt query`, malformed input of every
//! kind, misuse of the command line and config, and ingest raced with forget.

use serde_json::Value;

use crate::support::checks::{every_table_reads, ingest_and_forget_together};
use crate::support::datasets::{FLIGHTS_TOML, csv, flights, month, orders_project, project, write};
use crate::support::json;

#[test]
fn sql_only_reads_whatever_the_statement() {
    let p = flights();
    p.ok(&["run"]);
    let rows = p.count("select count(*) from bronze.flights");
    let logs = p.log_files();
    let outside = p.path().join("leak.csv");
    for sql in [
        "insert into bronze.flights select * from bronze.flights".to_string(),
        "delete from silver.stg_flights".to_string(),
        format!(
            "copy (select * from bronze.flights) to '{}' stored as csv",
            outside.display()
        ),
        "create external table pw (line varchar) stored as csv location '/etc/passwd'".to_string(),
        "create view v as select 1".to_string(),
        "explain analyze insert into bronze.flights select * from bronze.flights".to_string(),
        "set datafusion.execution.batch_size = 1".to_string(),
    ] {
        let out = p.run(&["query", &sql]);
        assert_eq!(out.status.code(), Some(2), "{sql}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("only reads"), "{sql}: {err}");
    }
    assert_eq!(p.count("select count(*) from bronze.flights"), rows);
    assert_eq!(p.log_files(), logs, "nothing was written");
    assert!(!outside.exists());
    // A model or a singular test cannot write either.
    write(
        p.path(),
        "sql/tests/sneaky.sql",
        "insert into bronze.flights select * from bronze.flights",
    );
    let out = p.run(&["test"]);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(p.count("select count(*) from bronze.flights"), rows);
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn dates_outside_the_readable_years_are_quarantined() {
    let p = flights();
    write(
        &p.landing(),
        "flights/odd.csv",
        "flight_id,flight_date,carrier,origin,dep_delay\n9001,+99999-01-01,AA,JFK,1\n9002,0000-01-01,AA,JFK,2\n9003,2024-01-05,AA,JFK,3\n",
    );
    p.ok(&["run"]);
    p.ok(&["run"]);
    assert_eq!(p.count("select count(*) from bronze.flights"), 81);
    let q = p.query("select _source_line, reason from quarantine.flights order by 1");
    assert_eq!(q.len(), 2, "{q:?}");
    for r in &q {
        assert!(r["reason"].as_str().unwrap().contains("0001-9999"), "{r:?}");
    }
    every_table_reads(&p);
}

#[test]
fn an_unterminated_quote_refuses_its_line_and_keeps_the_records_after_it() {
    let p = project(&[]);
    let mut text = String::from("flight_id,flight_date,carrier,origin,dep_delay\n");
    text.push_str("1,2024-01-01,AA,JFK,1\n");
    text.push_str("2,2024-01-02,\"AA,JFK,2\n"); // never closed
    for i in 3..=6 {
        text.push_str(&format!("{i},2024-01-0{i},AA,JFK,{i}\n"));
    }
    write(&p.landing(), "flights/quote.csv", &text);
    // A quote that closes only after more lines than the limit allows.
    let mut runaway = String::from("flight_id,flight_date,carrier,origin,dep_delay\n");
    runaway.push_str("10,2024-02-01,\"UA,SFO,1\n");
    for i in 11..=20 {
        runaway.push_str(&format!("{i},2024-02-02,UA,SFO,{i}\n"));
    }
    runaway.push_str("21,2024-02-03,UA\",SFO,1\n");
    write(&p.landing(), "flights/runaway.csv", &runaway);
    let toml = FLIGHTS_TOML.replace(
        "on_changed_file = \"ingest\"\n",
        "on_changed_file = \"ingest\"\n\n[parse]\nmax_quoted_lines = 5\n",
    );
    write(p.path(), "sql/bronze/flights.toml", &toml);
    p.ok(&["ingest"]);
    let ids: Vec<i64> = p
        .query("select flight_id from bronze.flights order by 1")
        .iter()
        .map(|r| r["flight_id"].as_i64().unwrap())
        .collect();
    let mut want = vec![1, 3, 4, 5, 6];
    want.extend(11..=21); // line 21 closes nothing: a quote inside a field is a character
    assert_eq!(ids, want);
    let q =
        p.query("select _source_file, _source_line, reason from quarantine.flights order by 1, 2");
    let lines: Vec<(String, i64)> = q
        .iter()
        .map(|r| {
            (
                r["_source_file"].as_str().unwrap().to_string(),
                r["_source_line"].as_i64().unwrap(),
            )
        })
        .collect();
    assert!(lines.contains(&("flights/quote.csv".into(), 3)), "{q:?}");
    assert!(lines.contains(&("flights/runaway.csv".into(), 2)), "{q:?}");
    assert!(
        q.iter()
            .any(|r| r["reason"].as_str().unwrap().contains("never closed")),
        "{q:?}"
    );
}

#[test]
fn bookkeeping_tables_are_not_restored_optimized_or_vacuumed() {
    let p = orders_project();
    p.ok(&["run"]);
    p.ok(&["forget", "42"]);
    let audit = p.count("select count(*) from _silt.erasures");
    for args in [
        vec!["restore", "_silt.erasures", "--version", "0"],
        vec!["restore", "_silt.ledger", "--version", "0"],
        vec!["optimize", "_silt.runs"],
        vec!["vacuum", "_silt.ledger", "--retain-hours", "0", "--force"],
    ] {
        let out = p.run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            stderr_of(&out).contains("bookkeeping"),
            "{args:?}: {}",
            stderr_of(&out)
        );
    }
    assert_eq!(p.count("select count(*) from _silt.erasures"), audit);
    // Vacuum of every table leaves them alone.
    let v = json(&p, &["vacuum", "--retain-hours", "0", "--force"]);
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|t| !t["table"].as_str().unwrap().starts_with("_silt.")),
        "{v}"
    );
    // Ingest again: nothing twice.
    let r = json(&p, &["ingest"]);
    for s in r["sources"].as_array().unwrap() {
        assert_eq!(s["files_ingested"], 0, "{r}");
    }
}

#[test]
fn a_bad_landing_entry_is_reported_and_the_others_proceed() {
    let p = flights();
    // A symlink loop, a name with a line break, and a link to a file outside the root.
    std::os::unix::fs::symlink(
        p.landing().join("flights"),
        p.landing().join("flights/loop"),
    )
    .unwrap();
    write(
        &p.landing(),
        "flights/bad\nname.csv",
        &month(500, "2024-05", 3, 0),
    );
    let outside = p.path().join("outside.csv");
    std::fs::write(&outside, month(900, "2024-06", 3, 0)).unwrap();
    std::os::unix::fs::symlink(&outside, p.landing().join("flights/linked.csv")).unwrap();
    let out = p.run(&["--json", "ingest"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = r["warnings"].to_string();
    assert!(warnings.contains("outside the landing root"), "{warnings}");
    assert!(r["warnings"].as_array().unwrap().len() >= 2, "{warnings}");
    assert_eq!(p.count("select count(*) from bronze.flights"), 80);
    assert_eq!(
        p.count("select count(*) from bronze.flights where flight_id >= 900"),
        0
    );
    // The rest of the pipeline runs, and so do forget and verify.
    p.ok(&["run"]);
    let err = stderr_of(&p.run(&["forget", "5"]));
    assert!(!err.contains("error"), "{err}");
    let v = p.run(&["forget", "--verify", "5"]);
    assert!(stderr_of(&v).contains("not scanned"), "{}", stderr_of(&v));
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        month(900, "2024-06", 3, 0)
    );
}

#[test]
fn forget_of_an_id_no_subject_has_changes_nothing_and_says_so() {
    let p = crate::support::Project::reference();
    p.ok(&["run"]);
    let q = p.count("select count(*) from quarantine.fees");
    let logs: Vec<String> = p
        .log_files()
        .into_iter()
        .filter(|f| !f.contains("_silt/erasures"))
        .collect();
    for id in ["GBP", "A001", "1"] {
        let out = p.ok(&["forget", id]);
        assert!(out.contains("nothing was changed"), "{id}: {out}");
    }
    assert_eq!(p.count("select count(*) from quarantine.fees"), q);
    let after: Vec<String> = p
        .log_files()
        .into_iter()
        .filter(|f| !f.contains("_silt/erasures"))
        .collect();
    assert_eq!(after, logs, "only the audit changed");
    assert_eq!(
        p.count("select count(*) from _silt.erasures where status = 'completed' and detail like '%no-op%'"),
        3
    );
}

#[test]
fn pii_of_a_subject_without_a_bronze_row_is_erased_and_verified() {
    let p = orders_project();
    // Customer 777 exists only in quarantine (a bad balance), and a twin record without its
    // id carries the same name and phone.
    write(
        &p.landing(),
        "customers/late.csv",
        "c_custkey,c_name,c_phone,c_acctbal\n777,Zelda Quarantine,99-777-777-7777,lots\n,Zelda Quarantine,99-777-777-7777,1.00\n",
    );
    p.ok(&["run"]);
    assert_eq!(p.count("select count(*) from quarantine.customers"), 2);
    let before = p.run(&["forget", "--verify", "777"]);
    assert_eq!(
        before.status.code(),
        Some(1),
        "verify finds the subject before"
    );
    p.ok(&["forget", "777"]);
    assert_eq!(p.count("select count(*) from quarantine.customers"), 0);
    let landing = std::fs::read_to_string(p.landing().join("customers/late.csv")).unwrap();
    assert!(!landing.contains("Zelda"), "{landing}");
    let v = p.ok(&["forget", "--verify", "777"]);
    assert!(v.contains(" 0 finding(s)"), "{v}");
    // The PII is remembered as HMACs: a twin record landing again is found.
    write(
        &p.landing(),
        "customers/again.csv",
        "c_custkey,c_name,c_phone,c_acctbal\n,Zelda Quarantine,00-000,1.00\n",
    );
    p.ok(&["ingest"]);
    p.exits(&["forget", "--verify", "777"], 1);
}

#[test]
fn forget_never_logs_or_records_the_ids_it_erases() {
    let p = crate::support::Project::reference();
    p.ok(&["run"]);
    let out = p.run(&["-vvv", "forget", "C0085"]);
    assert!(out.status.success());
    assert!(!stderr_of(&out).contains("C0085"), "the id in the log");
    // A unique key check of a subject key never writes the duplicate ids into the run log.
    write(
        p.path(),
        "sql/gold/dup_clients.sql",
        "{{ config(materialized='incremental', unique_key='client_id') }}\n\
         select client_id, fee_month from {{ ref('stg_fees') }}\n",
    );
    let out = p.run(&["run", "--select", "dup_clients"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("not shown"), "{}", stderr_of(&out));
    let msgs = p.query("select message from _silt.runs where model = 'dup_clients'");
    assert!(!msgs.is_empty());
    for m in msgs {
        assert!(!m["message"].to_string().contains("C00"), "{m:?}");
    }
}

#[test]
fn usage_mistakes_are_usage_errors_that_name_what_exists() {
    let p = flights();
    p.ok(&["run"]);
    let out = p.run(&["optimize", "silver.stg_flights", "--zorder", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("flight_id"), "{}", stderr_of(&out));
    let out = p.run(&["query", "select * from bronze.flights version as of 99999"]);
    assert_eq!(out.status.code(), Some(2));
    write(
        p.path(),
        "sql/gold/by_nothing.sql",
        "{{ config(materialized='partition_overwrite', partition_by='nope') }}\nselect origin from {{ ref('stg_flights') }}\n",
    );
    let out = p.run(&["build", "--select", "by_nothing"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("its columns are origin"),
        "{}",
        stderr_of(&out)
    );
    // An empty project file, a missing landing root.
    let q = project(&[]);
    std::fs::write(q.path().join("silt.toml"), "").unwrap();
    let out = q.run(&["ingest"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("empty"), "{}", stderr_of(&out));
    let r = project(&[("sql/bronze/flights.toml", FLIGHTS_TOML)]);
    std::fs::remove_dir_all(r.landing()).unwrap();
    let out = r.run(&["ingest"]);
    assert!(out.status.success());
    assert!(
        stderr_of(&out).contains("does not exist"),
        "{}",
        stderr_of(&out)
    );
}

#[test]
fn a_json_record_naming_a_field_twice_is_quarantined() {
    let p = orders_project();
    write(
        &p.landing(),
        "orders/dup.ndjson",
        "{\"o_orderkey\": 50, \"o_custkey\": 41, \"o_custkey\": 42, \"o_totalprice\": \"1.00\"}\n{\"o_orderkey\": 51, \"o_custkey\": 41, \"o_totalprice\": \"1.00\"}\n",
    );
    p.ok(&["ingest"]);
    assert_eq!(
        p.count("select count(*) from bronze.orders where o_orderkey = 51"),
        1
    );
    assert_eq!(
        p.count("select count(*) from bronze.orders where o_orderkey = 50"),
        0
    );
    let q = csv(&p, "select reason from quarantine.orders");
    assert!(q.contains("appears twice"), "{q}");
}

#[test]
fn ingest_and_forget_at_once_land_every_row_once_on_local_disk() {
    let p = project(&[(
        "sql/bronze/customers.toml",
        crate::support::datasets::CUSTOMERS_TOML,
    )]);
    ingest_and_forget_together(
        20,
        &|args| p.cmd(args),
        &|rel, text| write(&p.landing(), rel, &text),
        &|sql| p.count(sql),
    );
}

/// One case of the malformed-input corpus: a landing file, the exit code `silt ingest` must
/// give, and how many records it holds (each must end in bronze or quarantine: nothing lost),
/// or `None` when the file is refused whole (it stays in the landing root, out of the ledger).
struct Case {
    name: &'static str,
    path: &'static str,
    bytes: Vec<u8>,
    exit: i32,
    records: Option<i64>,
}

fn corpus() -> Vec<Case> {
    let h = "flight_id,flight_date,carrier,origin,dep_delay\n";
    let c = |name, path, text: String, exit, records| Case {
        name,
        path,
        bytes: text.into_bytes(),
        exit,
        records,
    };
    let mut v = vec![
        c("empty file", "flights/empty.csv", String::new(), 0, Some(0)),
        c("header only", "flights/header.csv", h.into(), 0, Some(0)),
        c(
            "BOM and CRLF",
            "flights/bom.csv",
            format!(
                "\u{feff}{}1,2024-01-01,AA,JFK,1\r\n2,2024-01-02,AA,JFK,2\r\n",
                h.replace('\n', "\r\n")
            ),
            0,
            Some(2),
        ),
        c(
            "ragged rows",
            "flights/ragged.csv",
            format!("{h}3,2024-01-03,AA,JFK,3,extra\n4,2024-01-04,AA\n5,2024-01-05,AA,JFK,5\n"),
            0,
            Some(3),
        ),
        c(
            "unterminated quote at the end",
            "flights/quote.csv",
            format!("{h}6,2024-01-06,AA,JFK,6\n7,2024-01-07,\"AA,JFK,7\n"),
            0,
            Some(2),
        ),
        c(
            "values that do not fit",
            "flights/values.csv",
            format!(
                "{h}99999999999999999999,2024-01-08,AA,JFK,1\n8,2024-02-30,AA,JFK,1\n9,+99999-01-01,AA,JFK,1\n10,2024-01-10,AA,JFK,1e400\n11,2024-01-11,AA,JFK,-0\n"
            ),
            0,
            Some(5),
        ),
        c(
            "a field of a megabyte",
            "flights/huge.csv",
            format!("{h}12,2024-01-12,{},JFK,1\n", "A".repeat(1 << 20)),
            0,
            Some(1),
        ),
        c(
            "a header naming a column twice",
            "flights/dupheader.csv",
            "flight_id,flight_id,flight_date,carrier,origin,dep_delay\n1,1,2024-01-01,AA,JFK,1\n"
                .into(),
            2,
            None,
        ),
        c(
            "a header without a required column",
            "flights/nokey.csv",
            "flight_date,carrier\n2024-01-01,AA\n".into(),
            2,
            None,
        ),
        c(
            "a name with spaces and accents",
            "flights/vol été 2024.csv",
            format!("{h}13,2024-01-13,AF,CDG,4\n"),
            0,
            Some(1),
        ),
    ];
    let mut bad = format!("{h}14,2024-01-14,").into_bytes();
    bad.extend_from_slice(b"\xff\xfe\x00A,JFK,1\n15,2024-01-15,AA,JFK,1\n");
    v.push(Case {
        name: "invalid UTF-8 and a NUL",
        path: "flights/bytes.csv",
        bytes: bad,
        exit: 0,
        records: Some(2),
    });
    let mut garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    garbage.splice(0..0, h.bytes());
    v.push(Case {
        name: "binary garbage after a header",
        path: "flights/garbage.csv",
        bytes: garbage,
        exit: 0,
        records: None,
    });
    // JSON, into the orders source (NDJSON).
    let j = |name, path, text: String, exit, records| Case {
        name,
        path,
        bytes: text.into_bytes(),
        exit,
        records,
    };
    v.push(j(
        "NDJSON: a truncated line, an array, a field twice, a string for a number",
        "orders/odd.ndjson",
        "{\"o_orderkey\": 100, \"o_custkey\": 1\n[1, 2]\n{\"o_orderkey\": 101, \"o_custkey\": 1, \"o_custkey\": 2}\n{\"o_orderkey\": \"x\", \"o_custkey\": 1}\n{\"o_orderkey\": 102, \"o_custkey\": 1}\n".into(),
        0,
        Some(5),
    ));
    v.push(j(
        "NDJSON: nesting deeper than any parser allows",
        "orders/deep.ndjson",
        format!(
            "{{\"o_orderkey\": 103, \"o_custkey\": 1}}\n{}\n{{\"o_orderkey\": 104, \"o_custkey\": 1}}\n",
            "[".repeat(100_000)
        ),
        0,
        Some(3),
    ));
    v
}

#[test]
fn malformed_inputs_never_panic_lose_rows_or_break_a_table() {
    for case in corpus() {
        let p = project(&[
            ("sql/bronze/flights.toml", FLIGHTS_TOML),
            (
                "sql/bronze/orders.toml",
                crate::support::datasets::ORDERS_TOML,
            ),
        ]);
        let path = p.landing().join(case.path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &case.bytes).unwrap();
        let out = p.run(&["ingest"]);
        let err = stderr_of(&out);
        assert!(!err.contains("panicked"), "{}: {err}", case.name);
        assert_eq!(out.status.code(), Some(case.exit), "{}: {err}", case.name);
        let source = case.path.split('/').next().unwrap();
        let rows = |t: &str| {
            if p.lake()
                .join(
                    t.replace("quarantine.", "_silt/quarantine/")
                        .replace("bronze.", "bronze/"),
                )
                .exists()
            {
                p.count(&format!("select count(*) from {t}"))
            } else {
                0
            }
        };
        let landed = rows(&format!("bronze.{source}")) + rows(&format!("quarantine.{source}"));
        match case.records {
            Some(n) => assert_eq!(
                landed, n,
                "{}: every record in bronze or quarantine",
                case.name
            ),
            None if case.exit == 2 => assert_eq!(landed, 0, "{}: refused whole", case.name),
            None => assert!(landed > 0, "{}: something was kept", case.name),
        }
        // A second ingest neither duplicates nor loses anything.
        let again = p.run(&["ingest"]);
        assert_eq!(again.status.code(), Some(case.exit), "{}", case.name);
        let landed_again =
            rows(&format!("bronze.{source}")) + rows(&format!("quarantine.{source}"));
        assert_eq!(landed_again, landed, "{}: a re-run adds nothing", case.name);
        every_table_reads(&p);
    }
}

#[test]
fn config_and_command_line_misuse_are_usage_errors() {
    let p = flights();
    p.ok(&["run"]);
    // (what, the command, a project file written first)
    type Misuse<'a> = (&'a str, Vec<&'a str>, Option<(&'a str, &'a str)>);
    let cases: Vec<Misuse> = vec![
        (
            "invalid TOML",
            vec!["ingest"],
            Some(("silt.toml", "[project\nname = 1")),
        ),
        (
            "an unknown source field",
            vec!["ingest"],
            Some((
                "sql/bronze/extra.toml",
                "glob = \"x/*.csv\"\nformat = \"csv\"\nbogus = 1\n[[columns]]\nname = \"a\"\ntype = \"string\"\n",
            )),
        ),
        (
            "an unknown column type",
            vec!["ingest"],
            Some((
                "sql/bronze/extra.toml",
                "glob = \"x/*.csv\"\nformat = \"csv\"\n[[columns]]\nname = \"a\"\ntype = \"uuid\"\n",
            )),
        ),
        (
            "a template that does not parse",
            vec!["build"],
            Some(("sql/gold/broken.sql", "select {{ ref('stg_flights' }}")),
        ),
        (
            "models in a cycle",
            vec!["build"],
            Some(("sql/gold/loop.sql", "select * from {{ ref('loop2') }}\n")),
        ),
        ("no SQL", vec!["query"], None),
        (
            "a version that is not a number",
            vec!["diff", "silver.stg_flights", "--from", "x"],
            None,
        ),
        (
            "a table that does not exist",
            vec!["restore", "bronze.nope", "--version", "1"],
            None,
        ),
        (
            "a table name without a layer",
            vec!["history", "flights"],
            None,
        ),
        ("a profile of nothing", vec!["profile", "nope"], None),
        ("forget without ids", vec!["forget"], None),
        (
            "an unknown selector",
            vec!["build", "--select", "nope"],
            None,
        ),
    ];
    for (name, args, file) in cases {
        let q = flights();
        q.ok(&["ingest"]);
        if let Some((rel, text)) = file {
            write(q.path(), rel, text);
            if rel == "sql/gold/loop.sql" {
                write(
                    q.path(),
                    "sql/gold/loop2.sql",
                    "select * from {{ ref('loop') }}\n",
                );
            }
        }
        let out = q.run(&args);
        let err = stderr_of(&out);
        assert!(!err.contains("panicked"), "{name}: {err}");
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(!err.trim().is_empty(), "{name}: says what is wrong");
    }
    let out = p
        .cmd(&["build"])
        .env("SILT_LEASE_WAIT", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    every_table_reads(&p);
}
