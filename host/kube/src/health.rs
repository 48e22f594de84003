//! Whether the API server (and the etcd behind it) answers, as this daemon last saw it.
//!
//! Every API failure that says the API server cannot serve (no connection, a timeout, a 5xx
//! or 429 answer, a watch that broke) marks it down; while it is down a prober reads one
//! address object every [`PROBE_INTERVAL`] (a quorum read, so it needs etcd too), and the
//! first read that succeeds marks it up again. Nothing else marks it up: a watch served from
//! the apiserver's cache can still deliver while etcd is down.
//!
//! While it is down the workload source knows no pod (an ADD is answered "try again later",
//! code 11, at once, before anything is planned: its cache may miss what changed, and no
//! claim could be written anyway) and the store fails its calls at once instead of waiting
//! for [`crate::store`]'s call timeout: the writer never sits on the state's lock for an API
//! server known not to answer.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kube::api::{Api, ListParams};
use tokio::runtime::Handle;

use crate::crd::IPAllocation;

/// How often the API server is probed while it is down.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The longest one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Since when, and why, the API server is down.
#[derive(Clone, Debug)]
struct Down {
    since: Instant,
    why: String,
}

#[derive(Default)]
struct State {
    down: Option<Down>,
    /// Whether a prober runs.
    probing: bool,
}

struct Inner {
    state: Mutex<State>,
    api: Api<IPAllocation>,
    rt: Handle,
}

/// The API server's health as this daemon sees it (cheap to clone; shared by the store, the
/// workload source and the watches).
#[derive(Clone)]
pub struct ApiHealth {
    inner: Arc<Inner>,
}

/// Whether a failed API call says the API server cannot serve now (rather than refusing this
/// one request: a conflict, a 404, a 403, an invalid object).
pub fn is_outage(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429,
        // Connection refused or reset, TLS, a body cut short, a timeout of the client.
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// Whether a watcher's error says the API server cannot serve now: a list or a watch that
/// cannot start or that broke, or an error status the server sends. A watch that expired
/// (410 Gone) is not one: the watcher re-lists. (A broken stream counts: when etcd stops, the
/// API server's watches break at once while its requests hang for their 4 s bound, and the
/// ADDs in between are refused at once instead of waiting. The cost: a proxy that closes an
/// idle watch makes ADDs answer 11 until the next probe, a second later.)
pub fn is_watch_outage(e: &kube::runtime::watcher::Error) -> bool {
    use kube::runtime::watcher::Error;
    match e {
        Error::InitialListFailed(e) | Error::WatchStartFailed(e) | Error::WatchFailed(e) => {
            is_outage(e)
        }
        Error::WatchError(s) => s.code >= 500 || s.code == 429,
        _ => false,
    }
}

/// Whether a watcher's error is a watch that expired (410 Gone): the watcher re-lists.
pub fn is_expired(e: &kube::runtime::watcher::Error) -> bool {
    matches!(e, kube::runtime::watcher::Error::WatchError(s) if s.code == 410)
}

impl ApiHealth {
    /// Up, probing through `client` on `rt` when it goes down.
    pub fn new(client: kube::Client, rt: Handle) -> ApiHealth {
        ApiHealth {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                api: Api::all(client),
                rt,
            }),
        }
    }

    /// `Err` (why, and for how long) while the API server is down.
    pub fn check(&self) -> Result<(), String> {
        match &self.state().down {
            None => Ok(()),
            Some(d) => Err(format!(
                "the API server has not answered for {:.1}s ({})",
                d.since.elapsed().as_secs_f64(),
                d.why
            )),
        }
    }

    /// Notes a failed call of `what`; marks the API server down when the failure says so.
    pub fn failed(&self, what: &str, e: &kube::Error) {
        if is_outage(e) {
            self.down(what, &e.to_string());
        }
    }

    /// Notes a failed watch of `resource`; marks the API server down when the failure says so.
    pub fn watch_failed(&self, resource: &str, e: &kube::runtime::watcher::Error) {
        if is_watch_outage(e) {
            self.down(&format!("watching {resource}"), &e.to_string());
        }
    }

    /// Marks the API server down (`what` failed with `why`) and starts probing it.
    pub fn down(&self, what: &str, why: &str) {
        let mut state = self.state();
        if state.down.is_none() {
            tracing::warn!(
                call = what,
                error = why,
                "the API server does not answer: ADDs are refused (try again later) until it does"
            );
            state.down = Some(Down {
                since: Instant::now(),
                why: format!("{what}: {why}"),
            });
        }
        if !state.probing {
            state.probing = true;
            let this = self.clone();
            self.inner.rt.spawn(async move { this.probe().await });
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads until a read succeeds, then marks the API server up.
    async fn probe(self) {
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let read = tokio::time::timeout(
                PROBE_TIMEOUT,
                self.inner.api.list(&ListParams::default().limit(1)),
            )
            .await;
            match read {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => tracing::debug!(error = %e, "API server probe failed"),
                Err(_) => tracing::debug!("API server probe timed out"),
            }
        }
        let was = {
            let mut state = self.state();
            state.probing = false;
            state.down.take()
        };
        if let Some(d) = was {
            tracing::info!(
                down_secs = d.since.elapsed().as_secs_f64(),
                "the API server answers again"
            );
        }
    }
}

/// How long a broken watch waits before it tries again: from [`RETRY_MIN`], doubling with
/// each failure in a row up to [`RETRY_MAX`], a quarter of it random; back to the start after
/// any event. Shorter than kube's default (up to 30 s, reset only after 120 s without an
/// error): a cache that lags after an outage makes ADDs wait (a pod recreated meanwhile is
/// refused until its watch re-lists), so the wait after the API server returns is bounded by
/// [`RETRY_MAX`]. A watch that expired (410) re-lists at once, without waiting.
#[derive(Debug, Clone)]
pub struct RetryDelay {
    next: Duration,
}

/// The first wait of a broken watch.
pub const RETRY_MIN: Duration = Duration::from_millis(500);
/// The longest wait of a broken watch.
pub const RETRY_MAX: Duration = Duration::from_secs(5);

impl Default for RetryDelay {
    fn default() -> Self {
        RetryDelay { next: RETRY_MIN }
    }
}

impl RetryDelay {
    /// The wait before the next try (and the one after it grows).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(RETRY_MAX);
        // A quarter of it random, so that daemons that lost the API server together do not
        // all come back at the same instant.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let quarter = base / 4;
        let jitter = quarter.mul_f64(f64::from(nanos % 1000) / 1000.0);
        base - quarter + jitter
    }

    /// An event arrived: the next failure waits [`RETRY_MIN`] again.
    pub fn reset(&mut self) {
        self.next = RETRY_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_up_to_the_cap_and_resets() {
        let mut d = RetryDelay::default();
        let waits: Vec<Duration> = (0..8).map(|_| d.next_delay()).collect();
        for w in &waits {
            assert!(*w <= RETRY_MAX, "{waits:?}");
            assert!(*w >= RETRY_MIN - RETRY_MIN / 4, "{waits:?}");
        }
        assert!(waits[7] >= RETRY_MAX - RETRY_MAX / 4, "{waits:?}");
        d.reset();
        assert!(d.next_delay() <= RETRY_MIN, "not reset");
    }

    fn status(code: u16) -> kube::core::Status {
        kube::core::Status::failure("test", "Test").with_code(code)
    }

    /// A watch that breaks, cannot start, or gets a 5xx says the API server is down; one that
    /// expired (410) or a refused request (409) does not.
    #[test]
    fn which_watch_errors_are_an_outage() {
        use kube::runtime::watcher::Error;
        let unavailable = || kube::Error::Api(Box::new(status(503)));
        assert!(is_watch_outage(&Error::WatchFailed(unavailable())));
        assert!(is_watch_outage(&Error::WatchStartFailed(unavailable())));
        assert!(is_watch_outage(&Error::InitialListFailed(unavailable())));
        assert!(is_watch_outage(&Error::WatchError(Box::new(status(500)))));
        assert!(!is_watch_outage(&Error::WatchError(Box::new(status(410)))));
        assert!(is_expired(&Error::WatchError(Box::new(status(410)))));
        assert!(!is_outage(&kube::Error::Api(Box::new(status(409)))));
    }
}
