//! The library's typed error: a variant for each kind of failure a caller or a user branches
//! on, its exit code (2 usage/config/input, 3 runtime/storage) and what to change when the
//! error says it. It must not format for a terminal or end the process: main.rs does that.

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

    /// A model reads a table that does not exist yet.
    #[error("{model}: upstream {upstream} does not exist yet (ingest or build it first)")]
    MissingUpstream { model: String, upstream: String },

    /// A local file or folder cannot be created, written or watched.
    #[error("cannot {action} {path}: {message}")]
    Io {
        action: &'static str,
        path: String,
        message: String,
    },

    /// Parquet that silt reads or writes itself (erasure scans, exports) is not readable or
    /// writable.
    #[error("{what}: {source}")]
    Parquet {
        what: String,
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// silt's own JSON (lease entries, the run log's fields) does not encode or decode.
    #[error("{0}")]
    Json(#[from] serde_json::Error),

    /// The warehouse refused or failed a request (HTTP status, job error, schema mismatch).
    #[error("{0}")]
    Warehouse(String),

    /// polars could not profile the data.
    #[error("{0}")]
    Profile(String),

    /// A lease entry in the lake is not readable.
    #[error("{0}")]
    Lease(String),

    /// A task silt runs in the background stopped (panicked, cancelled, or its peer went
    /// away).
    #[error("{what} failed: {message}")]
    Task { what: String, message: String },

    /// A build failed and rolling it back failed too: both are said.
    #[error("{error}; and rolling the build back failed: {rollback}")]
    Rollback {
        error: Box<Error>,
        rollback: Box<Error>,
    },

    /// An error, with what silt was doing when it happened.
    #[error("{what}: {source}")]
    Context {
        what: String,
        #[source]
        source: Box<Error>,
    },

    /// Something silt relies on did not hold: a bug to report.
    #[error("{0}")]
    Internal(String),

    /// Another silt process holds the lake's run lease, or committed the same
    /// idempotent ingest step first.
    #[error("{0}")]
    Busy(String),

    /// The cluster (`[engine] cluster`, `SILT_CLUSTER`, `--cluster`) cannot be reached or
    /// failed a job.
    #[error("{0}")]
    Cluster(String),
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

    /// A local file operation (`create`, `write`, `watch`) on `path` failed.
    pub fn io(action: &'static str, path: &std::path::Path, e: impl fmt::Display) -> Self {
        Error::Io {
            action,
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// A background task (`what`) stopped.
    pub fn task(what: impl Into<String>, e: impl fmt::Display) -> Self {
        Error::Task {
            what: what.into(),
            message: e.to_string(),
        }
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

impl Error {
    /// Whether the query engine ran out of its memory budget somewhere under this error (an
    /// operator that cannot spill, such as a join's build side, outgrew
    /// `[engine] memory_limit_mb`).
    pub fn out_of_memory(&self) -> bool {
        use datafusion::error::DataFusionError as D;
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(d) = e.downcast_ref::<D>()
                && matches!(d.find_root(), D::ResourcesExhausted(_))
            {
                return true;
            }
            // delta-rs turns the DataFusion errors of its writes into text
            // (`From<DataFusionError> for DeltaTableError`); DataFusion's text of this one
            // starts so.
            if let Some(deltalake::DeltaTableError::Generic(m)) =
                e.downcast_ref::<deltalake::DeltaTableError>()
                && m.starts_with("Resources exhausted")
            {
                return true;
            }
            cause = e.source();
        }
        false
    }

    /// What to change, when the error says it.
    pub fn hint(&self) -> Option<&'static str> {
        if matches!(self, Error::Cluster(_)) {
            return Some(
                "fix: start the scheduler (`silt scheduler --bind HOST:PORT`) and executors, or run locally: unset [engine] cluster in silt.toml, SILT_CLUSTER, or drop --cluster",
            );
        }
        self.out_of_memory().then_some(
            "fix: raise [engine] memory_limit_mb in silt.toml (or SILT_ENGINE_MEMORY_LIMIT_MB; default: a sixteenth of the machine's memory, at most 4 GiB): a join's build side must fit in it, sorts and aggregates spill",
        )
    }
}
