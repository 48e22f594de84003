//! Decision latency of the built-in policies (fresh instance + call), of the default chain, and
//! the one-time compile cost. scripts/bench.sh runs this and writes docs/benchmarks.md.

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tether_builtins::builtin;
use tether_core::samples::{deployment_request, sts_request, vm_request};
use tether_policy::{Chain, ChainEntry, Runtime, RuntimeConfig};

fn runtime(pooling: bool, pagemap_scan: bool) -> Runtime {
    Runtime::new(RuntimeConfig {
        pooling,
        pagemap_scan,
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

fn evaluate(c: &mut Criterion) {
    // `pooling` is the default configuration (PAGEMAP_SCAN off); `pooling-pagemap` the opt-in.
    for (label, pooling, pagemap_scan) in [
        ("pooling", true, false),
        ("pooling-pagemap", true, true),
        ("on-demand", false, false),
    ] {
        let rt = runtime(pooling, pagemap_scan);
        let load = |n: &str| {
            rt.load(n, builtin(n).expect("builtin").wasm)
                .expect("loads")
        };
        let (kubevirt, statefulset, stateless) =
            (load("kubevirt"), load("statefulset"), load("stateless"));
        let vm = vm_request("virt-launcher-vm-cirros-abcde", false);
        let sts = sts_request("web-1", false);
        let dep = deployment_request("cart-7d9f-x2");
        let none = Vec::new();
        let mut g = c.benchmark_group(format!("evaluate-{label}"));
        g.bench_function("kubevirt", |b| {
            b.iter(|| rt.evaluate(&kubevirt, black_box(&vm), &none).expect("ok"))
        });
        g.bench_function("statefulset", |b| {
            b.iter(|| {
                rt.evaluate(&statefulset, black_box(&sts), &none)
                    .expect("ok")
            })
        });
        g.bench_function("stateless", |b| {
            b.iter(|| rt.evaluate(&stateless, black_box(&dep), &none).expect("ok"))
        });
        let chain = Chain::new(
            [kubevirt, statefulset, stateless]
                .into_iter()
                .map(|policy| ChainEntry {
                    policy,
                    settings: vec![],
                })
                .collect(),
        )
        .expect("chain");
        // A Deployment pod walks the whole chain: two abstains and the stateless answer.
        g.bench_function("chain-3-deployment-pod", |b| {
            b.iter(|| chain.evaluate(&rt, black_box(&dep)).expect("ok"))
        });
        g.bench_function("chain-3-vm-pod", |b| {
            b.iter(|| chain.evaluate(&rt, black_box(&vm)).expect("ok"))
        });
        g.finish();
    }
}

fn compile(c: &mut Criterion) {
    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    let wasm = builtin("kubevirt").expect("builtin").wasm;
    g.bench_function("kubevirt", |b| {
        b.iter_batched(
            || runtime(true, false),
            |rt| rt.load("kubevirt", black_box(wasm)).expect("loads"),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, evaluate, compile);
criterion_main!(benches);
