//! Landing → bronze: the reference fixtures, exactly-once under SIGKILL, bad input, file
//! policies, and the Delta tables themselves (exactly once, bad input never panics, PII out of statistics).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::checks::{assert_exactly_once, quarantine_rows};
use crate::support::{Manifest, Project, repo, walk};

#[test]
fn fixtures_land_in_bronze_and_quarantine_exactly() {
    let p = Project::reference();
    let m = Manifest::load();
    p.ok(&["ingest"]);
    assert_exactly_once(&p, &m);
    // Each reason names its column.
    for (b, reason) in quarantine_rows(&p) {
        if let Some(c) = &b.column {
            assert!(
                reason.contains(c.as_str()),
                "reason for {b:?} does not name '{c}': {reason}"
            );
        } else {
            assert!(
                reason.contains("JSON"),
                "a record-level reason says what broke: {reason}"
            );
        }
    }
}

#[test]
fn quoted_fields_crlf_and_bom_parse_like_an_independent_reader() {
    let p = Project::reference();
    p.ok(&["ingest", "--source", "fees"]);
    let quarantined: BTreeSet<String> = p
        .query("select raw_record from quarantine.fees")
        .iter()
        .map(|r| {
            r["raw_record"]
                .as_str()
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut want = BTreeMap::new();
    let dir = repo().join("fixtures/landing/fees");
    for f in [
        "fees_2026_01.csv",
        "fees_2026_02.csv",
        "fees_2026_03.csv",
        "fees_2026_04.csv",
        "fees_2026_05.csv",
        "fees_2026_06.csv",
    ] {
        let data = std::fs::read(dir.join(f)).unwrap();
        let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&data).to_vec();
        let mut rdr = csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(&data[..]);
        for rec in rdr.byte_records() {
            let rec = rec.unwrap();
            let id = String::from_utf8_lossy(&rec[0]).to_string();
            if quarantined.contains(&id) {
                continue;
            }
            let note = String::from_utf8(rec[6].to_vec()).unwrap();
            want.insert(id, if note.is_empty() { None } else { Some(note) });
        }
    }
    let got: BTreeMap<String, Option<String>> = p
        .query("select fee_id, note from bronze.fees")
        .iter()
        .map(|r| {
            (
                r["fee_id"].as_str().unwrap().to_string(),
                r.get("note").and_then(|v| v.as_str()).map(String::from),
            )
        })
        .collect();
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
    assert!(
        got.values().flatten().any(|n| n.contains(",\n")),
        "a note with a comma and a newline survives"
    );
    assert!(
        got.values().flatten().all(|n| !n.contains('\r')),
        "CRLF endings leave no \\r behind"
    );
}

/// Ingest splits CSV with its own reader (`silt::ingest::parse::csv_records`); the csv crate is the
/// reference. Random inputs built from the bytes that matter (delimiters, quotes, doubled
/// quotes, CR, LF, CRLF, spaces, multi-byte UTF-8) must give the same records, fields, lines
/// and raw bytes.
#[test]
fn the_record_splitter_reads_random_csv_as_the_csv_crate_does() {
    use silt::ingest::parse::csv_records::Records;
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let trim = |b: &[u8]| -> Vec<u8> {
        let s = b
            .iter()
            .position(|c| *c != b'\n' && *c != b'\r')
            .unwrap_or(b.len());
        let e = b
            .iter()
            .rposition(|c| *c != b'\n' && *c != b'\r')
            .map_or(s, |e| e + 1);
        b[s..e.max(s)].to_vec()
    };
    let mut records = 0;
    for case in 0..20_000 {
        let (delim, quote) = if case % 3 == 0 {
            (b';', b'\'')
        } else {
            (b',', b'"')
        };
        let pieces: [&[u8]; 12] = [
            b"a",
            b"bc",
            &[delim],
            &[delim],
            &[quote],
            &[quote, quote],
            b"\n",
            b"\r",
            b"\r\n",
            b" ",
            "\u{e9}".as_bytes(),
            b"12",
        ];
        let mut data = Vec::new();
        for _ in 0..next() % 40 {
            data.extend_from_slice(pieces[(next() % 12) as usize]);
        }
        let mut ours = Records::new(&data, delim, quote);
        let mut rdr = csv::ReaderBuilder::new()
            .delimiter(delim)
            .quote(quote)
            .has_headers(false)
            .flexible(true)
            .from_reader(&data[..]);
        let mut rec = csv::ByteRecord::new();
        let mut start = rdr.position().clone();
        loop {
            let more = rdr.read_byte_record(&mut rec).unwrap();
            let got = ours.next_record();
            let shown = String::from_utf8_lossy(&data);
            if !more {
                assert!(got.is_none(), "{shown:?}: an extra record");
                break;
            }
            let got = got.unwrap_or_else(|| panic!("{shown:?}: a record is missing"));
            records += 1;
            let end = rdr.position().clone();
            let raw = &data[start.byte() as usize..end.byte() as usize];
            let line = start.line()
                + raw
                    .iter()
                    .take_while(|b| **b == b'\n' || **b == b'\r')
                    .filter(|b| **b == b'\n')
                    .count() as u64;
            start = end;
            let want: Vec<&[u8]> = rec.iter().collect();
            let have: Vec<&[u8]> = ours.iter().collect();
            assert_eq!(have, want, "{shown:?}: fields");
            assert_eq!(got.line, line, "{shown:?}: line");
            assert_eq!(
                trim(&data[got.start..got.end]),
                trim(raw),
                "{shown:?}: raw bytes"
            );
        }
    }
    assert!(records > 50_000, "the inputs hold records ({records})");
}

#[test]
fn nested_json_becomes_structs_and_lists() {
    let p = Project::reference();
    p.ok(&["ingest", "--source", "clients"]);
    let doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo().join("fixtures/landing/clients/clients_2026_01.json")).unwrap(),
    )
    .unwrap();
    for c in doc.as_array().unwrap().iter().take(5) {
        let id = c["client_id"].as_str().unwrap();
        let rows = p.query(&format!(
            "select address['city'] as city, address['postcode'] as postcode, accounts, date_of_birth from bronze.clients where client_id = '{id}'"
        ));
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["city"], c["address"]["city"]);
        assert_eq!(rows[0]["postcode"], c["address"]["postcode"]);
        assert_eq!(rows[0]["accounts"], c["accounts"]);
        assert_eq!(rows[0]["date_of_birth"], c["date_of_birth"]);
    }
}

#[test]
fn a_second_run_writes_no_new_version() {
    let p = Project::reference();
    p.ok(&["ingest"]);
    let before = p.log_files();
    assert!(!before.is_empty());
    p.ok(&["ingest"]);
    assert_eq!(p.log_files(), before);
    p.ok(&["run"]);
    let before = p.log_files();
    p.ok(&["ingest"]);
    p.ok(&["run"]);
    assert_eq!(p.log_files(), before);
}

#[test]
fn the_ledger_records_empty_header_only_and_duplicate_files() {
    let p = Project::reference();
    p.ok(&["ingest"]);
    let rows =
        p.query("select path, status, rows, quarantined, detail from _silt.ledger order by path");
    let status: BTreeMap<String, String> = rows
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        status.len(),
        Manifest::load().files.len(),
        "one ledger row per landing file"
    );
    assert_eq!(status["fees/fees_2026_07_empty.csv"], "empty");
    assert_eq!(status["fees/fees_2026_07.csv"], "empty");
    assert_eq!(status["fees/fees_2026_03_resent.csv"], "duplicate");
    assert_eq!(status["fees/fees_2026_03.csv"], "ingested");
    assert_eq!(
        p.count(
            "select count(*) from bronze.fees where _source_file = 'fees/fees_2026_03_resent.csv'"
        ),
        0
    );
}

/// Start `silt ingest` (one file per commit) with a failpoint and SIGKILL it there.
fn kill_at(p: &Project, failpoint: &str) {
    let mut c = p.cmd(&["ingest"]);
    c.env("SILT_INGEST_BATCH_FILES", "1");
    crate::support::kill_at_failpoint(c, failpoint);
}

#[test]
fn sigkill_at_every_commit_step_then_rerun_is_exactly_once() {
    let m = Manifest::load();
    for fp in [
        "ingest.after_quarantine#1",
        "ingest.after_bronze#1",
        "ingest.after_bronze#4",
        "ingest.after_ledger#2",
        "ingest.after_quarantine#3",
    ] {
        let p = Project::reference();
        kill_at(&p, fp);
        // Killed again on the re-run, at a later step, before a clean finish.
        kill_at(&p, "ingest.after_bronze#2");
        p.ok(&["ingest"]);
        assert_exactly_once(&p, &m);
    }
}

#[test]
fn sigkill_at_random_moments_then_rerun_is_exactly_once() {
    let m = Manifest::load();
    let p = Project::reference();
    for delay_ms in [30u64, 120, 300, 700, 1200] {
        let mut child = p
            .cmd(&["ingest"])
            .env("SILT_INGEST_BATCH_FILES", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(delay_ms) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        child.wait().unwrap();
    }
    p.ok(&["ingest"]);
    assert_exactly_once(&p, &m);
}

fn write(p: &Project, rel: &str, data: &[u8]) {
    let path = p.landing().join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn set_policy(p: &Project, source: &str, key: &str, value: &str) {
    let f = p.path().join(format!("sql/bronze/{source}.toml"));
    let text = std::fs::read_to_string(&f).unwrap();
    let re: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(&format!("{key} =")) {
                format!("{key} = \"{value}\"")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&f, re.join("\n")).unwrap();
}

const HEADER: &str = "fee_id,client_id,adviser_id,fee_date,fee_amount,currency,note";

#[test]
fn reject_file_policy_names_file_line_column_and_fix_and_keeps_other_files() {
    let p = Project::empty_reference();
    set_policy(&p, "fees", "on_unexpected_column", "reject_file");
    write(
        &p,
        "fees/good.csv",
        format!("{HEADER}\nF1,C1,A1,2026-01-01,10.00,GBP,\n").as_bytes(),
    );
    write(
        &p,
        "fees/extra.csv",
        format!("{HEADER},channel\nF2,C1,A1,2026-01-02,11.00,GBP,,web\n").as_bytes(),
    );
    let out = p.run(&["ingest", "--source", "fees"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fees/extra.csv:1 column 'channel'"), "{err}");
    assert!(err.contains("fix:"), "{err}");
    assert_eq!(p.count("select count(*) from bronze.fees"), 1);
    assert_eq!(
        p.count("select count(*) from _silt.ledger where path = 'fees/extra.csv'"),
        0
    );
    // Refused files are not forgotten: the next run refuses it again.
    assert_eq!(
        p.run(&["ingest", "--source", "fees"]).status.code(),
        Some(2)
    );
    // The ignore policy takes the rows and drops the column.
    set_policy(&p, "fees", "on_unexpected_column", "ignore");
    p.ok(&["ingest", "--source", "fees"]);
    assert_eq!(p.count("select count(*) from bronze.fees"), 2);
}

#[test]
fn unexpected_column_under_quarantine_policy_quarantines_only_rows_using_it() {
    let p = Project::empty_reference();
    write(&p, "fees/extra.csv", format!("{HEADER},channel\nF2,C1,A1,2026-01-02,11.00,GBP,,web\nF3,C1,A1,2026-01-02,12.00,GBP,,\n").as_bytes());
    p.ok(&["ingest", "--source", "fees"]);
    assert_eq!(p.count("select count(*) from bronze.fees"), 1);
    let q = p.query("select _source_line, column_name from quarantine.fees");
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["_source_line"], 2);
    assert_eq!(q[0]["column_name"], "channel");
}

#[test]
fn structural_errors_are_clear_and_never_panic() {
    let p = Project::empty_reference();
    // A header without a required column.
    write(
        &p,
        "fees/no_date.csv",
        b"fee_id,client_id,adviser_id,fee_amount,currency,note\nF1,C1,A1,1.00,GBP,\n",
    );
    // A top-level array where one object per line is declared.
    write(
        &p,
        "advisers/array.ndjson",
        b"[{\"adviser_id\": \"A1\", \"name\": \"X\"}]\n",
    );
    // Objects per line where a top-level array is declared.
    write(&p, "clients/lines.json", b"{\"client_id\": \"C1\"}\n");
    let out = p.run(&["ingest"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("fees/no_date.csv:1 column 'fee_date'") && err.contains("not null"),
        "{err}"
    );
    assert!(
        err.contains("advisers/array.ndjson:1") && err.contains("json_array"),
        "{err}"
    );
    assert!(
        err.contains("clients/lines.json:1") && err.contains("ndjson"),
        "{err}"
    );
    assert!(err.matches("fix:").count() >= 3, "{err}");
}

#[test]
fn garbage_input_never_panics() {
    let p = Project::empty_reference();
    let mut junk = Vec::new();
    for i in 0..2000u32 {
        junk.push((i.wrapping_mul(2654435761) >> 13) as u8);
    }
    write(&p, "fees/junk.csv", &junk);
    write(&p, "advisers/junk.ndjson", &junk);
    write(&p, "clients/junk.json", &[b"[".as_slice(), &junk].concat());
    write(
        &p,
        "fees/unterminated.csv",
        format!("{HEADER}\nF1,C1,A1,2026-01-01,1.00,GBP,\"never closed\n").as_bytes(),
    );
    let out = p.run(&["ingest"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(matches!(out.status.code(), Some(0) | Some(2)), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn changed_file_policies() {
    let v1 = format!("{HEADER}\nF1,C1,A1,2026-01-01,10.00,GBP,\nF2,C1,A1,2026-01-02,bad,GBP,\n");
    let v2 = format!(
        "{HEADER}\nF1,C1,A1,2026-01-01,10.50,GBP,corrected\nF2,C1,A1,2026-01-02,20.00,GBP,\nF3,C2,A1,2026-01-03,5.00,GBP,\n"
    );
    for (policy, bronze, quarantine, code) in [
        ("ingest", 4, 1, 0),
        ("replace", 3, 0, 0),
        ("skip", 1, 1, 0),
        ("error", 1, 1, 2),
    ] {
        let p = Project::empty_reference();
        set_policy(&p, "fees", "on_changed_file", policy);
        write(&p, "fees/f.csv", v1.as_bytes());
        p.ok(&["ingest", "--source", "fees"]);
        write(&p, "fees/f.csv", v2.as_bytes());
        let out = p.run(&["ingest", "--source", "fees"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{policy}: {err}");
        assert!(err.contains("changed"), "{policy}: the user is told: {err}");
        assert_eq!(
            p.count("select count(*) from bronze.fees"),
            bronze,
            "{policy}"
        );
        assert_eq!(
            p.count("select count(*) from quarantine.fees"),
            quarantine,
            "{policy}"
        );
        // And a further run changes nothing.
        let before = p.log_files();
        p.run(&["ingest", "--source", "fees"]);
        assert_eq!(p.log_files(), before, "{policy}: re-run is a no-op");
    }
}

fn commit_infos(table_dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut logs: Vec<std::path::PathBuf> = std::fs::read_dir(table_dir.join("_delta_log"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    logs.sort();
    logs.iter()
        .map(|l| {
            std::fs::read_to_string(l)
                .unwrap()
                .lines()
                .map(|x| serde_json::from_str::<serde_json::Value>(x).unwrap())
                .find(|a| a.get("commitInfo").is_some())
                .expect("a commitInfo action")["commitInfo"]
                .clone()
        })
        .collect()
}

fn table_dirs(lake: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut dirs = Vec::new();
    walk(lake, &mut |f| {
        if f.parent().is_some_and(|d| d.ends_with("_delta_log")) {
            let t = f.parent().unwrap().parent().unwrap().to_path_buf();
            if !dirs.contains(&t) {
                dirs.push(t);
            }
        }
    });
    dirs.sort();
    dirs
}

#[test]
fn tables_are_real_delta_tables_with_operations_in_every_commit() {
    let p = Project::reference();
    let out = p.run(&["ingest"]);
    assert!(out.status.success());
    // A changed file adds versions to check.
    write(
        &p,
        "fees/fees_2026_08.csv",
        format!("{HEADER}\nF9,C0001,A001,2026-08-01,10.00,GBP,\n").as_bytes(),
    );
    p.ok(&["ingest"]);
    let dirs = table_dirs(&p.lake());
    assert_eq!(
        dirs.len(),
        8,
        "3 bronze, 3 quarantine, the ledger, the batch statistics: {dirs:?}"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    for d in dirs {
        let infos = commit_infos(&d);
        for (v, info) in infos.iter().enumerate() {
            assert_eq!(info["operation"], "WRITE", "{} v{v}", d.display());
            assert!(
                info["silt.operation"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("ingest")),
                "{} v{v}: {info}",
                d.display()
            );
            assert!(info["silt.batch_id"].is_string());
        }
        let url = url::Url::from_directory_path(&d).unwrap();
        rt.block_on(async {
            for v in 0..infos.len() as u64 {
                let mut t = deltalake::DeltaTableBuilder::from_url(url.clone())
                    .unwrap()
                    .build()
                    .unwrap();
                t.load_version(v)
                    .await
                    .unwrap_or_else(|e| panic!("{} v{v}: {e}", d.display()));
                assert_eq!(t.version(), Some(v));
            }
        });
    }
}

/// Bronze ids and line numbers are delta-encoded (no dictionary), every other column keeps
/// its dictionary, the codec is LZ4, and the delta-encoded values read back as landed.
#[test]
fn bronze_delta_encodes_the_key_and_line_numbers() {
    use parquet::basic::{Compression, Encoding};
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let p = Project::reference();
    p.ok(&["ingest", "--source", "fees"]);
    let mut files = Vec::new();
    walk(&p.lake().join("bronze/fees"), &mut |f| {
        if f.extension().is_some_and(|x| x == "parquet") {
            files.push(f.to_path_buf());
        }
    });
    assert!(!files.is_empty());
    let mut ids = Vec::new();
    for f in &files {
        let r = SerializedFileReader::new(std::fs::File::open(f).unwrap()).unwrap();
        for rg in r.metadata().row_groups() {
            for c in rg.columns() {
                let name = c.column_descr().name().to_string();
                let enc = c.encodings().collect::<Vec<_>>();
                assert_eq!(c.compression(), Compression::LZ4_RAW, "{name} in {f:?}");
                match name.as_str() {
                    "fee_id" => {
                        assert!(enc.contains(&Encoding::DELTA_BYTE_ARRAY), "{name}: {enc:?}")
                    }
                    "_source_line" => {
                        assert!(
                            enc.contains(&Encoding::DELTA_BINARY_PACKED),
                            "{name}: {enc:?}"
                        )
                    }
                    "currency" => {
                        assert!(enc.contains(&Encoding::RLE_DICTIONARY), "{name}: {enc:?}")
                    }
                    _ => {}
                }
            }
        }
    }
    for r in p.query("select fee_id, _source_file, _source_line from bronze.fees") {
        ids.push((
            r["_source_file"].as_str().unwrap().to_string(),
            r["_source_line"].as_i64().unwrap(),
            r["fee_id"].as_str().unwrap().to_string(),
        ));
    }
    // Every bronze row is the landing line it names, fee id included.
    assert!(!ids.is_empty());
    for (file, line, id) in ids {
        // Some fixtures are not UTF-8 (a declared encoding); ids are ASCII either way.
        let bytes = std::fs::read(p.landing().join(&file)).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let row = text.lines().nth(line as usize - 1).unwrap();
        assert!(
            row.starts_with(&format!("{id},")),
            "{file}:{line} is {row:?}, bronze says {id}"
        );
    }
}

#[test]
fn pii_columns_and_the_subject_key_have_no_statistics_in_the_delta_log() {
    let p = Project::reference();
    p.ok(&["ingest", "--source", "clients"]);
    let mut adds = 0;
    walk(&p.lake().join("bronze/clients/_delta_log"), &mut |f| {
        if f.extension().is_none_or(|x| x != "json") {
            return;
        }
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let a: serde_json::Value = serde_json::from_str(line).unwrap();
            let Some(stats) = a["add"]["stats"].as_str() else {
                continue;
            };
            adds += 1;
            let stats: serde_json::Value = serde_json::from_str(stats).unwrap();
            for kind in ["minValues", "maxValues"] {
                let cols = stats[kind].as_object().unwrap();
                assert!(
                    cols.contains_key("signup_date"),
                    "other columns keep their statistics: {stats}"
                );
                // The subject key has none either: an erased id must not survive in the
                // statistics of a log entry or a checkpoint.
                for pii in [
                    "client_id",
                    "full_name",
                    "email",
                    "nino",
                    "date_of_birth",
                    "address",
                ] {
                    assert!(
                        !cols.contains_key(pii),
                        "{pii} has {kind} in the log: {stats}"
                    );
                }
            }
            let raw = stats.to_string();
            assert!(
                !raw.contains("@example.com"),
                "an email leaked into stats: {raw}"
            );
        }
    });
    assert!(adds > 0);
}

#[test]
fn query_formats_and_tables_listing() {
    let p = Project::reference();
    p.ok(&["ingest"]);
    let table = p.ok(&[
        "query",
        "select fee_id, fee_amount from bronze.fees order by fee_id limit 2",
    ]);
    assert!(
        table.contains("fee_id") && table.contains("(2 rows)"),
        "{table}"
    );
    let csv = p.ok(&[
        "query",
        "select fee_id from bronze.fees order by fee_id limit 2",
        "--format",
        "csv",
    ]);
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let tables: serde_json::Value = serde_json::from_str(&p.ok(&["--json", "tables"])).unwrap();
    let fees = tables
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "bronze.fees")
        .unwrap();
    assert_eq!(
        fees["rows"].as_i64(),
        Some(Manifest::load().good_rows("fees/"))
    );
    assert_eq!(fees["partition_by"][0], "fee_date_month");
    let out = p.run(&["query", "select * from bronze.nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

#[test]
fn files_beyond_the_memory_budget_are_read_again_with_the_same_result() {
    // memory_bytes = 1: no landing file is held between hashing and parsing; every one is read
    // again (and its hash checked) when parsed. The tables must be the same as with the default.
    let held = Project::reference();
    held.ok(&["ingest"]);
    let reread = Project::reference();
    let out = reread
        .cmd(&["--json", "ingest"])
        .env("SILT_INGEST_MEMORY_BYTES", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success() || out.status.code() == Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for t in [
        "bronze.fees",
        "bronze.clients",
        "bronze.advisers",
        "quarantine.fees",
        "quarantine.clients",
    ] {
        let q = format!(
            "select _source_file, count(*) as n, sum(_source_line) as lines from {t} group by 1 order by 1"
        );
        let (a, b) = (held.query(&q), reread.query(&q));
        assert!(!a.is_empty(), "{t} is empty");
        assert_eq!(a, b, "{t}");
    }
    let q = "select fee_id, client_id, fee_date, fee_amount, note from bronze.fees order by fee_id, _source_file, _source_line";
    assert_eq!(held.query(q), reread.query(q));
}

#[test]
fn batch_statistics_distinct_counts_match_the_data() {
    // The anomaly checks' distinct counts come from per-file sketches merged per batch: they
    // must agree with an exact count on this data (a small batch is counted exactly).
    let p = Project::reference();
    p.ok(&["ingest"]);
    let stats = p.query(
        "select column_name, distinct_count, rows from _silt.batch_stats where source = 'fees'",
    );
    assert!(!stats.is_empty());
    let exact = p.query(
        "select count(*) as n, count(distinct fee_id) as fee_id, count(distinct client_id) as client_id, \
         count(distinct note) as note from bronze.fees",
    );
    for col in ["fee_id", "client_id", "note"] {
        let s = stats
            .iter()
            .find(|s| s["column_name"] == col)
            .unwrap_or_else(|| panic!("no statistics for {col}: {stats:?}"));
        assert_eq!(s["rows"], exact[0]["n"]);
        let (got, want) = (
            s["distinct_count"].as_f64().unwrap(),
            exact[0][col].as_f64().unwrap(),
        );
        assert!(
            (got - want).abs() <= (want * 0.02).max(1.0),
            "{col}: sketch {got} vs exact {want}"
        );
    }
}

#[test]
fn a_file_of_many_slices_keeps_every_row_its_line_and_its_rejects() {
    // Good rows are parsed and written in slices of silt::ingest::SLICE_ROWS rows. A file of
    // several slices, with refused rows and a quoted line break on both sides of the slice
    // boundaries, must land row for row with the line each row started on.
    let p = Project::empty_reference();
    let n = 2 * silt::ingest::SLICE_ROWS + 1_000;
    let mut csv = format!("{HEADER}\n");
    let mut line = 2u64; // the header is line 1
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for i in 1..=n {
        if i % 997 == 0 {
            csv.push_str(&format!("F{i},C1,A1,2026-01-02,not-a-number,GBP,\n"));
            bad.push(line);
            line += 1;
        } else if i % 3001 == 0 {
            csv.push_str(&format!("F{i},C1,A1,2026-01-02,1.00,GBP,\"two\nlines\"\n"));
            good.push((format!("F{i}"), line));
            line += 2;
        } else {
            csv.push_str(&format!(
                "F{i},C{},A1,2026-01-02,{}.{:02},GBP,\n",
                i % 500,
                i % 900,
                i % 100
            ));
            good.push((format!("F{i}"), line));
            line += 1;
        }
    }
    write(&p, "fees/big.csv", csv.as_bytes());
    p.ok(&["ingest", "--source", "fees"]);

    let rows = p.query("select fee_id, _source_line from bronze.fees");
    assert_eq!(rows.len(), good.len());
    let got: std::collections::HashMap<String, i64> = rows
        .iter()
        .map(|r| {
            (
                r["fee_id"].as_str().unwrap().to_string(),
                r["_source_line"].as_i64().unwrap(),
            )
        })
        .collect();
    for (id, l) in &good {
        assert_eq!(got.get(id), Some(&(*l as i64)), "line of {id}");
    }
    let q = p.query("select _source_line from quarantine.fees order by 1");
    let q: Vec<u64> = q
        .iter()
        .map(|r| r["_source_line"].as_u64().unwrap())
        .collect();
    assert_eq!(q, bad);
}

#[test]
fn a_file_refused_after_its_first_slices_leaves_no_row_behind() {
    // Under reject_file a JSON record far past the first slice can refuse the whole file. Its
    // earlier slices must not reach bronze, while another file of the same run lands whole.
    let p = Project::empty_reference();
    set_policy(&p, "clients", "on_unexpected_column", "reject_file");
    let record = |i: usize, extra: &str| {
        format!(
            r#"{{"client_id":"C{i}","full_name":"N {i}","email":"e{i}@example.com","nino":"AB{i:06}C","date_of_birth":"1980-01-01","address":{{"line1":"1 Street","city":"Leeds","postcode":"LS1 1AA"}},"signup_date":"2026-01-01","accounts":["GIA"]{extra}}}"#
        )
    };
    let n = silt::ingest::SLICE_ROWS + 500;
    let refused: Vec<String> = (1..=n)
        .map(|i| {
            record(
                i,
                if i == n - 10 {
                    r#","channel":"web""#
                } else {
                    ""
                },
            )
        })
        .collect();
    write(
        &p,
        "clients/refused.json",
        format!("[{}]", refused.join(",\n")).as_bytes(),
    );
    let kept: Vec<String> = (1..=n).map(|i| record(100_000 + i, "")).collect();
    write(
        &p,
        "clients/kept.json",
        format!("[{}]", kept.join(",\n")).as_bytes(),
    );

    let out = p.run(&["ingest", "--source", "clients"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("clients/refused.json:{}", n - 10)),
        "{err}"
    );
    assert_eq!(
        p.count("select count(*) from bronze.clients where _source_file = 'clients/refused.json'"),
        0
    );
    assert_eq!(
        p.count("select count(*) from bronze.clients where _source_file = 'clients/kept.json'"),
        n as i64
    );
}
