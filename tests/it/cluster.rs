//! The cluster (Apache Ballista inside the silt binary): a scheduler and two executors started
//! as separate `silt` processes on free loopback ports; the reference pipeline, an incremental
//! batch and a forget built through them equal the same steps run locally; tasks ran on both
//! executors; an executor killed mid-build leaves nothing half-committed and a re-run
//! completes; an unreachable scheduler is exit 3 at once.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::datasets::{flights, orders_project};
use crate::support::golden::{GOLD, golden, sorted_csv};
use crate::support::{Project, SILT, copy_dir, repo};

/// A port nothing listens on now, whose next port is free too (an executor takes both).
fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

fn wait_listening(port: u16, what: &str) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Node {
    child: Option<Child>,
    log: PathBuf,
}

impl Node {
    fn start(args: &[String], log: PathBuf, env: &[(&str, String)]) -> Node {
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(SILT)
            .args(args)
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
            .env_remove("SILT_CLUSTER")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start silt");
        Node {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Tasks this executor reported running.
    fn tasks(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains(": task ") && l.contains(" job="))
            .count()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scheduler and two executors on 127.0.0.1, torn down on drop (also when a test fails).
struct Cluster {
    url: String,
    executors: Vec<Node>,
    _scheduler: Node,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// With this environment for every node (the credentials they read a lake with).
    fn start_with(env: &[(&str, String)]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port_pair();
        let scheduler = Node::start(
            &[
                "scheduler".into(),
                "--bind".into(),
                format!("127.0.0.1:{port}"),
                "--executor-timeout-secs".into(),
                "6".into(),
            ],
            dir.path().join("scheduler.log"),
            env,
        );
        wait_listening(port, "the scheduler");
        let mut executors = Vec::new();
        for i in 0..2 {
            let p = free_port_pair();
            let work = dir.path().join(format!("executor{i}"));
            std::fs::create_dir_all(&work).unwrap();
            executors.push(Node::start(
                &[
                    "executor".into(),
                    "--scheduler".into(),
                    format!("127.0.0.1:{port}"),
                    "--bind".into(),
                    format!("127.0.0.1:{p}"),
                    "--concurrent-tasks".into(),
                    "2".into(),
                    "--work-dir".into(),
                    work.display().to_string(),
                    "--memory-limit-mb".into(),
                    "256".into(),
                    "--heartbeat-secs".into(),
                    "2".into(),
                ],
                dir.path().join(format!("executor{i}.log")),
                env,
            ));
            wait_listening(p, "an executor");
            wait_listening(p + 1, "an executor's gRPC service");
        }
        // Registration follows the listeners by a heartbeat at most.
        std::thread::sleep(Duration::from_secs(3));
        Cluster {
            url: format!("df://127.0.0.1:{port}"),
            executors,
            _scheduler: scheduler,
            _dir: dir,
        }
    }

    fn tasks(&self) -> Vec<usize> {
        self.executors.iter().map(Node::tasks).collect()
    }
}

/// `args` through the cluster.
fn on(c: &Cluster, args: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["--cluster".into(), c.url.clone()];
    a.extend(args.iter().map(|s| s.to_string()));
    a
}

fn ok_on(p: &Project, c: &Cluster, args: &[&str]) -> String {
    let a = on(c, args);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    p.ok(&a)
}

/// Every data column of a table (not silt's `_` stamps: run ids), all rows, sorted: equal
/// tables give equal text.
fn content(p: &Project, table: &str) -> String {
    let (layer, name) = table.split_once('.').unwrap();
    let cols: Vec<String> = p
        .query(&format!(
            "select column_name from information_schema.columns where table_schema = '{layer}' \
             and table_name = '{name}' and column_name not like '\\_%' escape '\\' \
             order by ordinal_position"
        ))
        .into_iter()
        .map(|r| format!("\"{}\"", r["column_name"].as_str().unwrap()))
        .collect();
    assert!(!cols.is_empty(), "{table} has no data columns");
    let mut rows: Vec<String> = p
        .query(&format!("select {} from {table}", cols.join(", ")))
        .into_iter()
        .map(|r| serde_json::Value::Object(r).to_string())
        .collect();
    rows.sort();
    rows.join("\n")
}

fn tables(p: &Project) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&p.ok(&["--json", "tables"])).unwrap();
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap().to_string())
        .filter(|t| {
            ["bronze.", "silver.", "gold."]
                .iter()
                .any(|l| t.starts_with(l))
        })
        .collect();
    out.sort();
    out
}

fn assert_same_lakes(local: &Project, remote: &Project, when: &str) {
    let names = tables(local);
    assert_eq!(tables(remote), names, "{when}: the same tables");
    for t in &names {
        let (r, l) = (content(remote, t), content(local, t));
        if r != l {
            let first = r
                .lines()
                .zip(l.lines())
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("cluster: {a}\nlocal:   {b}"))
                .unwrap_or_else(|| format!("{} vs {} rows", r.lines().count(), l.lines().count()));
            panic!("{when}: {t} built through the cluster differs from the local build\n{first}");
        }
    }
}

/// The same bronze for two lakes: what `local` ingested, copied into `remote`'s lake (its
/// tables, quarantine and ledger), so load times match and only the builds can differ.
fn share_bronze(local: &Project, remote: &Project) {
    for d in ["bronze", "_silt/quarantine", "_silt/ledger"] {
        let from = local.lake().join(d);
        if from.exists() {
            copy_dir(&from, &remote.lake().join(d));
        }
    }
}

#[test]
fn the_reference_pipeline_through_a_cluster_equals_the_local_build() {
    let c = Cluster::start();
    let local = Project::reference();
    let remote = Project::reference();
    local.ok(&["ingest"]);
    share_bronze(&local, &remote);
    local.ok(&["build"]);
    ok_on(&remote, &c, &["build"]);
    for g in GOLD {
        let got = ok_on(
            &remote,
            &c,
            &[
                "query",
                &format!("select * from gold.{g}"),
                "--format",
                "csv",
            ],
        );
        assert_eq!(sorted_csv(&got), golden(g), "gold.{g} through the cluster");
    }
    assert_same_lakes(&local, &remote, "first build");
    let after_build = c.tasks();
    assert!(
        after_build.iter().all(|&n| n > 0),
        "tasks ran on both executors: {after_build:?}"
    );

    // An incremental batch, then a forget, each through the cluster.
    copy_dir(&repo().join("fixtures/batch2"), &local.landing());
    local.ok(&["ingest"]);
    share_bronze(&local, &remote);
    local.ok(&["build"]);
    ok_on(&remote, &c, &["build"]);
    assert_same_lakes(&local, &remote, "incremental batch");
    let after_batch = c.tasks();
    assert!(
        after_batch.iter().sum::<usize>() > after_build.iter().sum::<usize>(),
        "the batch ran on the cluster: {after_build:?} → {after_batch:?}"
    );
    copy_dir(&repo().join("fixtures/batch2"), &remote.landing());
    local.ok(&["forget", "C0085", "--reason", "test"]);
    ok_on(&remote, &c, &["forget", "C0085", "--reason", "test"]);
    assert_same_lakes(&local, &remote, "forget");
    assert_eq!(
        remote.count("select count(*) from silver.stg_fees where client_id = 'C0085'"),
        0
    );
    assert!(c.tasks().iter().sum::<usize>() > after_batch.iter().sum::<usize>());
}

#[test]
fn outside_data_through_a_cluster_equals_the_local_build() {
    let c = Cluster::start();
    // Month-partitioned flights; TPC-H-like orders, line items and customers with a join.
    for (name, make) in [
        ("flights", flights as fn() -> Project),
        ("orders", orders_project as fn() -> Project),
    ] {
        let (local, remote) = (make(), make());
        local.ok(&["run"]);
        ok_on(&remote, &c, &["run"]);
        assert_same_lakes(&local, &remote, name);
        if name == "flights" {
            // A filter on the partition column, through a table alias, prunes to one month.
            let sql = "select count(*) as n, min(s.flight_month) as lo, max(s.flight_month) as hi \
                       from silver.stg_flights s where s.flight_month = '2024-01'";
            let got = ok_on(&remote, &c, &["query", sql, "--format", "csv"]);
            assert_eq!(got.lines().nth(1), Some("40,2024-01,2024-01"), "{got}");
        }
        if name == "orders" {
            local.ok(&["forget", "42"]);
            ok_on(&remote, &c, &["forget", "42"]);
            assert_same_lakes(&local, &remote, "orders after forget 42");
        }
    }
}

/// Kill an executor as soon as the build's first task runs on it.
#[test]
fn an_executor_killed_mid_build_leaves_nothing_half_done_and_a_rerun_completes() {
    let mut c = Cluster::start();
    let p = Project::reference();
    p.ok(&["ingest"]);
    let logs_before = p.log_files();
    let a = on(&c, &["build"]);
    let mut build = p
        .cmd(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let victim = loop {
        if let Some(i) = c.executors.iter().position(|e| e.tasks() > 0) {
            break Some(i);
        }
        if build.try_wait().unwrap().is_some() || start.elapsed() > Duration::from_secs(120) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let victim = victim.expect("the build ran a task on the cluster before it ended");
    c.executors[victim].kill();
    let out = build.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "executor {victim} killed mid-build: the build exited {:?}",
        out.status.code()
    );
    match out.status.code() {
        Some(0) => {} // Ballista ran the lost tasks again on the other executor.
        Some(3) => {
            assert!(
                stderr.contains(&c.url),
                "a failed build names the cluster: {stderr}"
            );
            // Nothing half-committed: every table that changed has a complete new version
            // (a model's data and its build state are one commit), and the re-run completes.
        }
        other => panic!("build exited {other:?}: {stderr}"),
    }
    assert!(p.log_files().len() >= logs_before.len());
    ok_on(&p, &c, &["build"]);
    for g in GOLD {
        let got = p.ok(&[
            "query",
            &format!("select * from gold.{g}"),
            "--format",
            "csv",
        ]);
        assert_eq!(sorted_csv(&got), golden(g), "gold.{g} after the re-run");
    }
    let survivor = 1 - victim;
    assert!(c.executors[survivor].tasks() > 0);
}

#[test]
fn an_unreachable_scheduler_is_exit_3_at_once_naming_it() {
    let p = Project::reference();
    let port = free_port_pair();
    let url = format!("df://127.0.0.1:{port}");
    let start = Instant::now();
    let out = p.exits(&["--cluster", &url, "query", "select 1"], 3);
    assert!(start.elapsed() < Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&url), "{stderr}");
    // A malformed address is a usage error.
    p.exits(&["--cluster", "nowhere", "query", "select 1"], 2);
}

/// The same on gs:// roots (the GCS emulator): executors read the lake with their own explicit
/// credentials, and nothing asks a metadata server.
#[test]
fn the_reference_pipeline_on_gcs_through_a_cluster_is_golden() {
    use crate::gcs::{Faults, Gcs, ok, on_gcs, upload};
    let gcs = Gcs::start(Faults::default());
    let c = Cluster::start_with(&[
        (
            "GOOGLE_APPLICATION_CREDENTIALS",
            gcs.key.display().to_string(),
        ),
        ("GCE_METADATA_HOST", format!("127.0.0.1:{}", gcs.port)),
        ("GCE_METADATA_IP", format!("127.0.0.1:{}", gcs.port)),
    ]);
    let p = Project::empty_reference();
    let (lake, landing) = ("gs://lake/clustered", "gs://landing/incoming");
    upload(
        &gcs.store("landing"),
        &repo().join("fixtures/landing"),
        "incoming",
    );
    let run = |args: &[&str]| {
        ok(on_gcs(
            &p,
            &gcs,
            lake,
            landing,
            &on(&c, args).iter().map(String::as_str).collect::<Vec<_>>(),
        ))
    };
    run(&["run"]);
    for g in GOLD {
        let got = run(&[
            "query",
            &format!("select * from gold.{g}"),
            "--format",
            "csv",
        ]);
        assert_eq!(
            sorted_csv(&got),
            golden(g),
            "gold.{g} on gs:// through the cluster"
        );
    }
    assert!(c.tasks().iter().all(|&n| n > 0), "{:?}", c.tasks());
    for r in gcs.requests() {
        assert!(!r.to_string().contains("computeMetadata"), "{r}");
    }
}
