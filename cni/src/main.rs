//! `tether`: the CNI IPAM plugin. It reads the CNI call (environment and the network config on
//! stdin), forwards it to tetherd over the unix socket, and prints the result in the caller's
//! `cniVersion`. No async runtime, no logging to stdout (it is the protocol channel).

use tether_cni::plugin;

use std::io::Write;

fn main() -> std::process::ExitCode {
    let env: Vec<(String, String)> = std::env::vars().collect();
    // Run by hand: say what this is on stderr and exit 0 without waiting on stdin, as the
    // reference plugins (skel) do.
    if env.iter().all(|(k, v)| k != "CNI_COMMAND" || v.is_empty()) {
        let _ = std::io::stderr().write_all(plugin::about().as_bytes());
        return std::process::ExitCode::SUCCESS;
    }
    let out = match plugin::read_config(std::io::stdin().lock()) {
        Ok(stdin) => plugin::run(&env, &stdin),
        Err(refused) => refused,
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.stdout.as_bytes());
    let _ = stdout.flush();
    std::process::ExitCode::from(out.exit)
}
