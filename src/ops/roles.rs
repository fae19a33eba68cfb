//! The two cluster roles of the silt binary, `silt scheduler` and `silt executor`: Ballista's
//! scheduler and executor run as libraries, configured with what silt's plans need (its codec,
//! its object stores under its credential rules: `file://`, and `gs://` only with explicit
//! credentials, never a metadata server). Executors only compute; they never commit to a
//! Delta table. This module must not read a project: a node needs only the binary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ballista_core::JobId;
use ballista_executor::execution_engine::{
    DefaultExecutionEngine, ExecutionEngine, QueryStageExecutor,
};
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::start_server;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionConfig;

use crate::error::{Error, Result};
use crate::lake::cluster::Cluster;
use crate::lake::codec::SiltCodec;
use crate::lake::storage::LakeStores;

/// How a scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    pub bind: SocketAddr,
    /// An executor silent this long is taken for lost and its tasks run elsewhere.
    pub executor_timeout_secs: u64,
}

/// Run a scheduler until the process is stopped.
pub async fn run_scheduler(opts: SchedulerOptions) -> Result<()> {
    let mut config = SchedulerConfig::default();
    config.bind_host = opts.bind.ip().to_string();
    config.bind_port = opts.bind.port();
    config.external_host = opts.bind.ip().to_string();
    config.override_physical_codec = Some(Arc::new(SiltCodec::default()));
    config.executor_timeout_seconds = opts.executor_timeout_secs.max(2);
    config.expire_dead_executor_interval_seconds = (opts.executor_timeout_secs / 3).clamp(1, 15);
    config.no_executors_grace_period_seconds = config.executor_timeout_seconds;
    // Decoding a plan names the object stores of its scans: the scheduler's sessions know
    // the same ones as the executors'.
    let stores = Arc::new(LakeStores::from_env());
    config.override_session_builder = Some(Arc::new(move |session: SessionConfig| {
        let state = ballista_core::utils::default_session_builder(session)?;
        let runtime = RuntimeEnvBuilder::new()
            .with_object_store_registry(stores.clone())
            .build_arc()?;
        Ok(
            datafusion::execution::SessionStateBuilder::new_from_existing(state)
                .with_runtime_env(runtime)
                .build(),
        )
    }));
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(|e| Error::Cluster(format!("scheduler on {}: {e}", opts.bind)))?;
    tracing::info!(bind = %opts.bind, "silt scheduler listening");
    eprintln!("silt scheduler: listening on df://{}", opts.bind);
    start_server(cluster, opts.bind, Arc::new(config))
        .await
        .map_err(|e| Error::Cluster(format!("scheduler on {}: {e}", opts.bind)))
}

/// How an executor runs.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    pub scheduler: Cluster,
    /// The Arrow Flight address other executors and clients fetch results from; the
    /// executor's gRPC service listens on the next port.
    pub bind: SocketAddr,
    pub concurrent_tasks: usize,
    /// Shuffle files and spills (a temporary directory when None).
    pub work_dir: Option<std::path::PathBuf>,
    /// Memory every task's sorts, aggregates and joins share before they spill (bytes).
    pub memory_pool_bytes: u64,
    pub heartbeat_secs: u64,
}

/// Run an executor until the process is stopped.
pub async fn run_executor(opts: ExecutorOptions) -> Result<()> {
    let grpc_port = opts.bind.port().checked_add(1).ok_or_else(|| {
        Error::Usage(format!(
            "--bind {}: the executor's gRPC service takes the next port, and there is none",
            opts.bind
        ))
    })?;
    let stores = Arc::new(LakeStores::from_env());
    let work_dir = opts.work_dir.as_ref().map(|p| p.display().to_string());
    let spill_dir = work_dir.clone();
    let mut config = ExecutorProcessConfig {
        bind_host: opts.bind.ip().to_string(),
        external_host: Some(opts.bind.ip().to_string()),
        port: opts.bind.port(),
        grpc_port,
        scheduler_host: opts.scheduler.host.clone(),
        scheduler_port: opts.scheduler.port,
        scheduler_connect_timeout_seconds: 10,
        vcores: opts.concurrent_tasks.max(1),
        work_dir,
        executor_heartbeat_interval_seconds: opts.heartbeat_secs.max(1),
        memory_pool_size: Some(opts.memory_pool_bytes),
        override_physical_codec: Some(Arc::new(SiltCodec::default())),
        ..Default::default()
    };
    let id = config.executor_id.clone();
    config.override_runtime_producer = Some(Arc::new(move |_: &SessionConfig| {
        let mut b = RuntimeEnvBuilder::new().with_object_store_registry(stores.clone());
        if let Some(dir) = &spill_dir {
            b = b.with_temp_file_path(dir.clone());
        }
        Ok(Arc::new(b.build()?))
    }));
    config.override_execution_engine = Some(Arc::new(CountingEngine {
        inner: DefaultExecutionEngine::new(),
        executor: id.clone(),
        tasks: AtomicU64::new(0),
    }));
    eprintln!(
        "silt executor {id}: serving on {} for the scheduler at {}",
        opts.bind, opts.scheduler
    );
    start_executor_process(Arc::new(config))
        .await
        .map_err(|e| Error::Cluster(format!("executor on {}: {e}", opts.bind)))
}

/// DataFusion's engine, with one line on stderr per task: which executor ran which part of
/// which job (what `make cluster-demo` and the tests count).
struct CountingEngine {
    inner: DefaultExecutionEngine,
    executor: String,
    tasks: AtomicU64,
}

impl ExecutionEngine for CountingEngine {
    fn create_query_stage_exec(
        &self,
        job_id: JobId,
        stage_id: usize,
        task_id: usize,
        global_output_partition_ids: Vec<usize>,
        plan: Arc<dyn ExecutionPlan>,
        work_dir: &str,
        config: &SessionConfig,
    ) -> datafusion::error::Result<Arc<dyn QueryStageExecutor>> {
        let n = self.tasks.fetch_add(1, Ordering::Relaxed) + 1;
        eprintln!(
            "silt executor {}: task {n} job={job_id} stage={stage_id} task={task_id}",
            self.executor
        );
        self.inner.create_query_stage_exec(
            job_id,
            stage_id,
            task_id,
            global_output_partition_ids,
            plan,
            work_dir,
            config,
        )
    }
}
