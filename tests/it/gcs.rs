//! Production on GCS, against fake-gcs-server behind the XML-API bridge on 127.0.0.1
//! (tests/emulators/gcs_bridge.py, installed by tests/emulators/setup.sh): the reference
//! pipeline end to end on gs:// roots, concurrent writers, injected 503s and timeouts, fast
//! failure without credentials, and no request that leaves 127.0.0.1 or asks a metadata server.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::util::display::{ArrayFormatter, FormatOptions};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::Value;

use crate::support::emulators::emulator_python;
use crate::support::{Manifest, Project, repo, walk};

/// fake-gcs-server + bridge, stopped on drop.
pub struct Gcs {
    child: Child,
    pub port: u16,
    log: PathBuf,
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

#[derive(Default, Clone, Copy)]
pub struct Faults {
    pub fail_rate: f64,
    pub timeout_rate: f64,
    pub hang_secs: f64,
}

impl Gcs {
    pub fn start(faults: Faults) -> Gcs {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("requests.jsonl");
        let mut child = Command::new(emulator_python())
            .arg(repo().join("tests/emulators/gcs_bridge.py"))
            .args([
                "--bucket", "lake", "--bucket", "landing", "--bucket", "envs", "--log",
            ])
            .arg(&log)
            .args(["--fail-rate", &faults.fail_rate.to_string()])
            .args(["--timeout-rate", &faults.timeout_rate.to_string()])
            .args(["--hang", &faults.hang_secs.max(0.1).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the GCS emulator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .strip_prefix("READY ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the GCS emulator did not start: {line:?}"));
        let key = dir.path().join("sa.json");
        std::fs::write(
            &key,
            serde_json::json!({
                "gcs_base_url": format!("http://127.0.0.1:{port}"),
                "disable_oauth": true,
                "client_email": "",
                "private_key": "",
                "private_key_id": "",
            })
            .to_string(),
        )
        .unwrap();
        Gcs {
            child,
            port,
            log,
            key,
            _dir: dir,
        }
    }

    /// Point a silt command at this emulator: explicit credentials, and the metadata server
    /// (should anything ask it) at the bridge, where the request would be logged.
    pub fn env(&self, c: &mut Command, lake: &str, landing: &str) {
        c.env("SILT_LAKE", lake)
            .env("SILT_LANDING", landing)
            .env("GOOGLE_APPLICATION_CREDENTIALS", &self.key)
            .env("GCE_METADATA_HOST", format!("127.0.0.1:{}", self.port))
            .env("GCE_METADATA_IP", format!("127.0.0.1:{}", self.port));
    }

    /// Every request the bridge saw.
    pub fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// An object_store client on `bucket`, for the test's own uploads and scans.
    pub fn store(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::new()
                .with_bucket_name(bucket)
                .with_service_account_path(self.key.display().to_string())
                .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
                .build()
                .unwrap(),
        )
    }
}

impl Drop for Gcs {
    fn drop(&mut self) {
        // Closing stdin lets the bridge stop fake-gcs-server itself; only a bridge that does
        // not exit in time is killed (which would leave the server running).
        drop(self.child.stdin.take());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn store_put(store: &Arc<dyn ObjectStore>, at: &str, file: &Path) {
    rt().block_on(async {
        store
            .put(&ObjPath::from(at), std::fs::read(file).unwrap().into())
            .await
            .unwrap();
    });
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// Upload a local directory under `prefix`.
pub(crate) fn upload(store: &Arc<dyn ObjectStore>, dir: &Path, prefix: &str) {
    let mut files = Vec::new();
    walk(dir, &mut |p| files.push(p.to_path_buf()));
    rt().block_on(async {
        for f in files {
            let rel = f.strip_prefix(dir).unwrap().display().to_string();
            store
                .put(
                    &ObjPath::from(format!("{prefix}/{rel}")),
                    std::fs::read(&f).unwrap().into(),
                )
                .await
                .unwrap();
        }
    });
}

/// Every object under `prefix` that holds one of `needles` (Parquet decoded, the rest as text).
fn objects_holding(store: &Arc<dyn ObjectStore>, prefix: &str, needles: &[String]) -> Vec<String> {
    rt().block_on(async {
        let mut found = Vec::new();
        let metas: Vec<_> =
            futures::TryStreamExt::try_collect::<Vec<_>>(store.list(Some(&ObjPath::from(prefix))))
                .await
                .unwrap();
        assert!(!metas.is_empty(), "nothing under {prefix}");
        for m in metas {
            let data = store.get(&m.location).await.unwrap().bytes().await.unwrap();
            let texts: Vec<String> = if m.location.as_ref().ends_with(".parquet") {
                let r =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(data)
                        .unwrap()
                        .build()
                        .unwrap();
                let mut out = Vec::new();
                for b in r {
                    let b = b.unwrap();
                    for c in b.columns() {
                        let f =
                            ArrayFormatter::try_new(c.as_ref(), &FormatOptions::default()).unwrap();
                        for i in 0..c.len() {
                            out.push(f.value(i).to_string());
                        }
                    }
                }
                out
            } else {
                vec![String::from_utf8_lossy(&data).into_owned()]
            };
            for n in needles {
                if texts.iter().any(|t| t.contains(n.as_str())) {
                    found.push(format!("{} holds {n}", m.location));
                }
            }
        }
        found
    })
}

/// A silt command for `p` on gs:// roots of `gcs`.
pub(crate) fn on_gcs(p: &Project, gcs: &Gcs, lake: &str, landing: &str, args: &[&str]) -> Command {
    let mut c = p.cmd(args);
    gcs.env(&mut c, lake, landing);
    c
}

pub(crate) fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed ({:?}):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn query(p: &Project, gcs: &Gcs, lake: &str, landing: &str, sql: &str) -> Vec<Value> {
    let out = ok(on_gcs(
        p,
        gcs,
        lake,
        landing,
        &["query", sql, "--format", "json"],
    ));
    serde_json::from_str::<Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// A subject's id and its PII values in bronze.clients: what an erasure must leave nowhere.
fn subject_needles(
    p: &Project,
    gcs: &Gcs,
    lake: &str,
    landing: &str,
    subject: &str,
) -> Vec<String> {
    let pii = query(
        p,
        gcs,
        lake,
        landing,
        &format!("select full_name, email, nino from bronze.clients where client_id = '{subject}'"),
    );
    let mut needles = vec![subject.to_string()];
    needles.extend(
        pii[0]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_string()),
    );
    needles
}

/// Every gold table on gs:// equals the golden file the local test checks.
fn assert_gold_is_golden(p: &Project, gcs: &Gcs, lake: &str, landing: &str) {
    for g in crate::support::golden::GOLD {
        let sql = format!("select * from gold.{g}");
        let got = ok(on_gcs(
            p,
            gcs,
            lake,
            landing,
            &["query", &sql, "--format", "csv"],
        ));
        assert_eq!(
            crate::support::golden::sorted_csv(&got),
            crate::support::golden::golden(g),
            "gold.{g} on gs:// differs from tests/golden/{g}.csv"
        );
    }
}

#[test]
fn reference_pipeline_runs_unchanged_on_gs_roots() {
    let gcs = Gcs::start(Faults::default());
    let p = Project::empty_reference();
    let (lake, landing) = ("gs://lake/adviser-fees", "gs://landing/incoming");
    upload(
        &gcs.store("landing"),
        &repo().join("fixtures/landing"),
        "incoming",
    );
    let run = |args: &[&str]| ok(on_gcs(&p, &gcs, lake, landing, args));

    run(&["run"]);
    assert_gold_is_golden(&p, &gcs, lake, landing);
    let m = Manifest::load();
    let fees = query(
        &p,
        &gcs,
        lake,
        landing,
        "select count(*) as n from bronze.fees",
    );
    assert_eq!(fees[0]["n"].as_i64().unwrap(), m.good_rows("fees/"));
    run(&["test"]);
    // Exactly once: a second run ingests nothing.
    let again: Value = serde_json::from_str(&run(&["--json", "run"])).unwrap();
    for s in again["ingest"]["sources"].as_array().unwrap() {
        assert_eq!(s["rows"], 0, "{s}");
    }
    // Time travel.
    let h: Value = serde_json::from_str(&run(&["--json", "history", "silver.stg_fees"])).unwrap();
    assert_eq!(h.as_array().unwrap().len(), 1);
    let v0 = query(
        &p,
        &gcs,
        lake,
        landing,
        "select count(*) as n from silver.stg_fees version as of 0",
    );
    let now = query(
        &p,
        &gcs,
        lake,
        landing,
        "select count(*) as n from silver.stg_fees",
    );
    assert_eq!(v0, now);
    // GDPR on gs://.
    let subject = "C0085";
    let needles = subject_needles(&p, &gcs, lake, landing, subject);
    assert!(!objects_holding(&gcs.store("lake"), "adviser-fees", &needles).is_empty());
    let report: Value = serde_json::from_str(&run(&["--json", "forget", subject])).unwrap();
    assert!(report["rows_deleted"].as_u64().unwrap() > 0);
    let v = run(&["forget", "--verify", subject]);
    assert!(v.contains(" 0 finding(s)"), "{v}");
    assert_eq!(
        objects_holding(&gcs.store("lake"), "adviser-fees", &needles),
        Vec::<String>::new()
    );
    assert_eq!(
        objects_holding(&gcs.store("landing"), "incoming", &needles),
        Vec::<String>::new()
    );
    // The rewritten landing files are known by the etags their puts returned, spelt as the
    // bucket's listing spells them: the next ingest takes nothing and reads none of them.
    let next = on_gcs(&p, &gcs, lake, landing, &["-v", "--json", "ingest"])
        .output()
        .unwrap();
    assert!(
        next.status.success(),
        "{}",
        String::from_utf8_lossy(&next.stderr)
    );
    let ingest: Value = serde_json::from_slice(&next.stdout).unwrap();
    for s in ingest["sources"].as_array().unwrap() {
        assert_eq!(s["files_ingested"], 0, "{s}");
        assert_eq!(s["files_already_ingested"], s["files_listed"], "{s}");
    }
    let log = String::from_utf8_lossy(&next.stderr);
    assert!(
        !log.contains("hashed and classified"),
        "a landing file was read again:\n{log}"
    );
    let out = on_gcs(
        &p,
        &gcs,
        lake,
        landing,
        &["query", "select count(*) from bronze.fees version as of 0"],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(report["request_id"].as_str().unwrap()));

    // Nothing left 127.0.0.1, nothing asked a metadata server.
    let reqs = gcs.requests();
    assert!(reqs.len() > 100);
    let host = format!("127.0.0.1:{}", gcs.port);
    for r in &reqs {
        assert_eq!(r["client"], "127.0.0.1", "{r}");
        assert_eq!(r["host"], Value::from(host.clone()), "{r}");
        assert!(
            !r["path"].as_str().unwrap().starts_with("/computeMetadata"),
            "{r}"
        );
    }
}

#[test]
fn gs_root_without_credentials_fails_fast_and_clearly() {
    let p = Project::empty_reference();
    let home = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = p
        .cmd(&["tables"])
        .env("SILT_LAKE", "gs://lake/x")
        .env("HOME", home.path())
        .env_remove("CLOUDSDK_CONFIG")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        // Were anything to try the metadata server, it would hang on this unroutable address.
        .env("GCE_METADATA_HOST", "10.255.255.1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(started.elapsed() < Duration::from_secs(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no credentials for gs://lake/x"), "{err}");
}

#[test]
fn two_processes_commit_to_the_same_tables_on_gcs_and_nothing_is_lost() {
    let gcs = Gcs::start(Faults::default());
    let p = Project::empty_reference();
    let lake = "gs://lake/shared";
    // Two landing roots, each with half of the fee files; one commit per file.
    let m = Manifest::load();
    let mut files = Vec::new();
    walk(&repo().join("fixtures/landing/fees"), &mut |f| {
        files.push(f.to_path_buf())
    });
    files.sort();
    let store = gcs.store("landing");
    rt().block_on(async {
        for (i, f) in files.iter().enumerate() {
            let name = f.file_name().unwrap().to_str().unwrap();
            if name == "fees_2026_01.csv" {
                continue; // the seed
            }
            // The re-sent duplicate goes with its original, so each side sees it as a duplicate.
            let side = if name.starts_with("fees_2026_03") {
                0
            } else {
                i % 2
            };
            store
                .put(
                    &ObjPath::from(format!("side{side}/fees/{name}")),
                    std::fs::read(f).unwrap().into(),
                )
                .await
                .unwrap();
        }
    });
    // The tables exist first (creating a table is a different race: the loser fails cleanly).
    let first = files
        .iter()
        .find(|f| f.ends_with("fees_2026_01.csv"))
        .unwrap();
    store_put(&store, "seed/fees/fees_2026_01.csv", first);
    let mut seed = p.cmd(&["ingest", "--source", "fees"]);
    gcs.env(&mut seed, lake, "gs://landing/seed");
    ok(seed);
    // Both writers load the table, then wait at the same step until released together.
    let barrier = tempfile::tempdir().unwrap();
    let release = barrier.path().join("go");
    let spawn = |side: u32| {
        let mut c = p.cmd(&["ingest", "--source", "fees"]);
        gcs.env(&mut c, lake, &format!("gs://landing/side{side}"));
        c.env("SILT_INGEST_BATCH_FILES", "1")
            .env("SILT_FAILPOINT", "ingest.before_bronze")
            .env("SILT_FAILPOINT_RELEASE", &release)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut writers = vec![spawn(0), spawn(1)];
    let (tx, rx) = std::sync::mpsc::channel();
    let mut logs = Vec::new();
    for w in writers.iter_mut() {
        let err = w.stderr.take().unwrap();
        let tx = tx.clone();
        logs.push(std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("failpoint") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        }));
    }
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(120))
            .expect("both writers reach the barrier");
    }
    std::fs::write(&release, b"go").unwrap();
    for (w, log) in writers.into_iter().zip(logs) {
        let status = {
            let mut w = w;
            w.wait().unwrap()
        };
        let log = log.join().unwrap();
        assert!(status.success(), "{log}");
    }
    let q = |sql: &str| query(&p, &gcs, lake, "gs://landing/side0", sql);
    assert_eq!(
        q("select count(*) as n from bronze.fees")[0]["n"]
            .as_i64()
            .unwrap(),
        m.good_rows("fees/"),
        "every good fee row once"
    );
    assert_eq!(
        q(
            "select count(*) as n, count(distinct fee_id) as d from bronze.fees where fee_id is not null"
        )[0]["n"],
        q("select count(distinct fee_id) as d from bronze.fees")[0]["d"]
    );
    let ingested: BTreeSet<String> =
        q("select path from _silt.ledger where status in ('ingested', 'empty')")
            .into_iter()
            .map(|r| r["path"].as_str().unwrap().to_string())
            .collect();
    assert!(ingested.len() >= files.len() - 1, "{ingested:?}");
    // The log is whole: versions 0..=n with no gap, and more than one writer's commits in it.
    let versions: Vec<u64> = serde_json::from_str::<Value>(&ok(on_gcs(
        &p,
        &gcs,
        lake,
        "gs://landing/side0",
        &["--json", "history", "bronze.fees"],
    )))
    .unwrap()
    .as_array()
    .unwrap()
    .iter()
    .map(|h| h["version"].as_u64().unwrap())
    .collect();
    let n = versions.len() as u64;
    assert!(n >= 4);
    // Both writers' commits are in bronze's history (one retried on top of the other).
    let h: Value = serde_json::from_str(&ok(on_gcs(
        &p,
        &gcs,
        lake,
        "gs://landing/side0",
        &["--json", "history", "bronze.fees"],
    )))
    .unwrap();
    let batches: BTreeSet<String> = h
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["run"].as_str().map(String::from))
        .collect();
    assert_eq!(batches.len(), 3, "seed + two writers: {batches:?}");
    assert_eq!(versions, (0..n).rev().collect::<Vec<_>>());
}

#[test]
fn injected_503s_and_timeouts_are_retried_and_no_commit_is_half_done() {
    let gcs = Gcs::start(Faults {
        fail_rate: 0.08,
        timeout_rate: 0.01,
        hang_secs: 1.5,
    });
    let p = Project::empty_reference();
    let (lake, landing) = ("gs://lake/flaky", "gs://landing/flaky");
    upload(
        &gcs.store("landing"),
        &repo().join("fixtures/landing"),
        "flaky",
    );
    let mut c = on_gcs(&p, &gcs, lake, landing, &["run"]);
    c.env("SILT_GCS_TIMEOUT_SECS", "1");
    ok(c);
    let reqs = gcs.requests();
    let faults = |kind: &str| reqs.iter().filter(|r| r["fault"] == kind).count();
    assert!(
        faults("503") > 3 && faults("timeout") > 0,
        "faults: {} 503s, {} timeouts",
        faults("503"),
        faults("timeout")
    );
    // Same result as without faults: every row once, gold as golden.
    let m = Manifest::load();
    for (t, prefix) in [
        ("fees", "fees/"),
        ("clients", "clients/"),
        ("advisers", "advisers/"),
    ] {
        let n = query(
            &p,
            &gcs,
            lake,
            landing,
            &format!("select count(*) as n from bronze.{t}"),
        );
        assert_eq!(
            n[0]["n"].as_i64().unwrap(),
            m.good_rows(prefix),
            "bronze.{t}"
        );
    }
    assert_gold_is_golden(&p, &gcs, lake, landing);
}

#[test]
fn ingest_and_forget_at_once_land_every_row_once_on_gcs() {
    let gcs = Gcs::start(Faults::default());
    let p = crate::support::datasets::project(&[(
        "sql/bronze/customers.toml",
        crate::support::datasets::CUSTOMERS_TOML,
    )]);
    let (lake, landing) = ("gs://lake/race", "gs://landing/race");
    let store = gcs.store("landing");
    crate::support::checks::ingest_and_forget_together(
        20,
        &|args| on_gcs(&p, &gcs, lake, landing, args),
        &|rel, text| {
            rt().block_on(async {
                store
                    .put(
                        &ObjPath::from(format!("race/{rel}")),
                        text.into_bytes().into(),
                    )
                    .await
                    .unwrap();
            })
        },
        &|sql| {
            query(&p, &gcs, lake, landing, sql)[0]["n"]
                .as_i64()
                .unwrap()
        },
    );
    // Every request stayed on loopback.
    for r in gcs.requests() {
        assert!(!r.to_string().contains("computeMetadata"), "{r}");
    }
}

/// Names of the objects under `prefix`.
fn object_names(store: &Arc<dyn ObjectStore>, prefix: &str) -> Vec<String> {
    rt().block_on(async {
        futures::TryStreamExt::try_collect::<Vec<_>>(store.list(Some(&ObjPath::from(prefix))))
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.location.to_string())
            .collect()
    })
}

#[test]
fn environments_work_on_gs_roots() {
    environments_on_gcs(None);
}

#[test]
fn environments_on_another_bucket_reference_the_lake_bucket() {
    environments_on_gcs(Some("gs://envs/adviser-fees"));
}

/// The environment flow on gs://: under the lake (`envs_root` None) or under another bucket.
fn environments_on_gcs(envs_root: Option<&str>) {
    let gcs = Gcs::start(Faults::default());
    let p = Project::empty_reference();
    let (lake, landing) = ("gs://lake/adviser-fees", "gs://landing/incoming");
    upload(
        &gcs.store("landing"),
        &repo().join("fixtures/landing"),
        "incoming",
    );
    let cmd = |args: &[&str]| {
        let mut c = on_gcs(&p, &gcs, lake, landing, args);
        if let Some(r) = envs_root {
            c.env("SILT_ENVIRONMENTS_ROOT", r);
        }
        c
    };
    let run = |args: &[&str]| ok(cmd(args));
    // Where dev's objects are: its bucket's store and prefix.
    let (env_store, env_prefix) = match envs_root {
        None => (gcs.store("lake"), "adviser-fees/_envs".to_string()),
        Some(r) => {
            let u = url::Url::parse(r).unwrap();
            (
                gcs.store(u.host_str().unwrap()),
                u.path().trim_matches('/').to_string(),
            )
        }
    };
    let lake_store = gcs.store("lake");
    run(&["run"]);
    let prod_parquet: BTreeSet<String> = object_names(&lake_store, "adviser-fees")
        .into_iter()
        .filter(|n| n.ends_with(".parquet"))
        .collect();

    // A zero-copy clone: logs only under the environment's prefix.
    let created: Value = serde_json::from_str(&run(&["--json", "env", "create", "dev"])).unwrap();
    assert_eq!(created["files_copied"], 0);
    assert!(
        created["root"]
            .as_str()
            .unwrap()
            .starts_with(envs_root.unwrap_or("gs://lake/adviser-fees/_envs")),
        "{created}"
    );
    let env_objects = object_names(&env_store, &format!("{env_prefix}/dev"));
    assert!(!env_objects.is_empty());
    assert!(
        env_objects.iter().all(|n| !n.ends_with(".parquet")),
        "{env_objects:?}"
    );
    for g in crate::support::golden::GOLD {
        let sql = format!("select * from gold.{g}");
        let got = ok(cmd(&["--env", "dev", "query", &sql, "--format", "csv"]));
        assert_eq!(
            crate::support::golden::sorted_csv(&got),
            crate::support::golden::golden(g),
            "gold.{g} in dev on gs:// differs from tests/golden/{g}.csv"
        );
    }

    // A change to one silver model, built with its downstream in dev only.
    let adv = p.path().join("sql/silver/advisers.sql");
    let sql = std::fs::read_to_string(&adv).unwrap();
    std::fs::write(&adv, sql.replacen(" team,", " upper(team) as team,", 1)).unwrap();
    let built: Value = serde_json::from_str(&run(&[
        "--json",
        "--env",
        "dev",
        "build",
        "--select",
        "state:modified+",
    ]))
    .unwrap();
    let tables: BTreeSet<&str> = built["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["table"].as_str().unwrap())
        .collect();
    assert_eq!(
        tables,
        BTreeSet::from(["silver.advisers", "gold.rpt_adviser_ltv"])
    );
    let d: Value = serde_json::from_str(&run(&[
        "--json",
        "--env",
        "dev",
        "diff",
        "silver.advisers",
        "--against",
        "prod",
        "--key",
        "adviser_id",
    ]))
    .unwrap();
    assert_eq!(d["changed"].as_array().unwrap().len(), 8, "{d}");
    assert_eq!(d["added"].as_array().unwrap().len(), 0);

    // Promotion (after a second environment was cloned: it keeps prod's old files alive).
    run(&["env", "create", "ci"]);
    let promoted: Value = serde_json::from_str(&run(&["--json", "env", "promote", "dev"])).unwrap();
    assert_eq!(
        promoted["tables"].as_array().unwrap().len(),
        2,
        "{promoted}"
    );
    let teams = query(
        &p,
        &gcs,
        lake,
        landing,
        "select distinct team from silver.advisers",
    );
    assert!(
        teams.iter().all(|t| t["team"]
            .as_str()
            .unwrap()
            .chars()
            .all(|c| !c.is_lowercase())),
        "{teams:?}"
    );
    let v: Value = serde_json::from_str(&run(&[
        "--json",
        "vacuum",
        "silver.advisers",
        "--retain-hours",
        "0",
        "--force",
    ]))
    .unwrap();
    assert_eq!(v[0]["files_deleted"], serde_json::json!([]), "{v}");
    assert_eq!(v[0]["kept_for_envs"].as_array().unwrap().len(), 1, "{v}");
    // ci was cloned before the promotion: a change there no longer promotes, and says why.
    run(&[
        "--env",
        "ci",
        "build",
        "--full-refresh",
        "--select",
        "advisers",
    ]);
    let refused = cmd(&["env", "promote", "ci"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("silver.advisers moved"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let in_ci = ok(cmd(&[
        "--env",
        "ci",
        "query",
        "select count(*) as n from silver.advisers",
        "--format",
        "csv",
    ]));
    assert_eq!(in_ci.trim(), "n\n8", "{in_ci}");

    // Forget reaches both environments; an independent scan of the bucket finds nothing.
    let subject = "C0085";
    let needles = subject_needles(&p, &gcs, lake, landing, subject);
    run(&["forget", subject]);
    assert_eq!(
        objects_holding(&lake_store, "adviser-fees", &needles),
        Vec::<String>::new()
    );
    if envs_root.is_some() {
        assert_eq!(
            objects_holding(&env_store, &env_prefix, &needles),
            Vec::<String>::new()
        );
    }
    let verify = run(&["forget", "--verify", subject]);
    assert!(verify.contains(" 0 finding(s)"), "{verify}");

    // Dropping both leaves no object of theirs and prod whole.
    run(&["env", "drop", "ci"]);
    run(&["env", "drop", "dev"]);
    assert_eq!(object_names(&env_store, &env_prefix), Vec::<String>::new());
    let now: BTreeSet<String> = object_names(&lake_store, "adviser-fees")
        .into_iter()
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    assert!(!now.is_empty() && now != prod_parquet);
    let fees = query(
        &p,
        &gcs,
        lake,
        landing,
        "select count(*) as n from silver.stg_fees",
    );
    assert!(fees[0]["n"].as_i64().unwrap() > 0);
    for r in gcs.requests() {
        assert_eq!(r["client"], "127.0.0.1", "{r}");
    }
}
