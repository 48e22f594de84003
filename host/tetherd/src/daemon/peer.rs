//! Who may talk to the API socket: checked on every accepted connection with the peer's
//! kernel credentials (SO_PEERCRED), not only by the socket file's mode.
//!
//! Whoever reaches the socket can take and release addresses, so the mode (0600 root) is the
//! first fence and this check the second: it holds even if the file's mode is widened (a
//! `chmod` by hand, a hostPath mounted into another container that runs as another user). A
//! refused peer gets an HTTP 403 with a CNI error body (code 106) written at once, before any
//! byte of its request is read or parsed; what it sent is then discarded (bounded) so that
//! its client reads the answer instead of a broken pipe. The refusal is logged with the
//! peer's uid, gid and pid, and counted in `tether_api_refused_connections_total`.

use std::sync::Arc;
use std::time::Duration;

use tether_api::{ErrorBody, codes};
use tether_engine::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Refusals answered at once; beyond this many in flight, a refused connection is closed
/// without an answer (a flood of refused peers costs no more than this).
const MAX_ANSWERING: usize = 16;
/// How long, and how many bytes, a refused peer's request is discarded before closing.
const DRAIN_FOR: Duration = Duration::from_secs(2);
const DRAIN_BYTES: u64 = 64 * 1024;

/// The uids allowed to call: root, and the daemon's own effective uid (a daemon run by an
/// unprivileged user for a test or a demo serves that user; in a cluster it runs as root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed(Vec<u32>);

impl Allowed {
    /// Root and this process's effective uid.
    pub fn root_and_self() -> Self {
        let me = rustix::process::geteuid().as_raw();
        let mut v = vec![0];
        if me != 0 {
            v.push(me);
        }
        Allowed(v)
    }

    fn contains(&self, uid: u32) -> bool {
        self.0.contains(&uid)
    }
}

impl std::fmt::Display for Allowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let uids: Vec<String> = self.0.iter().map(u32::to_string).collect();
        write!(f, "uid {}", uids.join(" or "))
    }
}

/// The API socket's listener: hands axum only connections whose peer is allowed.
pub struct PeerChecked {
    inner: UnixListener,
    allowed: Allowed,
    metrics: Arc<Metrics>,
    answering: Arc<tokio::sync::Semaphore>,
}

impl PeerChecked {
    pub fn new(inner: UnixListener, allowed: Allowed, metrics: Arc<Metrics>) -> Self {
        PeerChecked {
            inner,
            allowed,
            metrics,
            answering: Arc::new(tokio::sync::Semaphore::new(MAX_ANSWERING)),
        }
    }

    /// Whether the connection may be served; a refused one is logged, counted and answered.
    fn admit(&self, stream: UnixStream) -> Option<UnixStream> {
        let (uid, pid) = match stream.peer_cred() {
            Ok(c) if self.allowed.contains(c.uid()) => return Some(stream),
            Ok(c) => {
                tracing::warn!(
                    peer_uid = c.uid(),
                    peer_gid = c.gid(),
                    peer_pid = c.pid(),
                    allowed = %self.allowed,
                    "refused an API connection: the peer is not allowed to call tetherd"
                );
                (Some(c.uid()), c.pid())
            }
            // Fail closed: a peer whose credentials cannot be read is not served.
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    allowed = %self.allowed,
                    "refused an API connection: the peer's credentials (SO_PEERCRED) cannot be read"
                );
                (None, None)
            }
        };
        self.metrics.api_refused.inc();
        match self.answering.clone().try_acquire_owned() {
            Ok(permit) => {
                let msg = refusal(uid, pid, &self.allowed);
                tokio::spawn(async move {
                    answer(stream, &msg).await;
                    drop(permit);
                });
            }
            Err(_) => drop(stream),
        }
        None
    }
}

impl axum::serve::Listener for PeerChecked {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // axum's accept retries and logs accept errors itself.
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            if let Some(s) = self.admit(stream) {
                return (s, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// The refusal's message, for the caller (the CNI plugin prints it as its error).
fn refusal(uid: Option<u32>, pid: Option<i32>, allowed: &Allowed) -> Vec<u8> {
    let who = match (uid, pid) {
        (Some(u), Some(p)) => format!("uid {u}, pid {p}"),
        (Some(u), None) => format!("uid {u}"),
        _ => "a peer whose credentials cannot be read".to_owned(),
    };
    let body = ErrorBody {
        code: codes::PERMISSION_DENIED,
        msg: format!(
            "tetherd refuses this caller ({who}): only {allowed} may use its socket (checked with SO_PEERCRED)"
        ),
        details: String::new(),
    };
    let json = serde_json::to_vec(&body).unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        json.len()
    )
    .into_bytes();
    out.extend_from_slice(&json);
    out
}

/// Writes the refusal, then discards what the peer sends (bounded in bytes and time) so that
/// it is not cut off mid-write, and closes.
async fn answer(mut stream: UnixStream, msg: &[u8]) {
    let work = async {
        stream.write_all(msg).await?;
        stream.shutdown().await?;
        let mut sink = tokio::io::sink();
        tokio::io::copy(&mut (&mut stream).take(DRAIN_BYTES), &mut sink).await?;
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(DRAIN_FOR, work).await {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "answering a refused API peer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_an_http_403_with_a_cni_error() {
        let raw = refusal(Some(65534), Some(42), &Allowed(vec![0]));
        let (status, body) = tether_api::client::parse_response(&raw).expect("parse");
        assert_eq!(status, 403);
        let e: ErrorBody = serde_json::from_slice(&body).expect("error body");
        assert_eq!(e.code, codes::PERMISSION_DENIED);
        assert!(e.msg.contains("uid 65534, pid 42"), "{}", e.msg);
        assert!(e.msg.contains("only uid 0 may"), "{}", e.msg);
    }

    /// Raw HTTP over the socket, as the CNI plugin's client sends it.
    async fn get(path: &std::path::Path) -> (u16, Vec<u8>) {
        let mut s = UnixStream::connect(path).await.expect("connect");
        s.write_all(b"GET /v1/allocations HTTP/1.1\r\nHost: tetherd\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        tether_api::client::parse_response(&raw).expect("an HTTP answer")
    }

    /// This process is refused when its uid is not in the allowed set, and served when it
    /// is: the check runs on the peer's credentials, whatever the socket's mode (0777 here).
    #[tokio::test]
    async fn a_peer_not_allowed_gets_a_403_before_the_router() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let me = rustix::process::geteuid().as_raw();
        for (allowed, served) in [
            (Allowed(vec![me.wrapping_add(1)]), false),
            (Allowed(vec![me]), true),
        ] {
            let path = dir.path().join(format!("t{served}.sock"));
            let l = UnixListener::bind(&path).expect("bind");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
            let metrics = Arc::new(Metrics::new());
            let listener = PeerChecked::new(l, allowed, metrics.clone());
            let router =
                axum::Router::new().route("/v1/allocations", axum::routing::get(|| async { "[]" }));
            let server = tokio::spawn(async move { axum::serve(listener, router).await });
            let (status, body) = get(&path).await;
            server.abort();
            if served {
                assert_eq!(status, 200);
                assert_eq!(body, b"[]");
                assert_eq!(metrics.api_refused.get(), 0);
            } else {
                assert_eq!(status, 403);
                let e: ErrorBody = serde_json::from_slice(&body).expect("error body");
                assert_eq!(e.code, codes::PERMISSION_DENIED);
                assert!(
                    e.msg
                        .contains(&format!("uid {me}, pid {}", std::process::id())),
                    "{}",
                    e.msg
                );
                assert_eq!(metrics.api_refused.get(), 1);
            }
        }
    }

    #[test]
    fn root_is_always_allowed() {
        let a = Allowed::root_and_self();
        assert!(a.contains(0));
        assert!(a.contains(rustix::process::geteuid().as_raw()));
    }
}
