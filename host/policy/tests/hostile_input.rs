//! Hostile policy bytes the other tests do not cover (docs/reliability.md, "Hostile input"):
//! precompiled native code, and components larger than a ConfigMap holds, at the runtime's
//! default limits.

use tether_builtins::builtin;
use tether_policy::{PolicyError, Runtime, RuntimeConfig, inspect};

fn runtime() -> Runtime {
    Runtime::new(RuntimeConfig::default()).expect("runtime")
}

/// A valid component padded to exactly `len` bytes with a trailing custom section: still a
/// component that loads, only bigger.
fn padded(wasm: &[u8], len: usize) -> Vec<u8> {
    const NAME: &[u8] = b"padding";
    // section id 0, LEB128 size, then the name (length-prefixed) and the payload. Fixed
    // 5-byte LEB128 encodings keep the arithmetic simple.
    let leb5 = |mut n: usize| -> [u8; 5] {
        let mut out = [0u8; 5];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::try_from(n & 0x7f).expect("7 bits") | if i < 4 { 0x80 } else { 0 };
            n >>= 7;
        }
        out
    };
    let header = 1 + 5 + 1 + NAME.len();
    assert!(len >= wasm.len() + header, "too short to pad");
    let payload = len - wasm.len() - header;
    let mut out = wasm.to_vec();
    out.push(0);
    out.extend(leb5(1 + NAME.len() + payload));
    out.push(u8::try_from(NAME.len()).expect("short name"));
    out.extend(NAME);
    out.resize(len, 0xAB);
    out
}

#[test]
fn precompiled_code_is_refused_before_anything_runs() {
    let wasm = builtin("stateless").expect("stateless").wasm;
    // A real .cwasm of a real policy, as `wasmtime compile` would write it.
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    let cwasm = wasmtime::Engine::new(&config)
        .expect("engine")
        .precompile_component(wasm)
        .expect("precompiles");
    assert_eq!(&cwasm[..4], b"\x7fELF", "a .cwasm is an ELF file");
    let rt = runtime();
    let e = rt.load("stateless.cwasm", &cwasm).expect_err("refused");
    assert!(matches!(e, PolicyError::InvalidModule { .. }), "{e}");
    assert_eq!(e.reason(), "invalid_module");
    assert_eq!(
        e.to_string(),
        "policy stateless.cwasm: not a valid WebAssembly component: the file does not start with the WebAssembly magic bytes (precompiled .cwasm files are never accepted)"
    );
    assert!(inspect(&rt, "stateless.cwasm", &cwasm).is_err());
}

#[test]
fn a_component_larger_than_a_configmap_is_refused_at_the_default_limit() {
    let rt = runtime();
    let limit = rt.config().max_component_bytes;
    assert_eq!(limit, 1 << 20, "the default is what a ConfigMap holds");
    let wasm = builtin("stateless").expect("stateless").wasm;
    // At the limit it is an ordinary component: it loads.
    let at = padded(wasm, limit);
    let p = rt
        .load("at-limit.wasm", &at)
        .expect("a component of exactly the limit loads");
    assert_eq!(p.metadata.name, "stateless");
    // One byte more is refused before it is compiled.
    let over = padded(wasm, limit + 1);
    let e = rt.load("over-limit.wasm", &over).expect_err("refused");
    assert!(
        matches!(e, PolicyError::TooLarge { size, limit: l, .. } if size == limit + 1 && l == limit),
        "{e}"
    );
    assert_eq!(e.reason(), "too_large");
    assert!(
        !rt.is_cached(&tether_policy::digest::sha256_hex(&over)),
        "nothing of it was compiled"
    );
    eprintln!("{e}");
}
