//! silt: a local-first lakehouse. Landing CSV/JSON files become bronze Delta tables (ingest),
//! and every table can be queried with SQL. This file wires the modules together and opens a
//! project; it must not hold logic of its own beyond that. See ARCHITECTURE.md for the codemap.

pub mod build;
pub mod error;
pub mod ingest;
pub mod lake;
pub mod ops;
pub mod progress;
pub mod project;
pub mod render;

pub use error::{Error, Result};
pub use lake::Silt;
