//! Environments (`silt env`, `--env`): zero-copy clones of the lake, state-based builds, diffs
//! across environments, promotion, vacuum and drop, GDPR across environments, alerts to a
//! webhook and a command, the README's CI recipe, and other readers of the clones. On the
//! reference project and on outside data (TPC-H-like orders and line items).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::erasure::{files_holding, live_files, subject_pii};
use crate::support::datasets::{orders_project, write};
use crate::support::golden::{GOLD, golden, sorted_csv};
use crate::support::{Project, SILT, json, repo, walk};

/// Every Parquet file under `dir` with its size, except under `skip`.
fn parquet_files(dir: &Path, skip: Option<&Path>) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    walk(dir, &mut |p| {
        if skip.is_some_and(|s| p.starts_with(s)) {
            return;
        }
        if p.extension().is_some_and(|e| e == "parquet") {
            out.insert(p.display().to_string(), std::fs::metadata(p).unwrap().len());
        }
    });
    out
}

fn envs_dir(p: &Project) -> PathBuf {
    p.lake().join("_envs")
}

/// Each table's latest version, as `silt tables` reports it (in an environment with `env`).
fn versions(p: &Project, env: Option<&str>) -> BTreeMap<String, u64> {
    let mut args = Vec::new();
    if let Some(e) = env {
        args.extend(["--env", e]);
    }
    args.push("tables");
    json(p, &args)
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["table"].as_str().unwrap().to_string(),
                t["version"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A gold table as sorted CSV, in `env` or prod.
fn gold_csv(p: &Project, env: Option<&str>, table: &str) -> String {
    let sql = format!("select * from gold.{table}");
    let mut args = Vec::new();
    if let Some(e) = env {
        args.extend(["--env", e]);
    }
    args.extend(["query", &sql, "--format", "csv"]);
    sorted_csv(&p.ok(&args))
}

fn model_statuses(report: &Value) -> BTreeMap<String, String> {
    report["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["table"].as_str().unwrap().to_string(),
                m["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn an_environment_is_a_zero_copy_clone_and_its_builds_leave_prod_alone() {
    let p = Project::reference();
    p.ok(&["run"]);
    let prod_files = parquet_files(&p.lake(), None);
    let prod_versions = versions(&p, None);
    let live: u64 = json(&p, &["tables"])
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["files"].as_u64().unwrap())
        .sum();

    let r = json(&p, &["env", "create", "dev"]);
    assert_eq!(r["files_copied"], 0, "{r}");
    assert_eq!(r["files_referenced"].as_u64().unwrap(), live, "{r}");
    assert_eq!(r["tables"].as_array().unwrap().len(), prod_versions.len());
    // No Parquet file was copied: the environment holds logs only, and prod's files are as
    // they were.
    assert_eq!(parquet_files(&envs_dir(&p), None), BTreeMap::new());
    let env_bytes: u64 = {
        let mut n = 0;
        walk(&envs_dir(&p), &mut |f| {
            n += std::fs::metadata(f).unwrap().len()
        });
        n
    };
    let prod_bytes: u64 = prod_files.values().sum();
    assert!(
        env_bytes < prod_bytes,
        "the environment's logs ({env_bytes} B) outweigh the data ({prod_bytes} B)"
    );
    assert_eq!(parquet_files(&p.lake(), None), prod_files);
    // Its tables read prod's rows: every gold table equals the golden file.
    for g in GOLD {
        assert_eq!(gold_csv(&p, Some("dev"), g), golden(g), "gold.{g} in dev");
    }
    let dev_fees = json(
        &p,
        &[
            "--env",
            "dev",
            "query",
            "select count(*) as n from bronze.fees",
            "--format",
            "json",
        ],
    );
    assert_eq!(
        dev_fees[0]["n"].as_i64(),
        Some(p.count("select count(*) from bronze.fees"))
    );
    // Every model is up to date there: a run builds nothing and writes no data file.
    let idle = json(&p, &["--env", "dev", "run"]);
    for (t, s) in model_statuses(&idle) {
        assert_eq!(s, "up_to_date", "{t} in a fresh clone");
    }
    let written: Vec<String> = parquet_files(&envs_dir(&p), None)
        .into_keys()
        .filter(|f| !f.contains("/_silt/"))
        .collect();
    assert_eq!(
        written,
        Vec::<String>::new(),
        "an idle run wrote data files"
    );

    // A build in dev writes dev's files only.
    p.ok(&[
        "--env",
        "dev",
        "build",
        "--full-refresh",
        "--select",
        "stg_fees+",
    ]);
    assert_eq!(versions(&p, None), prod_versions, "prod's versions moved");
    assert_eq!(parquet_files(&p.lake(), Some(&envs_dir(&p))), prod_files);
    let dev_files = parquet_files(&envs_dir(&p), None);
    assert!(
        dev_files
            .keys()
            .any(|f| f.contains("/dev/silver/stg_fees/")),
        "{dev_files:?}"
    );
    let dev_versions = versions(&p, Some("dev"));
    assert_eq!(dev_versions["silver.stg_fees"], 1);
    assert_eq!(
        dev_versions["silver.advisers"], 0,
        "not selected: still the clone"
    );
    for g in GOLD {
        assert_eq!(
            gold_csv(&p, Some("dev"), g),
            golden(g),
            "gold.{g} rebuilt in dev"
        );
    }
    // Unknown environments are a usage error that says how to make one.
    let out = p.exits(&["--env", "nope", "tables"], 2);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("silt env create nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = p.exits(&["env", "create", "prod"], 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("'prod'"));
    // An environment cloned from dev keeps dev from being dropped.
    p.ok(&["env", "create", "dev2", "--from", "dev"]);
    assert_eq!(
        gold_csv(&p, Some("dev2"), "rpt_client_ltv"),
        golden("rpt_client_ltv")
    );
    // A clone of a clone promotes to the environment it came from, not to prod.
    p.ok(&[
        "--env",
        "dev2",
        "build",
        "--full-refresh",
        "--select",
        "rpt_cohort_ltv",
    ]);
    let out = p.exits(&["env", "promote", "dev2", "--to", "prod"], 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cloned from 'dev'"));
    let r = json(&p, &["env", "promote", "dev2", "--to", "dev"]);
    let promoted: Vec<&str> = r["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    assert_eq!(promoted, vec!["gold.rpt_cohort_ltv"], "{r}");
    assert_eq!(
        gold_csv(&p, Some("dev"), "rpt_cohort_ltv"),
        golden("rpt_cohort_ltv")
    );
    assert_eq!(
        versions(&p, None),
        prod_versions,
        "a promotion to dev moved prod"
    );
    let out = p.exits(&["env", "drop", "dev"], 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("dev2"));
    p.ok(&["env", "drop", "dev2"]);
    p.ok(&["env", "drop", "dev"]);
    assert!(!envs_dir(&p).join("dev").exists());
    assert_eq!(
        parquet_files(&p.lake(), None),
        prod_files,
        "drop took prod's files"
    );
    for g in GOLD {
        assert_eq!(gold_csv(&p, None, g), golden(g));
    }
}

/// The outside project, run in prod, with an environment `dev` in which `stg_lineitem`
/// doubles each quantity.
fn orders_with_a_change() -> Project {
    let p = orders_project();
    p.ok(&["run"]);
    p.ok(&["env", "create", "dev"]);
    write(
        p.path(),
        "sql/silver/stg_lineitem.sql",
        "{{ config(materialized='incremental', unique_key=['l_orderkey', 'l_linenumber']) }}\n\
         select l_orderkey, l_linenumber, l_quantity * 2 as l_quantity from {{ source('lineitem') }}\n",
    );
    p
}

#[test]
fn state_modified_builds_exactly_the_changed_model_and_its_downstream() {
    let p = orders_with_a_change();
    let prod = versions(&p, None);
    let r = json(
        &p,
        &["--env", "dev", "build", "--select", "state:modified+"],
    );
    let built: BTreeSet<String> = model_statuses(&r).into_keys().collect();
    assert_eq!(
        built,
        BTreeSet::from([
            "silver.stg_lineitem".to_string(),
            "gold.order_volume".into()
        ]),
        "{r}"
    );
    for m in r["models"].as_array().unwrap() {
        assert_eq!(m["status"], "built", "{m}");
        // The changed incremental model is rebuilt over every row, not only new ones.
        assert_eq!(m["mode"], "full", "{m}");
    }
    // The others stay clones: version 0, every file named in prod's lake.
    let dev = versions(&p, Some("dev"));
    for t in ["silver.products", "silver.order_amounts", "bronze.lineitem"] {
        assert_eq!(dev[t], 0, "{t}");
        let (layer, name) = t.split_once('.').unwrap();
        let paths = live_files(&envs_dir(&p).join("dev").join(layer).join(name));
        assert!(!paths.is_empty());
        for f in paths {
            assert!(
                f.starts_with("file://") && !f.contains("/_envs/"),
                "{t}: {f} is not a reference to prod's file"
            );
        }
    }
    assert_eq!(versions(&p, None), prod, "prod moved");
    // The new logic over every row.
    assert_eq!(
        p.count("select sum(l_quantity) from silver.stg_lineitem"),
        139
    );
    let dev_sum = json(
        &p,
        &[
            "--env",
            "dev",
            "query",
            "select sum(l_quantity) as s from silver.stg_lineitem",
            "--format",
            "json",
        ],
    );
    assert_eq!(dev_sum[0]["s"], 278);
    // The diff against prod: every line changed (by its key), nothing added or removed, and
    // the summary's sums.
    let d = json(
        &p,
        &[
            "--env",
            "dev",
            "diff",
            "silver.stg_lineitem",
            "--against",
            "prod",
        ],
    );
    assert_eq!(d["key"], serde_json::json!(["l_orderkey", "l_linenumber"]));
    assert_eq!(d["added"].as_array().unwrap().len(), 0, "{d}");
    assert_eq!(d["removed"].as_array().unwrap().len(), 0, "{d}");
    let changed = d["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 6, "{d}");
    for pair in changed {
        assert_eq!(
            pair[1]["l_quantity"].as_i64().unwrap(),
            2 * pair[0]["l_quantity"].as_i64().unwrap()
        );
    }
    assert_eq!(
        (d["rows_before"].as_u64(), d["rows_after"].as_u64()),
        (Some(6), Some(6))
    );
    let q = d["summary"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["column"] == "l_quantity")
        .unwrap();
    assert_eq!(
        (q["sum_before"].as_f64(), q["sum_after"].as_f64()),
        (Some(139.0), Some(278.0))
    );
    let text = p.ok(&[
        "--env",
        "dev",
        "diff",
        "gold.order_volume",
        "--against",
        "prod",
        "--key",
        "o_custkey",
    ]);
    assert!(
        text.contains("prod → dev: 0 added, 0 removed, 3 changed"),
        "{text}"
    );
    // A second state build finds nothing left to do for the unchanged ones and rebuilds no
    // model whose SQL is the same as its last build in dev.
    let again = json(
        &p,
        &["--env", "dev", "build", "--select", "state:modified+"],
    );
    for (t, s) in model_statuses(&again) {
        assert_eq!(s, "up_to_date", "{t}");
    }
    // Without an environment, state:modified compares with the lake's own last build.
    let here = json(&p, &["build", "--select", "state:modified"]);
    assert_eq!(
        model_statuses(&here).into_keys().collect::<Vec<_>>(),
        vec!["silver.stg_lineitem".to_string()]
    );
}

#[test]
fn promotion_is_refused_when_prod_moved_and_whole_when_it_did_not() {
    let p = orders_with_a_change();
    p.ok(&["--env", "dev", "build", "--select", "state:modified+"]);
    // Prod moves one of the two tables dev changed (order_volume, built again in full).
    write(
        p.path(),
        "sql/silver/stg_lineitem.sql",
        "{{ config(materialized='incremental', unique_key=['l_orderkey', 'l_linenumber']) }}\n\
         select l_orderkey, l_linenumber, l_quantity from {{ source('lineitem') }}\n",
    );
    p.ok(&["build", "--full-refresh", "--select", "order_volume"]);
    let prod = versions(&p, None);
    // A dry run says the same.
    let out = p.exits(&["env", "promote", "dev", "--dry-run"], 2);
    assert!(String::from_utf8_lossy(&out.stderr).contains("gold.order_volume moved"));
    let out = p.exits(&["env", "promote", "dev"], 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gold.order_volume moved"), "{err}");
    assert!(!err.contains("silver.stg_lineitem moved"), "{err}");
    // Nothing promoted, not even the table that did not move.
    assert_eq!(versions(&p, None), prod);
    assert_eq!(
        p.count("select sum(l_quantity) from silver.stg_lineitem"),
        139
    );

    // A fresh environment with the change, promoted while prod stands still.
    p.ok(&["env", "drop", "dev"]);
    p.ok(&["env", "create", "dev"]);
    write(
        p.path(),
        "sql/silver/stg_lineitem.sql",
        "{{ config(materialized='incremental', unique_key=['l_orderkey', 'l_linenumber']) }}\n\
         select l_orderkey, l_linenumber, l_quantity * 2 as l_quantity from {{ source('lineitem') }}\n",
    );
    // …and a model prod does not have yet.
    write(
        p.path(),
        "sql/gold/big_lines.sql",
        "{{ config(materialized='table') }}\n\
         select l_orderkey, l_linenumber from {{ ref('stg_lineitem') }} where l_quantity > 40\n",
    );
    p.ok(&["--env", "dev", "build", "--select", "state:modified+"]);
    let dev_gold = gold_csv(&p, Some("dev"), "order_volume");
    let prod = versions(&p, None);
    let dry = json(&p, &["env", "promote", "dev", "--dry-run"]);
    let listed: Vec<&str> = dry["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    let listed: BTreeSet<&str> = listed.into_iter().collect();
    assert_eq!(
        listed,
        BTreeSet::from(["silver.stg_lineitem", "gold.order_volume", "gold.big_lines"])
    );
    assert_eq!(versions(&p, None), prod, "a dry run wrote");
    let r = json(&p, &["env", "promote", "dev"]);
    for t in r["tables"].as_array().unwrap() {
        let name = t["table"].as_str().unwrap();
        let expected = prod.get(name).map_or(0, |v| v + 1);
        assert_eq!(t["new_version"].as_u64().unwrap(), expected, "{t}");
        assert!(t["files_copied"].as_u64().unwrap() > 0, "{t}");
    }
    // The new model is prod's now: three lines of quantity 42 doubled.
    assert_eq!(p.count("select count(*) from gold.big_lines"), 3);
    assert_eq!(
        p.count("select sum(l_quantity) from silver.stg_lineitem"),
        278
    );
    assert_eq!(gold_csv(&p, None, "order_volume"), dev_gold);
    // Prod's history records the promotion, and its next run finds both models up to date.
    let h = json(&p, &["history", "gold.order_volume"]);
    let last = h
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|e| e["version"].as_u64())
        .unwrap();
    assert_eq!(last["silt_operation"], "promote", "{last}");
    let run = json(&p, &["run"]);
    for (t, s) in model_statuses(&run) {
        assert_eq!(s, "up_to_date", "{t} after the promotion");
    }
    // Dropping dev leaves prod's promoted tables whole (their files were copied in).
    p.ok(&["env", "drop", "dev"]);
    assert_eq!(gold_csv(&p, None, "order_volume"), dev_gold);
    assert_eq!(
        p.count("select sum(l_quantity) from silver.stg_lineitem"),
        278
    );
}

#[test]
fn vacuum_keeps_what_a_live_environment_references_and_drop_lets_it_go() {
    let p = Project::reference();
    p.ok(&["run"]);
    p.ok(&["env", "create", "dev"]);
    let old: Vec<String> = live_files(&p.lake().join("silver/advisers"))
        .into_iter()
        .collect();
    assert_eq!(old.len(), 1);
    let old_file = p.lake().join("silver/advisers").join(&old[0]);
    // Prod replaces the table's file: the old one is only a tombstone in prod, but dev's
    // clone still names it.
    p.ok(&["build", "--full-refresh", "--select", "advisers"]);
    let r = json(
        &p,
        &[
            "vacuum",
            "silver.advisers",
            "--retain-hours",
            "0",
            "--force",
        ],
    );
    assert_eq!(r[0]["files_deleted"], serde_json::json!([]), "{r}");
    assert_eq!(r[0]["kept_for_envs"].as_array().unwrap().len(), 1, "{r}");
    assert!(old_file.exists());
    assert_eq!(
        json(
            &p,
            &[
                "--env",
                "dev",
                "query",
                "select count(*) as n from silver.advisers",
                "--format",
                "json"
            ]
        )[0]["n"],
        8
    );
    // The environment's own vacuum never touches prod's files.
    p.ok(&["--env", "dev", "vacuum", "--retain-hours", "0", "--force"]);
    assert!(old_file.exists());
    p.ok(&["env", "drop", "dev"]);
    let r = json(
        &p,
        &[
            "vacuum",
            "silver.advisers",
            "--retain-hours",
            "0",
            "--force",
        ],
    );
    assert_eq!(r[0]["files_deleted"].as_array().unwrap().len(), 1, "{r}");
    assert!(!old_file.exists());
    assert_eq!(p.count("select count(*) from silver.advisers"), 8);
}

#[test]
fn forget_on_prod_erases_the_subject_from_every_environment() {
    let subject = "C0085";
    let p = Project::reference();
    p.ok(&["run"]);
    let mut needles = subject_pii(&p, subject);
    needles.push(subject.to_string());
    // ci: a pure clone; dev: a clone with files of its own (stg_fees and downstream rebuilt).
    p.ok(&["env", "create", "ci"]);
    p.ok(&["env", "create", "dev"]);
    p.ok(&[
        "--env",
        "dev",
        "build",
        "--full-refresh",
        "--select",
        "stg_fees+",
    ]);
    assert!(!files_holding(&envs_dir(&p).join("dev"), &needles).is_empty());
    let r = json(&p, &["forget", subject, "--reason", "test"]);
    assert!(r["rows_deleted"].as_u64().unwrap() > 0);
    // An independent scan of every file under the lake (environments included) and the
    // landing root finds nothing of the subject.
    assert_eq!(files_holding(&p.lake(), &needles), Vec::<String>::new());
    assert_eq!(files_holding(&p.landing(), &needles), Vec::<String>::new());
    for env in ["ci", "dev"] {
        for t in [
            "silver.stg_fees",
            "gold.dim_clients",
            "gold.rpt_client_ltv",
            "bronze.fees",
        ] {
            let n = json(
                &p,
                &[
                    "--env",
                    env,
                    "query",
                    &format!("select count(*) as n from {t} where client_id = '{subject}'"),
                    "--format",
                    "json",
                ],
            );
            assert_eq!(n[0]["n"], 0, "{env} {t}");
        }
        // Each environment's ledger knows the landing files' new content: nothing is
        // ingested again.
        let run = json(&p, &["--env", env, "run"]);
        for s in run["ingest"]["sources"].as_array().unwrap() {
            assert_eq!(s["rows"], 0, "{env}: {s}");
        }
    }
    let v = json(&p, &["forget", "--verify", subject]);
    assert_eq!(v["findings"], serde_json::json!([]), "{v}");
    // An erasure is no change to promote: ci (a pure clone) still has none, dev only what it
    // built itself.
    let list = json(&p, &["env", "list"]);
    let changed = |name: &str| -> BTreeSet<String> {
        list.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()["changed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(changed("ci"), BTreeSet::new(), "{list}");
    assert!(changed("dev").contains("silver.stg_fees"), "{list}");
    assert!(!changed("dev").contains("silver.clients"), "{list}");
    let alone = {
        // The same lake without environments (its verify finds the subject: exit 1).
        let q = Project::reference();
        q.ok(&["run"]);
        let out = q.exits(&["--json", "forget", "--verify", subject], 1);
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["parquet_files"]
            .as_u64()
            .unwrap()
    };
    assert!(
        v["parquet_files"].as_u64().unwrap() > alone,
        "--verify did not scan the environments: {v}"
    );
    // Prod's gold equals the other environments' (the same erasure everywhere).
    for g in ["dim_clients", "rpt_client_ltv", "rpt_cohort_ltv"] {
        let prod = gold_csv(&p, None, g);
        assert_eq!(gold_csv(&p, Some("ci"), g), prod, "{g} in ci");
        assert_eq!(gold_csv(&p, Some("dev"), g), prod, "{g} in dev");
    }
}

/// A one-thread HTTP server on 127.0.0.1 that answers 200 and keeps each request's body.
struct Hook {
    port: u16,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Hook {
    fn start() -> Hook {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies: Arc<Mutex<Vec<Value>>> = Default::default();
        let keep = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut len = 0usize;
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 0 {
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    line.clear();
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                keep.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
            }
        });
        Hook { port, bodies }
    }

    fn events(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

fn with_notify(p: &Project, webhook: &str, command: &str) {
    let mut toml = std::fs::read_to_string(p.path().join("silt.toml")).unwrap();
    toml.push_str(&format!(
        "\n[notify]\nwebhook = \"{webhook}\"\ncommand = \"{command}\"\ntimeout_secs = 5\n"
    ));
    std::fs::write(p.path().join("silt.toml"), toml).unwrap();
}

#[test]
fn alerts_reach_a_webhook_and_a_command_and_never_fail_the_pipeline() {
    let hook = Hook::start();
    let p = Project::reference();
    let log = p.path().join("alerts.jsonl");
    with_notify(
        &p,
        &format!("http://127.0.0.1:{}/hook", hook.port),
        &format!("cat >> {} && echo >> {}", log.display(), log.display()),
    );
    // A singular test that fails: the run exits 1 and says so to both.
    write(
        p.path(),
        "sql/tests/no_big_fees.sql",
        "select fee_id from {{ ref('stg_fees') }} where fee_amount > 100\n",
    );
    p.exits(&["run"], 1);
    let events = hook.events();
    let failed = events
        .iter()
        .find(|e| e["event"] == "test_failed")
        .unwrap_or_else(|| panic!("no test_failed event: {events:?}"));
    assert!(
        failed["text"].as_str().unwrap().contains("no_big_fees"),
        "{failed}"
    );
    assert_eq!(failed["env"], "prod");
    let commands: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        commands
            .iter()
            .map(|c| c["event"].clone())
            .collect::<Vec<_>>(),
        events
            .iter()
            .map(|c| c["event"].clone())
            .collect::<Vec<_>>(),
        "the command and the webhook saw different events"
    );
    // `silt watch` runs unattended: its cycles alert too.
    let before = hook.events().len();
    let mut watch = p
        .cmd(&["watch", "--debounce-ms", "200", "--poll-seconds", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    write(
        &p.landing(),
        "fees/fees_2026_08.csv",
        "fee_id,client_id,adviser_id,fee_date,fee_amount,currency,note\nF990001,C0001,A004,2026-08-03,500.00,GBP,ongoing advice\n",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let seen = loop {
        let from_watch: Vec<Value> = hook.events()[before..]
            .iter()
            .filter(|e| e["text"].as_str().unwrap_or("").starts_with("silt watch"))
            .cloned()
            .collect();
        if !from_watch.is_empty() || std::time::Instant::now() > deadline {
            break from_watch;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let _ = std::process::Command::new("kill")
        .arg("-INT")
        .arg(watch.id().to_string())
        .status();
    let _ = watch.wait();
    assert!(
        seen.iter()
            .any(|e| e["event"] == "test_failed"
                && e["text"].as_str().unwrap().contains("no_big_fees")),
        "no alert from silt watch: {:?}",
        hook.events()
    );
    // A freshness breach (the fixtures' fees are months old against a 35-day threshold).
    let before = hook.events().len();
    p.run(&["freshness"]);
    let fresh = hook.events()[before..].to_vec();
    assert!(
        fresh
            .iter()
            .any(|e| e["event"] == "freshness" && e["text"].as_str().unwrap().contains("fees")),
        "{fresh:?}"
    );
    // A completed erasure: counts, never the subject.
    let before = hook.events().len();
    p.ok(&["forget", "C0085"]);
    let erased = hook.events()[before..].to_vec();
    assert_eq!(erased.len(), 1, "{erased:?}");
    assert_eq!(erased[0]["event"], "erasure");
    assert!(erased[0]["details"]["rows_deleted"].as_u64().unwrap() > 0);
    assert!(!erased[0].to_string().contains("C0085"), "{}", erased[0]);
    // A broken model: the failed run is told, with the error.
    write(
        p.path(),
        "sql/gold/broken.sql",
        "select no_such_column from {{ ref('stg_fees') }}\n",
    );
    let before = hook.events().len();
    p.exits(&["build", "--select", "broken"], 2);
    let broken = hook.events()[before..].to_vec();
    assert!(
        broken.iter().any(|e| e["event"] == "run_failed"
            && e["text"].as_str().unwrap().contains("no_such_column")),
        "{broken:?}"
    );
    std::fs::remove_file(p.path().join("sql/gold/broken.sql")).unwrap();

    // A webhook that is down and a command that fails change nothing but a warning.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let q = Project::reference();
    with_notify(&q, &format!("http://127.0.0.1:{dead_port}/hook"), "exit 7");
    write(
        q.path(),
        "sql/tests/no_big_fees.sql",
        "select fee_id from {{ ref('stg_fees') }} where fee_amount > 100\n",
    );
    let out = q.exits(&["run"], 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: notify test_failed: webhook"),
        "{err}"
    );
    assert!(err.contains("command: exited with"), "{err}");
    std::fs::remove_file(q.path().join("sql/tests/no_big_fees.sql")).unwrap();
    q.ok(&["test"]);
}

/// The lines of the README's CI recipe (between the ci-recipe markers).
fn ci_recipe() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("<!-- ci-recipe:start -->")
        .expect("README has a CI recipe");
    let end = readme.find("<!-- ci-recipe:end -->").unwrap();
    readme[start..end]
        .lines()
        .filter(|l| !l.starts_with("```") && !l.starts_with("<!--"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_readme_ci_recipe_runs_on_the_reference_project() {
    let p = Project::reference();
    p.ok(&["run"]);
    let prod = versions(&p, None);
    let gold: Vec<String> = GOLD.iter().map(|g| gold_csv(&p, None, g)).collect();
    // The change under review: the first LTV horizon becomes two months.
    let file = p.path().join("sql/gold/rpt_client_ltv.sql");
    let sql = std::fs::read_to_string(&file).unwrap();
    let from = "first_fee_date + interval '1 month' as end_1m";
    assert!(sql.contains(from), "{sql}");
    std::fs::write(
        &file,
        sql.replacen(from, "first_fee_date + interval '2 months' as end_1m", 1),
    )
    .unwrap();
    let bin = Path::new(SILT).parent().unwrap();
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &ci_recipe()])
        .current_dir(p.path())
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("SILT_PROJECT", p.path())
        .env("SILT_LAKE", p.lake())
        .env("SILT_LANDING", p.landing())
        .env("CI_JOB_ID", "42")
        .env_remove("SILT_ENV")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the CI recipe failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("created environment ci-42 from prod"),
        "{stdout}"
    );
    // Built: the changed model and everything downstream of it, nothing upstream.
    for m in [
        "gold.rpt_client_ltv",
        "gold.rpt_adviser_ltv",
        "gold.rpt_cohort_ltv",
    ] {
        assert!(
            stderr.lines().any(|l| l.contains(m) && l.contains("built")),
            "{m} was not built:\n{stderr}"
        );
    }
    for m in ["silver.stg_fees", "silver.advisers", "gold.dim_clients"] {
        assert!(!stderr.contains(m), "{m} was built:\n{stderr}");
    }
    assert!(
        stdout.contains("gold.rpt_client_ltv: prod → ci-42:") && stdout.contains("changed"),
        "{stdout}"
    );
    assert!(stdout.contains("dropped environment ci-42"), "{stdout}");
    assert!(!envs_dir(&p).join("ci-42").exists());
    assert_eq!(versions(&p, None), prod);
    for (g, before) in GOLD.iter().zip(gold) {
        assert_eq!(gold_csv(&p, None, g), before, "prod's gold.{g} changed");
    }
}

#[test]
fn delta_rs_reads_a_clone_and_duckdb_reads_it_once_localized() {
    let p = Project::reference();
    p.ok(&["run"]);
    p.ok(&["env", "create", "dev"]);
    let table = envs_dir(&p).join("dev/silver/stg_fees");
    let expect =
        p.query("select count(*) as n, cast(sum(fee_amount) as varchar) as s from silver.stg_fees");
    let expect = format!("{} {}", expect[0]["n"], expect[0]["s"].as_str().unwrap());
    let python = crate::support::emulators::emulator_python();
    let home = python.parent().unwrap().join("home");
    let read = |engine: &str| {
        let out = std::process::Command::new(&python)
            .arg(repo().join("tests/readers/read_delta.py"))
            .arg(engine)
            .arg(&table)
            .env("HOME", &home)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, got, err) = read("deltalake");
    assert!(ok, "{err}");
    assert_eq!(got, expect, "delta-rs (Python) on the clone");
    // DuckDB's delta extension joins every path to the table root: a clone is unreadable
    // there (README says so), a localized table is read like any other.
    let (ok, _, err) = read("duckdb");
    assert!(
        !ok && err.contains("file://"),
        "DuckDB read the clone: {err}"
    );
    let r = json(&p, &["env", "localize", "dev", "silver.stg_fees"]);
    assert!(r["files_copied"].as_u64().unwrap() > 0);
    let (ok, got, err) = read("duckdb");
    assert!(ok, "{err}");
    assert_eq!(got, expect, "DuckDB on the localized table");
    let (ok, got, err) = read("deltalake");
    assert!(ok, "{err}");
    assert_eq!(got, expect);
    // Localizing leaves prod's files where they are, and silt reads the same rows.
    let n = json(
        &p,
        &[
            "--env",
            "dev",
            "query",
            "select count(*) as n from silver.stg_fees",
            "--format",
            "json",
        ],
    );
    assert_eq!(n[0]["n"].to_string(), expect.split(' ').next().unwrap());
}

/// Partition values that need encoding in object names (a space, a colon, a slash, a percent
/// sign): clones read, build incrementally (the MERGE target localized), erase, time-travel,
/// optimize and promote twice, and prod's rows stay exact. A lake whose path a URL would
/// encode (a space) cannot hold clones: refused, saying why.
#[test]
fn clones_of_encoded_partitions_build_erase_and_promote() {
    let p = crate::support::datasets::slots_project();
    let spaced = p.path().join("my lake");
    let refused = |args: &[&str]| {
        std::process::Command::new(SILT)
            .arg("--project")
            .arg(p.path())
            .args(args)
            .env("SILT_LAKE", &spaced)
            .env("SILT_LANDING", p.landing())
            .env_remove("SILT_ENV")
            .output()
            .unwrap()
    };
    write(
        &p.landing(),
        "people/p0.csv",
        "pid,email,slot
9,z@x.com,T 9:00
",
    );
    assert!(refused(&["run"]).status.success());
    let out = refused(&["env", "create", "dev"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("characters a URL or an object name encodes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!spaced.join("_envs/dev").exists());
    std::fs::remove_file(p.landing().join("people/p0.csv")).unwrap();
    let lake = p.path().join("lake-2");
    let silt = |args: &[&str]| -> String {
        let out = std::process::Command::new(SILT)
            .arg("--project")
            .arg(p.path())
            .args(args)
            .env("SILT_LAKE", &lake)
            .env("SILT_LANDING", p.landing())
            .env_remove("SILT_ENV")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "silt {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rows = |env: Option<&str>, sql: &str| -> String {
        let mut a = Vec::new();
        if let Some(e) = env {
            a.extend(["--env", e]);
        }
        a.extend(["query", sql, "--format", "csv"]);
        silt(&a)
    };
    write(
        &p.landing(),
        "people/p1.csv",
        "pid,email,slot\n1,a@x.com,T 1:00/a%2B\n2,b@x.com,T 2:00\n3,c@x.com,T 1:00/a%2B\n",
    );
    silt(&["run"]);
    let by_slot = "select slot, people from gold.by_slot order by slot";
    let people = "select pid, slot from silver.stg_people order by pid";
    silt(&["env", "create", "dev"]);
    assert_eq!(rows(Some("dev"), people), rows(None, people));
    assert_eq!(rows(Some("dev"), by_slot), rows(None, by_slot));
    // An incremental build in dev: new rows MERGE into the cloned, partitioned target.
    write(
        &p.landing(),
        "people/p2.csv",
        "pid,email,slot\n4,d@x.com,T 2:00\n5,e@x.com,T 1:00/a%2B\n",
    );
    let r: Value = serde_json::from_str(&silt(&["--json", "--env", "dev", "run"])).unwrap();
    let stg = r["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == "stg_people")
        .unwrap();
    assert_eq!(
        (stg["status"].as_str(), stg["mode"].as_str()),
        (Some("built"), Some("incremental")),
        "{r}"
    );
    assert_eq!(
        rows(Some("dev"), by_slot),
        "slot,people\nT 1:00/a%2B,3\nT 2:00,2\n"
    );
    assert_eq!(
        rows(None, by_slot),
        "slot,people\nT 1:00/a%2B,2\nT 2:00,1\n"
    );
    // Time travel in dev to the clone, and an optimize there.
    assert_eq!(
        rows(
            Some("dev"),
            "select count(*) as n from silver.stg_people version as of 0"
        ),
        "n\n3\n"
    );
    silt(&["--env", "dev", "optimize", "silver.stg_people"]);
    assert_eq!(
        rows(Some("dev"), "select count(*) as n from silver.stg_people"),
        "n\n5\n"
    );
    // Erasure on prod reaches dev's clone and dev's own files.
    silt(&["forget", "3"]);
    assert_eq!(
        rows(
            Some("dev"),
            "select count(*) as n from silver.stg_people where pid = 3"
        ),
        "n\n0\n"
    );
    assert_eq!(
        files_holding(&lake, &["c@x.com".to_string()]),
        Vec::<String>::new()
    );
    // Promotion: prod gets dev's rows exactly (no file both removed and added), twice.
    silt(&["env", "promote", "dev"]);
    assert_eq!(rows(None, people), rows(Some("dev"), people));
    assert_eq!(
        rows(None, by_slot),
        "slot,people\nT 1:00/a%2B,2\nT 2:00,2\n"
    );
    write(
        &p.landing(),
        "people/p3.csv",
        "pid,email,slot\n6,f@x.com,T 2:00\n",
    );
    silt(&["--env", "dev", "run"]);
    silt(&["env", "promote", "dev"]);
    assert_eq!(rows(None, people), rows(Some("dev"), people));
    assert_eq!(
        rows(None, by_slot),
        "slot,people\nT 1:00/a%2B,2\nT 2:00,3\n"
    );
    silt(&["env", "drop", "dev"]);
    assert_eq!(
        rows(None, by_slot),
        "slot,people\nT 1:00/a%2B,2\nT 2:00,3\n"
    );
    assert_eq!(
        rows(None, "select count(*) as n from silver.stg_people"),
        "n\n5\n"
    );
}
