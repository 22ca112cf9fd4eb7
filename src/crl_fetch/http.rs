//! One HTTP/1.1 GET of a CRL (hyper's client over a plain TCP connection): status 200 only,
//! redirects not followed, and a body larger than the bound refused as soon as its
//! `Content-Length` says so, or as soon as more arrives, never buffered whole. The caller puts
//! the whole exchange under its deadline.

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why no CRL body came back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("cannot connect to {authority}: {reason}")]
    Connect { authority: String, reason: String },
    #[error("the HTTP exchange failed: {0}")]
    Http(String),
    #[error("the server answered HTTP {0} (only 200 is taken; redirects are not followed)")]
    Status(u16),
    #[error("the body is larger than crl_max_size ({0} bytes)")]
    TooLarge(u64),
}

/// GETs `uri` (an `http://` URL checked by `config::crl_url`), returning its body if it is at
/// most `max_size` bytes.
pub(crate) async fn get(uri: &Uri, max_size: u64) -> Result<Bytes, FetchError> {
    let authority = uri.authority().map_or_else(String::new, |a| a.to_string());
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let connect = |reason: String| FetchError::Connect {
        authority: authority.clone(),
        reason,
    };
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| connect(e.to_string()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, &authority)
        .header(
            hyper::header::USER_AGENT,
            concat!("fulcrum/", env!("CARGO_PKG_VERSION")),
        )
        .header(
            hyper::header::ACCEPT,
            "application/pkix-crl, application/x-pem-file, */*",
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Http(e.to_string()))?;
    let limit = usize::try_from(max_size).unwrap_or(usize::MAX);
    let exchange = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if response.status() != hyper::StatusCode::OK {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let declared = response
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|length| length > max_size) {
            return Err(FetchError::TooLarge(max_size));
        }
        match Limited::new(response.into_body(), limit).collect().await {
            Ok(body) => Ok(body.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(FetchError::TooLarge(max_size)),
            Err(e) => Err(FetchError::Http(e.to_string())),
        }
    };
    // The connection is driven here, beside the exchange, rather than on a task of its own.
    tokio::pin!(exchange);
    tokio::pin!(connection);
    let mut driving = true;
    loop {
        tokio::select! {
            result = &mut exchange => return result,
            ended = &mut connection, if driving => {
                driving = false;
                if let Err(e) = ended {
                    return Err(FetchError::Http(e.to_string()));
                }
            }
        }
    }
}
