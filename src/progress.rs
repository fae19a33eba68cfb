//! How the library tells its caller that long work moves on (landing bytes read, models
//! built), without knowing how it is shown. The CLI draws an indicatif bar from it; tests and
//! `silt watch` pass nothing. It must not print, and must not name any terminal crate.

use std::sync::Arc;

/// A listener for progress. Every method has a default that ignores the news, so a caller
/// implements only what it shows.
pub trait Progress: Send + Sync {
    /// Work of `total` units starts now (the models of a run); the count starts at zero.
    fn start(&self, _total: u64) {}
    /// `n` more units are done (landing bytes read, one model built).
    fn advance(&self, _n: u64) {}
    /// What is being worked on now (a table's name).
    fn working_on(&self, _what: &str) {}
}

/// A shared progress listener, as builders and options hold it.
pub type SharedProgress = Arc<dyn Progress>;
