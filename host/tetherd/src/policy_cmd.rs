//! `tetherd policy test|inspect|export`.

use std::process::ExitCode;

use serde_json::json;
use tether_core::PolicyRequest;
use tether_policy::{Runtime, Settings};

use crate::chain::{self, DEFAULT_CHAIN, PolicySource};
use crate::cli::{BuildArgs, ExportArgs, InspectArgs, PolicyCommand, TestArgs};
use crate::manifests;

pub fn run(cmd: PolicyCommand) -> ExitCode {
    let result = match cmd {
        PolicyCommand::Test(a) => test(a),
        PolicyCommand::Inspect(a) => inspect(a),
        PolicyCommand::Export(a) => export(a),
        PolicyCommand::Build(a) => build(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tetherd: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn parse_settings(raw: &[String]) -> anyhow::Result<Settings> {
    raw.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| anyhow::anyhow!("--setting {s:?} is not KEY=VALUE"))
        })
        .collect()
}

fn test(a: TestArgs) -> anyhow::Result<ExitCode> {
    let settings = parse_settings(&a.settings)?;
    let mut workload = manifests::read_pod(&a.pod)?;
    workload.network = a.network;
    workload.interface = a.interface;
    if workload.container_id.is_empty() {
        workload.container_id = format!("policy-test-{}", workload.name);
    }
    let index = manifests::read_objects(&a.objects)?;
    let owners = index.owner_chain(&workload.namespace, &workload.owner_references);
    let refs: Vec<String> = if a.policies.is_empty() {
        DEFAULT_CHAIN.iter().map(|s| (*s).to_owned()).collect()
    } else {
        a.policies
    };
    let sources: Vec<_> = refs
        .iter()
        .map(|r| (PolicySource::parse(r), settings.clone()))
        .collect();
    let rt = Runtime::new(a.sandbox.runtime_config()?)?;
    let chain = chain::build(&rt, &sources)?;
    let owner_names: Vec<String> = owners
        .iter()
        .map(|o| format!("{}/{}", o.kind, o.name))
        .collect();
    let pod = workload.key();
    let request = PolicyRequest { workload, owners };
    // As the daemon does: a decision that claims another workload's identity fails.
    let outcome = chain.evaluate(&rt, &request).and_then(|out| {
        out.check_claim(&request)?;
        Ok(out)
    });
    match outcome {
        Ok(out) => {
            print_json(&json!({
                "pod": pod,
                "owners": owner_names,
                "chain": chain.names(),
                "decision": out.decision,
                "decidedBy": out.decided_by,
                "steps": out.steps,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            print_json(&json!({
                "pod": pod,
                "owners": owner_names,
                "chain": chain.names(),
                "error": {"policy": e.policy(), "reason": e.reason(), "message": e.to_string()},
            }))?;
            Ok(ExitCode::from(1))
        }
    }
}

fn inspect(a: InspectArgs) -> anyhow::Result<ExitCode> {
    let bytes =
        std::fs::read(&a.file).map_err(|e| anyhow::anyhow!("reading {}: {e}", a.file.display()))?;
    let rt = Runtime::new(a.sandbox.runtime_config()?)?;
    let source = a.file.display().to_string();
    let i = tether_policy::inspect(&rt, &source, &bytes)?;
    let loads = i.load_error.is_none();
    print_json(&serde_json::to_value(&i)?)?;
    Ok(if loads {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn export(a: ExportArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&a.dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", a.dir.display()))?;
    for b in tether_builtins::BUILTINS {
        let path = a.dir.join(format!("{}.wasm", b.name));
        std::fs::write(&path, b.wasm)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        use std::io::Write;
        writeln!(
            std::io::stdout(),
            "{}  {}",
            tether_policy::digest::sha256_hex(b.wasm),
            path.display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn build(a: BuildArgs) -> anyhow::Result<ExitCode> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--release", "--target", "wasm32-unknown-unknown"])
        .args(["--message-format", "json-render-diagnostics"])
        .arg("--manifest-path")
        .arg(&a.manifest_path)
        .stdout(std::process::Stdio::piped());
    if let Some(p) = &a.package {
        cmd.args(["-p", p]);
    }
    // Small components: no debug info, one codegen unit, LTO; unless the caller chose.
    for (var, value) in [
        ("CARGO_PROFILE_RELEASE_DEBUG", "false"),
        ("CARGO_PROFILE_RELEASE_STRIP", "debuginfo"),
        ("CARGO_PROFILE_RELEASE_LTO", "true"),
        ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1"),
        // A 64 KiB shadow stack keeps each instance's memory small (see .cargo/config.toml).
        (
            "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS",
            "-Clink-arg=-zstack-size=65536",
        ),
    ] {
        if std::env::var_os(var).is_none() {
            cmd.env(var, value);
        }
    }
    if let Some(dir) = &a.target_dir {
        cmd.arg("--target-dir").arg(dir);
    }
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("running cargo: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "cargo build failed ({}); is the wasm target installed? `rustup target add wasm32-unknown-unknown`",
            out.status
        );
    }
    // The cdylib artifacts cargo reports, last one wins per crate.
    let mut modules: Vec<(String, std::path::PathBuf)> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let is_cdylib = msg["target"]["crate_types"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "cdylib"));
        let wasm = msg["filenames"].as_array().and_then(|f| {
            f.iter()
                .filter_map(|f| f.as_str())
                .find(|f| f.ends_with(".wasm"))
        });
        if let (true, Some(wasm)) = (is_cdylib, wasm) {
            let name = msg["target"]["name"]
                .as_str()
                .unwrap_or("policy")
                .to_owned();
            modules.retain(|(n, _)| n != &name);
            modules.push((name, wasm.into()));
        }
    }
    let (name, module) = match modules.as_slice() {
        [one] => one.clone(),
        [] => anyhow::bail!(
            "the build produced no cdylib: add `[lib] crate-type = [\"cdylib\", \"rlib\"]` to the policy's Cargo.toml"
        ),
        many => anyhow::bail!(
            "the build produced several cdylibs ({}); pick one with --package",
            many.iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let bytes =
        std::fs::read(&module).map_err(|e| anyhow::anyhow!("reading {}: {e}", module.display()))?;
    let component = wit_component::ComponentEncoder::default()
        .module(&bytes)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| anyhow::anyhow!("wrapping {} as a component: {e:#}", module.display()))?;
    let output = a.output.unwrap_or_else(|| format!("{name}.wasm").into());
    std::fs::write(&output, &component)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", output.display()))?;
    let rt = Runtime::new(a.sandbox.runtime_config()?)?;
    let source = output.display().to_string();
    let i = tether_policy::inspect(&rt, &source, &component)?;
    print_json(&serde_json::to_value(&i)?)?;
    eprintln!("wrote {} ({} bytes)", output.display(), component.len());
    Ok(if i.load_error.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
