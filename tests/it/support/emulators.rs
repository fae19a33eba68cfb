//! The emulators' Python (fake-gcs-server, the BigQuery emulator's client), installed once per
//! test binary by tests/emulators/setup.sh unless SILT_EMULATOR_PYTHON names it.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use super::repo;

/// The python of the emulator virtualenv (created once per test binary).
pub fn emulator_python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        if let Ok(p) = std::env::var("SILT_EMULATOR_PYTHON") {
            return PathBuf::from(p);
        }
        let out = Command::new("bash")
            .arg(repo().join("tests/emulators/setup.sh"))
            .output()
            .expect("run tests/emulators/setup.sh");
        assert!(
            out.status.success(),
            "cannot install the GCS emulator (tests/emulators/setup.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}
