//! The I/O edge of the PROXY protocol codec: reading a header off the front of a socket.
//!
//! [`read_header`] never consumes a byte that follows the header: it peeks, and consumes only
//! bytes the parser has seen to be part of the header. While the header is incomplete every
//! byte received so far belongs to it (the parser refuses anything that is not a valid prefix),
//! so those are taken out of the socket and the reader waits for the socket to become readable
//! again: no polling, whatever pace the peer sends at. Everything happens before the caller's
//! deadline. Used by listeners with `accept_proxy_protocol` and by the demo backend.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{parse, Header, Parse, MAX_HEADER};

/// Reads a PROXY protocol header from the start of `stream`, consuming exactly its bytes, by
/// `deadline`.
pub async fn read_header(stream: &mut TcpStream, deadline: Instant) -> Result<Header, String> {
    tokio::time::timeout_at(deadline, read(stream))
        .await
        .map_err(|_| "no complete PROXY header before the deadline".to_string())?
}

async fn read(stream: &mut TcpStream) -> Result<Header, String> {
    let mut buf = vec![0u8; MAX_HEADER];
    // Header bytes already taken out of the socket.
    let mut taken = 0;
    loop {
        let peeked = stream.peek(&mut buf[taken..]).await.map_err(|e| e.to_string())?;
        if peeked == 0 {
            return Err("closed before a complete PROXY header".to_string());
        }
        let seen = taken + peeked;
        match parse(&buf[..seen]) {
            Ok(Parse::Complete(header)) => {
                let rest = header.len.saturating_sub(taken);
                stream
                    .read_exact(&mut buf[taken..taken + rest])
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(header);
            }
            Ok(Parse::Incomplete) if seen >= MAX_HEADER => {
                return Err(format!("PROXY header longer than {MAX_HEADER} bytes"));
            }
            Ok(Parse::Incomplete) => {
                // All of it is header: take it out, so the next peek waits for new bytes.
                stream
                    .read_exact(&mut buf[taken..seen])
                    .await
                    .map_err(|e| e.to_string())?;
                taken = seen;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let near = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (far, _) = listener.accept().await.expect("accept");
        (near, far)
    }

    #[tokio::test]
    async fn a_header_sent_byte_by_byte_is_read_and_the_payload_after_it_is_left() {
        let (mut near, mut far) = pair().await;
        let header = b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n";
        let writer = tokio::spawn(async move {
            for byte in header {
                near.write_all(&[*byte]).await.expect("write");
                tokio::task::yield_now().await;
            }
            near.write_all(b"payload").await.expect("payload");
            near
        });
        let read = read_header(&mut far, Instant::now() + std::time::Duration::from_secs(10)).await;
        let header = read.expect("a complete header");
        assert_eq!(
            header.source.map(|s| s.to_string()).as_deref(),
            Some("192.0.2.1:5000")
        );
        let _near = writer.await.expect("writer");
        let mut payload = [0u8; 7];
        far.read_exact(&mut payload).await.expect("payload");
        assert_eq!(&payload, b"payload");
    }

    #[tokio::test]
    async fn an_incomplete_header_ends_at_the_deadline() {
        let (mut near, mut far) = pair().await;
        near.write_all(b"PROXY TCP4 192.0.2.1").await.expect("write");
        let deadline = Instant::now() + std::time::Duration::from_millis(200);
        let error = read_header(&mut far, deadline).await.expect_err("incomplete");
        assert!(error.contains("deadline"), "{error}");
        assert!(Instant::now() >= deadline);
    }
}
