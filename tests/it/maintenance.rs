//! `silt optimize` and `silt vacuum` on the reference pipeline: compaction keeps every row and
//! leaves fewer files; vacuum (dry run first) deletes exactly the files old versions needed.

use serde_json::Value;

use crate::support::{Project, copy_dir, repo};

fn files_of(p: &Project, table: &str) -> u64 {
    let t: Value = serde_json::from_str(&p.ok(&["--json", "tables"])).unwrap();
    t.as_array()
        .unwrap()
        .iter()
        .find(|x| x["table"] == table)
        .unwrap()["files"]
        .as_u64()
        .unwrap()
}

fn content(p: &Project) -> String {
    crate::support::golden::sorted_csv(&p.ok(&[
        "query",
        "select fee_id, client_id, fee_amount, fee_month from silver.stg_fees",
        "--format",
        "csv",
    ]))
}

#[test]
fn optimize_compacts_without_changing_rows_and_vacuum_deletes_old_files() {
    let p = Project::reference();
    p.ok(&["run"]);
    copy_dir(&repo().join("fixtures/batch2"), &p.landing());
    p.ok(&["run"]);
    let before_files = files_of(&p, "silver.stg_fees");
    let before = content(&p);
    let v0 = p.count("select count(distinct fee_id) from silver.stg_fees version as of 0");

    let r: Value = serde_json::from_str(&p.ok(&[
        "--json",
        "optimize",
        "silver.stg_fees",
        "--zorder",
        "client_id",
    ]))
    .unwrap();
    assert!(r["files_removed"].as_u64().unwrap() > 0, "{r}");
    assert!(files_of(&p, "silver.stg_fees") <= before_files);
    assert_eq!(content(&p), before, "optimize changed rows");
    // The model still knows it is up to date.
    let run: Value = serde_json::from_str(&p.ok(&["--json", "run"])).unwrap();
    let stg = run["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "stg_fees")
        .unwrap();
    assert_eq!(stg["status"], "up_to_date");

    let dry: Value = serde_json::from_str(&p.ok(&[
        "--json",
        "vacuum",
        "silver.stg_fees",
        "--retain-hours",
        "0",
        "--dry-run",
    ]))
    .unwrap();
    let doomed = dry[0]["files_deleted"].as_array().unwrap().len();
    assert!(doomed > 0);
    // A dry run deletes nothing: version 0 is still readable.
    assert_eq!(
        p.count("select count(distinct fee_id) from silver.stg_fees version as of 0"),
        v0
    );
    let done: Value = serde_json::from_str(&p.ok(&[
        "--json",
        "vacuum",
        "silver.stg_fees",
        "--retain-hours",
        "0",
        "--force",
    ]))
    .unwrap();
    assert_eq!(done[0]["files_deleted"].as_array().unwrap().len(), doomed);
    for f in done[0]["files_deleted"].as_array().unwrap() {
        assert!(
            !p.lake()
                .join("silver/stg_fees")
                .join(f.as_str().unwrap())
                .exists(),
            "{f}"
        );
    }
    assert_eq!(content(&p), before, "vacuum changed the current rows");
    let old = p.run(&[
        "query",
        "select count(distinct fee_id) from silver.stg_fees version as of 0",
    ]);
    assert_ne!(
        old.status.code(),
        Some(0),
        "version 0 is still readable after vacuum"
    );
}
