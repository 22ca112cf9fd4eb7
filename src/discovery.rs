//! Backends from DNS: resolves each discovering upstream's name (`discover = "host:port"`) with
//! hickory's resolver, every A and AAAA record one backend, and asks the run loop to rebuild the
//! generation when the set changes.
//!
//! A set that changes is recorded in the live table ([`crate::state::Discovered`]) and the
//! running configuration is built again from it, without reading any file: an address that
//! appears becomes a backend with its own count, health and slow start; one that disappears is
//! retired exactly as a reload retires a removed backend (no new connections, open ones drain).
//! A failed or empty resolution keeps the last good set; it is logged and counted. An answer of
//! more than `discover_max_backends` addresses makes that many backends, the first in address
//! order; the rest are ignored, with a warning whenever how many are ignored changes. The next
//! resolution comes after `discover_interval`, or sooner when the records' TTL is shorter (never
//! sooner than [`MIN_INTERVAL`], so a TTL of 0 cannot make a loop of it). This module resolves
//! and schedules; it does not decide what a backend set means for the pool (`state` does).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::Resolver;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, Discover, DnsConfig};
use crate::reload::Handle;
use crate::state::{Discovered, Resolution};

/// Deadline of one resolution (every server and retry included).
pub(crate) const RESOLVE_DEADLINE: Duration = Duration::from_secs(10);
/// Shortest time between two resolutions of one name, whatever the TTL says (capped by the
/// configured interval).
pub(crate) const MIN_INTERVAL: Duration = Duration::from_secs(1);

type DnsResolver = Resolver<TokioRuntimeProvider>;

/// Why no resolver could be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver: {0} (set [dns] servers to name servers explicitly)")]
pub(crate) struct ResolverError(String);

/// A resolver for `dns`: its servers (UDP, then TCP for long answers), or the system's.
fn resolver(dns: &DnsConfig) -> Result<DnsResolver, ResolverError> {
    let mut builder = if dns.servers.is_empty() {
        Resolver::builder_tokio().map_err(|e| ResolverError(e.to_string()))?
    } else {
        let servers = dns
            .servers
            .iter()
            .map(|addr| {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            })
            .collect();
        Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    let options = builder.options_mut();
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    options.timeout = Duration::from_secs(2);
    options.attempts = 2;
    if !dns.servers.is_empty() {
        // Servers named explicitly are the source of truth, not this machine's /etc/hosts.
        options.use_hosts_file = ResolveHosts::Never;
    }
    builder.build().map_err(|e| ResolverError(e.to_string()))
}

/// When to resolve again after a resolution at `now` whose records are valid until
/// `valid_until`: after `interval`, or at the TTL's end if sooner, but not before
/// [`MIN_INTERVAL`] (or `interval` if that is shorter).
pub(crate) fn next_resolution(now: Instant, interval: Duration, valid_until: Option<Instant>) -> Instant {
    let ttl = valid_until.map_or(interval, |until| until.saturating_duration_since(now));
    now + ttl.clamp(MIN_INTERVAL.min(interval), interval)
}

/// Resolves `target` once and records the outcome for `upstream`. Returns whether its set
/// changed.
async fn refresh(resolver: &DnsResolver, discovered: &Discovered, upstream: &str, target: &Discover) -> bool {
    // The resolver's cache would answer from records up to their TTL: the interval is ours.
    resolver.clear_cache();
    let lookup = tokio::time::timeout(RESOLVE_DEADLINE, resolver.lookup_ip(target.host.as_str())).await;
    let now = Instant::now();
    let name = target.to_string();
    let (resolution, valid_until) = match lookup {
        Ok(Ok(found)) => {
            let addrs: Vec<SocketAddr> = found.iter().map(|ip| SocketAddr::new(ip, target.port)).collect();
            if addrs.is_empty() {
                (Resolution::Empty, None)
            } else {
                (Resolution::Addresses(addrs), Some(found.valid_until()))
            }
        }
        Ok(Err(e)) if e.is_no_records_found() => (Resolution::Empty, None),
        Ok(Err(e)) => {
            warn!(upstream, name = %name, error = %e, "discover: resolution failed; keeping the last good backends");
            (Resolution::Failed, None)
        }
        Err(_) => {
            warn!(upstream, name = %name, deadline = ?RESOLVE_DEADLINE, "discover: resolution timed out; keeping the last good backends");
            (Resolution::Failed, None)
        }
    };
    if resolution == Resolution::Empty {
        warn!(upstream, name = %name, "discover: the name has no address; keeping the last good backends");
    }
    let next = next_resolution(now, target.interval, valid_until);
    let ignored_before = discovered.ignored(upstream);
    let changed = discovered.record(upstream, &name, resolution, next, target.max_backends);
    let ignored = discovered.ignored(upstream);
    if ignored > 0 && ignored != ignored_before {
        warn!(
            upstream,
            name = %name,
            max = target.max_backends,
            ignored,
            "discover: the name has more addresses than discover_max_backends; the first in address order are backends, the others are ignored"
        );
    }
    if changed {
        let backends = discovered.addrs(upstream, &name);
        info!(upstream, name = %name, backends = backends.len(), "discover: the backend set changed");
    }
    changed
}

/// Resolves, once, every discovering upstream of `config` whose name has no set yet (at startup,
/// or a reload that names a new one), so that the generation built next starts with backends.
/// Failures are logged and counted; the upstream then starts empty and its loop keeps trying.
pub(crate) async fn resolve_new(config: &Config, discovered: &Discovered) {
    let pending: Vec<_> = config
        .upstreams
        .iter()
        .filter_map(|u| Some((u.name.as_str(), u.discover.as_ref()?)))
        .filter(|(name, target)| !discovered.knows(name, &target.to_string()))
        .collect();
    if pending.is_empty() {
        return;
    }
    let resolver = match resolver(&config.dns) {
        Ok(resolver) => resolver,
        Err(e) => {
            error!(error = %e, "discover: no resolver; discovering upstreams have no backends");
            return;
        }
    };
    for (upstream, target) in pending {
        refresh(&resolver, discovered, upstream, target).await;
    }
}

/// Resolves `upstream`'s name at its interval until `stop` (the end of this generation), and
/// asks for a rebuild when the set changes.
pub(crate) async fn run(
    handle: Handle,
    discovered: Arc<Discovered>,
    upstream: String,
    target: Discover,
    dns: DnsConfig,
    stop: CancellationToken,
) {
    let resolver = match resolver(&dns) {
        Ok(resolver) => resolver,
        Err(e) => {
            error!(upstream, error = %e, "discover: no resolver; the upstream keeps its backends");
            return;
        }
    };
    let name = target.to_string();
    loop {
        if let Some(at) = discovered.next(&upstream, &name) {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(at.into()) => {}
            }
        }
        let changed = tokio::select! {
            _ = stop.cancelled() => return,
            changed = refresh(&resolver, &discovered, &upstream, &target) => changed,
        };
        if changed {
            // The rebuild stops this generation's tasks, this one included; the next
            // generation's loop carries on from the table.
            if let Err(e) = handle.rediscover().await {
                error!(upstream, error = %e, "discover: the rebuild with the new backends failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ttl_shorter_than_the_interval_brings_the_next_resolution_forward() {
        let now = Instant::now();
        let next = next_resolution(now, Duration::from_secs(10), Some(now + Duration::from_secs(3)));
        assert_eq!(next, now + Duration::from_secs(3));
    }

    #[test]
    fn a_ttl_longer_than_the_interval_waits_only_the_interval() {
        let now = Instant::now();
        let next = next_resolution(now, Duration::from_secs(10), Some(now + Duration::from_secs(300)));
        assert_eq!(next, now + Duration::from_secs(10));
    }

    #[test]
    fn a_zero_ttl_cannot_make_the_resolution_spin() {
        let now = Instant::now();
        assert_eq!(
            next_resolution(now, Duration::from_secs(10), Some(now)),
            now + MIN_INTERVAL
        );
        let short = Duration::from_millis(200);
        assert_eq!(
            next_resolution(now, short, Some(now)),
            now + short,
            "a shorter interval is the floor"
        );
    }
}
