//! The library's typed error and its mapping to the CLI exit codes of ARCHITECTURE.md
//! (0 ok, 1 data tests failed, 2 usage/config error, 3 runtime/storage error).
//! It must not format for a terminal or decide process exit: main.rs does that.

use std::fmt;

/// Where in an input file a problem sits: file, 1-based line, and column name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputLocation {
    pub file: String,
    pub line: u64,
    pub column: Option<String>,
}

impl fmt::Display for InputLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)?;
        if let Some(c) = &self.column {
            write!(f, " column '{c}'")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file (silt.toml, sql/bronze/*.toml) is missing, malformed or inconsistent.
    #[error("{file}: {message}")]
    Config { file: String, message: String },

    /// The command line asked for something that does not exist or does not fit.
    #[error("{0}")]
    Usage(String),

    /// An input file cannot be taken as a whole; the message says what to change.
    #[error("{location}: {message}\n  fix: {fix}")]
    Input {
        location: InputLocation,
        message: String,
        fix: String,
    },

    /// Some input files were rejected; the others were ingested.
    #[error("{} file(s) rejected:\n{}", .0.len(), .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Rejected(Vec<Error>),

    /// A SQL statement did not plan (unknown table, bad syntax).
    #[error("SQL error: {0}")]
    Sql(String),

    #[error("storage error on {url}: {source}")]
    Storage {
        url: String,
        #[source]
        source: object_store::Error,
    },

    #[error("Delta table {table}: {source}")]
    Delta {
        table: String,
        #[source]
        source: deltalake::DeltaTableError,
    },

    #[error("query engine: {0}")]
    Engine(#[from] datafusion::error::DataFusionError),

    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),

    #[error("{0}")]
    Runtime(String),

    /// Another silt process holds the lake's run lease, or committed the same
    /// idempotent ingest step first.
    #[error("{0}")]
    Busy(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Exit code for this error, per ARCHITECTURE.md.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config { .. } | Error::Usage(_) | Error::Input { .. } | Error::Sql(_) => 2,
            Error::Rejected(_) => 2,
            _ => 3,
        }
    }

    pub fn config(file: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            file: file.into(),
            message: message.into(),
        }
    }

    pub fn delta(table: impl Into<String>, source: deltalake::DeltaTableError) -> Self {
        use deltalake::kernel::transaction::{CommitConflictError, TransactionError};
        let table = table.into();
        // Every silt commit that carries a `txn` id is an idempotent step (one landing file's
        // rows): losing that race means another process did the same step at the same time.
        if let deltalake::DeltaTableError::Transaction {
            source: TransactionError::CommitConflict(CommitConflictError::ConcurrentTransaction),
        } = &source
        {
            return Error::concurrent_step(&table);
        }
        Error::Delta { table, source }
    }

    /// Another process committed the same idempotent step (`txn` id) to `table` first.
    pub fn concurrent_step(table: &str) -> Self {
        Error::Busy(format!(
            "Delta table {table}: another silt process committed the same landing file(s) at \
             the same time, so this commit was refused and nothing of it landed. Run the \
             command again: it skips what the other process committed."
        ))
    }

    pub fn storage(url: impl Into<String>, source: object_store::Error) -> Self {
        Error::Storage {
            url: url.into(),
            source,
        }
    }

    /// A DataFusion error, classified: planning errors are the user's SQL (exit 2).
    pub fn from_datafusion(e: datafusion::error::DataFusionError) -> Self {
        use datafusion::error::DataFusionError as D;
        match e.find_root() {
            D::Plan(_) | D::SQL(..) | D::SchemaError(..) | D::NotImplemented(_) => {
                Error::Sql(e.to_string())
            }
            _ => Error::Engine(e),
        }
    }
}

/// What to change when an error's text says the engine ran out of its memory budget (an
/// operator that cannot spill, such as a join's build side, outgrew `[engine] memory_limit_mb`).
pub fn memory_hint(message: &str) -> Option<&'static str> {
    message.contains("Resources exhausted").then_some(
        "fix: raise [engine] memory_limit_mb in silt.toml (or SILT_ENGINE_MEMORY_LIMIT_MB; default: a quarter of the machine's memory): a join's build side must fit in it, sorts and aggregates spill",
    )
}
