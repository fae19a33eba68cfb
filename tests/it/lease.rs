//! The lake's run lease: a second writing command waits for it or is told who
//! holds it, a holder renews it, a killed holder's lease is freed at once on its host, and a
//! lease from another host holds until it expires.

use std::io::{BufRead, BufReader};
use std::process::{Child, Output, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Manifest, Project, copy_dir, kill_at_failpoint, repo};

/// Start `silt <args>` stopped at `failpoint` until `release` exists; wait until it is there.
/// Returns the child and a receiver of its stderr lines.
fn start_held(
    p: &Project,
    args: &[&str],
    failpoint: &str,
    release: &std::path::Path,
    envs: &[(&str, &str)],
) -> (Child, Receiver<String>) {
    let mut c = p.cmd(args);
    c.env("SILT_FAILPOINT", failpoint)
        .env("SILT_FAILPOINT_RELEASE", release)
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let lines = lines_of(&mut child);
    wait_for(
        &lines,
        "failpoint",
        &format!("silt {args:?} reaches {failpoint}"),
    );
    (child, lines)
}

fn lines_of(child: &mut Child) -> Receiver<String> {
    let err = child.stderr.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

fn wait_for(lines: &Receiver<String>, needle: &str, what: &str) -> String {
    loop {
        match lines.recv_timeout(Duration::from_secs(120)) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => {}
            Err(e) => panic!("{what}: no line with '{needle}' ({e})"),
        }
    }
}

/// Two `silt <args>` lined up at the first bronze commit and released together: exactly one
/// must succeed, and the other exit 3 saying another process committed the same files.
fn race(p: &Project, args: &[&str], what: &str) {
    let gate = tempfile::tempdir().unwrap();
    let release = gate.path().join("go");
    let (a, a_lines) = start_held(p, args, "ingest.before_bronze", &release, &[]);
    let (b, b_lines) = start_held(p, args, "ingest.before_bronze", &release, &[]);
    std::fs::write(&release, b"go").unwrap();
    let outs = [
        (
            a.wait_with_output().unwrap(),
            a_lines.iter().collect::<Vec<_>>().join("\n"),
        ),
        (
            b.wait_with_output().unwrap(),
            b_lines.iter().collect::<Vec<_>>().join("\n"),
        ),
    ];
    let won = outs.iter().filter(|(o, _)| o.status.success()).count();
    assert_eq!(won, 1, "{what}: exactly one commits the files: {outs:?}");
    let (lost, err) = outs.iter().find(|(o, _)| !o.status.success()).unwrap();
    assert_eq!(lost.status.code(), Some(3), "{what}: {err}");
    assert!(
        err.contains("another silt process committed the same landing file(s)"),
        "{what}: {err}"
    );
}

/// `silt <args>` that waits at most `wait` seconds for the lake's lease.
fn waiting(p: &Project, args: &[&str], wait: &str) -> Output {
    p.cmd(args).env("SILT_LEASE_WAIT", wait).output().unwrap()
}

/// Insist that a command exited 0, showing its stderr otherwise.
fn ok_with(out: Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The lease entries under the lake, oldest first.
fn entries(p: &Project) -> Vec<(u64, Value)> {
    let dir = p.lake().join("_silt/lease");
    let mut out: Vec<(u64, Value)> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| {
                let e = e.ok()?;
                let name = e.file_name().to_string_lossy().into_owned();
                let seq = name.strip_suffix(".json")?.parse().ok()?;
                let v = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                Some((seq, v))
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|(s, _)| *s);
    out
}

/// Write the next lease entry by hand, as a process on another machine would.
fn write_entry(p: &Project, holder: Value) {
    let next = entries(p).last().map_or(1, |(s, _)| s + 1);
    let dir = p.lake().join("_silt/lease");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{next:020}.json")),
        serde_json::to_vec(&holder).unwrap(),
    )
    .unwrap();
}

#[test]
fn a_second_writer_waits_for_the_lease_or_is_told_who_holds_it() {
    let p = Project::reference();
    let m = Manifest::load();
    let gate = tempfile::tempdir().unwrap();
    let release = gate.path().join("go");
    // The first run holds the lease, stopped inside its ingest. A short TTL, so the second
    // check below also proves the holder renews it.
    let (mut first, _first_lines) = start_held(
        &p,
        &["run"],
        "ingest.before_bronze",
        &release,
        &[("SILT_LEASE_TTL", "1.5")],
    );
    let before = p.log_files();

    // A writer that will not wait is told who holds the lease, and writes nothing.
    let busy = waiting(&p, &["build"], "0");
    let err = String::from_utf8_lossy(&busy.stderr);
    assert_eq!(busy.status.code(), Some(3), "{err}");
    assert!(err.contains("is in use"), "{err}");
    assert!(
        err.contains(&format!("`silt run` (pid {} on host", first.id())),
        "{err}"
    );
    // Past three of the holder's TTLs, it still holds it: it renews.
    std::thread::sleep(Duration::from_millis(4500));
    for cmd in [&["build"][..], &["forget", "C000001"], &["vacuum"]] {
        let busy = waiting(&p, cmd, "0");
        assert_eq!(
            busy.status.code(),
            Some(3),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&busy.stderr)
        );
    }
    assert_eq!(p.log_files(), before, "a refused writer wrote to no table");
    // Reading needs no lease.
    p.ok(&["tables"]);
    let renewed = entries(&p);
    assert!(renewed.len() >= 3, "renewals: {renewed:?}");

    // A writer that waits says so, then runs once the first is done.
    let mut second = p
        .cmd(&["--json", "run"])
        .env("SILT_LEASE_WAIT", "120")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let second_lines = lines_of(&mut second);
    let waiting = wait_for(
        &second_lines,
        "waiting for the lake's lease",
        "the second run",
    );
    assert!(
        waiting.contains(&format!("pid {}", first.id())),
        "{waiting}"
    );
    std::fs::write(&release, b"go").unwrap();
    assert!(first.wait().unwrap().success());
    let out = second.wait_with_output().unwrap();
    assert!(out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_files: u64 = report["ingest"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["files_ingested"].as_u64().unwrap())
        .sum();
    assert_eq!(new_files, 0, "the first run ingested every file: {report}");
    assert_eq!(
        p.count("select count(*) from bronze.fees"),
        m.good_rows("fees/"),
        "every fee once"
    );
    // The last entry frees the lease.
    let (_, last) = entries(&p).pop().unwrap();
    assert_eq!(last["released"], json!(true), "{last}");
    assert_eq!(last["command"], json!("run"), "{last}");
}

#[test]
fn a_killed_holders_lease_is_free_at_once_on_its_host_and_another_hosts_holds_until_it_expires() {
    let p = Project::reference();
    // Killed while holding the lease: the next writer on this host sees the process is gone.
    kill_at_failpoint(p.cmd(&["run"]), "ingest.before_bronze");
    let (_, left) = entries(&p).pop().unwrap();
    assert_eq!(left["released"], json!(false), "{left}");
    ok_with(waiting(&p, &["run"], "0"));

    // A lease held on another machine holds until it expires, whatever its pid.
    let now = chrono::Utc::now();
    let elsewhere = |expires: chrono::DateTime<chrono::Utc>| {
        json!({
            "id": "elsewhere",
            "command": "forget",
            "pid": std::process::id(),
            "host": "another-machine.example",
            "acquired_at": (now - chrono::Duration::minutes(5)).to_rfc3339(),
            "expires_at": expires.to_rfc3339(),
            "released": false,
        })
    };
    write_entry(&p, elsewhere(now + chrono::Duration::hours(1)));
    let before = p.log_files();
    let busy = waiting(&p, &["build", "--full-refresh"], "0.3");
    let err = String::from_utf8_lossy(&busy.stderr);
    assert_eq!(busy.status.code(), Some(3), "{err}");
    assert!(
        err.contains("`silt forget` (pid") && err.contains("on host another-machine.example"),
        "{err}"
    );
    assert_eq!(p.log_files(), before);

    // Expired: free.
    write_entry(&p, elsewhere(now - chrono::Duration::seconds(1)));
    ok_with(waiting(&p, &["build", "--full-refresh"], "0"));
    assert_ne!(p.log_files(), before, "the build committed");
}

#[test]
fn two_ingests_of_the_same_files_at_once_land_each_file_once() {
    // A bare ingest takes no lease: the per-file Delta txn ids decide the race, into a new lake
    // (both create the tables) and into existing tables (batch 2).
    let p = Project::reference();
    let m = Manifest::load();
    let b2 = m.batch2["new_fees"].as_i64().unwrap()
        + m.batch2["corrected"].as_array().unwrap().len() as i64
        + 1;
    for round in 0..2 {
        if round == 1 {
            copy_dir(&repo().join("fixtures/batch2"), &p.landing());
        }
        // The barrier is the first source's commit: in round 1, the one with new files.
        let args: &[&str] = if round == 0 {
            &["ingest"]
        } else {
            &["ingest", "--source", "fees"]
        };
        race(&p, args, &format!("round {round}"));
        // The loser's re-run finds nothing left to do.
        let again: Vec<&str> = ["--json"].iter().chain(args).copied().collect();
        let r: Value = serde_json::from_str(&p.ok(&again)).unwrap();
        for s in r["sources"].as_array().unwrap() {
            assert_eq!(s["files_ingested"], json!(0), "round {round}: {r}");
        }
        if round == 0 {
            crate::support::checks::assert_exactly_once(&p, &m);
        } else {
            assert_eq!(
                p.count("select count(*) from bronze.fees"),
                m.good_rows("fees/") + b2,
                "every fee of both deliveries once"
            );
        }
    }
}

#[test]
fn a_file_of_refused_rows_ingested_twice_at_once_is_quarantined_once() {
    // No good row: bronze gets no commit, and the race is on creating the quarantine table.
    let p = Project::empty_reference();
    std::fs::create_dir_all(p.landing().join("fees")).unwrap();
    std::fs::write(
        p.landing().join("fees/fees_2026_01.csv"),
        "fee_id,client_id,adviser_id,fee_date,fee_amount,currency,note\n\
         F1,C0001,A001,2026-01-05,lots,GBP,a\n\
         F2,C0001,A001,2026-01-06,many,GBP,b\n\
         F3,C0001,A001,not-a-date,1.00,GBP,c\n",
    )
    .unwrap();
    race(&p, &["ingest", "--source", "fees"], "refused rows only");
    p.ok(&["ingest", "--source", "fees"]);
    assert_eq!(p.count("select count(*) from quarantine.fees"), 3);
    assert_eq!(
        p.count("select count(distinct _source_line) from quarantine.fees"),
        3
    );
}
