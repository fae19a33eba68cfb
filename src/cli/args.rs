//! The command line, declared with clap derive: every command and its arguments, with the help
//! text a user reads. This is the only file that knows clap; it must not hold pipeline logic
//! (the library does), printing (printers.rs) nor exit codes (main.rs).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "silt",
    version,
    about = "A local-first lakehouse: landing files to bronze, silver and gold Delta tables"
)]
pub struct Cli {
    /// Project directory (holding silt.toml).
    #[arg(long, global = true, env = "SILT_PROJECT", default_value = ".")]
    pub project: PathBuf,
    /// Machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log more (-v info, -vv debug, -vvv trace) on stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Run model builds, tests and queries on the Ballista cluster at df://HOST:PORT (the
    /// address `silt scheduler --bind` listens on); also `[engine] cluster` or SILT_CLUSTER.
    #[arg(long, global = true, value_name = "df://HOST:PORT")]
    pub cluster: Option<String>,
    /// Work in this environment (`silt env create NAME`) instead of the project's own lake
    /// (`prod`).
    #[arg(long, global = true, env = "SILT_ENV", value_name = "NAME")]
    pub env: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new project in DIR: silt.toml, sql/ folders, an example source and model.
    Init(InitArgs),
    /// Ingest new landing files into bronze tables, exactly once.
    Ingest(IngestArgs),
    /// Run the pipeline: ingest, then build every model whose inputs changed, in dag order.
    Run(BuildArgs),
    /// Build models (all, or --select name, name+, +name, silver, gold) in dag order.
    Build(BuildArgs),
    /// Watch the landing root; when files land, ingest them and build the affected models.
    Watch(WatchArgs),
    /// Run data tests: column tests of models and sources, and sql/tests/*.sql.
    Test(TestArgs),
    /// How old each source's newest data is, against its [freshness] thresholds.
    Freshness,
    /// Column statistics (polars) of a table (bronze.fees) or a landing file.
    Profile(ProfileArgs),
    /// Show the model dag: a text tree, or --format mermaid|dot|json.
    Dag(DagArgs),
    /// Column lineage from the models' plans: where a column comes from (down to the landing
    /// fields), what depends on it (--downstream), or what a change affects (--changed).
    Lineage(LineageArgs),
    /// Write a static documentation site (tables, columns, tests, lineage) into a folder.
    Docs(DocsArgs),
    /// Past runs (run, build, test, forget), newest first: one line each; --run ID shows each
    /// model and test of one run in the order they ran.
    Runs(RunsArgs),
    /// Run one SQL statement over every table (bronze.x, silver.x, gold.x, quarantine.x, _silt.x).
    Query(QueryArgs),
    /// A table's versions: operation, time, run and metrics.
    History(HistoryArgs),
    /// Make a table's content that of an older version (as a new version).
    Restore(RestoreArgs),
    /// Rows added, removed and changed between two versions (keyed by the unique key).
    Diff(DiffArgs),
    /// GDPR erasure: delete data subjects from every layer, the quarantine and the landing
    /// files, rebuild what was derived from them, purge the files, audit in _silt.erasures.
    Forget(ForgetArgs),
    /// Publish gold tables to a warehouse: only what changed since the last export.
    Export(ExportArgs),
    /// Compact a table's small files (or Z-order them) into a new version with the same rows.
    Optimize(OptimizeArgs),
    /// Delete data files that no version younger than --retain-hours needs (all tables, or one).
    Vacuum(VacuumArgs),
    /// List tables with version, rows, files, bytes and partitioning.
    Tables,
    /// Landing sources.
    Source(SourceArgs),
    /// Environments: zero-copy clones of the lake (or of another environment) to build, test
    /// and diff changes in, then promote.
    Env(EnvArgs),
    /// Run a cluster scheduler (Apache Ballista): clients send it plans with --cluster.
    Scheduler(SchedulerArgs),
    /// Run a cluster executor (Apache Ballista) that takes tasks from a scheduler.
    Executor(ExecutorArgs),
}

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Address to listen on (clients use --cluster df://HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:50050")]
    pub bind: std::net::SocketAddr,
    /// Seconds without a heartbeat after which an executor is taken for lost and its tasks
    /// run elsewhere.
    #[arg(long, default_value_t = 60)]
    pub executor_timeout_secs: u64,
}

#[derive(Debug, Args)]
pub struct ExecutorArgs {
    /// The scheduler: df://HOST:PORT or HOST:PORT.
    #[arg(long)]
    pub scheduler: String,
    /// Address other nodes fetch this executor's results from (Arrow Flight); its gRPC
    /// service takes the next port.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub bind: std::net::SocketAddr,
    /// Tasks run at once (default: the number of cores).
    #[arg(long)]
    pub concurrent_tasks: Option<usize>,
    /// Directory for shuffle files and spills (default: a temporary directory).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Memory the tasks' sorts, aggregates and joins share before they spill, in MiB
    /// (default: as [engine] memory_limit_mb's default, a sixteenth of the machine's memory).
    #[arg(long)]
    pub memory_limit_mb: Option<u64>,
    /// Seconds between heartbeats to the scheduler.
    #[arg(long, default_value_t = 10)]
    pub heartbeat_secs: u64,
}

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Only these sources (comma-separated or repeated).
    #[arg(long = "source", short = 's', value_delimiter = ',')]
    pub sources: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Selectors: name, name+ (and downstream), +name (and upstream), silver, gold,
    /// state:modified (SQL or config changed against the lake an environment was cloned from,
    /// or against the last build; state:modified+ adds downstream), comma-separated or repeated.
    #[arg(long = "select", short = 's', value_delimiter = ',')]
    pub select: Vec<String>,
    /// Rebuild from scratch instead of incrementally.
    #[arg(long)]
    pub full_refresh: bool,
}

#[derive(Debug, Subcommand)]
pub enum ExportTarget {
    /// BigQuery, per [bigquery] in silt.toml: changed partitions only, each replaced atomically.
    Bigquery {
        /// Models to export (selectors as in `silt build`, comma-separated or repeated; default:
        /// [bigquery] models or every gold model).
        #[arg(long = "select", short = 's', value_delimiter = ',')]
        select: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DagFormat {
    Text,
    Mermaid,
    Dot,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum SourceCommand {
    /// Infer a contract from a sample landing file and write sql/bronze/NAME.toml for review.
    New {
        name: String,
        /// A sample file: a path or a URL (file://, gs://).
        #[arg(long)]
        from: String,
        /// Overwrite an existing sql/bronze/NAME.toml.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// The new project's directory (created; it must not hold a silt.toml yet).
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Wait this long after the last change before running.
    #[arg(long, default_value_t = 500)]
    pub debounce_ms: u64,
    /// Also poll the landing root this often (the only trigger for gs:// roots).
    #[arg(long, default_value_t = 10)]
    pub poll_seconds: u64,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Only the tests of these models (selectors as for build, comma-separated or repeated).
    #[arg(long = "select", short = 's', value_delimiter = ',')]
    pub select: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// A table name (layer.name) or a landing file (path, URL, or path under the landing root).
    pub target: String,
    /// How many top values to show per column.
    #[arg(long, default_value_t = 3)]
    pub top: usize,
}

#[derive(Debug, Args)]
pub struct DagArgs {
    #[arg(long, value_enum, default_value_t = DagFormat::Text)]
    pub format: DagFormat,
}

#[derive(Debug, Args)]
pub struct LineageArgs {
    /// A column (gold.rpt_client_ltv.ltv_total) or a table (every column of it).
    #[arg(required_unless_present = "changed")]
    pub target: Option<String>,
    /// Every column that depends on it, instead of where it comes from.
    #[arg(long)]
    pub downstream: bool,
    /// The columns and models a change to the project's SQL or contracts affects, against
    /// the lineage the last run stored.
    #[arg(long, conflicts_with_all = ["downstream", "run"])]
    pub changed: bool,
    /// The lineage as run ID stored it (`silt runs` lists runs), instead of the project's now.
    #[arg(long, value_name = "ID")]
    pub run: Option<String>,
}

#[derive(Debug, Args)]
pub struct DocsArgs {
    /// The folder to write (created; an earlier site there is replaced).
    #[arg(long, default_value = "target/silt-docs")]
    pub out: std::path::PathBuf,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// How many runs to show.
    #[arg(long, default_value_t = 5)]
    pub limit: usize,
    /// One run's models and tests (a run id from the list).
    #[arg(long)]
    pub run: Option<String>,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    pub sql: String,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Read every table at the version the given run left (see `silt runs`).
    #[arg(long)]
    pub as_of_run: Option<String>,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The table, as layer.name (bronze.fees, silver.stg_fees, _silt.runs).
    pub table: String,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The table, as layer.name.
    pub table: String,
    /// The version whose content becomes the table's next version (see `silt history`).
    #[arg(
        long,
        conflicts_with = "timestamp",
        required_unless_present = "timestamp"
    )]
    pub version: Option<u64>,
    /// An RFC 3339 time.
    #[arg(long)]
    pub timestamp: Option<String>,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The table, as layer.name.
    pub table: String,
    /// The older version to compare (see `silt history`).
    #[arg(long, required_unless_present = "against", conflicts_with = "against")]
    pub from: Option<u64>,
    /// Compare with the same table in this environment (`prod`: the project's lake) instead
    /// of an older version: `silt diff --env dev --against prod gold.x`.
    #[arg(long, value_name = "ENV")]
    pub against: Option<String>,
    /// Default: the latest version.
    #[arg(long)]
    pub to: Option<u64>,
    /// Key columns, comma-separated or repeated (default: the model's unique_key or the
    /// source's primary_key).
    #[arg(long, value_delimiter = ',')]
    pub key: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// Subject ids (values of the sources' subject_key).
    pub ids: Vec<String>,
    /// A file with one subject id per line.
    #[arg(long)]
    pub file: Option<std::path::PathBuf>,
    /// Why (kept in the audit log).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only scan every file under the lake and landing roots for the subjects; exit 1 on a find.
    #[arg(long)]
    pub verify: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    pub target: ExportTarget,
}

#[derive(Debug, Args)]
pub struct OptimizeArgs {
    pub table: String,
    /// Z-order by these columns (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub zorder: Vec<String>,
    /// Target file size in bytes.
    #[arg(long)]
    pub target_size: Option<u64>,
}

#[derive(Debug, Args)]
pub struct VacuumArgs {
    /// One table (layer.name, e.g. silver.stg_fees); default: every table of the lake.
    pub table: Option<String>,
    /// Keep every file a version younger than this needs (hours). Below Delta's default of
    /// 168 (7 days) it needs --force: older versions become unreadable.
    #[arg(long, default_value_t = 168)]
    pub retain_hours: u64,
    /// Allow --retain-hours below 168.
    #[arg(long)]
    pub force: bool,
    /// List the files that would be deleted, and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct EnvArgs {
    #[command(subcommand)]
    pub command: EnvCommand,
}

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Create NAME: every table of --from cloned at its current version; no data file is
    /// copied (the clones' logs name the source's files).
    Create {
        /// The new environment's name: lower-case letters, digits, '-' and '_' (not prod).
        name: String,
        /// The lake to clone: `prod` (the project's own) or another environment.
        #[arg(long, default_value = "prod")]
        from: String,
    },
    /// The environments, what each was cloned from, and the tables each changed.
    List,
    /// Delete NAME: its own files and logs; the files it referenced stay where they are.
    Drop {
        /// The environment to delete.
        name: String,
    },
    /// Make NAME's changed model tables the next versions of the lake it was cloned from,
    /// one commit per table, only if none of those moved since.
    Promote {
        /// The environment whose changed tables to promote.
        name: String,
        /// The lake to promote to (it must be the one NAME was cloned from).
        #[arg(long, default_value = "prod")]
        to: String,
        /// List what would change, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Copy the files NAME's tables (or one table) reference in another lake into NAME, for
    /// readers that cannot follow a shallow clone (DuckDB's delta extension, pyarrow).
    Localize {
        /// The environment whose tables to make self-contained.
        name: String,
        /// One table (layer.name); default: every table.
        table: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct SourceArgs {
    #[command(subcommand)]
    pub command: SourceCommand,
}

/// The command line of this process.
pub fn parse() -> Cli {
    Cli::parse()
}
