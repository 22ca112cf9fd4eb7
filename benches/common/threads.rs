//! How many threads the contention benchmarks run on: `FULCRUM_BENCH_THREADS="1,2,4,8,16,32,64"`
//! for the scaling curve (on a machine with fewer cores the extra threads time-share them, which
//! shows how a lock behaves when its holder is descheduled, not how 64 cores would scale), else
//! one thread and one per core.

/// The thread counts to measure, in order.
pub(crate) fn counts(cores: usize) -> Vec<usize> {
    let asked = std::env::var("FULCRUM_BENCH_THREADS").unwrap_or_default();
    let listed: Vec<usize> = asked
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|n| *n > 0)
        .collect();
    match listed.is_empty() {
        true if cores > 1 => vec![1, cores],
        true => vec![1],
        false => listed,
    }
}
