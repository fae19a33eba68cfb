//! Inputs and commands that must not break the lake, leak personal data or step outside the
//! project's roots: statements that would write through `silt query`, and more as they are found.

use crate::outside::{flights, write};

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
