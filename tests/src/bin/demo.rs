//! Tether's main job on its embedded default: the seed walkthrough, as a table of step, pod
//! and IP with whether each promise held. As root it wires real macvlan interfaces; otherwise
//! it runs the IPAM path alone (the `tether` plugin called as macvlan would call it).

use std::process::ExitCode;

use tether_e2e::netns;
use tether_e2e::walkthrough::{self, Row};

fn main() -> ExitCode {
    let real = match netns::unavailable() {
        None => true,
        Some(why) => {
            println!("Real interfaces: off ({why}); running the IPAM path alone.\n");
            false
        }
    };
    if real {
        println!("Real interfaces: on (macvlan in network namespaces, delegating to tether).\n");
    }
    println!(
        "{:<44} {:<32} {:<14} {:<58} HELD",
        "STEP", "POD", "IP", "PROMISE"
    );
    let mut print = |r: &Row| {
        println!(
            "{:<44} {:<32} {:<14} {:<58} {}",
            r.step,
            r.pod,
            r.ip,
            r.promise,
            if r.held { "yes" } else { "NO" }
        );
    };
    match walkthrough::run(real, &mut print) {
        Ok(rows) => {
            let held = rows.iter().filter(|r| r.held).count();
            println!("\n{held} of {} promises held.", rows.len());
            if held == rows.len() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("walkthrough failed: {e:#}");
            ExitCode::from(2)
        }
    }
}
