//! GDPR erasure on the reference pipeline: `silt forget` removes one client from every layer, the
//! quarantine and the landing files; an independent scan of every file under both roots finds
//! none of the client's id or PII; gold equals a rebuild from scratch without the client; only
//! files holding the client are rewritten; purged versions fail with an error naming the request;
//! SIGKILL at several points and a re-run completes one request; pseudonymized silver columns.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::Value;

use crate::support::{Project, copy_dir, parquet_layout, repo, walk};

/// C0085 has fees in several months, a profile in the truncated clients file, a quarantined
/// fee row (extra column) and a name no other client shares.
const SUBJECT: &str = "C0085";
const KEY: &str = "adviser-fees-dev-key";

/// The reference pipeline after both deliveries (so silver.clients has SCD2 history).
fn pipeline() -> Project {
    let p = Project::reference();
    p.ok(&["run"]);
    copy_dir(&repo().join("fixtures/batch2"), &p.landing());
    p.ok(&["run"]);
    p
}

/// A `silt run`: its report and the rows it landed in bronze.
fn run_and_count_ingested(p: &Project) -> (Value, u64) {
    let run: Value = serde_json::from_str(&p.ok(&["--json", "run"])).unwrap();
    let rows = run["ingest"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["rows"].as_u64().unwrap())
        .sum();
    (run, rows)
}

/// Every cell of a Parquet file, as text.
pub(crate) fn parquet_cells(path: &Path) -> Vec<String> {
    let file = std::fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        for c in b.columns() {
            let f = ArrayFormatter::try_new(c.as_ref(), &FormatOptions::default()).unwrap();
            for i in 0..c.len() {
                out.push(f.value(i).to_string());
            }
        }
    }
    out
}

/// Files under `root` (decoded when Parquet, read as text otherwise) that hold any needle.
pub(crate) fn files_holding(root: &Path, needles: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    walk(root, &mut |p| {
        let texts = if p.extension().is_some_and(|e| e == "parquet") {
            parquet_cells(p)
        } else {
            vec![String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned()]
        };
        for n in needles {
            if texts.iter().any(|t| t.contains(n.as_str())) {
                found.push(format!("{} holds {n}", p.display()));
            }
        }
    });
    found
}

/// Live data files of a Delta table, through deltalake itself.
pub(crate) fn live_files(dir: &Path) -> BTreeSet<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = deltalake::open_table(url::Url::from_directory_path(dir).unwrap())
            .await
            .unwrap();
        t.snapshot()
            .unwrap()
            .log_data()
            .iter()
            .map(|f| f.path().to_string())
            .collect()
    })
}

pub(crate) fn subject_pii(p: &Project, subject: &str) -> Vec<String> {
    let rows = p.query(&format!(
        "select distinct full_name, email, nino from bronze.clients where client_id = '{subject}'"
    ));
    assert!(!rows.is_empty(), "{subject} has a bronze profile");
    let mut out: Vec<String> = rows
        .iter()
        .flat_map(|r| r.values().map(|v| v.as_str().unwrap().to_string()))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn gold_tables(p: &Project) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for t in [
        "dim_clients",
        "fct_monthly_revenue",
        "rpt_client_ltv",
        "rpt_adviser_ltv",
        "rpt_cohort_ltv",
    ] {
        let mut rows: Vec<String> = p
            .query(&format!("select * from gold.{t}"))
            .into_iter()
            .map(|r| Value::Object(r).to_string())
            .collect();
        rows.sort();
        out.insert(t.to_string(), rows);
    }
    out
}

#[test]
fn forget_removes_a_client_everywhere_and_gold_equals_a_rebuild_without_it() {
    let p = pipeline();
    let pii = subject_pii(&p, SUBJECT);
    let mut needles = vec![SUBJECT.to_string()];
    needles.extend(pii.iter().cloned());
    assert!(
        !files_holding(&p.lake(), &needles).is_empty()
            && !files_holding(&p.landing(), &needles).is_empty(),
        "the scan finds the client before the erasure"
    );
    // Which live files hold the client, per table, before.
    let tables = [
        "bronze/fees",
        "bronze/clients",
        "silver/stg_fees",
        "silver/clients",
        "_silt/quarantine/fees",
    ];
    let mut holding: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for t in tables {
        let dir = p.lake().join(t);
        let files = live_files(&dir)
            .into_iter()
            .filter(|f| {
                parquet_cells(&dir.join(f))
                    .iter()
                    .any(|c| c.contains(SUBJECT))
            })
            .collect::<BTreeSet<_>>();
        assert!(!files.is_empty(), "{t} holds {SUBJECT} before");
        holding.insert(
            t.replace("_silt/quarantine", "quarantine")
                .replace('/', "."),
            files,
        );
    }
    let months: BTreeSet<String> = p
        .query(&format!(
            "select distinct fee_month from silver.stg_fees where client_id = '{SUBJECT}'"
        ))
        .into_iter()
        .map(|r| r["fee_month"].as_str().unwrap().to_string())
        .collect();
    let revenue_dir = p.lake().join("gold/fct_monthly_revenue");
    let revenue_before = live_files(&revenue_dir);
    let fee_rows_before: i64 = p.count("select count(*) from bronze.fees");

    let out = p.ok(&["--json", "forget", SUBJECT, "--reason", "client request"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    let steps = report["steps"].as_array().unwrap();

    // Only the files that held the client were rewritten, and all of them were.
    for (t, files) in &holding {
        let rewritten: BTreeSet<String> = steps
            .iter()
            .filter(|s| s["table"] == *t && s["action"] == "rewrite")
            .flat_map(|s| s["files_rewritten"].as_array().unwrap().iter())
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        assert_eq!(&rewritten, files, "{t}: files rewritten");
    }
    // The partition_overwrite aggregate redid exactly the client's months; the others' files stay.
    let rebuilt: BTreeSet<String> = steps
        .iter()
        .find(|s| s["table"] == "gold.fct_monthly_revenue")
        .unwrap()["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(rebuilt, months);
    let revenue_after = live_files(&revenue_dir);
    for f in &revenue_before {
        let untouched = !months
            .iter()
            .any(|m| f.starts_with(&format!("fee_month={m}/")));
        assert_eq!(revenue_after.contains(f), untouched, "{f}");
    }
    assert!(fee_rows_before > p.count("select count(*) from bronze.fees"));
    // The rewritten files are encoded as their table's writer encodes them: bronze LZ4 (raw),
    // models Snappy in row groups of at most 32k rows; every step reports its wall time.
    for (t, codec) in [("bronze/fees", "LZ4_RAW"), ("silver/stg_fees", "SNAPPY")] {
        let dir = p.lake().join(t);
        let rewritten: Vec<String> = live_files(&dir)
            .into_iter()
            .filter(|f| !holding[&t.replace('/', ".")].contains(f))
            .collect();
        assert!(!rewritten.is_empty(), "{t}: new files after the erasure");
        for f in rewritten {
            let (codecs, largest) = parquet_layout(&dir.join(&f));
            assert_eq!(codecs, BTreeSet::from([codec.to_string()]), "{t}/{f}");
            assert!(largest <= 32 * 1024, "{t}/{f}: row group of {largest} rows");
        }
    }
    let step_ms: u64 = steps
        .iter()
        .map(|s| s["elapsed_ms"].as_u64().unwrap())
        .sum();
    assert!(
        step_ms <= report["elapsed_ms"].as_u64().unwrap(),
        "{report}"
    );

    // verify finds nothing, and neither does an independent scan of every file.
    let v = p.ok(&["forget", "--verify", SUBJECT]);
    assert!(v.contains(" 0 finding(s)"), "{v}");
    assert_eq!(files_holding(&p.lake(), &needles), Vec::<String>::new());
    assert_eq!(files_holding(&p.landing(), &needles), Vec::<String>::new());

    // Gold equals a rebuild from scratch on the rewritten landing files.
    let q = Project::empty_reference();
    let batch2: BTreeSet<String> = ["clients/clients_2026_07.json", "fees/fees_2026_07_b2.csv"]
        .into_iter()
        .map(String::from)
        .collect();
    let copy = |only_batch2: bool| {
        walk(&p.landing(), &mut |f| {
            let rel = f.strip_prefix(p.landing()).unwrap().display().to_string();
            if batch2.contains(&rel) == only_batch2 {
                let to = q.landing().join(&rel);
                std::fs::create_dir_all(to.parent().unwrap()).unwrap();
                std::fs::copy(f, to).unwrap();
            }
        });
    };
    copy(false);
    q.ok(&["run"]);
    copy(true);
    q.ok(&["run"]);
    assert_eq!(gold_tables(&p), gold_tables(&q));

    // The audit: one completed request, an HMAC of the id, never the id.
    let hmac = silt::build::pseudonym::hmac_hex(KEY, SUBJECT);
    let done = p.query("select * from _silt.erasures where status = 'completed'");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["subject_hmacs"], Value::from(hmac.clone()));
    assert_eq!(done[0]["reason"], Value::from("client request"));
    assert_eq!(done[0]["request_id"], report["request_id"]);
    assert!(files_holding(&p.lake().join("_silt/erasures"), &[SUBJECT.to_string()]).is_empty());
    assert!(!files_holding(&p.lake().join("_silt/erasures"), &[hmac]).is_empty());

    // A version the erasure purged fails with an error naming the request.
    let purge = steps
        .iter()
        .find(|s| s["table"] == "bronze.fees" && s["action"] == "purge")
        .unwrap();
    let from = purge["unreadable"][0].as_u64().unwrap();
    let out = p.run(&[
        "query",
        &format!("select count(*) from bronze.fees version as of {from}"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no longer readable") && err.contains(report["request_id"].as_str().unwrap()),
        "{err}"
    );
    // The version the erasure wrote is readable.
    let now = purge["version"].as_u64().unwrap();
    p.ok(&[
        "query",
        &format!("select count(*) from bronze.fees version as of {now}"),
    ]);

    // Nothing left to do: the next run ingests nothing and builds nothing.
    let (run, ingested) = run_and_count_ingested(&p);
    assert_eq!(ingested, 0);
    for m in run["models"].as_array().unwrap() {
        assert_eq!(m["status"], "up_to_date", "{m}");
    }

    // Forgetting again is a no-op with its own audit entry.
    let logs = p.log_files();
    let again: Value = serde_json::from_str(&p.ok(&["--json", "forget", SUBJECT])).unwrap();
    assert_eq!(again["rows_deleted"], 0);
    assert_ne!(again["request_id"], report["request_id"]);
    let data_logs = |l: Vec<String>| -> Vec<String> {
        l.into_iter()
            .filter(|f| !f.contains("_silt/erasures"))
            .collect()
    };
    assert_eq!(
        data_logs(p.log_files()),
        data_logs(logs),
        "no table but the audit changed"
    );
    assert_eq!(
        p.count("select count(*) from _silt.erasures where status = 'completed'"),
        2
    );

    // An unknown subject: nothing changes, the request is still audited.
    let logs = p.log_files();
    let unknown: Value = serde_json::from_str(&p.ok(&["--json", "forget", "C9999"])).unwrap();
    assert_eq!(unknown["rows_deleted"], 0);
    assert_eq!(data_logs(p.log_files()), data_logs(logs));
    assert_eq!(
        p.count(&format!(
            "select count(*) from _silt.erasures where status = 'completed' and subject_hmacs = '{}'",
            silt::build::pseudonym::hmac_hex(KEY, "C9999")
        )),
        1
    );

    // --as-of-run on a run whose versions were purged names the erasure too.
    let first_run = p.query("select run_id from _silt.runs order by started_at limit 1");
    let out = p.run(&[
        "query",
        "--as-of-run",
        first_run[0]["run_id"].as_str().unwrap(),
        "select count(*) from bronze.fees",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(report["request_id"].as_str().unwrap()),
        "{err}"
    );
}

#[test]
fn forget_killed_at_any_step_completes_on_rerun() {
    let p = pipeline();
    for (subject, fp) in [
        ("C0002", "forget.started"),
        ("C0006", "forget.landing_ledger#2"),
        ("C0009", "forget.table#4"),
        ("C0016", "forget.purge#2"),
        ("C0054", "forget.before_complete"),
    ] {
        let mut needles = vec![subject.to_string()];
        needles.extend(subject_pii(&p, subject));
        crate::support::kill_at_failpoint(p.cmd(&["forget", subject]), fp);
        let out = p.ok(&["forget", subject]);
        assert!(out.contains("(resumed)"), "{fp}: {out}");
        let v = p.ok(&["forget", "--verify", subject]);
        assert!(v.contains(" 0 finding(s)"), "{fp}: {v}");
        assert_eq!(
            files_holding(&p.lake(), &needles),
            Vec::<String>::new(),
            "{fp}"
        );
        assert_eq!(
            files_holding(&p.landing(), &needles),
            Vec::<String>::new(),
            "{fp}"
        );
        let hmac = silt::build::pseudonym::hmac_hex(KEY, subject);
        assert_eq!(
            p.count(&format!(
                "select count(distinct request_id) from _silt.erasures where status = 'completed' and subject_hmacs = '{hmac}'"
            )),
            1,
            "{fp}"
        );
    }
    // The pipeline is whole: landing files are not re-ingested and the data tests pass.
    assert_eq!(run_and_count_ingested(&p).1, 0);
}

#[test]
fn silver_pseudonymizes_pii_so_gold_never_sees_it() {
    let p = Project::reference();
    p.ok(&["run"]);
    let rows = p.query(
        "select b.client_id, b.full_name as raw_name, b.email as raw_email, b.nino as raw_nino, \
         s.full_name, s.email, s.nino from bronze.clients b join silver.clients s using (client_id)",
    );
    assert!(rows.len() > 50);
    let mut raw = Vec::new();
    for r in &rows {
        let s = |k: &str| r[k].as_str().unwrap().to_string();
        assert_eq!(
            s("email"),
            silt::build::pseudonym::hmac_hex(KEY, &s("raw_email"))
        );
        assert_eq!(
            s("nino"),
            silt::build::pseudonym::hmac_hex(KEY, &s("raw_nino"))
        );
        assert_eq!(s("full_name"), silt::build::pseudonym::mask(&s("raw_name")));
        assert_ne!(s("full_name"), s("raw_name"));
        raw.extend([s("raw_email"), s("raw_nino")]);
    }
    // RFC 4231 test case 2: the HMAC is the standard one.
    assert_eq!(
        silt::build::pseudonym::hmac_hex("Jefe", "what do ya want for nothing?"),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    assert_eq!(
        files_holding(&p.lake().join("gold"), &raw),
        Vec::<String>::new()
    );
    assert_eq!(
        files_holding(&p.lake().join("silver/clients"), &raw),
        Vec::<String>::new()
    );
}

#[test]
fn needles_match_whole_words_and_a_subject_key_wins() {
    use silt::ops::erasure::Needles;
    let mut n = Needles::default();
    n.ids.extend(["C0042".to_string(), "C004".to_string()]);
    n.pii.extend([
        "Jane Doe".to_string(),
        "jane@x.com".to_string(),
        "Zoë Ångström".to_string(),
    ]);
    let cases = [
        // Part of a longer word is no match, for every needle that overlaps there.
        ("fee,C00421,12.50", None),
        ("C0042_old", None),
        ("Jane Does", None),
        ("xC0042", None),
        // A needle standing alone after one that does not.
        ("C00421 C004", Some("subject key")),
        ("x,C0042,y", Some("subject key")),
        ("C0042", Some("subject key")),
        ("Dear Jane Doe,", Some("PII value")),
        ("mail jane@x.com.", Some("PII value")),
        ("«Zoë Ångström»", Some("PII value")),
        // The key wins over a PII value found before it.
        ("Jane Doe pays for C0042", Some("subject key")),
        ("", None),
    ];
    for (text, want) in cases {
        // The automaton and the one-search-per-needle fallback agree with the expected verdict.
        assert_eq!(n.find_in(text), want, "{text:?}");
        assert_eq!(n.find_in_each(text), want, "{text:?} (per needle)");
    }
    assert_eq!(Needles::default().find_in("C0042"), None);
}

/// The landing files a forget rewrote are known by path, size and etag afterwards: the next
/// ingest reads none of them again (before, it hashed each to find its content already known).
#[test]
fn after_a_forget_the_next_ingest_reads_no_rewritten_landing_file() {
    let p = pipeline();
    let out = p.ok(&["--json", "forget", SUBJECT, "--reason", "client request"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    let landing_rewritten: usize = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["table"].as_str().unwrap_or("").starts_with("landing"))
        .map(|s| s["files_rewritten"].as_array().map_or(0, |a| a.len()))
        .sum();
    assert!(
        landing_rewritten > 0,
        "the forget rewrote landing files: {report}"
    );
    let run = p.cmd(&["-v", "--json", "ingest"]).output().unwrap();
    assert!(run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    let ingest: Value = serde_json::from_slice(&run.stdout).unwrap();
    for s in ingest["sources"].as_array().unwrap() {
        assert_eq!(s["files_ingested"], 0, "{s}");
        assert_eq!(s["files_already_ingested"], s["files_listed"], "{s}");
    }
    assert!(
        !stderr.contains("hashed and classified"),
        "a landing file was read again:\n{stderr}"
    );
}

/// An erasure's (and a MERGE's) file jobs: a new one starts as soon as any running one ends,
/// not when the oldest does, and the results come in the jobs' order. The first job waits for
/// the last one, which can only start once the ones after the first have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_jobs_start_when_any_running_one_ends_and_keep_their_order() {
    use silt::lake::rewrite::{each_in_a_task, files_at_once};
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let quick = files_at_once() - 1;
    let mut jobs: Vec<
        std::pin::Pin<Box<dyn std::future::Future<Output = silt::Result<usize>> + Send>>,
    > = vec![Box::pin(async move {
        tokio::time::timeout(std::time::Duration::from_secs(20), rx)
            .await
            .map_err(|_| silt::Error::Internal("the last job never started".into()))?
            .map_err(|_| silt::Error::Internal("the last job dropped its signal".into()))?;
        Ok(0)
    })];
    for i in 1..=quick {
        jobs.push(Box::pin(async move { Ok(i) }));
    }
    jobs.push(Box::pin(async move {
        tx.send(()).ok();
        Ok(quick + 1)
    }));
    let got: Vec<usize> = each_in_a_task(jobs.into_iter(), "test jobs")
        .await
        .into_iter()
        .collect::<silt::Result<_>>()
        .unwrap();
    assert_eq!(got, (0..=quick + 1).collect::<Vec<_>>());
}
