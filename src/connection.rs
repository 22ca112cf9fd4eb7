//! One client connection's life, from accept to the closing log line: the connection's task
//! ([`handle`]) and the order of its phases, each in a file of its own, in the order a connection
//! lives.
//!
//! Each phase returns a value that says how the connection goes on, or why it ends:
//! 1. [`front`]: reading the front, the PROXY header on listeners that accept one (its source is
//!    then the client for everything after): who the client is, by its address;
//! 2. [`admission`]: on TLS listeners, the handshake under the listener's deadline, then, judged
//!    against the generation live at that moment, the upstream (SNI or the listener's), the
//!    client identity from the verified certificate (verified again for a resumed session), and
//!    the authorization of that identity for that upstream (mTLS; default deny): admitted (and
//!    registered for revocation and expiry) or refused;
//! 3. [`limits`]: the per-client rate limit (key: identity on mTLS listeners, source IP
//!    otherwise), a permit held for the whole connection;
//! 4. [`dial`]: pick a backend and dial it, trying the next least-loaded one on refusal or
//!    timeout; each dial's outcome feeds the backend's health (passive detection);
//! 5. [`relay`]: bytes both ways until both sides end, the drain deadline, the backend being
//!    marked down (`on_down = "close"`), the access being revoked or the client certificate
//!    expiring: an [`End`](end::End), whose label is the `end` field of the closing log line;
//! 6. [`end`]: one summary log line and one access log entry (see [`crate::accesslog`]) for every
//!    connection, refused ones included (with interim entries of long connections from the
//!    relay's meter).
//!
//! From accept to close the connection is listed in the table of open connections by its
//! [`record`] (`GET /connections`), whose facts are set here as each phase passes. Every phase
//! watches its record's cut signal beside the drain deadline ([`refusal::Stop`]): a connection
//! closed by an operator or quarantined ends at once, in whatever phase, its client reset and its
//! end logged with the cut's reason. A refusal ([`refusal`]) is recorded once, here, and the
//! client ([`client`]) closed as the refusing phase calls for. The handshake, connect and connection-duration histograms, the byte
//! counters (as bytes move) and the per-identity table are fed as the phases go. No backend is
//! dialed before phases 1-3 pass. The backend lease and the rate-limit permit are held for the
//! whole connection, so counts are exact on every path. Failures end this connection only. This
//! file owns the order of the phases and nothing else: the phases live in its folder (and call
//! downward, never back here), their rules in tls, identity, authz, ratelimit, balancer, net and
//! proxy.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{field, info_span, Instrument};

use crate::accesslog::Entry;
use crate::state::registry::Tracked;
use crate::state::{Listener, Live};

use admission::{Admission, Admitted};
use record::Record;
use refusal::{Step, Stop};
use relay::Proxied;

pub(crate) use limits::{take_places, Places};

mod admission;
mod client;
mod dial;
mod end;
mod front;
mod limits;
mod record;
mod refusal;
mod relay;

/// Serves one accepted client connection to completion: phases 1-4 ([`setup`], boxed), then
/// the relay and the end, listed in the table of open connections throughout. Never panics on
/// peer input; every wait on a peer is bounded by a deadline or by `abort` (the drain deadline).
// Not an `async fn`: its future would keep a second copy of every argument beside the captured
// one for the connection's whole life (the future sits in the task of every open connection).
// The setup's box is made here, so the task does not carry the client socket and address either.
pub(crate) fn handle(
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    live: Arc<Live>,
    place: Places,
    abort: CancellationToken,
) -> impl Future<Output = ()> {
    let span = info_span!(
        "conn",
        client.addr = %peer,
        listener = %listener.name,
        client.id = field::Empty,
        shadow = field::Empty,
        upstream = field::Empty,
        backend.addr = field::Empty,
        alpn = field::Empty,
    );
    let started = Instant::now();
    // Listed until the setup drops it (refused) or the relay gives it back (proxied).
    let record = live
        .registry
        .connections()
        .track(|id| Record::new(id, &listener, peer, started));
    // Phases 1-4 (front, admission, limits, dial) run in a box of their own, freed once they are
    // done: an idle connection's task then holds only what its relay needs.
    let setup = Box::pin(setup(
        client,
        peer,
        Arc::clone(&listener),
        live,
        abort.clone(),
        started,
        record,
    ));
    // The span covers the whole task, held once.
    async move {
        let (proxied, entry) = setup.await;
        // Without an access log the entry is not kept while the connection is open.
        let mut entry = listener.access_log.is_some().then_some(entry);
        if let Some(proxied) = proxied {
            // 5. The relay, until the connection ends.
            let (proxied, ended) = proxied.run(&abort, started, entry.as_deref()).await;
            // 6. Its end: the closing log line, then its counts given back and its sockets closed.
            end::close(ended, &proxied.listener, started, entry.as_deref_mut());
            proxied.release();
        }
        // The connection's places in the process's and the listener's caps, given back now.
        drop(place);
        end::log(listener.access_log.as_deref(), entry, started);
    }
    .instrument(span)
}

/// A connection's setup, owning what it needs (it runs in its own box): phases 1-4 ([`reach_backend`]). Gives back the relay to run, if any, and the access log entry.
async fn setup(
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<Listener>,
    live: Arc<Live>,
    abort: CancellationToken,
    started: Instant,
    record: Tracked<Record>,
) -> (Option<Box<Proxied>>, Box<Entry>) {
    // Boxed: the entry is large and an idle connection's task should not carry it inline.
    let mut entry = Box::new(Entry::new(&listener.name, peer));
    let proxied = reach_backend(
        client, peer, &listener, &live, &abort, started, record, &mut entry,
    )
    .await;
    (proxied, entry)
}

/// Phases 1-4, from the front to a backend that answered: `Some` when the relay can start. A
/// refusal is recorded here, then the client closed as its phase calls for: dropped after the
/// front, a TLS close_notify after a completed handshake, the listener's reject response after
/// the rate limit, a shutdown after a failed dial. A cut resets it ([`stopped`]).
#[allow(clippy::too_many_arguments)]
async fn reach_backend(
    mut client: TcpStream,
    peer: SocketAddr,
    listener: &Arc<Listener>,
    live: &Live,
    abort: &CancellationToken,
    started: Instant,
    record: Tracked<Record>,
    entry: &mut Entry,
) -> Option<Box<Proxied>> {
    let stop = Stop {
        abort,
        cut: &record.cut,
    };
    // One deadline for the PROXY header and the TLS handshake together.
    let deadline = crate::clock::later(
        tokio::time::Instant::from_std(started),
        listener.handshake_timeout,
    );
    // 1. The front: who the client is, by its address.
    let who = match front::front(&mut client, peer, listener, deadline, stop, entry).await {
        Step::Next(who) => who,
        Step::Refused(refusal) => {
            refusal.record(listener, entry);
            return None;
        }
        Step::Aborted => return stopped(stop, Some(&client), started, entry),
    };
    record.front(who.addr);
    // 2. Admission: the upstream, and the client's identity and authorization on TLS listeners.
    let admitted = match &listener.tls {
        None => admission::admit_plain(client, listener, who, &record, entry),
        Some(tls) => {
            match admission::admit(client, tls, listener, live, who, deadline, stop, &record, entry).await {
                Admission::Admitted(admitted) => *admitted,
                Admission::Refused { refusal, client } => {
                    refusal.record(listener, entry);
                    if let Some(mut client) = client {
                        client.close().await;
                    }
                    return None;
                }
                // The handshake reset a cut client itself.
                Admission::Aborted => return stopped(stop, None, started, entry),
            }
        }
    };
    let Admitted {
        mut client,
        // From here on, the listener as the generation live at admission has it.
        listener,
        upstream,
        who,
    } = admitted;
    // 3. The limits: the client's rate limit. Its check is not interrupted (a count half taken
    // in a shared store could be left behind); a cut meanwhile stops the dial at once.
    let limited = match limits::limit(&listener, &who.key).await {
        Ok(limited) => limited,
        Err(refusal) => {
            refusal.record(&listener, entry);
            client.turn_away(listener.reject_response.as_deref()).await;
            return None;
        }
    };
    // 4. The dial: a backend that answers.
    let connected = match dial::connect(&upstream, &who.origin(), stop, entry).await {
        Step::Next(connected) => connected,
        Step::Refused(refusal) => {
            refusal.record(&listener, entry);
            client.close().await;
            return None;
        }
        Step::Aborted => return stopped(stop, Some(client.tcp()), started, entry),
    };
    record.proxied(&connected.chosen);
    Some(Proxied::new(
        client,
        connected,
        limited,
        who.registration,
        listener,
        &upstream,
        started,
        record,
    ))
}

/// A connection stopped before its relay: when it was cut (closed by an operator,
/// quarantined), its `client` socket (if the phase still held it) reset and its end reported
/// with the cut's reason; at the drain deadline, nothing (see [`Step::Aborted`]).
fn stopped(
    stop: Stop<'_>,
    client: Option<&TcpStream>,
    started: Instant,
    entry: &mut Entry,
) -> Option<Box<Proxied>> {
    if let Some(why) = stop.cut() {
        if let Some(tcp) = client {
            client::reset(tcp);
        }
        end::cut_short(why, started, entry);
    }
    None
}

#[cfg(test)]
mod tests {
    /// Every open connection is one task holding this future: its size is most of what an idle
    /// connection costs, and the budget is at most 2.0 kB per idle plain connection. The setup's
    /// state (handshake, dial, refusal paths) lives in a box freed before the relay starts.
    #[tokio::test]
    async fn an_idle_connection_task_future_fits_in_half_a_kibibyte() {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = backend.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let toml = format!(
            "[[listener]]\nname='a'\nbind='127.0.0.1:0'\nupstream='u'\n[[upstream]]\nname='u'\nbackends=['{addr}']\n"
        );
        let config = crate::Config::from_toml(&toml, "t").expect("config");
        let server = crate::Server::bind(config).await.expect("bind server");
        let listener = server.state().listener("a").cloned().expect("listener");
        let live = server.live();
        let places = super::take_places(&live, &live.state(), &listener, addr).expect("places");
        let task = super::handle(
            client,
            addr,
            listener,
            live,
            places,
            tokio_util::sync::CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&task);
        // 2 784 bytes before the setup was boxed apart from the relay, 768 while `handle` and
        // `Proxied::run` were `async fn`s (each future kept a second copy of its arguments). At
        // 512 or less, tokio's task cell (the future plus about 120 bytes, in multiples of 128)
        // is 640 bytes.
        assert!(size <= 512, "a connection's future is {size} bytes");
        // What the relay holds besides, on the heap while bytes may flow.
        let relay = std::mem::size_of::<super::Proxied>();
        assert!(
            relay <= 320,
            "a proxied connection's relay state is {relay} bytes"
        );
    }
}
