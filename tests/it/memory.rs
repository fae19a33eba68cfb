//! The engine's memory pool (`lake/memory.rs`): a large spilling operator borrows what idle
//! ones leave, every other spilling operator keeps half its fair share, and the total stays
//! within the pool. (Builds in small pools, where operators must spill, are in dedupe.rs,
//! files.rs and models.rs; what the pool gains is measured in benches/RESULTS.md.)

use std::sync::Arc;

use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use silt::lake::memory::SharePool;

const MB: usize = 1 << 20;

/// A consumer that can spill, as sorts and aggregates register.
fn spilling(pool: &Arc<dyn MemoryPool>, name: &str) -> MemoryReservation {
    MemoryConsumer::new(name)
        .with_can_spill(true)
        .register(pool)
}

#[test]
fn large_operators_borrow_what_idle_ones_leave_and_they_keep_half_their_share() {
    let pool: Arc<dyn MemoryPool> = Arc::new(SharePool::new(120 * MB));
    let spilling = |name: &str| spilling(&pool, name);
    let mut idle: Vec<_> = (0..10).map(|i| spilling(&format!("idle {i}"))).collect();
    let (big, second) = (spilling("big"), spilling("second"));
    // Twelve spilling consumers: a fair share is 10 MiB, half of it (5 MiB) is owed to each.
    // A large one may borrow up to a quarter of the pool (30 MiB), three times its share.
    big.try_grow(30 * MB).unwrap();
    assert!(big.try_grow(1).is_err(), "{pool}");
    second.try_grow(30 * MB).unwrap();
    assert!(second.try_grow(1).is_err(), "{pool}");
    assert_eq!(pool.reserved(), 60 * MB);
    // Each idle one still gets its half share; then one borrows what is left, and no more.
    for r in &mut idle {
        r.try_grow(5 * MB).unwrap();
    }
    idle[0].try_grow(10 * MB).unwrap();
    assert_eq!(pool.reserved(), 120 * MB);
    assert!(idle[1].try_grow(1).is_err());
    // An operator that cannot spill gets only what is left; freed memory comes back.
    let join = MemoryConsumer::new("join build").register(&pool);
    assert!(join.try_grow(1).is_err());
    big.shrink(20 * MB);
    join.try_grow(20 * MB).unwrap();
    assert!(join.try_grow(1).is_err());
    // Alone, an operator may take the whole pool, as in the fair pool.
    drop((idle, join, second));
    assert_eq!(pool.reserved(), 10 * MB);
    big.try_grow(110 * MB).unwrap();
    assert!(big.try_grow(1).is_err());
    drop(big);
    assert_eq!(pool.reserved(), 0);
}

#[test]
fn loans_leave_half_the_pool_to_what_cannot_spill_and_a_half_share_is_never_refused() {
    let pool: Arc<dyn MemoryPool> = Arc::new(SharePool::new(120 * MB));
    let spilling = |name: &str| spilling(&pool, name);
    // Three spilling consumers: a fair share is 40 MiB, half of it 20 MiB; a loan goes up to
    // the share.
    let (a, b, c) = (spilling("a"), spilling("b"), spilling("c"));
    a.try_grow(40 * MB).unwrap();
    b.try_grow(40 * MB).unwrap();
    assert!(a.try_grow(1).is_err(), "{pool}");
    // A join's build side takes what is left.
    let join = MemoryConsumer::new("join build").register(&pool);
    join.try_grow(40 * MB).unwrap();
    assert!(join.try_grow(1).is_err(), "{pool}");
    // c still gets its half share (now 13.3 MiB, the join counted) with the pool full: as in
    // the fair pool, a consumer within its guaranteed share is not refused (a sort's first
    // batch must fit); beyond it, nothing.
    c.try_grow(13 * MB).unwrap();
    assert!(c.try_grow(MB).is_err());
    drop((a, b, c, join));
    assert_eq!(pool.reserved(), 0);
    // One idle and four large consumers: a half share is 12 MiB, a loan goes up to a quarter
    // of the pool (30 MiB), and all loans together stop at half the pool (60 MiB).
    let idle = spilling("idle");
    let large: Vec<_> = (0..4).map(|i| spilling(&format!("large {i}"))).collect();
    let mut held = Vec::new();
    for l in &large {
        let mut n = 0;
        while l.try_grow(MB).is_ok() {
            n += 1;
        }
        held.push(n);
    }
    assert_eq!(held, [30, 30, 30, 18], "{pool}");
    let loans: usize = held.iter().map(|h| h - 12).sum();
    assert_eq!(loans, 60);
    // The idle one's half share is still there.
    idle.try_grow(12 * MB).unwrap();
    assert_eq!(pool.reserved(), 120 * MB);
}

/// Twelve spilling consumers in a pool of `size`: nine idle ones, and three large ones that
/// grew to a quarter, a quarter and an eighth of the pool, borrowing until loans in all reach
/// half of it (a fair share is a twelfth of the pool).
fn loans_took_the_rest(
    size: usize,
) -> (
    Arc<dyn MemoryPool>,
    Vec<MemoryReservation>,
    (MemoryReservation, MemoryReservation, MemoryReservation),
) {
    let pool: Arc<dyn MemoryPool> = Arc::new(SharePool::new(size));
    let spilling = |name: &str| spilling(&pool, name);
    let idle: Vec<_> = (0..9).map(|i| spilling(&format!("idle {i}"))).collect();
    let (big, second, third) = (spilling("big"), spilling("second"), spilling("third"));
    big.try_grow(size / 4).unwrap();
    second.try_grow(size / 4).unwrap();
    third.try_grow(size / 8).unwrap();
    (pool, idle, (big, second, third))
}

/// A sort or an aggregate holding nothing has nothing to spill: its first allocation is
/// granted up to its whole fair share or a batch (16 MiB), whichever is less, even once loans
/// took what the others' half shares leave. (Refused, a sort's first batch fails the build:
/// seen once in the 32 MiB dedupe build of `dedupe.rs`.)
#[test]
fn a_first_allocation_within_the_fair_share_is_granted_when_loans_took_the_rest() {
    // A fair share is 10 MiB, half of it 5 MiB; the three large ones borrowed 25 + 25 + 10 MiB.
    let (pool, idle, (big, second, third)) = loans_took_the_rest(120 * MB);
    assert!(third.try_grow(1).is_err(), "{pool}");
    // A first batch beyond the half share, within the share: granted; more would be a loan.
    idle[0].try_grow(8 * MB).unwrap();
    assert!(idle[0].try_grow(1).is_err(), "{pool}");
    // A first allocation beyond the share is a loan, and there is none left; the half share is
    // still there.
    assert!(idle[1].try_grow(11 * MB).is_err(), "{pool}");
    idle[1].try_grow(5 * MB).unwrap();
    drop((idle, big, second, third));
    assert_eq!(pool.reserved(), 0);
}

/// In a large pool, a first allocation beyond half the share and beyond a batch's size is a
/// loan like any other: it is refused when the loans took the rest, so the pool is not overrun.
#[test]
fn a_large_first_allocation_is_a_loan_and_does_not_overrun_the_pool() {
    // A fair share is 100 MiB, half of it 50 MiB; loans in all reach half the pool.
    let (pool, idle, (big, second, third)) = loans_took_the_rest(1200 * MB);
    // Beyond its half share and a batch, a first allocation is a loan, and none is left...
    assert!(idle[0].try_grow(60 * MB).is_err(), "{pool}");
    // ...so every other consumer still gets its half share, and the pool is not overrun.
    for c in &idle {
        c.try_grow(50 * MB).unwrap();
    }
    assert!(pool.reserved() <= 1200 * MB, "{pool}");
    drop((idle, big, second, third));
    assert_eq!(pool.reserved(), 0);
}
