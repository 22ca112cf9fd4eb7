//! Plain TCP clients of fulcrum: connect, echo round trips, one admin HTTP request, clean and
//! abrupt ends, all under the deadline. TLS clients are in `tls.rs`.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{poll_for, within, DEADLINE};

/// Connects to `addr`, within the deadline.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    within("connect", TcpStream::connect(addr))
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Writes `message` and reads back exactly as many bytes (an echo round trip).
pub async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    within("write", stream.write_all(message)).await.expect("write");
    let mut reply = vec![0u8; message.len()];
    within("echo reply", stream.read_exact(&mut reply))
        .await
        .expect("read echo reply");
    reply
}

/// One HTTP/1.1 request (to the admin API) with `Connection: close`; the status code and the
/// body. A `Host` header is added unless `headers` has one.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let mut stream = connect(addr).await;
    within("the admin request", stream.write_all(request.as_bytes()))
        .await
        .expect("send");
    let response = String::from_utf8(read_to_end(&mut stream).await.expect("answer")).expect("UTF-8");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// Reads until end of stream, within the deadline.
pub async fn read_to_end(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    within("end of stream", stream.read_to_end(&mut out)).await?;
    Ok(out)
}

/// Closes cleanly: half-close, then read (and check) until the peer's end of stream.
pub async fn close(mut stream: TcpStream) {
    within("shutdown", stream.shutdown()).await.expect("shutdown");
    let rest = read_to_end(&mut stream).await.expect("clean end of stream");
    assert!(rest.is_empty(), "unexpected bytes at close: {rest:?}");
}

/// Waits until connecting to `addr` is refused (the listener is closed).
pub async fn wait_until_refused(addr: SocketAddr) {
    let refused = poll_for(async || {
        match tokio::time::timeout(DEADLINE, TcpStream::connect(addr)).await {
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Some(()),
            // The listener closed while this handshake was queued: it is closing, look again.
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => None,
            Ok(Err(e)) => panic!("connect to {addr} failed with {e}, expected a refusal"),
            // Still accepting: drop the connection and look again.
            Ok(Ok(stream)) => {
                drop(stream);
                None
            }
            Err(_) => panic!("connect to {addr} hung for {DEADLINE:?}"),
        }
    })
    .await;
    if refused.is_none() {
        panic!("{addr} still accepts connections after {DEADLINE:?}");
    }
}

/// Asserts the peer ends `stream` (end of stream or reset) without sending data.
pub async fn assert_ends<S: tokio::io::AsyncRead + Unpin>(stream: &mut S, what: &str) {
    let mut buf = [0u8; 16];
    match within(&format!("{what} to end"), stream.read(&mut buf)).await {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("{what}: {n} bytes instead of the end of the connection"),
    }
}
