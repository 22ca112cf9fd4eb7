//! The quarantine's Redis sync across instances: what this instance adds or releases goes to the
//! cluster, what other instances add applies here (and closes its subjects' open connections).
//!
//! With `[rate_limit.shared]` configured, its Redis is the cluster's: quarantines live in a sorted
//! set `{key_prefix}quarantine` (member `identity:NAME` or `serial:HEX`, score the end in UNIX
//! milliseconds), their reasons in the hash `{key_prefix}quarantine:reasons`, and every change
//! increments `{key_prefix}quarantine:version`. Every [`POLL`] (and at once when an operator
//! adds or releases one), [`sync`] writes what this instance owes Redis, then reads the version
//! and, when it changed, the whole set: another instance's quarantine applies here within one
//! poll and a round trip, and an instance started later reads every entry in force on its first
//! round. Each round trip has the limiter's `timeout`; a failed round is counted
//! (`fulcrum_quarantine_sync_errors_total`) and shown by `fulcrum ctl quarantine`, and the local
//! table still applies. Without `[rate_limit.shared]` the table is this instance's alone.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::quarantine::{QuarantineStore, Subject};
use crate::ratelimit::Limiter;
use crate::state::{Live, State};

/// How often the cluster's quarantines are read.
pub(crate) const POLL: Duration = Duration::from_millis(250);

/// Adds or extends one quarantine, removes expired members (and their reasons), bumps the
/// version. KEYS: set, reasons, version; ARGV: member, end (ms), reason, now (ms).
const ADD: &str = "local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[4]) \
    for _, m in ipairs(gone) do redis.call('HDEL', KEYS[2], m) end \
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4]) \
    local cur = redis.call('ZSCORE', KEYS[1], ARGV[1]) \
    if (not cur) or tonumber(cur) < tonumber(ARGV[2]) then redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) end \
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[3]) \
    return redis.call('INCR', KEYS[3])";

/// Ends one quarantine. KEYS: set, reasons, version; ARGV: member.
const RELEASE: &str = "redis.call('ZREM', KEYS[1], ARGV[1]) \
    redis.call('HDEL', KEYS[2], ARGV[1]) \
    return redis.call('INCR', KEYS[3])";

/// The cluster's Redis as a generation configures it.
struct Cluster {
    client: redis::Client,
    keys: [String; 3],
    timeout: Duration,
}

impl Cluster {
    fn of(state: &State) -> Option<Cluster> {
        let Some(Limiter::Cluster(limiter)) = &state.global_limiter else {
            return None;
        };
        let shared = state.config.rate_limit.as_ref()?.shared.as_ref()?;
        let prefix = &shared.key_prefix;
        Some(Cluster {
            client: limiter.client(),
            keys: [
                format!("{prefix}quarantine"),
                format!("{prefix}quarantine:reasons"),
                format!("{prefix}quarantine:version"),
            ],
            timeout: shared.timeout,
        })
    }
}

/// The sync loop, until `stop`: one round every [`POLL`] or when woken.
pub(crate) async fn sync(live: Arc<Live>, stop: CancellationToken) {
    // The connection and the generation it was opened for, and the last version read.
    let mut open: Option<(u64, MultiplexedConnection)> = None;
    let mut version: Option<i64> = None;
    loop {
        let state = live.state();
        let store = Arc::clone(&state.quarantine);
        if let Some(cluster) = Cluster::of(&state) {
            let reuse = open
                .take()
                .filter(|(generation, _)| *generation == state.generation);
            let result = tokio::time::timeout(
                cluster.timeout.max(Duration::from_millis(50)) * 4,
                round(&cluster, reuse.map(|(_, c)| c), &store, &mut version),
            )
            .await;
            match result {
                Ok(Ok((connection, new))) => {
                    if store.last_error().is_some() {
                        info!("quarantine: the cluster's Redis answers again");
                    }
                    store.sync_result(None);
                    open = Some((state.generation, connection));
                    for subject in new {
                        let closed = live.close_quarantined(&subject);
                        info!(%subject, closed, "quarantine from the cluster applied");
                    }
                }
                Ok(Err(e)) => failed(&store, &mut version, e.to_string()),
                Err(_) => failed(&store, &mut version, "the round trip timed out".to_string()),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
            _ = store.wake.notified() => {}
        }
    }
}

fn failed(store: &QuarantineStore, version: &mut Option<i64>, error: String) {
    if store.last_error().is_none() {
        warn!(error = %error, "quarantine: the cluster's Redis failed; local quarantines still apply");
    }
    store.sync_result(Some(error));
    // Read everything again once it answers.
    *version = None;
}

/// One round: what this instance owes Redis, then the cluster's set if its version changed.
/// Returns the connection (for the next round) and the subjects new here.
async fn round(
    cluster: &Cluster,
    connection: Option<MultiplexedConnection>,
    store: &QuarantineStore,
    version: &mut Option<i64>,
) -> redis::RedisResult<(MultiplexedConnection, Vec<Subject>)> {
    let mut connection = match connection {
        Some(connection) => connection,
        None => {
            *version = None;
            cluster.client.get_multiplexed_async_connection().await?
        }
    };
    let [set, reasons, version_key] = &cluster.keys;
    let (written, released) = store.lock().unsynced();
    let now_ms = millis(SystemTime::now());
    for (subject, entry) in &written {
        redis::cmd("EVAL")
            .arg(ADD)
            .arg(3)
            .arg(set)
            .arg(reasons)
            .arg(version_key)
            .arg(subject.key())
            .arg(millis(entry.until))
            .arg(&entry.reason)
            .arg(now_ms)
            .query_async::<i64>(&mut connection)
            .await?;
    }
    for subject in &released {
        redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(3)
            .arg(set)
            .arg(reasons)
            .arg(version_key)
            .arg(subject.key())
            .query_async::<i64>(&mut connection)
            .await?;
    }
    store.lock().synced(&written, &released);
    let current: Option<i64> = redis::cmd("GET")
        .arg(version_key)
        .query_async(&mut connection)
        .await?;
    let current = current.unwrap_or(0);
    if *version == Some(current) && written.is_empty() && released.is_empty() {
        return Ok((connection, Vec::new()));
    }
    let (members, why): (Vec<(String, f64)>, std::collections::HashMap<String, String>) = redis::pipe()
        .cmd("ZRANGEBYSCORE")
        .arg(set)
        .arg(format!("({now_ms}"))
        .arg("+inf")
        .arg("WITHSCORES")
        .cmd("HGETALL")
        .arg(reasons)
        .query_async(&mut connection)
        .await?;
    *version = Some(current);
    let cluster: Vec<(Subject, SystemTime, String)> = members
        .into_iter()
        .filter_map(|(member, until)| {
            let subject = Subject::from_key(&member)?;
            let until = UNIX_EPOCH + Duration::from_millis(until.max(0.0) as u64);
            Some((subject, until, why.get(&member).cloned().unwrap_or_default()))
        })
        .collect();
    let new = store.lock().merge_cluster(cluster, SystemTime::now());
    Ok((connection, new))
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
