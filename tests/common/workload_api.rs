//! A SPIFFE Workload API server for tests, standing in for the SPIRE agent: [`WorkloadApi`]
//! serves a [`Workload`] (X509-SVIDs and bundles made with [`pki`]) over a Unix socket and pushes
//! each [`update`](WorkloadApi::update) to every open stream, so a test can rotate what fulcrum
//! holds. The public proto's code is `workload_api/pb.rs` (see scripts/gen-workload-api).
//!
//! Like SPIRE it refuses a call without the `workload.spiffe.io: true` header
//! (`InvalidArgument`) and answers `PermissionDenied` "no identity issued" to a workload without
//! SVIDs. It attests nothing (every caller is the one workload) and serves no CRLs; the JWT RPCs
//! answer `Unimplemented`. It knows nothing of fulcrum.

pub mod pb;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::pki::{self, Cert};
use super::within;
use pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};

/// The metadata header every Workload API call must carry (SPIFFE Workload Endpoint spec).
const HEADER: &str = "workload.spiffe.io";

/// One X509-SVID as the Workload API serves it.
pub struct Svid {
    /// `spiffe://trust-domain/path`, the leaf's URI SAN.
    pub id: String,
    /// The leaf, then the intermediates it sends.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The CA certificates of the SVID's trust domain.
    pub bundle: Vec<CertificateDer<'static>>,
}

impl Svid {
    /// A fresh leaf for `id` ([`pki::svid_params`]) signed by `ca`, its trust domain's one CA.
    pub fn issue(ca: &Cert, id: &str) -> Svid {
        Svid::new(id, &pki::issue(pki::svid_params(&[id]), Some(ca)), &[], &[ca])
    }

    /// An SVID for `id` from certificates made with [`pki`]: `leaf`, the `intermediates` it
    /// sends, and the CAs of its trust domain (`bundle`).
    pub fn new(id: &str, leaf: &Cert, intermediates: &[&Cert], bundle: &[&Cert]) -> Svid {
        Svid {
            id: id.to_owned(),
            chain: std::iter::once(leaf)
                .chain(intermediates.iter().copied())
                .map(Cert::der)
                .collect(),
            key: leaf.key_der(),
            bundle: bundle.iter().map(|ca| ca.der()).collect(),
        }
    }

    /// `spiffe://trust-domain`, the key of its bundle.
    fn trust_domain(&self) -> &str {
        let end = self.id.strip_prefix("spiffe://").and_then(|rest| rest.find('/'));
        &self.id[..end.map_or(self.id.len(), |slash| "spiffe://".len() + slash)]
    }
}

/// What the workload is given: its SVIDs (the first is the default one) and the CAs of the
/// trust domains it federates with.
#[derive(Default)]
pub struct Workload {
    pub svids: Vec<Svid>,
    /// CA certificates keyed by trust domain ID, `spiffe://trust-domain`.
    pub federated: BTreeMap<String, Vec<CertificateDer<'static>>>,
}

impl Workload {
    /// A workload with one SVID and no federation.
    pub fn new(svid: Svid) -> Workload {
        Workload {
            svids: vec![svid],
            federated: BTreeMap::new(),
        }
    }

    /// This workload, also trusting `cas` for `trust_domain` (`spiffe://trust-domain`).
    pub fn federate(mut self, trust_domain: &str, cas: &[&Cert]) -> Workload {
        self.federated
            .insert(trust_domain.to_owned(), cas.iter().map(|ca| ca.der()).collect());
        self
    }
}

/// A [`Workload`] as the two responses, encoded once per update and cloned to every stream.
#[derive(Clone)]
struct Served {
    svids: Result<pb::X509svidResponse, Status>,
    bundles: Result<pb::X509BundlesResponse, Status>,
}

impl From<Workload> for Served {
    fn from(workload: Workload) -> Served {
        if workload.svids.is_empty() {
            // SPIRE's answer to a workload no registration entry matches.
            let denied = Status::permission_denied("no identity issued");
            return Served {
                svids: Err(denied.clone()),
                bundles: Err(denied),
            };
        }
        let federated: BTreeMap<String, Vec<u8>> = workload
            .federated
            .iter()
            .map(|(trust_domain, cas)| (trust_domain.clone(), concat(cas)))
            .collect();
        let mut bundles = federated.clone();
        for svid in workload.svids.iter().rev() {
            bundles.insert(svid.trust_domain().to_owned(), concat(&svid.bundle));
        }
        let svids = workload
            .svids
            .iter()
            .map(|svid| pb::X509svid {
                spiffe_id: svid.id.clone(),
                x509_svid: concat(&svid.chain),
                x509_svid_key: svid.key.secret_pkcs8_der().to_vec(),
                bundle: concat(&svid.bundle),
                hint: String::new(),
            })
            .collect();
        Served {
            svids: Ok(pb::X509svidResponse {
                svids,
                crl: Vec::new(),
                federated_bundles: federated.into_iter().collect(),
            }),
            bundles: Ok(pb::X509BundlesResponse {
                crl: Vec::new(),
                bundles: bundles.into_iter().collect(),
            }),
        }
    }
}

/// Certificates as the proto carries them: their DER one after the other.
fn concat(certs: &[CertificateDer<'_>]) -> Vec<u8> {
    certs
        .iter()
        .flat_map(|cert| cert.as_ref().iter().copied())
        .collect()
}

/// A running Workload API server on `agent.sock` in a test's directory.
pub struct WorkloadApi {
    path: PathBuf,
    current: watch::Sender<Served>,
    answered: Arc<AtomicUsize>,
    /// Ends the streams and the server.
    stopping: CancellationToken,
    /// One task per open stream.
    stream_tasks: TaskTracker,
    serving: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl WorkloadApi {
    /// Binds `dir/agent.sock` and serves `first` until [`stop`](WorkloadApi::stop).
    pub async fn start(dir: &Path, first: Workload) -> WorkloadApi {
        let path = std::path::absolute(dir.join("agent.sock")).expect("absolute socket path");
        let listener = tokio::net::UnixListener::bind(&path)
            .unwrap_or_else(|e| panic!("bind the Workload API socket {}: {e}", path.display()));
        let (current, receiver) = watch::channel(Served::from(first));
        let answered = Arc::new(AtomicUsize::new(0));
        let stopping = CancellationToken::new();
        let stream_tasks = TaskTracker::new();
        let service = Service {
            current: receiver,
            answered: Arc::clone(&answered),
            stopping: stopping.clone(),
            stream_tasks: stream_tasks.clone(),
        };
        let serving = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(SpiffeWorkloadApiServer::new(service))
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    stopping.clone().cancelled_owned(),
                ),
        );
        WorkloadApi {
            path,
            current,
            answered,
            stopping,
            stream_tasks,
            serving,
        }
    }

    /// The endpoint as SPIFFE clients name it: `unix:///abs/path/agent.sock`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves `next` from now on: every open stream sends it at once, new ones start with it.
    pub fn update(&self, next: Workload) {
        self.current.send_replace(Served::from(next));
    }

    /// How many `FetchX509SVID` calls were answered with a stream so far. An `X509Source` makes
    /// two: one for its initial sync (it keeps the first message), then its long-lived one.
    pub fn streams(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// How many streams are open now (a client that goes away closes its own).
    pub fn open_streams(&self) -> usize {
        self.stream_tasks.len()
    }

    /// Ends every open stream (cleanly, as an agent restarting does), stops the server and
    /// removes the socket.
    pub async fn stop(mut self) {
        self.stopping.cancel();
        self.stream_tasks.close();
        let served = within("the Workload API server to stop", &mut self.serving).await;
        served
            .expect("the Workload API server task")
            .expect("the Workload API server");
        within("the Workload API streams to end", self.stream_tasks.wait()).await;
        std::fs::remove_file(&self.path)
            .unwrap_or_else(|e| panic!("remove the Workload API socket {}: {e}", self.path.display()));
    }
}

impl Drop for WorkloadApi {
    /// A server dropped without [`stop`](WorkloadApi::stop) (a failed test) still ends.
    fn drop(&mut self) {
        self.stopping.cancel();
    }
}

/// The gRPC service: answers each X.509 call with a stream of the current [`Served`].
struct Service {
    current: watch::Receiver<Served>,
    answered: Arc<AtomicUsize>,
    stopping: CancellationToken,
    stream_tasks: TaskTracker,
}

impl Service {
    /// A stream of `pick(current)`: one message now and one on every update, until the server
    /// stops or the client goes; an error message (no identity) ends it.
    fn stream<T: Send + 'static>(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        pick: fn(&Served) -> Result<T, Status>,
    ) -> Result<Response<BoxStream<T>>, Status> {
        if metadata.get(HEADER).and_then(|value| value.to_str().ok()) != Some("true") {
            return Err(Status::invalid_argument("security header missing from request"));
        }
        let (sender, receiver) = mpsc::channel(1);
        let mut current = self.current.clone();
        let stopping = self.stopping.clone();
        self.stream_tasks.spawn(async move {
            loop {
                let message = pick(&current.borrow_and_update());
                let last = message.is_err();
                tokio::select! {
                    sent = sender.send(message) => if sent.is_err() || last { return },
                    () = stopping.cancelled() => return,
                }
                tokio::select! {
                    changed = current.changed() => if changed.is_err() { return },
                    () = sender.closed() => return,
                    () = stopping.cancelled() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Service {
    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<BoxStream<pb::X509svidResponse>>, Status> {
        let stream = self.stream(request.metadata(), |served| served.svids.clone())?;
        self.answered.fetch_add(1, Ordering::SeqCst);
        Ok(stream)
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<BoxStream<pb::X509BundlesResponse>>, Status> {
        self.stream(request.metadata(), |served| served.bundles.clone())
    }
}
