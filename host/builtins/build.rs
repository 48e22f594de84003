//! Builds the policy crates under policies/ for wasm32-unknown-unknown and wraps each core
//! module into a component with wit-component, the way wasmtime's test-programs artifacts are
//! built. The nested cargo uses its own target directory (the outer build holds the lock on
//! the main one) shared by every profile, so it only rebuilds what changed.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (crate name, artifact name) of every policy this crate embeds.
const POLICIES: &[(&str, &str)] = &[
    ("tether-policy-kubevirt", "kubevirt"),
    ("tether-policy-statefulset", "statefulset"),
    ("tether-policy-stateless", "stateless"),
    ("tether-policy-label-identity", "label_identity"),
    ("tether-fixture-hostile", "hostile"),
    ("tether-fixture-wasi-import", "wasi_import"),
    ("tether-fixture-future-contract", "future_contract"),
];

fn main() {
    if let Err(e) = run() {
        eprintln!("error: building the policy components failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let root = manifest_dir
        .ancestors()
        .nth(2)
        .ok_or("host/builtins has no workspace root above it")?
        .to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    for dir in ["policies", "wit", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );
    println!("cargo:rerun-if-env-changed=TETHER_WASM_TARGET_DIR");

    let target_dir = match env::var_os("TETHER_WASM_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"))
            .join("wasm-policies"),
    };
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--release", "--target", "wasm32-unknown-unknown"])
        .arg("--target-dir")
        .arg(&target_dir);
    for (krate, _) in POLICIES {
        cmd.args(["-p", krate]);
    }
    // Flags meant for the host build must not leak into the guest build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_LLVM_COV",
    ] {
        cmd.env_remove(var);
    }
    // Small, fast components: no debug info (the name section stays for trap messages).
    cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1");
    let status = cmd.status().map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() {
        return Err(format!(
            "cargo build --target wasm32-unknown-unknown exited with {status}"
        ));
    }

    let mut consts = String::new();
    for (_, artifact) in POLICIES {
        let core = target_dir
            .join("wasm32-unknown-unknown/release")
            .join(format!("tether_{}.wasm", artifact_stem(artifact)));
        let component = componentize(&core)?;
        let dest = out_dir.join(format!("{artifact}.wasm"));
        fs::write(&dest, component).map_err(|e| format!("writing {}: {e}", dest.display()))?;
        consts.push_str(&format!(
            "/// The `{artifact}` component.\npub const {}: &[u8] = include_bytes!({:?});\n",
            artifact.to_uppercase(),
            dest.display().to_string()
        ));
    }
    fs::write(out_dir.join("components.rs"), consts).map_err(|e| e.to_string())?;
    Ok(())
}

/// The library file stem cargo gives each crate.
fn artifact_stem(artifact: &str) -> String {
    match artifact {
        "hostile" | "wasi_import" | "future_contract" => format!("fixture_{artifact}"),
        other => format!("policy_{other}"),
    }
}

fn componentize(core: &Path) -> Result<Vec<u8>, String> {
    let module = fs::read(core).map_err(|e| format!("reading {}: {e}", core.display()))?;
    wit_component::ComponentEncoder::default()
        .module(&module)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| format!("componentizing {}: {e:#}", core.display()))
}
