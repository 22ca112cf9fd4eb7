//! The I/O edge of the PROXY protocol codec: reading a header off the front of a socket.
//!
//! [`read_header`] peeks, so nothing after the header is ever consumed, and runs within the
//! caller's deadline. Used by listeners with `accept_proxy_protocol` and by the demo backend.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::{parse, Header, Parse, MAX_HEADER};

/// Reads a PROXY protocol header from the start of `stream`, consuming exactly its bytes (it
/// peeks, so nothing after the header is ever taken), all within `deadline`.
pub async fn read_header(stream: &mut TcpStream, deadline: Duration) -> Result<Header, String> {
    let read = async {
        let mut buf = vec![0u8; MAX_HEADER];
        let mut seen = 0;
        loop {
            let n = stream.peek(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed before a complete PROXY header".to_string());
            }
            match parse(&buf[..n]) {
                Ok(Parse::Complete(header)) => {
                    stream
                        .read_exact(&mut buf[..header.len])
                        .await
                        .map_err(|e| e.to_string())?;
                    return Ok(header);
                }
                Ok(Parse::Incomplete) if n >= MAX_HEADER => {
                    return Err(format!("PROXY header longer than {MAX_HEADER} bytes"));
                }
                Ok(Parse::Incomplete) => {
                    // Peeking again returns at once with the same bytes: wait a little for more.
                    if n == seen {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    seen = n;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| "no complete PROXY header before the deadline".to_string())?
}
