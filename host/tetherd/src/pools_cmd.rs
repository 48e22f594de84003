//! Operator commands that talk to the running daemon: `tetherd pools` and `tetherd
//! allocations` print tables; `tetherd release POOL/IP` frees one address by hand; `tetherd
//! wait` waits until the daemon is ready.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tether_api::client::{Client, ClientError};
use tether_api::{PoolList, ReconcileResult, ReleaseRequest};
use tether_core::alloc::{Allocation, Owner};

use crate::cli::{AllocationsArgs, ReleaseArgs, SocketArgs, WaitArgs};

/// Prints rows under a header, columns padded to their widest cell (like kubectl).
fn print_table(header: &[&str], rows: &[Vec<String>]) -> ExitCode {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut out = std::io::stdout().lock();
    for r in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        if writeln!(out, "{}", line.join("   ").trim_end()).is_err() {
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

fn client(args: &SocketArgs) -> Client {
    Client::new(&args.socket, Duration::from_secs(30))
}

pub fn run(args: &SocketArgs) -> ExitCode {
    let list: PoolList = match client(args).get("/v1/pools") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tetherd: {e}");
            return ExitCode::from(1);
        }
    };
    let rows: Vec<Vec<String>> = list
        .pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.subnet.clone(),
                p.allocated.clone(),
                p.total.clone(),
                p.default.to_string(),
            ]
        })
        .collect();
    let code = print_table(
        &[
            "NAME",
            "SUBNET",
            "ALLOCATED-IP-COUNT",
            "TOTAL-IP-COUNT",
            "DEFAULT",
        ],
        &rows,
    );
    print_notes(&list);
    code
}

/// `tetherd gc`: the last garbage collection pass and what waits for its grace.
pub fn gc(args: &SocketArgs) -> ExitCode {
    let report: tether_api::GcReport = match client(args).get("/v1/gc") {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tetherd: {e}");
            return ExitCode::from(1);
        }
    };
    if report.at == 0 {
        println!("no garbage collection pass has run on this daemon");
    } else if let Some(why) = &report.paused {
        println!("paused at the last pass: {why}");
    }
    if !report.released.is_empty() {
        println!("freed by the last pass:");
        let rows: Vec<Vec<String>> = report
            .released
            .iter()
            .map(|r| {
                vec![
                    r.address.clone(),
                    r.action.clone(),
                    r.reason.clone(),
                    r.workload.clone(),
                ]
            })
            .collect();
        print_table(&["ADDRESS", "ACTION", "REASON", "WORKLOAD"], &rows);
    }
    if report.suspects.is_empty() {
        println!("nothing looks leaked");
        return ExitCode::SUCCESS;
    }
    println!("looks leaked, waiting for its grace period:");
    let rows: Vec<Vec<String>> = report
        .suspects
        .iter()
        .map(|s| {
            vec![
                s.address.clone(),
                s.reason.clone(),
                format!("{}s", s.seen_secs),
                format!("{}s", s.grace_secs),
                s.workload.clone(),
            ]
        })
        .collect();
    print_table(&["ADDRESS", "REASON", "SEEN", "GRACE", "WORKLOAD"], &rows)
}

/// What the tables cannot show: the last refused reload, and allocations held under a pool
/// no longer in force. On stderr, so the tables stay parseable.
fn print_notes(list: &PoolList) {
    if let Some(e) = &list.reload_error {
        eprintln!(
            "warning: the pool files were refused at the last reload; the pools above are the previous ones: {e}"
        );
    }
    for o in &list.orphans {
        match &o.reserved_in {
            Some(p) => eprintln!(
                "note: {} is held under a pool no longer in force; the address stays reserved in pool {p} until released",
                o.address
            ),
            None => eprintln!(
                "note: {} is held under a pool no longer in force, outside every current pool; it stays until released",
                o.address
            ),
        }
    }
}

pub fn allocations(args: &AllocationsArgs) -> ExitCode {
    let list: Vec<Allocation> = match client(&args.socket).get("/v1/allocations") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tetherd: {e}");
            return ExitCode::from(1);
        }
    };
    let rows: Vec<Vec<String>> = list
        .iter()
        .filter(|a| args.pool.as_ref().is_none_or(|p| &a.pool == p))
        .map(|a| {
            let (owner, identity) = match &a.owner {
                Owner::Ephemeral => ("ephemeral", "-".to_owned()),
                Owner::Pinned { identity, .. } => ("pinned", identity.clone()),
            };
            let held_by = if a.holders.is_empty() {
                "-".to_owned()
            } else {
                a.holders
                    .iter()
                    .map(|h| {
                        let at = &h.attachment;
                        if at.pod.is_empty() {
                            format!("{} ({})", at.container_id, at.ifname)
                        } else {
                            format!("{}/{} ({})", at.namespace, at.pod, at.ifname)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            vec![
                format!("{}/{}", a.pool, a.ip),
                a.network.clone(),
                owner.to_owned(),
                identity,
                held_by,
            ]
        })
        .collect();
    let code = print_table(
        &["ADDRESS", "NETWORK", "OWNER", "IDENTITY", "HELD-BY"],
        &rows,
    );
    if let Ok(pools) = client(&args.socket).get::<PoolList>("/v1/pools") {
        print_notes(&pools);
    }
    code
}

pub fn release(args: &ReleaseArgs) -> ExitCode {
    let Some((pool, ip)) = args.address.rsplit_once('/') else {
        eprintln!(
            "tetherd: {:?} is not POOL/IP (for example test-ippool/10.6.168.101)",
            args.address
        );
        return ExitCode::from(2);
    };
    let req = ReleaseRequest {
        pool: pool.to_owned(),
        ip: ip.to_owned(),
        force: args.force,
        to_claim: args.to_claim.clone(),
    };
    match client(&args.socket).post::<_, ReconcileResult>("/v1/release", &req) {
        Ok(r) => {
            if let Some(claim) = &args.to_claim {
                println!("re-filed {} under IPAMClaim {claim}", args.address);
            }
            for a in r.released {
                println!("released {a}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tetherd: {e}");
            ExitCode::from(1)
        }
    }
}

/// Polls `/readyz` until the daemon answers 200, or the timeout passes (exit 1, saying what the
/// last attempt got). A socket this user may not open fails at once: waiting will not help.
pub fn wait(args: &WaitArgs) -> ExitCode {
    const EVERY: Duration = Duration::from_millis(100);
    let socket = &args.socket.socket;
    let timeout = Duration::from_secs(args.timeout_secs);
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let client = Client::new(
            socket,
            left.clamp(Duration::from_millis(1), Duration::from_secs(5)),
        );
        let err = match client.get_text("/readyz") {
            Ok(_) => {
                println!("tetherd is ready at {}", socket.display());
                return ExitCode::SUCCESS;
            }
            Err(e) => e,
        };
        if let ClientError::Connect { source, .. } = &err
            && source.kind() == std::io::ErrorKind::PermissionDenied
        {
            eprintln!("tetherd: {err}: the socket is root-only (mode 0600)");
            return ExitCode::from(1);
        }
        if left.is_zero() {
            eprintln!(
                "tetherd: not ready after {}s at {} (last attempt: {err})",
                args.timeout_secs,
                socket.display()
            );
            return ExitCode::from(1);
        }
        std::thread::sleep(EVERY.min(left));
    }
}
