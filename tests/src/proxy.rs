//! A TCP proxy on 127.0.0.1 that a test can cut: one node partitioned from the API server
//! while the others still reach it.
//!
//! Cut, it forwards nothing (a black hole, as a partition looks: calls hang until their own
//! timeouts, nothing is refused): connections open before and during the cut stay open and
//! silent. Healed, it closes every one of them (they would have timed out by then) and
//! forwards new connections again.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Shared {
    cut: AtomicBool,
    stop: AtomicBool,
    /// Both ends of every connection since the last heal.
    conns: Mutex<Vec<TcpStream>>,
}

/// The proxy; it stops when dropped.
pub struct Proxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Forwards 127.0.0.1:`port` (returned) to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                {
                    // Read under the lock `heal` holds while it closes what was cut: a
                    // connection is either closed by it or forwarded, never left silent.
                    let mut conns = lock(&s);
                    if s.cut.load(Ordering::SeqCst) {
                        // Held open, never answered.
                        if let Ok(c) = client.try_clone() {
                            conns.push(c);
                        }
                        continue;
                    }
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                keep(&s, &client);
                keep(&s, &server);
                pipe(&s, &client, &server);
                pipe(&s, &server, &client);
            }
        });
        Ok(Proxy { port, shared })
    }

    /// Stops forwarding: the node is cut off.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
    }

    /// Closes every connection that went silent and forwards again.
    pub fn heal(&self) {
        let mut conns = lock(&self.shared);
        for c in conns.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.shared.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop up.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        self.heal();
    }
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Vec<TcpStream>> {
    s.conns
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn keep(s: &Shared, c: &TcpStream) {
    if let Ok(c) = c.try_clone() {
        lock(s).push(c);
    }
}

/// Copies `from` to `to` in a thread of its own while not cut (what arrives while cut is
/// dropped); closes both ends when either does.
fn pipe(s: &Arc<Shared>, from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let s = s.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if s.cut.load(Ordering::SeqCst) {
                continue;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}
