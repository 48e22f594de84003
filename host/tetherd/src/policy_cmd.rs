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
    use std::io::Write;
    if a.configmaps {
        let yaml = configmap_manifests(a.namespace.as_deref())?;
        std::io::stdout().lock().write_all(yaml.as_bytes())?;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(dir) = a.dir else {
        anyhow::bail!("give a directory, or --configmaps");
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    for b in tether_builtins::BUILTINS {
        let path = dir.join(format!("{}.wasm", b.name));
        std::fs::write(&path, b.wasm)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        writeln!(
            std::io::stdout(),
            "{}  {}",
            tether_policy::digest::sha256_hex(b.wasm),
            path.display()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The name `policy export --configmaps` gives the ConfigMap of built-in policy `name`.
pub fn configmap_name(name: &str) -> String {
    format!("tether-policy-{name}")
}

/// The built-in policies as policy ConfigMap manifests (see [`tether_kube::policies`]), in the
/// order of the default chain: a function of the component bytes alone, so every run (and
/// every build from the same policies/) prints the same bytes.
pub fn configmap_manifests(namespace: Option<&str>) -> anyhow::Result<String> {
    use std::fmt::Write;
    use tether_kube::policies::{COMPONENT_KEY, POLICY_LABEL, SHA256_KEY};
    // JSON strings are YAML scalars: quoting without a YAML emitter's choices.
    let quote = |s: &str| serde_json::to_string(s);
    let chain: Vec<String> = tether_builtins::BUILTINS
        .iter()
        .map(|b| format!("configmap:{}", configmap_name(b.name)))
        .collect();
    let mut out = String::new();
    writeln!(
        out,
        "# The built-in policies of tetherd as policy ConfigMaps (`tetherd policy export --configmaps`).\n\
         # Apply them in the daemon's namespace and run it with\n\
         #   --chain {}",
        chain.join(",")
    )?;
    for b in tether_builtins::BUILTINS {
        let sha256 = tether_policy::digest::sha256_hex(b.wasm);
        // base64, as the API's binaryData carries bytes.
        let data = serde_json::to_string(&k8s_openapi::ByteString(b.wasm.to_vec()))?;
        writeln!(out, "---")?;
        writeln!(out, "apiVersion: v1")?;
        writeln!(out, "kind: ConfigMap")?;
        writeln!(out, "metadata:")?;
        writeln!(out, "  name: {}", quote(&configmap_name(b.name))?)?;
        if let Some(ns) = namespace {
            writeln!(out, "  namespace: {}", quote(ns)?)?;
        }
        writeln!(out, "  labels:")?;
        writeln!(out, "    {}: {}", quote(POLICY_LABEL)?, quote(b.name)?)?;
        writeln!(out, "data:")?;
        writeln!(out, "  {}: {}", quote(SHA256_KEY)?, quote(&sha256)?)?;
        writeln!(out, "binaryData:")?;
        writeln!(out, "  {}: {data}", quote(COMPONENT_KEY)?)?;
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    /// The manifests parse as ConfigMaps whose components check out against their digests,
    /// and are the same bytes every time.
    #[test]
    fn configmap_manifests_round_trip() {
        let yaml = configmap_manifests(Some("tether-system")).expect("manifests");
        assert_eq!(
            yaml,
            configmap_manifests(Some("tether-system")).expect("again")
        );
        let mut names = Vec::new();
        for doc in yaml_serde::Deserializer::from_str(&yaml) {
            let cm: ConfigMap = serde::Deserialize::deserialize(doc).expect("a ConfigMap");
            let (bytes, sha256) = tether_kube::policies::component(&cm).expect("checks out");
            let name = cm.metadata.name.clone().expect("name");
            let label =
                &cm.metadata.labels.as_ref().expect("labels")[tether_kube::policies::POLICY_LABEL];
            let b = tether_builtins::builtin(label).expect("names a built-in");
            assert_eq!(bytes, b.wasm);
            assert_eq!(sha256, tether_policy::digest::sha256_hex(b.wasm));
            assert_eq!(cm.metadata.namespace.as_deref(), Some("tether-system"));
            names.push(name);
        }
        assert_eq!(
            names,
            [
                "tether-policy-kubevirt",
                "tether-policy-statefulset",
                "tether-policy-stateless"
            ]
        );
        assert!(
            !configmap_manifests(None)
                .expect("manifests")
                .contains("namespace:")
        );
    }
}
