//! The admin side: the HTTP API on a TCP address and/or a Unix socket, serving `/` (the status
//! page), `/status` (JSON), `/metrics` (Prometheus text), `/healthz`, `POST /reload`,
//! `POST /impact` (the reload preview, `impact`), `GET /connections` and
//! `POST /connections/close` (the open connections, `connections`), `GET`/`POST /quarantine` and
//! `POST /quarantine/release` (`quarantine`), and
//! `POST /upstreams/{upstream}/backends/{backend}/state`, and the read-only views of the live
//! state it serves: [`status`] (the snapshot and the page) and [`prometheus`] (the metrics text).
//!
//! HTTP is hyper's (HTTP/1.1), routing axum's; this module is the policy around them: at most
//! [`MAX_CONNECTIONS`] admin connections at once (more are closed at once), request heads and
//! bodies bounded, every request head under [`HEAD_DEADLINE`] and every connection under
//! [`REQUEST_DEADLINE`], the Unix socket's file kept by `socket`, and every request judged by
//! [`guard`] (token, CSRF and DNS rebinding rules) before a handler runs. It reads the current
//! generation per request; its writes are asking the server to reload and setting a backend's
//! admin state. It never runs on a client connection's path.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::balancer::MAX_WEIGHT;
use crate::health::AdminState;
use crate::reload::Handle;

pub(crate) mod connections;
pub mod guard;
pub(crate) mod impact;
pub mod prometheus;
pub(crate) mod quarantine;
pub(crate) mod socket;
pub mod status;

use guard::{Verdict, Via, Who};

/// Admin connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// Everything one admin connection may take, request head to the last byte of the answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// How long a connection may take to send its whole request head (request line and headers),
/// from accept: a client slower than this is closed, so that slow clients cannot hold the
/// [`MAX_CONNECTIONS`] slots for all of [`REQUEST_DEADLINE`].
pub const HEAD_DEADLINE: Duration = Duration::from_secs(2);
/// Largest request body accepted (the only bodies are small JSON objects).
const MAX_BODY: usize = 16 * 1024;
/// Largest request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;

/// The sockets the admin API is served on.
#[derive(Debug, Default)]
pub(crate) struct Sockets {
    pub(crate) tcp: Option<TcpListener>,
    /// The Unix socket and its file (removed when serving stops, if it is still this one's).
    pub(crate) unix: Option<(UnixListener, socket::SocketFile)>,
}

/// What every handler can reach.
#[derive(Clone)]
struct Admin {
    handle: Handle,
}

/// Serves the admin API on `sockets` until `stop` is cancelled, then waits for the requests in
/// flight.
pub(crate) async fn serve(sockets: Sockets, handle: Handle, stop: CancellationToken) {
    let router = router(Admin { handle });
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let Sockets { tcp, unix } = sockets;
    let mut unix_file = None;
    if let Some(tcp) = tcp {
        let accept = move |cx: &mut Context<'_>| tcp.poll_accept(cx).map_ok(|(stream, _)| stream);
        let (router, slots) = (router.clone(), Arc::clone(&slots));
        tracker.spawn(accept_loop(
            accept,
            Via::Tcp,
            router,
            slots,
            tracker.clone(),
            stop.clone(),
        ));
    }
    if let Some((unix, file)) = unix {
        unix_file = Some(file);
        let accept = move |cx: &mut Context<'_>| unix.poll_accept(cx).map_ok(|(stream, _)| stream);
        tracker.spawn(accept_loop(
            accept,
            Via::Socket,
            router,
            slots,
            tracker.clone(),
            stop.clone(),
        ));
    }
    tracker.close();
    tracker.wait().await;
    // Removes the socket file unless a newer process (an upgrade) has bound the path since.
    drop(unix_file);
}

/// Accepts admin connections with `accept` (one listener's `poll_accept`) until `stop`.
async fn accept_loop<S>(
    mut accept: impl FnMut(&mut Context<'_>) -> Poll<std::io::Result<S>>,
    via: Via,
    router: Router,
    slots: Arc<Semaphore>,
    tracker: TaskTracker,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = std::future::poll_fn(&mut accept) => accepted,
        };
        match accepted {
            Ok(stream) => connection(stream, via, &router, &slots, &tracker, &stop),
            Err(e) => accept_failed(&e).await,
        }
    }
}

async fn accept_failed(e: &std::io::Error) {
    debug!(error = %e, "admin accept failed");
    // Back off so that a full descriptor table cannot make the loop spin.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Serves one admin connection (HTTP/1.1, one request) under [`REQUEST_DEADLINE`], its request
/// head under [`HEAD_DEADLINE`], if a slot is free; otherwise it is closed at once.
fn connection<S>(
    stream: S,
    via: Via,
    router: &Router,
    slots: &Arc<Semaphore>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(slot) = Arc::clone(slots).try_acquire_owned() else {
        debug!("admin connection refused: {MAX_CONNECTIONS} already open");
        return;
    };
    // Every request knows how it arrived, for the guard.
    let service = hyper_util::service::TowerToHyperService::new(router.clone().layer(axum::Extension(via)));
    let stop = stop.clone();
    tracker.spawn(async move {
        // One request per connection, answered with `Connection: close`, as before: admin
        // clients are scripts and probes that read to the end.
        let http = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_DEADLINE)
            .max_buf_size(MAX_HEAD.max(8192))
            .serve_connection(TokioIo::new(stream), service);
        let mut http = std::pin::pin!(http);
        tokio::select! {
            served = tokio::time::timeout(REQUEST_DEADLINE, http.as_mut()) => {
                if served.is_err() {
                    debug!("admin connection closed at its deadline");
                }
            }
            _ = stop.cancelled() => {
                http.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(1), http).await;
            }
        }
        drop(slot);
    });
}

fn router(admin: Admin) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/status", get(status_json))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/reload", post(reload))
        .route("/impact", post(impact))
        .route("/connections", get(connections_list))
        .route("/connections/close", post(connections_close))
        .route("/quarantine", get(quarantine_list).post(quarantine_add))
        .route("/quarantine/release", post(quarantine_release))
        .route(
            "/upstreams/{upstream}/backends/{backend}/state",
            post(backend_state),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(admin.clone(), guarded))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(admin)
}

/// Applies [`guard::check`] to every request; a refused one never reaches a handler.
async fn guarded(
    State(admin): State<Admin>,
    axum::Extension(via): axum::Extension<Via>,
    mut request: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let state = admin.handle.state();
    let Some(settings) = state.admin.as_ref() else {
        return text(StatusCode::NOT_FOUND, "no [admin] in the configuration\n");
    };
    let headers = request.headers();
    let value = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let verdict = guard::check(
        settings,
        via,
        &guard::Request {
            method: request.method().as_str(),
            path: request.uri().path(),
            host: value(header::HOST),
            origin: value(header::ORIGIN),
            authorization: value(header::AUTHORIZATION),
            content_type: value(header::CONTENT_TYPE),
        },
    );
    match verdict {
        Verdict::Allow(who) => {
            request.extensions_mut().insert(who);
            next.run(request).await
        }
        Verdict::Unauthorized(why) => {
            let mut response = text(StatusCode::UNAUTHORIZED, &format!("{why}\n"));
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer, Basic realm=\"fulcrum admin\""),
            );
            response
        }
        Verdict::Forbidden(why) => {
            debug!(path = %request.uri().path(), "admin request forbidden: {why}");
            text(StatusCode::FORBIDDEN, &format!("{why}\n"))
        }
    }
}

/// A response with `Cache-Control: no-store` (every admin answer is live state).
fn respond(status: StatusCode, kind: &'static str, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn text(status: StatusCode, body: &str) -> Response {
    respond(status, "text/plain", body.to_string())
}

fn json(status: StatusCode, body: String) -> Response {
    respond(status, "application/json", body)
}

async fn page() -> Response {
    respond(
        StatusCode::OK,
        "text/html; charset=utf-8",
        status::PAGE.to_string(),
    )
}

async fn status_json(State(admin): State<Admin>) -> Response {
    json(
        StatusCode::OK,
        status::render(&admin.handle.state(), std::time::Instant::now()),
    )
}

async fn metrics(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = prometheus::Format::from_accept(accept);
    respond(
        StatusCode::OK,
        format.content_type(),
        prometheus::render_as(&admin.handle.state(), format),
    )
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n")
}

async fn reload(State(admin): State<Admin>, axum::Extension(who): axum::Extension<Who>) -> Response {
    info!(by = who.label(), "POST /reload: reloading configuration");
    match admin.handle.reload().await {
        Ok(generation) => json(
            StatusCode::OK,
            format!("{{\"result\":\"ok\",\"generation\":{generation}}}\n"),
        ),
        Err(e) => json(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{{\"result\":\"error\",\"error\":{}}}\n",
                serde_json::Value::String(e.to_string())
            ),
        ),
    }
}

/// The reload preview: which open connections the config file named by the body would close.
/// Loading and judging read files and verify chains, so they run off the async workers.
async fn impact(
    State(admin): State<Admin>,
    axum::Extension(who): axum::Extension<Who>,
    body: axum::body::Bytes,
) -> Response {
    let path = match impact::candidate(&body) {
        Ok(path) => path,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    info!(by = who.label(), path = %path.display(), "POST /impact: previewing a configuration");
    let live = Arc::clone(&admin.handle.live);
    match tokio::task::spawn_blocking(move || impact::preview(&live, &path)).await {
        Ok(Ok(closing)) => json(StatusCode::OK, impact::render(&closing)),
        Ok(Err(why)) => error(StatusCode::UNPROCESSABLE_ENTITY, &why),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the preview did not finish"),
    }
}

async fn quarantine_list(State(admin): State<Admin>) -> Response {
    json(
        StatusCode::OK,
        quarantine::list(&admin.handle.live).to_string() + "\n",
    )
}

/// Quarantines an identity or serial and closes its open connections.
async fn quarantine_add(
    State(admin): State<Admin>,
    axum::Extension(who): axum::Extension<Who>,
    body: axum::body::Bytes,
) -> Response {
    let added = quarantine::request(&body).and_then(|request| quarantine::add(&admin.handle.live, &request));
    match added {
        Ok(answer) => {
            info!(by = who.label(), answer = %answer, "POST /quarantine");
            json(StatusCode::OK, answer.to_string() + "\n")
        }
        Err(why) => error(StatusCode::BAD_REQUEST, &why),
    }
}

async fn quarantine_release(
    State(admin): State<Admin>,
    axum::Extension(who): axum::Extension<Who>,
    body: axum::body::Bytes,
) -> Response {
    let released =
        quarantine::request(&body).and_then(|request| quarantine::release(&admin.handle.live, &request));
    match released {
        Ok(answer) => {
            info!(by = who.label(), answer = %answer, "POST /quarantine/release");
            json(StatusCode::OK, answer.to_string() + "\n")
        }
        Err(why) => error(StatusCode::BAD_REQUEST, &why),
    }
}

/// A page of the open connections, by the query string's filters and cursor.
async fn connections_list(State(admin): State<Admin>, uri: axum::http::Uri) -> Response {
    match connections::listing(uri.query()) {
        Ok(listing) => json(StatusCode::OK, connections::list(&admin.handle.live, &listing)),
        Err(why) => error(StatusCode::BAD_REQUEST, &why),
    }
}

/// Closes (or counts, `dry_run`) the open connections the body's filters match.
async fn connections_close(
    State(admin): State<Admin>,
    axum::Extension(who): axum::Extension<Who>,
    body: axum::body::Bytes,
) -> Response {
    let closing = match connections::closing(&body) {
        Ok(closing) => closing,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let answer = connections::close(&admin.handle.live, &closing);
    info!(by = who.label(), filter = ?closing.filter, answer = %answer, "POST /connections/close");
    json(StatusCode::OK, answer.to_string() + "\n")
}

/// `{"state": ...}`, `{"weight": ...}` or both.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StateBody {
    state: Option<String>,
    weight: Option<u32>,
}

async fn backend_state(
    State(admin): State<Admin>,
    axum::Extension(who): axum::Extension<Who>,
    Path((upstream, backend)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    const EXPECTED: &str =
        "expected a JSON body {\"state\": \"ready\" | \"drain\" | \"maint\"} and/or {\"weight\": 1 to 256}";
    let Ok(body) = serde_json::from_slice::<StateBody>(&body) else {
        return error(StatusCode::BAD_REQUEST, EXPECTED);
    };
    let wanted = match body.state.as_deref().map(AdminState::parse) {
        Some(None) => return error(StatusCode::BAD_REQUEST, EXPECTED),
        Some(Some(state)) => Some(state),
        None => None,
    };
    let weight = body.weight;
    if (wanted.is_none() && weight.is_none()) || weight.is_some_and(|w| !(1..=MAX_WEIGHT).contains(&w)) {
        return error(StatusCode::BAD_REQUEST, EXPECTED);
    }
    let state = admin.handle.state();
    let Some(group) = state.upstream(&upstream) else {
        return error(StatusCode::NOT_FOUND, &format!("no upstream {upstream:?}"));
    };
    let Some(slot) = group.backends.iter().find(|b| b.label == backend).map(|b| b.slot) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("upstream {upstream:?} has no backend {backend:?}"),
        );
    };
    let mut reply = serde_json::json!({"result": "ok", "upstream": upstream, "backend": backend});
    if let Some(weight) = weight {
        let Some(spec) = group.pool.spec(slot) else {
            return error(StatusCode::NOT_FOUND, "the backend left the configuration");
        };
        group.pool.respec(
            slot,
            crate::balancer::Spec { weight, ..spec },
            std::time::Instant::now(),
        );
        info!(upstream = %upstream, backend = %backend, from = spec.weight, to = weight, by = who.label(), "backend weight set");
        reply["weight"] = weight.into();
        reply["previous_weight"] = spec.weight.into();
    }
    if let Some(wanted) = wanted {
        match crate::probe::set_admin_state(group, slot, wanted, who.label()) {
            Some(before) => {
                reply["state"] = wanted.label().into();
                reply["previous"] = before.label().into();
            }
            None => return error(StatusCode::NOT_FOUND, "the backend left the configuration"),
        }
    }
    json(StatusCode::OK, reply.to_string() + "\n")
}

fn error(status: StatusCode, why: &str) -> Response {
    json(
        status,
        serde_json::json!({"result": "error", "error": why}).to_string() + "\n",
    )
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "not found\n")
}

async fn method_not_allowed() -> Response {
    text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
}

/// Warns once at startup about an admin listener reachable from the network.
pub(crate) fn warn_if_exposed(settings: &crate::config::AdminConfig, addr: std::net::SocketAddr) {
    if !addr.ip().to_canonical().is_loopback() {
        if settings.token.is_some() {
            warn!(%addr, "admin listener is not on a loopback address: every endpoint but /healthz (and /metrics unless metrics_auth) needs the token");
        } else {
            warn!(%addr, "admin listener is not on a loopback address without [admin] token_file: /status and /metrics are open to the network, mutating endpoints are refused");
        }
    }
}
