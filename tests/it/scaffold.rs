//! `silt init` and `silt source new`: a new user's first steps, on the real binary.

use std::path::Path;
use std::process::Command;

use crate::support::{Manifest, SILT, repo, walk};

fn silt(project: &Path, args: &[&str]) -> std::process::Output {
    Command::new(SILT)
        .arg("--project")
        .arg(project)
        .args(args)
        .env_remove("SILT_LAKE")
        .env_remove("SILT_LANDING")
        .env_remove("SILT_FAILPOINT")
        .output()
        .unwrap()
}

fn ok(project: &Path, args: &[&str]) -> String {
    let out = silt(project, args);
    assert!(
        out.status.success(),
        "silt {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn count(project: &Path, sql: &str) -> i64 {
    let out = ok(project, &["query", sql, "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_i64()
        .unwrap()
}

fn init(tmp: &Path) -> std::path::PathBuf {
    let dir = tmp.join("proj");
    let out = Command::new(SILT).arg("init").arg(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

#[test]
fn init_then_ingest_the_example_and_a_copied_csv() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init(tmp.path());
    for f in [
        "silt.toml",
        "sql/bronze/example.toml",
        "sql/silver/example_orders.sql",
        "lake/README.md",
    ] {
        assert!(dir.join(f).exists(), "{f}");
    }
    ok(&dir, &["ingest"]);
    assert_eq!(count(&dir, "select count(*) from bronze.example"), 3);
    // A copied CSV becomes a source with an inferred contract.
    std::fs::create_dir_all(dir.join("landing/fees")).unwrap();
    std::fs::copy(
        repo().join("fixtures/landing/fees/fees_2026_01.csv"),
        dir.join("landing/fees/fees_2026_01.csv"),
    )
    .unwrap();
    ok(
        &dir,
        &[
            "source",
            "new",
            "fees",
            "--from",
            dir.join("landing/fees/fees_2026_01.csv").to_str().unwrap(),
        ],
    );
    let toml = std::fs::read_to_string(dir.join("sql/bronze/fees.toml")).unwrap();
    assert!(toml.contains("glob = \"fees/*.csv\""), "{toml}");
    assert!(toml.contains("partition_by = \"fee_date:month\""), "{toml}");
    assert!(toml.contains("primary_key = [\"fee_id\"]"), "{toml}");
    // A wide decimal: later values with more places than the sample's two still fit.
    assert!(toml.contains("type = \"decimal(38,9)\""), "{toml}");
    ok(&dir, &["ingest"]);
    assert_eq!(count(&dir, "select count(*) from bronze.fees"), 60);
    // init refuses to overwrite a project.
    let again = Command::new(SILT).arg("init").arg(&dir).output().unwrap();
    assert_eq!(again.status.code(), Some(2));
}

/// Every fixture file, under a contract inferred from itself, ingests with only its structurally
/// broken records (a truncated document, a ragged row, a line that is not JSON) in quarantine.
#[test]
fn source_new_infers_a_contract_each_fixture_file_ingests_under() {
    let m = Manifest::load();
    let mut files = Vec::new();
    let landing = repo().join("fixtures/landing");
    walk(&landing, &mut |f| files.push(f.to_path_buf()));
    files.sort();
    assert!(files.len() >= 12);
    for f in files {
        let rel = f
            .strip_prefix(&landing)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let tmp = tempfile::tempdir().unwrap();
        let dir = init(tmp.path());
        std::fs::remove_file(dir.join("sql/bronze/example.toml")).unwrap();
        std::fs::remove_dir_all(dir.join("landing/example")).unwrap();
        let name = f.file_name().unwrap().to_str().unwrap();
        std::fs::create_dir_all(dir.join("landing/sample")).unwrap();
        let dest = dir.join("landing/sample").join(name);
        std::fs::copy(&f, &dest).unwrap();
        let out = silt(
            &dir,
            &["source", "new", "sample", "--from", dest.to_str().unwrap()],
        );
        if std::fs::metadata(&f).unwrap().len() == 0 {
            assert_eq!(out.status.code(), Some(2), "{rel}");
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("empty"),
                "{rel}"
            );
            continue;
        }
        assert!(
            out.status.success(),
            "{rel}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ok(&dir, &["ingest"]);
        let of = m.files[&rel]
            .get("duplicate_of")
            .and_then(|v| v.as_str())
            .unwrap_or(&rel)
            .to_string();
        let bad: Vec<_> = m.bad.iter().filter(|b| b.file == of).collect();
        let structural = bad.iter().filter(|b| b.kind == "structural").count() as i64;
        let good = m.files[&of]["good_rows"].as_i64().unwrap() + bad.len() as i64 - structural;
        let q = if dir.join("lake/_silt/quarantine/sample").exists() {
            count(&dir, "select count(*) from quarantine.sample")
        } else {
            0
        };
        assert_eq!(q, structural, "{rel}: quarantined rows");
        let b = if dir.join("lake/bronze/sample").exists() {
            count(&dir, "select count(*) from bronze.sample")
        } else {
            0
        };
        assert_eq!(b, good, "{rel}: bronze rows");
    }
}

/// Outside data (airports and flights, TPC-H customers as NDJSON): inference proposes what
/// later rows fit and says what it relied on.
#[test]
fn source_new_infers_types_later_rows_fit_and_keys_beyond_id_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = init(tmp.path());
    let land = dir.join("landing/airports");
    std::fs::create_dir_all(&land).unwrap();
    let mut csv = String::from("faa,name,lat,lon,alt,tz,fare\n");
    for i in 0..300 {
        csv.push_str(&format!(
            "A{i:03},Airport number {i},{}.1234567,-{}.7654321,{},{},{}.{:02}\n",
            40 + i % 10,
            70 + i % 5,
            i * 3,
            if i % 2 == 0 { "-5" } else { "-8" },
            100 + i,
            i % 100
        ));
    }
    std::fs::write(land.join("airports.csv"), &csv).unwrap();
    ok(
        &dir,
        &[
            "source",
            "new",
            "airports",
            "--from",
            land.join("airports.csv").to_str().unwrap(),
        ],
    );
    let toml = std::fs::read_to_string(dir.join("sql/bronze/airports.toml")).unwrap();
    let column = |name: &str| -> String {
        let start = toml
            .find(&format!("name = \"{name}\""))
            .unwrap_or_else(|| panic!("{name}: {toml}"));
        toml[start..]
            .split("[[columns]]")
            .next()
            .unwrap()
            .to_string()
    };
    // Seven decimal places: a float, not a string.
    assert!(column("lat").contains("type = \"float64\""), "{toml}");
    // Money with two places gets a decimal wide enough for three.
    assert!(
        column("fare").contains("type = \"decimal(38,9)\""),
        "{toml}"
    );
    // A unique column that is not named id is proposed as the key.
    assert!(toml.contains("primary_key = [\"faa\"]"), "{toml}");
    // NULL-free in the sample is not NOT NULL; the key is.
    assert!(column("alt").contains("nullable = true"), "{toml}");
    assert!(column("faa").contains("nullable = false"), "{toml}");
    // An airport's name is not marked PII, only pointed out.
    assert!(toml.contains("pii = []"), "{toml}");
    assert!(toml.contains("# 'name' may name a person"), "{toml}");
    // The parse options it relied on are written down.
    assert!(toml.contains("trim = false"), "{toml}");
    assert!(toml.contains("header = true"), "{toml}");
    // A later row with three decimal places of fare and an empty altitude ingests.
    std::fs::write(
        land.join("airports_2.csv"),
        "faa,name,lat,lon,alt,tz,fare\nZZZ,Late,1.5,2.5,,-5,12.345\n",
    )
    .unwrap();
    ok(&dir, &["ingest"]);
    assert_eq!(count(&dir, "select count(*) from bronze.airports"), 301);
    assert!(
        !dir.join("lake/_silt/quarantine/airports").exists(),
        "nothing quarantined"
    );

    // NDJSON columns keep the file's order; a person's name is PII.
    let cust = dir.join("landing/customers");
    std::fs::create_dir_all(&cust).unwrap();
    let mut nd = String::new();
    for i in 1..=50 {
        nd.push_str(&format!(
            "{{\"c_custkey\": {i}, \"c_name\": \"Customer#{i:09}\", \"contact_name\": \"Ann {i}\", \"c_phone\": \"11-{i:03}\", \"c_acctbal\": {i}.25}}\n"
        ));
    }
    std::fs::write(cust.join("customers.ndjson"), nd).unwrap();
    ok(
        &dir,
        &[
            "source",
            "new",
            "customers",
            "--from",
            cust.join("customers.ndjson").to_str().unwrap(),
        ],
    );
    let toml = std::fs::read_to_string(dir.join("sql/bronze/customers.toml")).unwrap();
    let pos = |n: &str| {
        toml.find(&format!("name = \"{n}\""))
            .unwrap_or_else(|| panic!("{n}: {toml}"))
    };
    assert!(
        pos("c_custkey") < pos("c_name")
            && pos("c_name") < pos("contact_name")
            && pos("contact_name") < pos("c_phone")
            && pos("c_phone") < pos("c_acctbal"),
        "{toml}"
    );
    assert!(toml.contains("primary_key = [\"c_custkey\"]"), "{toml}");
    assert!(
        toml.contains("pii = [\"contact_name\", \"c_phone\"]"),
        "{toml}"
    );
}
