//! The terminal side of the library's progress reports: an indicatif bar on stderr. This is
//! the only file that knows indicatif; it must not decide what the library does.

use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

/// A bar that draws the library's progress on stderr, and clears itself when dropped.
#[derive(Clone)]
pub struct Bar(ProgressBar);

impl Bar {
    /// A spinner counting landing bytes read (`silt ingest`).
    pub fn bytes() -> anyhow::Result<Bar> {
        Bar::with_template("{spinner} ingest {bytes} read ({binary_bytes_per_sec}) {msg}")
    }

    /// A bar counting models built (`silt run`, `silt build`).
    pub fn models() -> anyhow::Result<Bar> {
        Bar::with_template("{spinner} {bar:30} {pos}/{len} {msg} ({elapsed})")
    }

    fn with_template(template: &str) -> anyhow::Result<Bar> {
        let pb = ProgressBar::new(0);
        pb.set_style(ProgressStyle::with_template(template).context("progress template")?);
        pb.enable_steady_tick(Duration::from_millis(120));
        Ok(Bar(pb))
    }

    /// Print a line on stderr above the bar.
    pub fn println(&self, line: &str) {
        self.0.suspend(|| eprintln!("{line}"));
    }

    /// Remove the bar from the terminal.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl silt::progress::Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0.set_position(0);
    }

    fn advance(&self, n: u64) {
        self.0.inc(n);
    }

    fn working_on(&self, what: &str) {
        self.0.set_message(what.to_string());
    }
}
