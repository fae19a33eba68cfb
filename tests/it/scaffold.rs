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
    assert!(toml.contains("type = \"decimal(18,2)\""), "{toml}");
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
