//! The one way to run fulcrum in process: [`TestServer`], the real [`Server`] bound to port 0 and
//! running on a task of the test's runtime, plus the TOML snippets most tests start it from.
//!
//! Every starter (`start`, `start_file`, `try_start`, `draining`) ends in `TestServer::spawn`, the
//! only place a test spawns `Server::run`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fulcrum::metrics::Reason;
use fulcrum::reload::{Handle, ReloadError};
use fulcrum::state::{ServerError, State};
use fulcrum::{CancellationToken, Config, Server};
use tokio::task::JoinHandle;

use super::{poll_for, schema, wait_until, within, within_for, DEADLINE};

/// The balancer, running on a task of the test's runtime. Dropping it cancels it.
pub struct TestServer {
    pub admin: Option<SocketAddr>,
    /// The first generation's state (see [`TestServer::current`] for the one serving now).
    pub state: Arc<State>,
    /// Reloads the running server.
    pub handle: Handle,
    shutdown: CancellationToken,
    run: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Binds a server from TOML text (every `bind` on port 0) and spawns its `run`.
    pub async fn start(toml: &str) -> TestServer {
        TestServer::try_start(toml)
            .await
            .unwrap_or_else(|e| panic!("the test server binds: {e}"))
    }

    /// Binds a server from a config file (so that it can reload it) and spawns its `run`.
    pub async fn start_file(path: &Path) -> TestServer {
        let config = Config::load(path).unwrap_or_else(|e| panic!("test config: {e}"));
        schema::assert_valid(&std::fs::read_to_string(path).expect("read the test config"));
        TestServer::bind(config)
            .await
            .unwrap_or_else(|e| panic!("the test server binds: {e}"))
    }

    /// [`TestServer::start`] for a test about the bind itself: the config must parse, binding
    /// may fail.
    pub async fn try_start(toml: &str) -> Result<TestServer, ServerError> {
        let config = Config::from_toml(toml, "<test>").unwrap_or_else(|e| panic!("{e}\n{toml}"));
        schema::assert_valid(toml);
        TestServer::bind(config).await
    }

    async fn bind(config: Config) -> Result<TestServer, ServerError> {
        let server = Server::bind(config).await?;
        Ok(TestServer::spawn(server, CancellationToken::new()))
    }

    /// Runs an already built `server` with its shutdown requested before `run` starts: the
    /// accept loop stops before its first accept, as when a drain starts with connections still
    /// queued on the socket.
    pub fn draining(server: Server) -> TestServer {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        TestServer::spawn(server, shutdown)
    }

    /// Runs an already built `server` (e.g. one made with `Server::from_listeners`).
    pub fn running(server: Server) -> TestServer {
        TestServer::spawn(server, CancellationToken::new())
    }

    /// Spawns `server.run(shutdown)`.
    fn spawn(server: Server, shutdown: CancellationToken) -> TestServer {
        let admin = server.admin_addr();
        let state = server.state();
        let handle = server.handle();
        let run = tokio::spawn(server.run(shutdown.clone()));
        TestServer {
            admin,
            state,
            handle,
            shutdown,
            run: Some(run),
        }
    }

    /// The current generation's state (`state` is the first one's).
    pub fn current(&self) -> Arc<State> {
        self.handle.state()
    }

    /// The bound address of a listener of the current generation.
    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.current()
            .listener(listener)
            .unwrap_or_else(|| panic!("no listener named {listener:?} in the current generation"))
            .bind
    }

    /// Rewrites the config file at `path` with `text`, then reloads it, within the deadline. A
    /// text fulcrum accepts must match the config schema too.
    pub async fn reload_file(&self, path: &Path, text: &str) -> Result<u64, ReloadError> {
        std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        if Config::load(path).is_ok() {
            schema::assert_valid(text);
        }
        within("the reload to be applied or refused", self.handle.reload()).await
    }

    /// Cancels the shutdown token (the drain starts); `run` keeps going until drained.
    pub fn cancel(&self) {
        self.shutdown.cancel();
    }

    /// Whether `run` has returned.
    pub fn has_returned(&self) -> bool {
        self.run.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Cancels and waits for `run` to return, within `limit`.
    pub async fn stop_within(mut self, limit: Duration) {
        self.shutdown.cancel();
        let run = self.run.take().expect("run is awaited once");
        within_for(limit, "Server::run to return", run)
            .await
            .expect("Server::run does not panic");
    }

    /// Cancels and waits for `run` to return (after [`TestServer::cancel`], once drained).
    pub async fn stopped(self) {
        self.stop_within(DEADLINE).await
    }

    /// Active connections per backend of `upstream`, counts only, in configured order.
    pub fn active(&self, upstream: &str) -> Vec<u32> {
        self.state
            .active_connections(upstream)
            .into_iter()
            .map(|(_, count)| count)
            .collect()
    }

    /// Waits until no connection is counted against any backend.
    pub async fn wait_idle(&self) {
        let state = Arc::clone(&self.state);
        wait_until("every backend's active count to return to 0", || {
            state.total_active() == 0
        })
        .await
    }

    /// The non-zero rejection counters of a listener, as `(label, count)`.
    pub fn rejections(&self, listener: &str) -> Vec<(&'static str, u64)> {
        let l = self
            .state
            .listener(listener)
            .unwrap_or_else(|| panic!("no listener {listener:?}"));
        Reason::ALL
            .iter()
            .map(|r| (r.label(), l.rejected.get(*r)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Waits until the listener's rejection counters are exactly `expected` (non-zero ones).
    pub async fn wait_for_rejections(&self, listener: &str, expected: &[(Reason, u64)]) {
        let expected: Vec<(&'static str, u64)> = expected.iter().map(|(r, n)| (r.label(), *n)).collect();
        let mut actual = Vec::new();
        let matched = poll_for(async || {
            actual = self.rejections(listener);
            (actual == expected).then_some(())
        })
        .await;
        if matched.is_none() {
            panic!(
                "timed out after {DEADLINE:?} waiting until listener {listener:?} counts \
                 rejections {expected:?}; it counts {actual:?}"
            );
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `"a", "b"` for a TOML array of backend addresses.
pub fn backend_list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A config with one listener `main` in front of one upstream `pool`. `upstream_extra` is added
/// to the upstream table (e.g. `connect_timeout = "300ms"`).
pub fn one_pool(backends: &[SocketAddr], upstream_extra: &str) -> String {
    format!(
        r#"
[[listener]]
name = "main"
bind = "127.0.0.1:0"
upstream = "pool"

[[upstream]]
name = "pool"
backends = [{}]
{upstream_extra}
"#,
        backend_list(backends)
    )
}
