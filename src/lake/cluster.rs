//! The client side of a cluster (`[engine] cluster = "df://host:port"`): after DataFusion has
//! planned and optimized a query on the client, the largest parts of the plan that can travel
//! (every node known to `lake/codec.rs`, scans that are plain Parquet from
//! `lake/snapshot_scan.rs`) are handed to the Ballista scheduler as physical plans, and their
//! results stream back into the rest of the plan, which runs here. What must stay with the
//! writer stays here: delta-rs's scans and operators, and the pseudonymizing functions, whose
//! key never leaves this process. This module must not commit or write anything: executors
//! only compute; the writer holding the lease commits (decision 0024).

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ballista_core::extension::SessionConfigExt;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties,
    PlanProperties, SendableRecordBatchStream,
};
use datafusion_proto::physical_plan::AsExecutionPlan;
use datafusion_proto::protobuf::PhysicalPlanNode;
use futures::TryStreamExt;

use crate::error::{Error, Result};
use crate::lake::codec::SiltCodec;

/// Functions that must run where their key is (`build/pseudonym.rs`).
const LOCAL_ONLY_FUNCTIONS: [&str; 2] = ["silt_hmac", "silt_mask"];

/// A Ballista scheduler to run plans on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// As the user wrote it: `df://host:port`.
    pub url: String,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl Cluster {
    /// `df://host:port` (or `host:port`).
    pub fn parse(s: &str) -> Result<Cluster> {
        let bad = || {
            Error::Usage(format!(
                "'{s}' is not a cluster address: write df://HOST:PORT (the address `silt scheduler --bind` listens on)"
            ))
        };
        let rest = s.strip_prefix("df://").unwrap_or(s).trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || host.contains('/') {
            return Err(bad());
        }
        Ok(Cluster {
            url: format!("df://{host}:{port}"),
            host: host.to_string(),
            port,
        })
    }

    fn scheduler_url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// Fails at once, naming the address, when nothing listens there.
    pub async fn check_reachable(&self) -> Result<()> {
        let addr = format!("{}:{}", self.host, self.port);
        match tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(Error::Cluster(format!(
                "the cluster scheduler at {self} is unreachable: {e}"
            ))),
            Err(_) => Err(Error::Cluster(format!(
                "the cluster scheduler at {self} did not answer within 3 s"
            ))),
        }
    }
}

/// The Ballista session this process's jobs belong to (one per client process).
fn session_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| format!("silt-{}", uuid::Uuid::now_v7()))
}

/// Hands the parts of a plan that can travel to the cluster; appended after every other
/// physical optimizer rule of a cluster session.
#[derive(Debug)]
pub struct ClusterRule {
    cluster: Cluster,
}

impl ClusterRule {
    pub fn new(cluster: Cluster) -> Self {
        ClusterRule { cluster }
    }

    fn offload(&self, plan: Arc<dyn ExecutionPlan>) -> DfResult<Arc<dyn ExecutionPlan>> {
        if plan.children().is_empty() || !has_source(&plan, true) {
            // A bare scan is cheaper here; a plan without files has nothing to distribute.
            return Ok(plan);
        }
        if travels(&plan) {
            return Ok(Arc::new(ClusterExec::new(
                single_partition(plan),
                self.cluster.clone(),
            )));
        }
        let only_child = plan.children().len() == 1;
        let required = plan.input_distribution_requirements();
        let children: Vec<Arc<dyn ExecutionPlan>> = plan.children().into_iter().cloned().collect();
        let mut changed = false;
        let mut out = Vec::with_capacity(children.len());
        for (i, child) in children.into_iter().enumerate() {
            // A child may become one partition only where its parent does not count on how
            // the child's rows are spread over partitions.
            let spread_free = child.output_partitioning().partition_count() == 1
                || (only_child
                    && matches!(
                        required.child_distribution(i),
                        Some(Distribution::UnspecifiedDistribution)
                            | Some(Distribution::SinglePartition)
                            | None
                    ));
            if !spread_free {
                out.push(child);
                continue;
            }
            let new = self.offload(Arc::clone(&child))?;
            changed |= !Arc::ptr_eq(&new, &child);
            out.push(new);
        }
        if changed {
            datafusion::physical_plan::execution_plan::replace_children_if_necessary(plan, out)
        } else {
            Ok(plan)
        }
    }
}

impl PhysicalOptimizerRule for ClusterRule {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.offload(plan)
    }

    fn name(&self) -> &str {
        "SiltCluster"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Whether `plan` has a data source that reads files (`true`) or that holds rows in memory
/// (`false`: a scratch table, which would travel inside the plan itself, past gRPC's message
/// limit for a large one).
fn has_source(plan: &Arc<dyn ExecutionPlan>, of_files: bool) -> bool {
    let mut found = false;
    let _ = plan.apply(|node| {
        if let Some(ds) = node.downcast_ref::<DataSourceExec>()
            && ds.data_source().downcast_ref::<FileScanConfig>().is_some() == of_files
        {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// Whether the whole of `plan` can run on an executor: it encodes, holds no rows in memory,
/// and calls no function that must stay here.
fn travels(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut local_only = false;
    let _ = plan.apply(|node| {
        let _ = node.apply_expressions(&mut |e| {
            let _ = e.apply(|x| {
                if let Some(f) = x.downcast_ref::<ScalarFunctionExpr>()
                    && LOCAL_ONLY_FUNCTIONS.contains(&f.name())
                {
                    local_only = true;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            });
            Ok(if local_only {
                TreeNodeRecursion::Stop
            } else {
                TreeNodeRecursion::Continue
            })
        });
        Ok(if local_only {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    !local_only
        && !has_source(plan, false)
        && PhysicalPlanNode::try_from_physical_plan(Arc::clone(plan), &SiltCodec::default()).is_ok()
}

/// `plan` as one output partition, keeping its order when it has one.
fn single_partition(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    if plan.output_partitioning().partition_count() <= 1 {
        return plan;
    }
    match plan.output_ordering() {
        Some(ordering) => Arc::new(SortPreservingMergeExec::new(ordering.clone(), plan)),
        None => Arc::new(CoalescePartitionsExec::new(plan)),
    }
}

/// A part of the plan that runs on the cluster: one Ballista job per execution, its result
/// streamed back.
#[derive(Debug)]
pub struct ClusterExec {
    remote: Arc<dyn ExecutionPlan>,
    cluster: Cluster,
    properties: Arc<PlanProperties>,
}

impl ClusterExec {
    fn new(remote: Arc<dyn ExecutionPlan>, cluster: Cluster) -> Self {
        ClusterExec {
            properties: Arc::clone(remote.properties()),
            remote,
            cluster,
        }
    }
}

impl DisplayAs for ClusterExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ClusterExec: {}", self.cluster)
    }
}

impl ExecutionPlan for ClusterExec {
    fn name(&self) -> &str {
        "ClusterExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        // The remote plan is not a child: nothing here may re-plan or run it locally.
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_plan::PhysicalExpr>,
        ) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "ClusterExec has no children".into(),
            ))
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "ClusterExec has one partition, asked for {partition}"
            )));
        }
        let remote = Arc::clone(&self.remote);
        let cluster = self.cluster.clone();
        let schema = self.remote.schema();
        let config = context.session_config().clone();
        tracing::info!(cluster = %cluster, "submitting a plan to the cluster");
        tracing::debug!(
            plan = %datafusion::physical_plan::displayable(remote.as_ref()).indent(true),
            "the plan the cluster runs"
        );
        let stream = futures::stream::once(async move {
            let codec = SiltCodec::default();
            ballista_core::execution_plans::execute_physical_plan::<PhysicalPlanNode>(
                cluster.scheduler_url(),
                &config.ballista_config(),
                remote,
                &codec,
                session_id().to_string(),
                config,
            )
            .await
            .map_err(|e| in_cluster(&cluster, e))
            .map(move |s| s.map_err(move |e| in_cluster(&cluster, e)))
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

fn in_cluster(cluster: &Cluster, e: DataFusionError) -> DataFusionError {
    DataFusionError::Execution(format!("on the cluster at {cluster}: {e}"))
}
