//! The queue: callers waiting, first come first served, for a backend to have room.
//!
//! When every eligible backend is at its cap, a caller may take a place with [`Pool::wait`]
//! (at most `queue_size` wait). Every change that may free a slot (a lease given back, a backend
//! back in rotation, added, reused or given a new spec) hands free slots to the waiters in order,
//! under the pool's lock, so a new arrival never overtakes them; a served waiter holds its slot
//! (counted) until its [`Wait`] takes it as a [`Lease`], or gives it on when dropped. This file
//! owns the waiting only: [`Pool::wait`], [`Wait`] and the serving of the queue; the waiters'
//! type is in `model.rs`, and the search that serves them is `select.rs`. It names `model` and
//! `select`, never the API above it.
//!
//! It reads the clock in one place, [`State::give_back`]: a slot given back by a `Drop` (a lease,
//! or a waiter's unused slot) takes no argument, yet must go to the first waiter at once (left for
//! the next call that has a `now`, it could wait for a call that never comes). The clock is read
//! only when someone is queued, and only the slow start depends on it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::model::{Lease, Pool, State, Waiter};
use super::select::Found;

/// The queue is full: `queue_size` callers are already waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the queue is full")]
pub struct QueueFull;

/// A caller's place in the queue (see [`Pool::wait`]).
#[derive(Debug)]
pub struct Wait {
    pool: Arc<Pool>,
    id: u64,
}

impl Pool {
    /// Waits, behind the callers already waiting, for a backend not in `exclude` to have room:
    /// at most `queue_size` may wait. The returned future resolves to a lease; dropped before
    /// that (a timeout), it leaves the queue and gives back a lease it may have been handed.
    /// `now` is when the caller joins (a slot freed since its `choose` is served at once).
    pub fn wait(
        self: &Arc<Self>,
        exclude: &[usize],
        queue_size: usize,
        now: Instant,
    ) -> Result<Wait, QueueFull> {
        let mut state = self.lock();
        if state.waiters.len() >= queue_size {
            return Err(QueueFull);
        }
        state.next_waiter += 1;
        let id = state.next_waiter;
        state.waiters.push_back(Waiter {
            id,
            exclude: exclude.to_vec(),
            waker: None,
            served: None,
        });
        // A slot freed since the caller's `choose` goes to the queue's head right away.
        state.serve_waiters(now);
        Ok(Wait {
            pool: Arc::clone(self),
            id,
        })
    }

    /// Callers waiting in the queue (served ones included until they take their lease).
    pub fn waiting(&self) -> usize {
        self.lock().waiters.len()
    }
}

impl Future for Wait {
    type Output = Lease;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Lease> {
        let mut state = self.pool.lock();
        let Some(position) = state.waiters.iter().position(|w| w.id == self.id) else {
            // Not in the queue any more: cannot happen while this future lives; wait forever
            // rather than invent a lease (the caller's timeout ends it).
            return Poll::Pending;
        };
        if let Some(index) = state.waiters[position].served {
            state.waiters.remove(position);
            drop(state);
            return Poll::Ready(Lease {
                pool: Arc::clone(&self.pool),
                index,
            });
        }
        state.waiters[position].waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        if let Some(position) = state.waiters.iter().position(|w| w.id == self.id) {
            if let Some(waiter) = state.waiters.remove(position) {
                if let Some(index) = waiter.served {
                    // Handed a slot it will not use: give it to the next waiter, or back.
                    state.give_back(index);
                }
            }
        }
    }
}

impl State {
    /// Gives back one connection of `index` from a `Drop` (a [`Lease`], or a [`Wait`] handed a
    /// slot it will not use), and hands the freed slot on to the queue.
    pub(super) fn give_back(&mut self, index: usize) {
        if self.release(index) && !self.waiters.is_empty() {
            // The balancer's one clock read (see the module doc): a `Drop` has no `now` to pass.
            self.serve_waiters(Instant::now());
        }
    }

    /// Hands free slots to the waiters, first come first served; wakes those served.
    pub(super) fn serve_waiters(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].served.is_some() {
                i += 1;
                continue;
            }
            let exclude = std::mem::take(&mut self.waiters[i].exclude);
            let found = self.choose(&exclude, now, true);
            self.waiters[i].exclude = exclude;
            match found {
                Found::Index(index) => {
                    let waiter = &mut self.waiters[i];
                    waiter.served = Some(index);
                    if let Some(waker) = waiter.waker.take() {
                        waker.wake();
                    }
                    i += 1;
                }
                // No room for this one: later ones wait behind it (first come, first served).
                Found::Full | Found::Nothing => return,
            }
        }
    }
}
