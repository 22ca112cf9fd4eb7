//! The Redis shell of `shared_concurrency`: [`SharedSlots`] asks Redis for the slots the pure
//! [`Slots`] decides to ask for, and runs the keeper task that refreshes the leases and gives
//! spare slots back. The decisions are all in [`Slots`]; this file only sends its requests, reads
//! the clock, and wakes whoever waits for an answer. No lock is held across an await, and every
//! round trip runs under the store's `timeout`.
//!
//! # Redis
//! One hash per client, `{key_prefix}{client}:open` (no window key ends in `:open`: theirs end in
//! a number), with one field per instance: `held:seq:expiry` (slots, the instance's request
//! number, and the Redis time in milliseconds at which the record expires). [`SCRIPT`] applies a
//! batch of requests atomically: for each client it drops the expired fields, sums the others,
//! ignores a request older than the instance's recorded one, records
//! [`crate::ratelimit::slots::granted`] with an expiry of one lease on Redis's own clock (so the
//! instances' clocks need not agree), renews the hash's TTL to one lease, and answers the
//! record, or the room the others leave if that is less.
//!
//! # The keeper
//! One task per [`SharedSlots`], started by the first answer that leaves a client tracked, ends
//! by itself once no client is (no connection open here, no slot held). Every third of the lease
//! it refreshes every record; when a client holds more spare than it keeps (connections closed)
//! it gives the excess back at once. It is not one of the server's tracked tasks: it belongs to
//! the slots, which a reload hands over from one generation to the next, and it only ends once
//! the connections holding slots have. If the process exits before it has given the last slots
//! back, they expire with their lease, as a killed instance's do.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::Notify;

use super::store::Store;
use crate::ratelimit::key::ClientKey;
use crate::ratelimit::local::RejectReason;
use crate::ratelimit::slots::{Acquire, Answer, Request, Slot, Slots};

/// At most this many clients' requests in one script call, so Redis is never held long.
const BATCH: usize = 256;

/// `KEYS[k]`: client k's hash; `ARGV[1]`: the instance; then per client six numbers: seq, hold,
/// need, spare, cap, lease (ms). Returns, per client, the slots the instance may hand out: its
/// record, or the room the others leave when less (a record forced over the cap by `hold`).
/// The arithmetic is `slots::granted`. Sent with `EVAL`, which Redis compiles once and caches.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
local out = {}
for k = 1, #KEYS do
  local a = 1 + (k - 1) * 6
  local seq, hold, need = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local spare, cap, lease = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local fields = redis.call('HGETALL', KEYS[k])
  local others, mine, mine_seq = 0, 0, -1
  for j = 1, #fields, 2 do
    local held, s, expiry = string.match(fields[j + 1], '^(%d+):(%d+):(%d+)$')
    if held == nil or tonumber(expiry) <= now then
      redis.call('HDEL', KEYS[k], fields[j])
    elseif fields[j] == me then
      mine, mine_seq = tonumber(held), tonumber(s)
    else
      others = others + tonumber(held)
    end
  end
  local room = math.max(cap - others, 0)
  if seq > mine_seq then
    local wanted = hold + need
    local extra = math.min(spare, math.floor(math.max(room - wanted, 0) / 2))
    mine = math.max(hold, math.min(wanted, room) + extra)
    redis.call('HSET', KEYS[k], me, string.format('%d:%d:%d', mine, seq, now + lease))
    redis.call('PEXPIRE', KEYS[k], lease)
  end
  out[k] = math.min(mine, room)
end
return out
";

/// What [`SharedSlots::acquire`] decided for one connection.
pub(super) enum Outcome {
    Admit(Slot),
    Reject(RejectReason),
    /// Redis could not answer in time: `on_unavailable` applies.
    Unavailable,
}

/// The slots of one key prefix and the Redis they are counted in.
pub(super) struct SharedSlots {
    core: Arc<Slots>,
    pub(super) prefix: String,
    /// The newest generation's store: a reload that keeps these slots hands over its own.
    store: Mutex<Arc<Store>>,
    /// Signalled after every answer, for the connections waiting for one.
    answered: Notify,
}

impl SharedSlots {
    pub(super) fn new(core: Slots, prefix: String, store: Arc<Store>) -> SharedSlots {
        SharedSlots {
            core: Arc::new(core),
            prefix,
            store: Mutex::new(store),
            answered: Notify::new(),
        }
    }

    /// The pure core.
    pub(super) fn core(&self) -> &Slots {
        &self.core
    }

    /// Counts through `store` from now on (a reload's new client).
    pub(super) fn hand_over(&self, store: Arc<Store>) {
        *self.store.lock().unwrap_or_else(PoisonError::into_inner) = store;
    }

    fn store(&self) -> Arc<Store> {
        Arc::clone(&self.store.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Decides for one connection of `key`: a slot held here, else one request to Redis (or the
    /// answer to the one in flight for this client), each wait bounded by `timeout`.
    pub(super) async fn acquire(self: &Arc<Self>, key: &ClientKey) -> Outcome {
        let deadline = Instant::now() + self.store().timeout();
        loop {
            // Made before deciding, so an answer arriving in between is not missed.
            let answered = self.answered.notified();
            match self.core.acquire(key, Instant::now()) {
                Acquire::Admit(slot) => return Outcome::Admit(slot),
                Acquire::Full => return Outcome::Reject(RejectReason::Concurrency),
                Acquire::TooManyClients => return Outcome::Reject(RejectReason::TooManyClients),
                Acquire::Ask(request) => return self.ask(request).await,
                Acquire::Wait => {
                    if tokio::time::timeout_at(deadline.into(), answered).await.is_err() {
                        return Outcome::Unavailable;
                    }
                }
            }
        }
    }

    async fn ask(self: &Arc<Self>, request: Request) -> Outcome {
        // Answers "no answer" if this future is dropped before Redis answered, so the client's
        // request in flight never stays marked.
        let mut pending = Pending {
            slots: self,
            request: Some(request),
        };
        let reply = match &pending.request {
            Some(request) => self.send(std::slice::from_ref(request)).await,
            None => None,
        };
        let Some(request) = pending.request.take() else {
            return Outcome::Unavailable;
        };
        let answer = self
            .core
            .answer(&request, reply.and_then(|r| r.first().copied()), Instant::now());
        self.answered.notify_waiters();
        self.ensure_keeper();
        match answer {
            Answer::Admit(slot) => Outcome::Admit(slot),
            Answer::Full => Outcome::Reject(RejectReason::Concurrency),
            Answer::Unavailable | Answer::Recorded => Outcome::Unavailable,
        }
    }

    /// Sends `requests` in one script call; the slots recorded per request, in order.
    async fn send(&self, requests: &[Request]) -> Option<Vec<u32>> {
        let mut eval = redis::cmd("EVAL");
        eval.arg(SCRIPT).arg(requests.len());
        for request in requests {
            eval.arg(format!("{}{}:open", self.prefix, request.key));
        }
        eval.arg(self.core.instance());
        for request in requests {
            let lease_ms = u64::try_from(request.lease.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            eval.arg(request.seq)
                .arg(request.ask.hold)
                .arg(request.ask.need)
                .arg(request.ask.spare)
                .arg(request.cap)
                .arg(lease_ms);
        }
        let replies: Vec<u32> = self
            .store()
            .call(move |mut connection| async move { eval.query_async(&mut connection).await })
            .await?;
        (replies.len() == requests.len()).then_some(replies)
    }

    fn ensure_keeper(self: &Arc<Self>) {
        if self.core.start_keeper() {
            tokio::spawn(keep(Arc::clone(self)));
        }
    }
}

/// A request in flight; answered "no answer" if dropped before it was answered.
struct Pending<'a> {
    slots: &'a SharedSlots,
    request: Option<Request>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            let _ = self.slots.core.answer(&request, None, Instant::now());
            self.slots.answered.notify_waiters();
        }
    }
}

/// The keeper: every refresh interval, every record refreshed; when woken, the give-backs due.
/// Returns once no client is tracked.
async fn keep(slots: Arc<SharedSlots>) {
    let mut next_tick = Instant::now() + slots.core.refresh_interval();
    let mut all = false;
    loop {
        let Some(requests) = slots.core.due(Instant::now(), all) else {
            return;
        };
        for chunk in requests.chunks(BATCH) {
            let replies = slots.send(chunk).await;
            let now = Instant::now();
            for (i, request) in chunk.iter().enumerate() {
                let granted = replies.as_ref().and_then(|r| r.get(i).copied());
                // Refreshes and give-backs admit no connection: the answer is `Recorded`.
                let _ = slots.core.answer(request, granted, now);
            }
            slots.answered.notify_waiters();
        }
        all = tokio::select! {
            () = tokio::time::sleep_until(next_tick.into()) => {
                next_tick = Instant::now() + slots.core.refresh_interval();
                true
            }
            () = slots.core.wake().notified() => false,
        };
    }
}
