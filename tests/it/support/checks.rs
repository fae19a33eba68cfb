//! Checks more than one test module makes of a lake: the reference landing rows are in bronze
//! exactly once, every table reads, and ingest raced with forget leaves each row once or
//! nowhere.

use serde_json::Value;

use super::{Bad, Manifest, Project};

pub const SOURCES: [&str; 3] = ["fees", "clients", "advisers"];

pub fn quarantine_rows(p: &Project) -> Vec<(Bad, String)> {
    let mut out = Vec::new();
    for s in SOURCES {
        for r in p.query(&format!(
            "select _source_file, _source_line, column_name, reason from quarantine.{s} order by 1, 2"
        )) {
            out.push((
                Bad {
                    file: r["_source_file"].as_str().unwrap().into(),
                    line: r["_source_line"].as_i64().unwrap(),
                    column: r["column_name"].as_str().map(String::from),
                    kind: String::new(),
                },
                r["reason"].as_str().unwrap().to_string(),
            ));
        }
    }
    out.sort();
    out
}

/// Bronze holds every good row once and the quarantine every planted bad row once.
pub fn assert_exactly_once(p: &Project, m: &Manifest) {
    for s in SOURCES {
        assert_eq!(
            p.count(&format!("select count(*) from bronze.{s}")),
            m.good_rows(&format!("{s}/")),
            "bronze.{s} row count"
        );
        assert_eq!(
            p.count(&format!(
                "select count(*) from (select _source_file, _source_line from bronze.{s} group by 1, 2 having count(*) > 1)"
            )),
            0,
            "bronze.{s} holds a landing row twice"
        );
    }
    let got: Vec<(String, i64, Option<String>)> = quarantine_rows(p)
        .into_iter()
        .map(|(b, _)| (b.file, b.line, b.column))
        .collect();
    let mut want: Vec<(String, i64, Option<String>)> = m
        .bad
        .iter()
        .map(|b| (b.file.clone(), b.line, b.column.clone()))
        .collect();
    want.sort();
    assert_eq!(got, want, "quarantine = planted bad records");
}
/// Every table of the lake opens and reads in delta-rs, at its latest version.
pub fn every_table_reads(p: &Project) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for layer in ["bronze", "silver", "gold", "_silt/quarantine"] {
        let dir = p.lake().join(layer);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for t in rd.flatten() {
            if !t.path().join("_delta_log").exists() {
                continue;
            }
            rt.block_on(async {
                let table = deltalake::open_table(url::Url::from_directory_path(t.path()).unwrap())
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", t.path().display()));
                let ctx = datafusion::prelude::SessionContext::new();
                let provider = table.table_provider().await.unwrap();
                ctx.read_table(provider)
                    .unwrap()
                    .collect()
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", t.path().display()));
            });
        }
    }
}

/// `rounds` times: a new landing file of three customers lands, then `silt ingest` and `silt
/// forget <its first customer>` start together. Whatever the interleaving, each landing row ends
/// up in bronze once or (the forgotten one) nowhere, and a later ingest finds nothing new: a
/// forget's rewrite is never taken for new content.
pub fn ingest_and_forget_together(
    rounds: u32,
    cmd: &dyn Fn(&[&str]) -> std::process::Command,
    land: &dyn Fn(&str, String),
    count: &dyn Fn(&str) -> i64,
) {
    let mut forgotten = Vec::new();
    for i in 0..rounds {
        let ids = [i * 10 + 1, i * 10 + 2, i * 10 + 3];
        land(
            &format!("customers/batch_{i:02}.csv"),
            format!(
                "c_custkey,c_name,c_phone,c_acctbal\n{}\n",
                ids.iter()
                    .map(|id| format!("{id},Customer {id},00-{id:04},1.00"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        );
        let spawn = |args: &[&str]| {
            let mut c = cmd(args);
            c.env("SILT_LEASE_WAIT", "120")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let subject = ids[0].to_string();
        let (a, b) = if i % 2 == 0 {
            (spawn(&["ingest"]), spawn(&["forget", &subject]))
        } else {
            let f = spawn(&["forget", &subject]);
            (spawn(&["ingest"]), f)
        };
        for (what, child) in [("ingest", a), ("forget", b)] {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {i}: {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        forgotten.push(subject);
    }
    // A later ingest finds no new and no changed file.
    let out = cmd(&["--json", "ingest"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &r["sources"][0];
    assert_eq!(s["files_ingested"], 0, "{r}");
    assert_eq!(s["files_changed"], 0, "{r}");
    assert_eq!(
        count("select count(*) as n from bronze.customers"),
        2 * rounds as i64
    );
    assert_eq!(
        count(
            "select count(*) as n from (select c_custkey from bronze.customers group by 1 having count(*) > 1)"
        ),
        0
    );
    assert_eq!(
        count(&format!(
            "select count(*) as n from bronze.customers where c_custkey in ({})",
            forgotten.join(", ")
        )),
        0
    );
    let mut args = vec!["forget", "--verify"];
    args.extend(forgotten.iter().map(String::as_str));
    let out = cmd(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
