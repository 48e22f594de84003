//! Operator commands that talk to the running daemon: `tetherd pools` prints its pools as a
//! table; `tetherd release POOL/IP` frees one address by hand.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use tether_api::client::Client;
use tether_api::{PoolList, ReconcileResult, ReleaseRequest};

use crate::cli::{ReleaseArgs, SocketArgs};

pub fn run(args: &SocketArgs) -> ExitCode {
    let client = Client::new(&args.socket, Duration::from_secs(10));
    let list: PoolList = match client.get("/v1/pools") {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tetherd: {e}");
            return ExitCode::from(1);
        }
    };
    let mut out = std::io::stdout().lock();
    let rows: Vec<[String; 5]> = list
        .pools
        .iter()
        .map(|p| {
            [
                p.name.clone(),
                p.subnet.clone(),
                p.allocated.clone(),
                p.total.clone(),
                p.default.to_string(),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "SUBNET",
        "ALLOCATED-IP-COUNT",
        "TOTAL-IP-COUNT",
        "DEFAULT",
    ]
    .map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        if writeln!(out, "{}", line.join("   ").trim_end()).is_err() {
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

pub fn release(args: &ReleaseArgs) -> ExitCode {
    let Some((pool, ip)) = args.address.rsplit_once('/') else {
        eprintln!(
            "tetherd: {:?} is not POOL/IP (for example test-ippool/10.6.168.101)",
            args.address
        );
        return ExitCode::from(2);
    };
    let client = Client::new(&args.socket.socket, Duration::from_secs(30));
    let req = ReleaseRequest {
        pool: pool.to_owned(),
        ip: ip.to_owned(),
        force: args.force,
    };
    match client.post::<_, ReconcileResult>("/v1/release", &req) {
        Ok(r) => {
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
