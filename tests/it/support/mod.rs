//! Test support: a temp copy of the reference project, a runner for the real `silt` binary, and
//! readers for the fixture manifest and query results.

pub mod checks;
pub mod datasets;
pub mod emulators;
pub mod golden;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub const SILT: &str = env!("CARGO_BIN_EXE_silt");

/// The checkout under test. Cargo sets CARGO_MANIFEST_DIR when it runs the tests; the value
/// compiled in is only a fallback, since a shared target dir can reuse a binary built in
/// another clone of the repository.
pub fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A project in a temp dir: the reference silt.toml and sql/, its own landing and lake roots.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    /// The reference project with a copy of fixtures/landing.
    pub fn reference() -> Project {
        let p = Project::empty_reference();
        copy_dir(&repo().join("fixtures/landing"), &p.landing());
        p
    }

    /// The reference project's config with an empty landing root.
    pub fn empty_reference() -> Project {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::copy(repo().join("silt.toml"), dir.path().join("silt.toml")).unwrap();
        copy_dir(&repo().join("sql"), &dir.path().join("sql"));
        std::fs::create_dir_all(dir.path().join("landing")).unwrap();
        Project { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn landing(&self) -> PathBuf {
        self.dir.path().join("landing")
    }
    pub fn lake(&self) -> PathBuf {
        self.dir.path().join("lake")
    }

    /// A `silt` command for this project, with its roots set through the environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(SILT);
        c.arg("--project")
            .arg(self.path())
            .args(args)
            .env("SILT_LAKE", self.lake())
            .env("SILT_LANDING", self.landing())
            .env_remove("SILT_FAILPOINT")
            .env_remove("GOOGLE_APPLICATION_CREDENTIALS");
        c
    }

    /// Run silt and return its output, whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run silt")
    }

    /// Run silt and insist on exit code 0.
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_with_env(args, &[])
    }

    /// Run silt with these extra environment variables and insist on exit code 0.
    pub fn ok_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self
            .cmd(args)
            .envs(env.iter().copied())
            .output()
            .expect("run silt");
        assert!(
            out.status.success(),
            "silt {args:?} failed with {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run silt and insist on this exit code; its output.
    pub fn exits(&self, args: &[&str], code: i32) -> Output {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "silt {args:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Rows of a query, as JSON objects.
    pub fn query(&self, sql: &str) -> Vec<serde_json::Map<String, Value>> {
        let out = self.ok(&["query", sql, "--format", "json"]);
        let v: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"));
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_object().unwrap().clone())
            .collect()
    }

    /// One integer from a query returning one row and one column.
    pub fn count(&self, sql: &str) -> i64 {
        let rows = self.query(sql);
        assert_eq!(rows.len(), 1, "{sql}");
        rows[0]
            .values()
            .next()
            .and_then(|v| v.as_i64())
            .expect("an integer")
    }

    /// Every Delta log entry file under the lake, sorted, for "nothing was written" checks.
    pub fn log_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.lake(), &mut |p| {
            if p.components().any(|c| c.as_os_str() == "_delta_log") {
                out.push(p.display().to_string());
            }
        });
        out.sort();
        out
    }
}

/// `silt --json <args>` on `p`, insisting on exit code 0, as JSON.
pub fn json(p: &Project, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let out = p.ok(&a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}): {out}"))
}

/// One model's entry in a run report.
pub fn model<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["model"] == name)
        .unwrap_or_else(|| panic!("{name} in {report}"))
}

/// The models of a run report, in its order.
pub fn model_names(report: &Value) -> Vec<String> {
    report["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model"].as_str().unwrap().to_string())
        .collect()
}

/// Start `cmd` with `SILT_FAILPOINT=failpoint`, wait until it stops there, SIGKILL it.
pub fn kill_at_failpoint(mut cmd: Command, failpoint: &str) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .env("SILT_FAILPOINT", failpoint)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("failpoint") {
                let _ = tx.send(());
            }
        }
    });
    let reached = rx.recv_timeout(std::time::Duration::from_secs(120)).is_ok();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(reached, "failpoint {failpoint} was never reached");
}

pub fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let dest = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// fixtures/MANIFEST.json: every planted bad record, and the good rows of each file.
pub struct Manifest {
    pub bad: Vec<Bad>,
    pub files: serde_json::Map<String, Value>,
    pub batch2: Value,
    pub march_fix: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bad {
    pub file: String,
    pub line: i64,
    pub column: Option<String>,
    pub kind: String,
}

impl Manifest {
    pub fn load() -> Manifest {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(repo().join("fixtures/MANIFEST.json")).unwrap(),
        )
        .unwrap();
        let bad = v["bad"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| Bad {
                file: b["file"].as_str().unwrap().into(),
                line: b["line"].as_i64().unwrap(),
                column: b["column"].as_str().map(String::from),
                kind: b["kind"].as_str().unwrap().into(),
            })
            .collect();
        Manifest {
            bad,
            files: v["files"].as_object().unwrap().clone(),
            batch2: v["batch2"].clone(),
            march_fix: v["march_fix"].clone(),
        }
    }

    pub fn good_rows(&self, prefix: &str) -> i64 {
        self.files
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v["good_rows"].as_i64().unwrap())
            .sum()
    }
}

/// The compression codecs of a Parquet file's column chunks, and its largest row group's rows.
pub fn parquet_layout(path: &Path) -> (BTreeSet<String>, i64) {
    use parquet::file::reader::FileReader;
    let r = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(path).unwrap())
        .unwrap();
    let md = r.metadata();
    let codecs = md
        .row_groups()
        .iter()
        .flat_map(|rg| {
            rg.columns()
                .iter()
                .map(|c| format!("{:?}", c.compression()))
        })
        .collect();
    let largest = md
        .row_groups()
        .iter()
        .map(|rg| rg.num_rows())
        .max()
        .unwrap_or(0);
    (codecs, largest)
}

/// The encodings of one column's chunks in a Parquet file.
pub fn column_encodings(path: &Path, column: &str) -> BTreeSet<String> {
    use parquet::file::reader::FileReader;
    let r = parquet::file::reader::SerializedFileReader::new(std::fs::File::open(path).unwrap())
        .unwrap();
    r.metadata()
        .row_groups()
        .iter()
        .flat_map(|rg| rg.columns().iter())
        .filter(|c| c.column_path().string() == column)
        .flat_map(|c| c.encodings().map(|e| format!("{e:?}")).collect::<Vec<_>>())
        .collect()
}

/// The physical plan a session makes of `sql` (panics on a planning error).
pub async fn physical_plan(
    ctx: &datafusion::prelude::SessionContext,
    sql: &str,
) -> std::sync::Arc<dyn datafusion::physical_plan::ExecutionPlan> {
    ctx.sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .create_physical_plan()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}
