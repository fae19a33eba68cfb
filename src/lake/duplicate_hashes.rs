//! The keys a dedupe must resolve, found with bitmaps of key hashes instead of a grouped count
//! ([`DuplicateFilterExec`]). `lake/dedupe.rs` splits "the latest row per key" into the rows
//! whose key occurs once (passed through) and the others (sorted and cut to the first of each
//! key); this node makes that split. One pass over the key columns sets, for each row, the bit
//! of its key's hash in a "seen" bitmap, and the same bit in a "seen again" bitmap when it was
//! set already. A second pass sends a row to the duplicated side when its bit is set in "seen
//! again". A key that occurs twice always is; a key seen once is too when another key hashes
//! to the same bit (a false positive, about one key in 40), which only sends it through the
//! exact path, where it comes out as the first (and only) row of its key. The bits depend only
//! on the keys and the bitmap's size, never on the order rows arrive in, so two counts of the
//! same rows with the same size split them alike.
//!
//! Memory is the two bitmaps while counting, then "seen again": a power of two of bits each,
//! about 32 per row the plan's statistics expect, at most 256 MiB and both together within a
//! quarter of the pool; reserved in the pool (the size is fixed before the count, so the
//! reservation is not refused: a pool short of room makes the spilling operators beside it
//! spill). The grouped count it replaces held every distinct key (60-odd bytes each) and grew
//! with the table. This module must not decide which rows a dedupe keeps: it only splits the
//! input. Its node does not travel to a cluster (the dedupe's split is not planned there).
//! A full build's unique-key check (`build/materialize/guard.rs`) uses the same split to find
//! the few rows whose key may repeat before it counts keys exactly.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::arrow::array::{ArrayRef, BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::common::Result as DfResult;
use datafusion::common::hash_utils::{QualityRandomState, create_hashes};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::TaskContext;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryLimit, MemoryReservation};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::metrics::{
    Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
    SendableRecordBatchStream,
};
use futures::{StreamExt, TryStreamExt};

/// Hashes both passes compute alike (a fixed seed: the same key, the same hash, in every node).
const HASHES: QualityRandomState = QualityRandomState::with_seed(0x5117_d0d0);

/// Bits per expected row: a key seen once shares its bit with another key about once in 32
/// (once in 44 on average, the bitmap being rounded up to a power of two).
const BITS_PER_ROW: u64 = 32;

/// The smallest bitmap (8 KiB).
const MIN_BITS: u64 = 1 << 16;

/// The largest (256 MiB): beyond it, more rows go the exact way instead of memory growing.
const MAX_BITS: u64 = 1 << 31;

/// The rows of `input` whose key occurs more than once in `counted` (`duplicated`), or the
/// others; both sides' nodes built over the same `counted` share one count.
#[derive(Debug)]
pub struct DuplicateFilterExec {
    input: Arc<dyn ExecutionPlan>,
    /// The rows counted: the key columns of the same input (in a plan of their own).
    counted: Arc<dyn ExecutionPlan>,
    /// The key columns in `input` and in `counted`, in the same order and of the same types.
    keys: Vec<usize>,
    counted_keys: Vec<usize>,
    duplicated: bool,
    /// The most bits a bitmap may have (tests set it low to force shared bits).
    max_bits: u64,
    /// The rows `counted` holds, as its statistics estimate them.
    expected_rows: u64,
    shared: Arc<tokio::sync::OnceCell<Arc<SeenAgain>>>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

/// The "seen again" bitmap of a finished count, and its reservation.
#[derive(Debug)]
struct SeenAgain {
    bits: Vec<u64>,
    mask: u64,
    _reservation: MemoryReservation,
}

impl SeenAgain {
    fn is_set(&self, hash: u64) -> bool {
        let slot = hash & self.mask;
        self.bits[(slot >> 6) as usize] & (1u64 << (slot & 63)) != 0
    }
}

impl DuplicateFilterExec {
    /// Over `input` (rows) and `counted` (the key rows of the same data); `shared` is the count
    /// both sides of one dedupe read.
    pub fn try_new(
        input: Arc<dyn ExecutionPlan>,
        counted: Arc<dyn ExecutionPlan>,
        keys: Vec<usize>,
        counted_keys: Vec<usize>,
        duplicated: bool,
        max_bits: Option<u64>,
    ) -> DfResult<Self> {
        let (a, b) = (input.schema(), counted.schema());
        let same_types = keys.len() == counted_keys.len()
            && !keys.is_empty()
            && keys.iter().zip(&counted_keys).all(|(&i, &j)| {
                i < a.fields().len()
                    && j < b.fields().len()
                    && a.field(i).data_type() == b.field(j).data_type()
            });
        if !same_types {
            return datafusion::common::plan_err!(
                "DuplicateFilterExec: the key columns of the rows and of the count differ"
            );
        }
        Ok(DuplicateFilterExec {
            expected_rows: expected_rows(counted.as_ref()),
            properties: Arc::clone(input.properties()),
            input,
            counted,
            keys,
            counted_keys,
            duplicated,
            max_bits: max_bits.unwrap_or(MAX_BITS).clamp(MIN_BITS, MAX_BITS),
            shared: Arc::new(tokio::sync::OnceCell::new()),
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    /// Read the count `other` reads (the other side of the same dedupe): it runs once.
    pub fn share_count(&mut self, other: &DuplicateFilterExec) {
        self.shared = Arc::clone(&other.shared);
    }

    pub fn counted(&self) -> &Arc<dyn ExecutionPlan> {
        &self.counted
    }

    pub fn counted_keys(&self) -> &[usize] {
        &self.counted_keys
    }

    pub fn duplicated(&self) -> bool {
        self.duplicated
    }
}

impl DisplayAs for DuplicateFilterExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let a = self.input.schema();
        let keys: Vec<&str> = self
            .keys
            .iter()
            .map(|&i| a.field(i).name().as_str())
            .collect();
        write!(
            f,
            "DuplicateFilterExec: {} keys=[{}]",
            if self.duplicated {
                "duplicated"
            } else {
                "unique"
            },
            keys.join(", ")
        )
    }
}

impl ExecutionPlan for DuplicateFilterExec {
    fn name(&self) -> &str {
        "DuplicateFilterExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input, &self.counted]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true, false]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false, false]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.len() != 2 {
            return datafusion::common::internal_err!("DuplicateFilterExec takes two children");
        }
        let counted = children.pop().expect("two");
        let input = children.pop().expect("two");
        let same_count = Arc::ptr_eq(&counted, &self.counted);
        let mut new = Self::try_new(
            input,
            counted,
            self.keys.clone(),
            self.counted_keys.clone(),
            self.duplicated,
            Some(self.max_bits),
        )?;
        // A new count is a new computation; the same one stays shared with the other side.
        if same_count {
            new.shared = Arc::clone(&self.shared);
        }
        Ok(Arc::new(new))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let input = self.input.execute(partition, Arc::clone(&context))?;
        let rows = self.expected_rows;
        let (counted, counted_keys, shared, max_bits) = (
            Arc::clone(&self.counted),
            self.counted_keys.clone(),
            Arc::clone(&self.shared),
            self.max_bits,
        );
        let (keys, duplicated) = (self.keys.clone(), self.duplicated);
        let passed: Count = MetricBuilder::new(&self.metrics).output_rows(partition);
        let schema = self.schema();
        let rows = futures::stream::once(async move {
            let found = shared
                .get_or_try_init(|| count(counted, counted_keys, rows, max_bits, context))
                .await?;
            let found: Arc<SeenAgain> = Arc::clone(found);
            let mut hashes = Vec::new();
            Ok::<_, datafusion::error::DataFusionError>(input.map(move |b| {
                let b = b?;
                let keep = split(&found, &b, &keys, duplicated, &mut hashes)?;
                let out = filter_record_batch(&b, &keep)?;
                passed.add(out.num_rows());
                Ok(out)
            }))
        })
        .try_flatten()
        .try_filter(|b| futures::future::ready(b.num_rows() > 0));
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, rows)))
    }
}

/// The rows the count will read, as the plan's statistics estimate them (a Delta scan knows
/// them from its log); a few million when they do not say.
fn expected_rows(counted: &dyn ExecutionPlan) -> u64 {
    use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
    StatisticsContext::new()
        .compute(counted, &StatisticsArgs::new())
        .ok()
        .and_then(|s| s.num_rows.get_value().copied())
        .unwrap_or(1 << 22) as u64
}

/// The bits of each bitmap: about `BITS_PER_ROW` per expected row, a power of two, at most
/// `max_bits`, the two bitmaps within a quarter of the pool. The same for the same rows, pool
/// and limit, whichever side asks.
fn bitmap_bits(rows: u64, max_bits: u64, pool: &MemoryLimit) -> u64 {
    let floor_pow2 = |b: u64| {
        if b.is_power_of_two() {
            b
        } else {
            b.checked_next_power_of_two().map_or(MAX_BITS, |p| p / 2)
        }
    };
    // Two bitmaps of `bits / 8` bytes in a quarter of the pool: bits ≤ pool bytes.
    let room = match pool {
        MemoryLimit::Finite(bytes) => *bytes as u64,
        _ => MAX_BITS,
    };
    rows.max(1)
        .saturating_mul(BITS_PER_ROW)
        .checked_next_power_of_two()
        .unwrap_or(MAX_BITS)
        .min(floor_pow2(max_bits.max(MIN_BITS)))
        .min(floor_pow2(room.max(MIN_BITS)))
        .clamp(MIN_BITS, MAX_BITS)
}

/// The rows of `b` for this side: those whose bit is set in "seen again" (`duplicated`), or
/// not.
fn split(
    found: &SeenAgain,
    b: &RecordBatch,
    keys: &[usize],
    duplicated: bool,
    hashes: &mut Vec<u64>,
) -> DfResult<BooleanArray> {
    let columns: Vec<ArrayRef> = keys.iter().map(|&i| Arc::clone(b.column(i))).collect();
    hashes.clear();
    hashes.resize(b.num_rows(), 0);
    create_hashes(&columns, &HASHES, hashes)?;
    Ok(hashes
        .iter()
        .map(|&h| Some(found.is_set(h) == duplicated))
        .collect())
}

/// The count: every partition of `counted` in a task of its own (aborted if the count is
/// dropped or one fails), all setting bits in the same two bitmaps.
async fn count(
    counted: Arc<dyn ExecutionPlan>,
    keys: Vec<usize>,
    rows: u64,
    max_bits: u64,
    context: Arc<TaskContext>,
) -> DfResult<Arc<SeenAgain>> {
    let pool = context.memory_pool();
    let bits = bitmap_bits(rows, max_bits, &pool.memory_limit());
    let words = (bits / 64) as usize;
    let reservation = MemoryConsumer::new("DuplicateFilterExec").register(pool);
    // Fixed before the count and not refused (see the module's note on memory).
    reservation.grow(2 * words * 8);
    let seen: Arc<Vec<AtomicU64>> = Arc::new((0..words).map(|_| AtomicU64::new(0)).collect());
    let again: Arc<Vec<AtomicU64>> = Arc::new((0..words).map(|_| AtomicU64::new(0)).collect());
    let mask = bits - 1;
    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..counted.output_partitioning().partition_count() {
        let mut stream = counted.execute(p, Arc::clone(&context))?;
        let (seen, again, keys) = (Arc::clone(&seen), Arc::clone(&again), keys.clone());
        tasks.spawn(async move {
            let mut hashes = Vec::new();
            while let Some(b) = stream.next().await {
                let b = b?;
                let columns: Vec<ArrayRef> =
                    keys.iter().map(|&i| Arc::clone(b.column(i))).collect();
                hashes.clear();
                hashes.resize(b.num_rows(), 0);
                create_hashes(&columns, &HASHES, &mut hashes)?;
                for &h in &hashes {
                    let slot = h & mask;
                    let (word, bit) = ((slot >> 6) as usize, 1u64 << (slot & 63));
                    // Bits are only ever set: of two rows with the same bit, exactly one
                    // `fetch_or` finds it clear, whatever the order.
                    if seen[word].load(Ordering::Relaxed) & bit != 0
                        || seen[word].fetch_or(bit, Ordering::Relaxed) & bit != 0
                    {
                        again[word].fetch_or(bit, Ordering::Relaxed);
                    }
                }
            }
            Ok::<_, datafusion::error::DataFusionError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))??;
    }
    drop(seen);
    reservation.shrink(words * 8);
    let again = Arc::try_unwrap(again)
        .map_err(|_| datafusion::error::DataFusionError::Internal("count still running".into()))?;
    let bits_vec: Vec<u64> = again.into_iter().map(AtomicU64::into_inner).collect();
    let set: u64 = bits_vec.iter().map(|w| u64::from(w.count_ones())).sum();
    tracing::debug!(
        rows_estimated = rows,
        bits,
        bits_seen_again = set,
        "duplicated keys counted"
    );
    Ok(Arc::new(SeenAgain {
        bits: bits_vec,
        mask,
        _reservation: reservation,
    }))
}
