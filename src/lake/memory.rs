//! The engine's memory pool: DataFusion's fair spill pool, except that a spilling operator
//! (sort, aggregate, repartition buffer) may borrow memory the others leave idle. A loan must
//! never take the pool past its size, nor from any other spilling operator the half of its
//! fair share that stays guaranteed to it, nor leave less than half the pool to what cannot
//! spill.
//!
//! DataFusion's `FairSpillPool` caps every spilling consumer at (pool − unspillable) / n, n the
//! registered spilling consumers. A plan registers many that hold little (one per repartition
//! output, one per aggregate partition), so one large aggregate spilled at a fraction of a
//! mostly empty pool: the line-item gold model `customer_revenue` at scale 4 spilled in
//! 1.5 GiB and took half again as long as in 3 GiB, at the same peak RSS.

use std::collections::HashMap;

use datafusion::common::{Result, resources_datafusion_err};
use datafusion::execution::memory_pool::{
    MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation, human_readable_size,
};

/// The most a spilling consumer holding nothing is granted beyond half its fair share without a
/// loan: one large batch (a sort's first batch of wide rows).
const FIRST_BATCH: usize = 16 << 20;

/// A fair spill pool whose spilling consumers may borrow what the others leave idle.
///
/// A spilling consumer always gets up to half its fair share, and a first allocation up to its
/// whole share or one large batch, whichever is less. Beyond that it borrows: up to its fair
/// share or a quarter of the pool (whichever is more), while the pool after the loan still
/// holds what every other spilling consumer needs to reach half its fair share, and while all
/// loans together stay within half the pool. Consumers that cannot spill (hash join build
/// sides) take what is left, as in `FairSpillPool`.
#[derive(Debug)]
pub struct SharePool {
    size: usize,
    state: std::sync::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    unspillable: usize,
    spillable: usize,
    /// Bytes held by each registered spilling consumer, by consumer id.
    spillers: HashMap<usize, usize>,
}

impl SharePool {
    pub fn new(size: usize) -> Self {
        SharePool {
            size,
            state: Default::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Display for SharePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state();
        write!(
            f,
            "silt share pool of {} ({} held by {} spilling operators, {} by others)",
            human_readable_size(self.size),
            human_readable_size(s.spillable),
            s.spillers.len(),
            human_readable_size(s.unspillable)
        )
    }
}

impl State {
    /// A spilling consumer's fair share, as `FairSpillPool` computes it.
    fn share(&self, size: usize) -> usize {
        size.saturating_sub(self.unspillable) / self.spillers.len().max(1)
    }
}

impl MemoryPool for SharePool {
    fn name(&self) -> &str {
        "silt share"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        if consumer.can_spill() {
            self.state().spillers.insert(consumer.id(), 0);
        }
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        if consumer.can_spill() {
            let mut s = self.state();
            if let Some(held) = s.spillers.remove(&consumer.id()) {
                // A reservation returns its bytes (shrink) before it unregisters; whatever
                // it still counted goes with it.
                s.spillable = s.spillable.saturating_sub(held);
            }
        }
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        let mut s = self.state();
        let c = reservation.consumer();
        if c.can_spill() {
            s.spillable += additional;
            *s.spillers.entry(c.id()).or_default() += additional;
        } else {
            s.unspillable += additional;
        }
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        let mut s = self.state();
        let c = reservation.consumer();
        if c.can_spill() {
            s.spillable = s.spillable.saturating_sub(shrink);
            if let Some(held) = s.spillers.get_mut(&c.id()) {
                *held = held.saturating_sub(shrink);
            }
        } else {
            s.unspillable = s.unspillable.saturating_sub(shrink);
        }
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let mut s = self.state();
        let c = reservation.consumer();
        if c.can_spill() {
            let me = c.id();
            let held = s.spillers.get(&me).copied().unwrap_or(0);
            let share = s.share(self.size);
            let floor = share / 2;
            let want = held + additional;
            // Up to half its fair share it is never refused, nor is a first allocation of a
            // batch's size within its whole share: a sort or an aggregate holding nothing has
            // nothing to spill, and must get its first batch. Beyond that, a loan. (A first
            // allocation of the whole share, granted past the loans, could reserve more than
            // the pool holds; a batch per operator bounds that.)
            if want > floor && !(held == 0 && want <= share.min(FIRST_BATCH)) {
                let (mut owed, mut lent) = (0usize, 0usize);
                for (id, h) in &s.spillers {
                    if *id != me {
                        owed += floor.saturating_sub(*h);
                        lent += h.saturating_sub(floor);
                    }
                }
                // From what the pool holds beyond what the others are owed up to their half
                // shares; for one operator no more than its fair share or a quarter of the pool
                // (a second large one, the other partition of an aggregate, finds room too);
                // and loans in all at most half the pool, which keeps room for what cannot
                // spill (a join's build side).
                let room = self.size.saturating_sub(s.unspillable + s.spillable + owed);
                let cap = (2 * floor).max(self.size / 4);
                let loans_left = (self.size / 2).saturating_sub(lent);
                if additional > room || want > cap || want - floor > loans_left {
                    return Err(resources_datafusion_err!(
                        "Failed to allocate additional {} for {} with {} already allocated - the engine pool of {} lends no more ({} free beyond what other operators are owed)",
                        human_readable_size(additional),
                        c.name(),
                        human_readable_size(held),
                        human_readable_size(self.size),
                        human_readable_size(room)
                    ));
                }
            }
            s.spillable += additional;
            *s.spillers.entry(me).or_default() += additional;
        } else {
            let free = self.size.saturating_sub(s.unspillable + s.spillable);
            if additional > free {
                return Err(resources_datafusion_err!(
                    "Failed to allocate additional {} for {} with {} already allocated - {} remain available in the engine pool of {}",
                    human_readable_size(additional),
                    c.name(),
                    human_readable_size(reservation.size()),
                    human_readable_size(free),
                    human_readable_size(self.size)
                ));
            }
            s.unspillable += additional;
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        let s = self.state();
        s.unspillable + s.spillable
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.size)
    }
}

/// Hand the allocator's free pages back to the operating system, between model builds.
///
/// glibc keeps what a finished plan freed in its per-thread arenas: after a large MERGE the
/// process stayed near its peak, and the next models' allocations came on top of it. On other
/// C libraries this does nothing.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}
