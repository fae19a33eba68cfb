//! Named crash points for the kill tests (exactly-once ingest, a commit as the unit of truth). When
//! `SILT_FAILPOINT=<name>[#n]` is set, the n-th (default first) time the process reaches `<name>`
//! it says so on stderr and stops there until killed, so a test can SIGKILL it at an exact
//! step. With `SILT_FAILPOINT_RELEASE=<file>` it waits there until that file exists instead, a
//! barrier that lets a test line two processes up on the same step. Unset, it does nothing. It
//! must not change behaviour in any other way.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;

static HITS: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

/// Mark a crash point.
pub fn hit(name: &str) {
    let Ok(spec) = std::env::var("SILT_FAILPOINT") else {
        return;
    };
    let (want, nth) = match spec.split_once('#') {
        Some((n, k)) => (n.to_string(), k.parse::<u32>().unwrap_or(1)),
        None => (spec.clone(), 1),
    };
    if want != name {
        return;
    }
    let count = {
        let mut g = HITS.lock().unwrap_or_else(|e| e.into_inner());
        let m = g.get_or_insert_with(HashMap::new);
        let c = m.entry(name.to_string()).or_insert(0);
        *c += 1;
        *c
    };
    if count == nth {
        let mut err = std::io::stderr();
        let _ = writeln!(err, "silt: failpoint {name}#{nth} reached");
        let _ = err.flush();
        if let Ok(release) = std::env::var("SILT_FAILPOINT_RELEASE") {
            while !std::path::Path::new(&release).exists() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            return;
        }
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
