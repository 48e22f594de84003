//! A minimal, blocking HTTP/1.1 client over a unix socket, std only: the CNI plugin must start
//! fast and carry no async runtime. One request per connection (`Connection: close`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ErrorBody;

/// Why a call failed.
#[derive(Debug)]
pub enum ClientError {
    /// The socket is not there or refuses connections: the daemon is not running.
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Reading or writing failed (or timed out).
    Io(std::io::Error),
    /// The daemon closed the connection before its whole answer came (it stopped or
    /// crashed while serving the request, which may or may not have taken effect).
    Closed {
        /// Bytes of the answer received before the close.
        received: usize,
    },
    /// The answer is not HTTP or not the JSON expected.
    Protocol(String),
    /// The daemon answered with an error.
    Api {
        /// HTTP status.
        status: u16,
        /// The error.
        body: ErrorBody,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect { socket, source } => write!(
                f,
                "cannot reach tetherd at {}: {source} (is tetherd running?)",
                socket.display()
            ),
            ClientError::Io(e) => write!(f, "talking to tetherd: {e}"),
            ClientError::Closed { received } => write!(
                f,
                "tetherd closed the connection before answering ({received} bytes received; \
                 was it restarted?): the request may or may not have taken effect; retry it"
            ),
            ClientError::Protocol(m) => write!(f, "unexpected answer from tetherd: {m}"),
            ClientError::Api { body, .. } => f.write_str(&body.msg),
        }
    }
}

impl std::error::Error for ClientError {}

/// A client of one daemon socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client with a per-call timeout.
    pub fn new(socket: impl AsRef<Path>, timeout: Duration) -> Self {
        Client {
            socket: socket.as_ref().to_owned(),
            timeout,
        }
    }

    /// GET and decode.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, None)
    }

    /// POST a JSON body and decode.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call("POST", path, Some(body))
    }

    /// GET returning the raw body text (for `/metrics`).
    pub fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let (status, body) = self.request("GET", path, None)?;
        if status >= 400 {
            return Err(api_error(status, &body));
        }
        String::from_utf8(body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, body) = self.request(method, path, body)?;
        if status >= 400 {
            return Err(api_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(format!("{e}")))
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let mut s = UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            socket: self.socket.clone(),
            source,
        })?;
        s.set_read_timeout(Some(self.timeout))
            .map_err(ClientError::Io)?;
        s.set_write_timeout(Some(self.timeout))
            .map_err(ClientError::Io)?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: tetherd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut msg = head.into_bytes();
        msg.extend_from_slice(&body);
        s.write_all(&msg).map_err(ClientError::Io)?;
        let mut raw = Vec::with_capacity(1024);
        s.read_to_end(&mut raw).map_err(ClientError::Io)?;
        if !complete(&raw) {
            return Err(ClientError::Closed {
                received: raw.len(),
            });
        }
        parse_response(&raw)
    }
}

fn api_error(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(body) => ClientError::Api { status, body },
        Err(_) => ClientError::Api {
            status,
            body: ErrorBody {
                code: crate::codes::IO_FAILURE,
                msg: format!(
                    "tetherd answered HTTP {status}: {}",
                    String::from_utf8_lossy(body).trim()
                ),
                details: String::new(),
            },
        },
    }
}

/// Whether `raw` holds a whole response: its headers, and all of a body whose length the
/// headers give (`Connection: close` answers without one end at the close).
fn complete(raw: &[u8]) -> bool {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let rest = &raw[split + 4..];
    if head.contains("transfer-encoding: chunked") {
        return rest.ends_with(b"0\r\n\r\n");
    }
    let length = head
        .split("\r\n")
        .filter_map(|l| l.strip_prefix("content-length:"))
        .find_map(|v| v.trim().parse::<usize>().ok());
    length.is_none_or(|n| rest.len() >= n)
}

/// Splits a raw HTTP/1.1 response into status and body (Content-Length or chunked).
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let bad = |m: &str| ClientError::Protocol(m.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("headers are not UTF-8"))?;
    let rest = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse().ok();
            }
        }
    }
    if !chunked {
        let n = length.unwrap_or(rest.len()).min(rest.len());
        return Ok((status, rest[..n].to_vec()));
    }
    let mut body = Vec::new();
    let mut i = 0;
    loop {
        let eol = rest[i..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("truncated chunk"))?;
        let size_text =
            std::str::from_utf8(&rest[i..i + eol]).map_err(|_| bad("bad chunk size"))?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        i += eol + 2;
        if size == 0 {
            break;
        }
        let end = i
            .checked_add(size)
            .filter(|e| *e <= rest.len())
            .ok_or_else(|| bad("truncated chunk"))?;
        body.extend_from_slice(&rest[i..end]);
        // The chunk's data ends with CRLF; an answer cut (or lying about the size) before it
        // is truncated, never an index past the end.
        if rest.get(end..end + 2) != Some(&b"\r\n"[..]) {
            return Err(bad("truncated chunk"));
        }
        i = end + 2;
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").expect("ok");
        assert_eq!(r, (200, b"{}".to_vec()));
        let r = parse_response(b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .expect("chunked");
        assert_eq!(r, (503, b"abcde".to_vec()));
        assert!(parse_response(b"garbage").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nff\r\nab")
                .is_err()
        );
    }

    #[test]
    fn an_answer_cut_off_is_incomplete() {
        assert!(!complete(b""));
        assert!(!complete(b"HTTP/1.1 200 OK\r\ncontent-length: 5"));
        assert!(!complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n{\"a"
        ));
        assert!(complete(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"));
        assert!(!complete(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n"
        ));
        assert!(complete(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        ));
        assert!(complete(b"HTTP/1.1 204 No Content\r\n\r\n"));
    }

    /// A daemon that dies after reading the request: the client says the connection closed
    /// (the plugin turns that into code 11), not that the answer was malformed.
    #[test]
    fn a_daemon_gone_mid_request_is_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            // Half an answer, then gone.
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n{\"ip");
        });
        let c = Client::new(&path, Duration::from_secs(5));
        let e = c
            .post::<_, serde_json::Value>("/v1/cni/add", &serde_json::json!({}))
            .expect_err("cut off");
        server.join().expect("server");
        assert!(
            matches!(e, ClientError::Closed { received } if received > 0),
            "{e:?}"
        );
    }

    /// Found by the fuzz target `cni_response`: a chunk size that runs into the chunk's CRLF
    /// (a daemon killed mid-answer, or a corrupt one) made the plugin panic on a slice index
    /// past the end instead of reporting a truncated answer.
    #[test]
    fn a_chunk_running_past_the_answer_is_truncated_not_a_panic() {
        let found = b"HTTP/1.1 409 Conflict\r\ntransfer-encoding: chunked\r\n\r\n1f\r\n{\"code\":100,\"ms99999ed\"}\r\n0\r\n\r\n";
        assert!(
            matches!(parse_response(found), Err(ClientError::Protocol(m)) if m == "truncated chunk")
        );
        // Cut right after the data, and one byte into its CRLF.
        for cut in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n",
        ] {
            assert!(
                parse_response(cut).is_err(),
                "{:?}",
                String::from_utf8_lossy(cut)
            );
        }
    }
}
