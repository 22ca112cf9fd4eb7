//! The shared limiter's Redis: building its client from the configuration ([`redis_client`]),
//! and [`Store`], one connection to it with its health, through which every round trip of the
//! window shares and of the concurrency slots goes.
//!
//! Every round trip runs under `timeout` (dial included) and none holds a lock across an await.
//! After a failed round trip Redis is not tried again for [`RETRY_AFTER`]: meanwhile every call
//! fails at once, so `on_unavailable` applies without waiting. The first success after that
//! brings shared limiting back. Each change between available and unavailable is logged once,
//! and each failure counts in `fulcrum_ratelimit_backend_errors_total`. The password goes to
//! Redis only: it is in no log line, error or Debug output of this module.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::config::SharedRateLimitConfig;
use crate::metrics::Counter;
use crate::tls::TlsError;

/// How long a failed Redis is left alone before a later round trip tries it again.
pub const RETRY_AFTER: Duration = Duration::from_millis(500);

/// Why the shared rate limit's Redis client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum RedisClientError {
    #[error("[rate_limit.shared.tls]: {0}")]
    Tls(#[from] TlsError),
    #[error("[rate_limit.shared] redis: {0}")]
    Client(String),
}

/// The redis client for `shared`: its URL, the password from `password_file` if any, and for
/// `rediss://` the `[rate_limit.shared.tls]` files (checked here). Does no network I/O.
pub fn redis_client(shared: &SharedRateLimitConfig) -> Result<redis::Client, RedisClientError> {
    // Whatever the redis crate says, the password and the URL's password never show.
    let failed = |e: redis::RedisError| {
        let mut message = e
            .to_string()
            .replace(&shared.redis, &crate::config::redact_url(&shared.redis));
        if let Some(password) = &shared.password {
            message = message.replace(password.expose(), "***");
        }
        RedisClientError::Client(message)
    };
    let mut info = redis::IntoConnectionInfo::into_connection_info(shared.redis.as_str()).map_err(failed)?;
    if let Some(password) = &shared.password {
        let settings = info.redis_settings().clone().set_password(password.expose());
        info = info.set_redis_settings(settings);
    }
    if let redis::ConnectionAddr::TcpTls { .. } = info.addr() {
        // The redis client builds its rustls configuration from the process default provider.
        crate::tls::install_default_provider();
    }
    match &shared.tls {
        Some(tls) => redis::Client::build_with_tls(info, crate::tls::redis_certificates(tls)?),
        None => redis::Client::open(info),
    }
    .map_err(failed)
}

/// One generation's Redis: the client, its open connection and its health.
pub(crate) struct Store {
    pub(super) client: redis::Client,
    timeout: Duration,
    /// The open connection, cloned out for each round trip (it multiplexes).
    connection: Mutex<Option<MultiplexedConnection>>,
    health: Mutex<Health>,
    /// `fulcrum_ratelimit_backend_errors_total`.
    errors: Arc<Counter>,
}

struct Health {
    available: bool,
    /// While in the future, Redis is not tried.
    retry_at: Option<Instant>,
}

impl Store {
    /// A store that dials `client` on its first round trip.
    pub(super) fn new(client: redis::Client, timeout: Duration, errors: Arc<Counter>) -> Store {
        Store {
            client,
            timeout,
            connection: Mutex::new(None),
            health: Mutex::new(Health {
                available: true,
                retry_at: None,
            }),
            errors,
        }
    }

    /// The budget of one round trip.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the last round trip succeeded (true before the first).
    pub(super) fn is_available(&self) -> bool {
        lock(&self.health).available
    }

    /// Runs `query` on the connection (dialing it first if needed) within `timeout`; `None` when
    /// Redis failed, timed out, or is being left alone after a failure.
    pub(super) async fn call<T, F, Fut>(&self, query: F) -> Option<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if lock(&self.health).retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let attempt = async {
            let connection = self.connection().await?;
            query(connection).await
        };
        let error = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(value)) => {
                let mut health = lock(&self.health);
                health.retry_at = None;
                if !health.available {
                    health.available = true;
                    tracing::info!("shared rate limit: Redis is available again");
                }
                return Some(value);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.errors.inc();
        *lock(&self.connection) = None;
        let mut health = lock(&self.health);
        health.retry_at = Some(Instant::now() + RETRY_AFTER);
        if health.available {
            health.available = false;
            tracing::warn!(%error, "shared rate limit: Redis is unavailable; on_unavailable applies");
        }
        None
    }

    async fn connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let existing = lock(&self.connection).clone();
        match existing {
            Some(connection) => Ok(connection),
            None => {
                let connection = self.client.get_multiplexed_async_connection().await?;
                *lock(&self.connection) = Some(connection.clone());
                Ok(connection)
            }
        }
    }
}

/// Locks ignoring poisoning: the sections only assign plain values and cannot panic midway.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
