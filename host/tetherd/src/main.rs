//! `tetherd`: Tether's node daemon and its policy tools. This file only wires.

mod chain;
mod cli;
mod daemon;
mod install_cni;
mod manifests;
mod policy_cmd;
mod pools_cmd;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    cli::init_tracing(&cli.log);
    match cli.command {
        cli::Command::Run(args) => daemon::run(args),
        cli::Command::Pools(args) => pools_cmd::run(&args),
        cli::Command::Allocations(args) => pools_cmd::allocations(&args),
        cli::Command::Release(args) => pools_cmd::release(&args),
        cli::Command::Wait(args) => pools_cmd::wait(&args),
        cli::Command::Gc(args) => pools_cmd::gc(&args),
        cli::Command::Policy(cmd) => policy_cmd::run(cmd),
        cli::Command::InstallCni(args) => install_cni::run(&args),
        cli::Command::Crd => match tether_kube::crd::crds_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                std::process::ExitCode::from(1)
            }
        },
    }
}
