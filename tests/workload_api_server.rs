//! The tests' SPIFFE Workload API server (tests/common/workload_api.rs) against the real client,
//! the `spiffe` crate fulcrum uses: what it serves, rotation through open streams, federation,
//! stopping, and its refusals. These check the test tool; fulcrum's `source = "spiffe"` has its
//! own end-to-end tests built on it.

mod common;

use std::time::Duration;

use common::pki::{self, Cert};
use common::workload_api::{pb, Svid, Workload, WorkloadApi};
use common::{wait_until, within, TempDir};
use spiffe::{TrustDomain, WorkloadApiClient, WorkloadApiError, X509BundleSet, X509Source, X509SourceError};
use tokio_stream::StreamExt as _;

const ID: &str = "spiffe://example.org/fulcrum";

async fn source(api: &WorkloadApi) -> X509Source {
    within(
        "the X509Source's initial sync",
        X509Source::builder().endpoint(api.endpoint()).build(),
    )
    .await
    .expect("an X509Source from the test Workload API")
}

async fn client(api: &WorkloadApi) -> WorkloadApiClient {
    within(
        "a Workload API client",
        WorkloadApiClient::connect_to(api.endpoint()),
    )
    .await
    .expect("connect to the test Workload API")
}

/// The DER of each CA the bundle set holds for `trust_domain`.
fn authorities(bundles: &X509BundleSet, trust_domain: &str) -> Vec<Vec<u8>> {
    let trust_domain = TrustDomain::new(trust_domain).expect("a trust domain");
    let bundle = bundles
        .get(&trust_domain)
        .unwrap_or_else(|| panic!("no bundle for {trust_domain}"));
    bundle
        .authorities()
        .iter()
        .map(|ca| ca.as_bytes().to_vec())
        .collect()
}

fn ders(cas: &[&Cert]) -> Vec<Vec<u8>> {
    cas.iter().map(|ca| ca.der().to_vec()).collect()
}

/// Calls `FetchX509SVID` as a bare gRPC client, with or without the Workload API header (the
/// `spiffe` client always sends it).
async fn fetch_x509_svid(
    api: &WorkloadApi,
    header: bool,
) -> Result<tonic::Streaming<pb::X509svidResponse>, tonic::Status> {
    let endpoint = spiffe::transport::Endpoint::parse(&api.endpoint()).expect("the endpoint parses");
    let channel = within(
        "a channel to the Workload API",
        spiffe::transport::connect(&endpoint),
    )
    .await
    .expect("connect to the Workload API");
    let mut grpc = tonic::client::Grpc::new(channel);
    within("the channel to be ready", grpc.ready())
        .await
        .expect("channel ready");
    let mut request = tonic::Request::new(pb::X509svidRequest {});
    if header {
        request.metadata_mut().insert(
            "workload.spiffe.io",
            tonic::metadata::MetadataValue::from_static("true"),
        );
    }
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/SpiffeWorkloadAPI/FetchX509SVID");
    let call = grpc.server_streaming(request, path, tonic_prost::ProstCodec::default());
    within("FetchX509SVID", call)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn an_x509_source_receives_the_served_svid_and_its_trust_domain_bundle() {
    let dir = TempDir::new("wlapi-serves");
    let ca = pki::root("example.org CA");
    let svid = Svid::issue(&ca, ID);
    let leaf = svid.chain[0].to_vec();
    let api = WorkloadApi::start(dir.path(), Workload::new(svid)).await;

    let source = source(&api).await;
    let served = source.svid().expect("an SVID");
    assert_eq!(served.spiffe_id().to_string(), ID);
    assert_eq!(served.leaf().as_bytes(), leaf.as_slice());
    let bundles = source.bundle_set().expect("a bundle set");
    assert_eq!(authorities(&bundles, "example.org"), ders(&[&ca]));
    api.stop().await;
}

#[tokio::test]
async fn a_rotated_svid_reaches_an_open_source_through_its_stream() {
    let dir = TempDir::new("wlapi-rotates");
    let ca = pki::root("example.org CA");
    let api = WorkloadApi::start(dir.path(), Workload::new(Svid::issue(&ca, ID))).await;
    let source = source(&api).await;
    let mut updates = source.updated();
    // The initial sync's call, then the long-lived one of the source's supervisor.
    wait_until("the source's update stream", || api.streams() == 2).await;

    let rotated = Svid::issue(&ca, ID);
    let rotated_leaf = rotated.chain[0].to_vec();
    api.update(Workload::new(rotated));
    within("the source to see the rotation", updates.changed())
        .await
        .expect("the source is open");

    let served = source.svid().expect("an SVID");
    assert_eq!(served.leaf().as_bytes(), rotated_leaf.as_slice());
    assert_eq!(
        api.streams(),
        2,
        "the rotation came through the open stream, not a new one"
    );
    api.stop().await;
}

#[tokio::test]
async fn federated_bundles_arrive_in_the_sources_bundle_set() {
    let dir = TempDir::new("wlapi-federates");
    let ca = pki::root("example.org CA");
    let partner = pki::root("partner.org CA");
    let workload = Workload::new(Svid::issue(&ca, ID)).federate("spiffe://partner.org", &[&partner]);
    let api = WorkloadApi::start(dir.path(), workload).await;

    let source = source(&api).await;
    let bundles = source.bundle_set().expect("a bundle set");
    assert_eq!(authorities(&bundles, "partner.org"), ders(&[&partner]));
    assert_eq!(authorities(&bundles, "example.org"), ders(&[&ca]));
    api.stop().await;
}

#[tokio::test]
async fn the_bundles_stream_sends_every_trust_domain_now_and_on_each_update() {
    let dir = TempDir::new("wlapi-bundles");
    let ca = pki::root("example.org CA");
    let partner = pki::root("partner.org CA");
    let api = WorkloadApi::start(dir.path(), Workload::new(Svid::issue(&ca, ID))).await;
    let client = client(&api).await;
    let mut stream = within("FetchX509Bundles", client.stream_x509_bundles())
        .await
        .expect("a bundles stream");

    let first = within("the first bundles", stream.next()).await;
    let first = first.expect("a message").expect("valid bundles");
    assert_eq!(authorities(&first, "example.org"), ders(&[&ca]));
    assert_eq!(first.len(), 1);

    let rolled = pki::root("example.org CA");
    let next = Workload::new(Svid::issue(&rolled, ID)).federate("spiffe://partner.org", &[&partner]);
    api.update(next);
    let second = within("the updated bundles", stream.next()).await;
    let second = second.expect("a message").expect("valid bundles");
    assert_eq!(authorities(&second, "example.org"), ders(&[&rolled]));
    assert_eq!(authorities(&second, "partner.org"), ders(&[&partner]));
    api.stop().await;
}

#[tokio::test]
async fn stopping_the_server_ends_open_streams_and_removes_the_socket() {
    let dir = TempDir::new("wlapi-stops");
    let ca = pki::root("example.org CA");
    let api = WorkloadApi::start(dir.path(), Workload::new(Svid::issue(&ca, ID))).await;
    let path = api.path().to_path_buf();
    let client = client(&api).await;
    let mut stream = within("FetchX509SVID", client.stream_x509_svids())
        .await
        .expect("an SVID stream");
    let first = within("the first SVID", stream.next()).await;
    assert_eq!(
        first
            .expect("a message")
            .expect("a valid SVID")
            .spiffe_id()
            .to_string(),
        ID
    );

    api.stop().await;
    let after = within("the stream to end", stream.next()).await;
    assert!(after.is_none(), "the stream ended cleanly, got {after:?}");
    assert!(!path.exists(), "{} removed", path.display());
}

#[tokio::test]
async fn a_new_source_times_out_its_initial_sync_against_a_stopped_server() {
    let dir = TempDir::new("wlapi-gone");
    let ca = pki::root("example.org CA");
    let api = WorkloadApi::start(dir.path(), Workload::new(Svid::issue(&ca, ID))).await;
    let endpoint = api.endpoint();
    api.stop().await;

    let build = X509Source::builder()
        .endpoint(endpoint)
        .initial_sync_timeout(Duration::from_millis(300))
        .build();
    let built = within("the initial sync to time out", build).await;
    assert!(
        matches!(built, Err(X509SourceError::InitialSyncTimeout)),
        "expected InitialSyncTimeout, got {:?}",
        built.err()
    );
}

#[tokio::test]
async fn a_call_with_the_workload_header_is_answered() {
    let dir = TempDir::new("wlapi-header");
    let ca = pki::root("example.org CA");
    let api = WorkloadApi::start(dir.path(), Workload::new(Svid::issue(&ca, ID))).await;

    let mut stream = fetch_x509_svid(&api, true).await.expect("answered");
    let first = within("the first response", stream.message()).await;
    let first = first.expect("a response").expect("a message");
    assert_eq!(first.svids.len(), 1);
    assert_eq!(first.svids[0].spiffe_id, ID);
    assert_eq!(api.streams(), 1);
    api.stop().await;
}

#[tokio::test]
async fn a_call_without_the_workload_header_is_refused_as_an_invalid_argument() {
    let dir = TempDir::new("wlapi-no-header");
    let ca = pki::root("example.org CA");
    let api = WorkloadApi::start(dir.path(), Workload::new(Svid::issue(&ca, ID))).await;

    let refused = fetch_x509_svid(&api, false).await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    assert_eq!(api.streams(), 0);
    api.stop().await;
}

#[tokio::test]
async fn a_workload_without_svids_is_told_no_identity_was_issued() {
    let dir = TempDir::new("wlapi-no-identity");
    let api = WorkloadApi::start(dir.path(), Workload::default()).await;
    let client = client(&api).await;

    let fetched = within("FetchX509SVID", client.fetch_x509_svid()).await;
    assert!(
        matches!(fetched, Err(WorkloadApiError::NoIdentityIssued)),
        "expected NoIdentityIssued, got {fetched:?}"
    );
    api.stop().await;
}
