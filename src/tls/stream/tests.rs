use std::future::poll_fn;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::client::TlsStream as ClientStream;

use super::*;
use crate::config::TlsConfig;
use crate::pki::Ca;

/// A listener's server configuration (no client certificate) and a client trusting it.
fn configs(tag: &str) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let dir = std::env::temp_dir().join(format!("fulcrum-stream-test-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new("stream CA").unwrap();
    let server = ca.server(&[]).unwrap();
    std::fs::write(dir.join("server.pem"), &server.cert).unwrap();
    std::fs::write(dir.join("server.key"), &server.key).unwrap();
    let config = crate::tls::server_config(&TlsConfig::new(dir.join("server.pem"), dir.join("server.key")));
    let _ = std::fs::remove_dir_all(&dir);
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let client = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (config.unwrap().config, Arc::new(client))
}

/// A handshake over loopback: fulcrum's server stream and a tokio-rustls client.
async fn connected(tag: &str) -> (TlsStream, ClientStream<TcpStream>) {
    let (server, client) = configs(tag);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let dial = async {
        let tcp = TcpStream::connect(address).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .unwrap()
    };
    let serve = async {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut hello = Hello::new(tcp);
        let accepted = hello.read().await.unwrap();
        let name = accepted.client_hello().server_name().map(str::to_string);
        drop(accepted);
        let mut stream = hello.start(server, name).unwrap();
        stream.handshake().await.unwrap();
        stream
    };
    let (client, stream) = tokio::join!(dial, serve);
    (stream, client)
}

/// Polls one read as an idle relay does: it must wait.
async fn park(stream: &mut TlsStream) {
    let mut space = [0u8; 16];
    poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut space);
        match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Ready(()),
            Poll::Ready(read) => panic!("nothing was sent, yet the read ended: {read:?}"),
        }
    })
    .await;
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn bytes_cross_both_ways_through_small_reads_and_large_writes_and_an_idle_stream_holds_no_buffer() {
    let (mut stream, mut client) = connected("both-ways").await;
    assert_eq!(stream.server_name(), Some("localhost"));
    // Two records and a part, read 100 bytes at a time: what a read has no room for is kept.
    let sent = pattern(40_000);
    let (_, received) = tokio::join!(async { client.write_all(&sent).await.unwrap() }, async {
        let mut received = Vec::new();
        let mut small = [0u8; 100];
        while received.len() < sent.len() {
            let n = stream.read(&mut small).await.unwrap();
            assert!(n > 0, "EOF after {} bytes", received.len());
            received.extend_from_slice(&small[..n]);
        }
        received
    });
    assert_eq!(received, sent);
    // More than one write encrypts at once.
    let answer = pattern(3 * WRITE_SIZE + 7);
    let (_, echoed) = tokio::join!(
        async {
            stream.write_all(&answer).await.unwrap();
            stream.flush().await.unwrap();
        },
        async {
            let mut echoed = vec![0; answer.len()];
            client.read_exact(&mut echoed).await.unwrap();
            echoed
        }
    );
    assert_eq!(echoed, answer);
    park(&mut stream).await;
    assert_eq!(
        (
            stream.incoming.buf.capacity(),
            stream.outgoing.capacity(),
            stream.plaintext.capacity()
        ),
        (0, 0, 0),
        "an idle stream holds a buffer"
    );
}

#[tokio::test]
async fn the_peer_s_close_notify_reads_as_the_end_and_our_shutdown_sends_one() {
    let (mut stream, mut client) = connected("close-notify").await;
    client.write_all(b"last").await.unwrap();
    client.shutdown().await.unwrap();
    let mut all = Vec::new();
    stream.read_to_end(&mut all).await.unwrap();
    assert_eq!(all, b"last");
    stream.write_all(b"reply").await.unwrap();
    stream.shutdown().await.unwrap();
    // tokio-rustls reads a FIN without close_notify as an error.
    let mut reply = Vec::new();
    client
        .read_to_end(&mut reply)
        .await
        .expect("the server's close_notify");
    assert_eq!(reply, b"reply");
}

#[tokio::test]
async fn a_fin_without_close_notify_is_an_unexpected_end_not_a_clean_one() {
    let (mut stream, client) = connected("bare-fin").await;
    let (mut tcp, _) = client.into_inner();
    tcp.shutdown().await.unwrap();
    let mut all = Vec::new();
    let error = stream
        .read_to_end(&mut all)
        .await
        .expect_err("a truncated stream read as complete");
    assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
}

#[tokio::test]
async fn a_client_hello_that_never_ends_is_refused_with_no_more_held_than_the_bound() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let flood = async {
        let mut tcp = TcpStream::connect(address).await.unwrap();
        // A ClientHello that claims 16 MiB, then records of it until the server stops reading.
        let mut first = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
        first.resize(5 + 0x4000, 0);
        if tcp.write_all(&first).await.is_err() {
            return;
        }
        let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00];
        record.resize(5 + 0x4000, 0);
        for _ in 0..64 {
            if tcp.write_all(&record).await.is_err() {
                return;
            }
        }
    };
    let serve = async {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut hello = Hello::new(tcp);
        let refused = hello.read().await.expect_err("an endless ClientHello was taken");
        assert!(
            hello.incoming.buf.len() <= MAX_INCOMING,
            "held {} bytes",
            hello.incoming.buf.len()
        );
        refused
    };
    let (_, refused) = tokio::join!(flood, serve);
    assert_eq!(refused.kind(), io::ErrorKind::InvalidData, "{refused}");
}

#[tokio::test]
async fn a_key_update_from_the_client_is_answered_and_bytes_keep_flowing_both_ways() {
    let (mut stream, mut client) = connected("key-update").await;
    for round in 0..3u8 {
        // The client's key_update asks for ours: the server must send it before its next record,
        // or the client cannot read what follows.
        client.get_mut().1.refresh_traffic_keys().unwrap();
        client.write_all(&[round; 100]).await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0u8; 100];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [round; 100]);
        stream.write_all(&[round + 1; 50]).await.unwrap();
        stream.flush().await.unwrap();
        let mut back = [0u8; 50];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(back, [round + 1; 50]);
    }
}
