//! `tetherd pools`: ask the running daemon and print its pools as a table.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use tether_api::PoolList;
use tether_api::client::Client;

use crate::cli::SocketArgs;

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
