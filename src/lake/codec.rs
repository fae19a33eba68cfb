//! How silt's own physical plan nodes travel to a cluster: the latest-row-per-key nodes of
//! `lake/dedupe.rs` encoded behind a tag, everything else handed to Ballista's codec (its
//! shuffle nodes) and DataFusion's protobuf (scans, joins, aggregates). The client, the
//! scheduler and every executor use this one codec. It must not encode anything a far
//! process cannot rebuild from the bytes alone: a node it does not know fails to encode, and
//! the plan above it then runs on the client (`lake/cluster.rs`).

use std::sync::Arc;

use ballista_core::serde::BallistaPhysicalExtensionCodec;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};

use crate::lake::dedupe::{FirstOfKeyExec, SharedOnceExec};

/// The first bytes of a node silt encoded (Ballista's own never start with them).
const TAG: &[u8] = b"silt\x00";

#[derive(serde::Serialize, serde::Deserialize)]
enum Node {
    FirstOfKey {
        keys: Vec<(String, usize)>,
        rank: String,
    },
    SharedOnce,
}

/// silt's nodes, then Ballista's.
#[derive(Debug, Default)]
pub struct SiltCodec {
    ballista: BallistaPhysicalExtensionCodec,
}

impl PhysicalExtensionCodec for SiltCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let Some(body) = buf.strip_prefix(TAG) else {
            return self.ballista.try_decode(buf, inputs, ctx, proto_converter);
        };
        let node: Node = serde_json::from_slice(body)
            .map_err(|e| DataFusionError::Internal(format!("silt plan node: {e}")))?;
        let [input] = inputs else {
            return Err(DataFusionError::Internal(format!(
                "a silt plan node takes one input, got {}",
                inputs.len()
            )));
        };
        let input = Arc::clone(input);
        Ok(match node {
            Node::FirstOfKey { keys, rank } => {
                Arc::new(FirstOfKeyExec::from_parts(input, keys, rank)?)
            }
            Node::SharedOnce => Arc::new(SharedOnceExec::new(input)),
        })
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DfResult<()> {
        let ours = if let Some(f) = node.downcast_ref::<FirstOfKeyExec>() {
            let (keys, rank) = f.parts().ok_or_else(|| {
                DataFusionError::NotImplemented(
                    "FirstOfKeyExec over computed keys does not travel".into(),
                )
            })?;
            Some(Node::FirstOfKey { keys, rank })
        } else if node.downcast_ref::<SharedOnceExec>().is_some() {
            Some(Node::SharedOnce)
        } else {
            None
        };
        match ours {
            Some(n) => {
                buf.extend_from_slice(TAG);
                serde_json::to_writer(&mut *buf, &n)
                    .map_err(|e| DataFusionError::Internal(format!("silt plan node: {e}")))
            }
            None => self.ballista.try_encode(node, buf, proto_converter),
        }
    }
}
