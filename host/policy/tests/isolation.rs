//! A fresh instance per evaluation: what one evaluation writes into linear memory and onto its
//! shadow stack is never seen by the next one, whichever way the pooling allocator resets a
//! reused memory slot.
//!
//! The hostile fixture's `canary` mode (policies/fixtures/hostile/src/canary.rs) first scans
//! all of its linear memory, including pages it grows, for markers an earlier evaluation left,
//! then writes markers onto the shadow stack, into the heap and into the grown pages, and scans
//! again. Every evaluation must report nothing before writing, and every marker it wrote after.
//!
//! What is exercised: with one slot, every evaluation reuses the same memory; evaluations
//! alternate between writing only the kept-resident part (stack, arena), a few grown pages,
//! 8 MiB of grown pages (past `keep_resident`: the rest is released to the kernel) and every
//! other grown page (many disjoint dirty regions), in every order; with `keep_resident` of 0,
//! 1 MiB (the default) and 16 MiB (the whole memory); and with `pagemap_scan` off (the default:
//! the kept-resident bytes are cleared, the rest released) and on (only the dirty pages found
//! by `PAGEMAP_SCAN` are reset; where the kernel lacks the ioctl wasmtime falls back to the
//! first behaviour, and the test says so on stderr).
//!
//! Under memory pressure: with swap (the machine's, or a 256 MiB file the test adds as root and
//! removes), a thread pushes every page of the test process out with `MADV_PAGEOUT` again and
//! again while a canary evaluation spins after writing its markers, so its dirty pages are in
//! swap when its slot is reset. The default reset leaks nothing; with `pagemap_scan` on, the
//! same run reproduces the known hazard (a swapped-out dirty page is neither reset nor
//! released), which both shows that this test can see a leak and pins why the opt-in is off
//! by default and refused by tetherd on machines with swap.

use std::sync::Arc;
use std::time::Duration;

use tether_builtins::fixtures;
use tether_core::samples::deployment_request;
use tether_policy::{LoadedPolicy, PolicyError, Runtime, RuntimeConfig};

/// Bytes of a wasm page.
const PAGE: usize = 64 * 1024;
/// Markers (16 bytes each) in a fully written grown page.
const MARKERS_PER_PAGE: usize = PAGE / 16;

/// What one canary evaluation does: grow this many pages, write every `stride`-th of them.
#[derive(Debug, Clone, Copy)]
struct Shape {
    grow: usize,
    stride: usize,
}

/// The kept-resident part only (stack and arena), a few grown pages, 8 MiB of grown pages, and
/// every other page of 8 MiB.
const SHAPES: [Shape; 4] = [
    Shape { grow: 0, stride: 1 },
    Shape { grow: 2, stride: 1 },
    Shape {
        grow: 128,
        stride: 1,
    },
    Shape {
        grow: 128,
        stride: 2,
    },
];

/// Markers found per place: the shadow stack, the rest of the initial memory, grown pages.
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    stack: usize,
    memory: usize,
    grown: usize,
}

#[derive(Debug)]
struct Report {
    before: Counts,
    after: Counts,
    /// The first marker found before writing, `address:id of its writer`, or `none`.
    first: String,
    text: String,
}

fn parse(text: &str) -> Report {
    let field = |key: &str| -> &str {
        text.split(' ')
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {text:?}"))
    };
    let counts = |key: &str| -> Counts {
        let n: Vec<usize> = field(key)
            .split('/')
            .map(|n| {
                n.parse()
                    .unwrap_or_else(|_| panic!("bad {key} in {text:?}"))
            })
            .collect();
        assert_eq!(n.len(), 3, "{text:?}");
        Counts {
            stack: n[0],
            memory: n[1],
            grown: n[2],
        }
    };
    Report {
        before: counts("before="),
        after: counts("after="),
        first: field("first=").to_owned(),
        text: text.to_owned(),
    }
}

fn runtime(max_concurrent: usize, keep_resident: usize, pagemap_scan: bool) -> Runtime {
    Runtime::new(RuntimeConfig {
        // Generous: this is not about the deadline, and CI machines are slow.
        timeout: Duration::from_secs(10),
        max_concurrent,
        keep_resident,
        pagemap_scan,
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

fn load(rt: &Runtime) -> Arc<LoadedPolicy> {
    rt.load("hostile.wasm", fixtures::HOSTILE)
        .expect("hostile loads")
}

/// One canary evaluation that spins `spin` iterations after writing its markers; its report,
/// leak or not.
fn run_canary(
    rt: &Runtime,
    p: &LoadedPolicy,
    id: u64,
    shape: Shape,
    spin: u64,
    context: &str,
) -> Report {
    let settings = vec![
        ("mode".to_owned(), "canary".to_owned()),
        ("id".to_owned(), id.to_string()),
        ("grow".to_owned(), shape.grow.to_string()),
        ("stride".to_owned(), shape.stride.to_string()),
        ("spin".to_owned(), spin.to_string()),
    ];
    match rt.evaluate(p, &deployment_request("canary"), &settings) {
        Err(PolicyError::Refused { message, .. }) => parse(&message),
        other => panic!("{context}: expected the canary's report, got {other:?}"),
    }
}

/// One canary evaluation; panics on a leak or when the markers did not land.
fn canary(rt: &Runtime, p: &LoadedPolicy, id: u64, shape: Shape, context: &str) -> Report {
    let report = run_canary(rt, p, id, shape, 0, context);
    assert_clean(&report, id, shape, context);
    assert_landed(&report, shape, context);
    report
}

/// The evaluation found nothing of an earlier one.
fn assert_clean(report: &Report, id: u64, shape: Shape, context: &str) {
    assert_eq!(
        report.before,
        Counts {
            stack: 0,
            memory: 0,
            grown: 0
        },
        "{context}: evaluation {id} ({shape:?}) saw markers of an earlier evaluation \
         (first at address:writer {}): {}",
        report.first,
        report.text
    );
    assert_eq!(report.first, "none", "{context}: {}", report.text);
}

/// The markers landed where they should, and the scan sees them: a leak would be seen.
fn assert_landed(report: &Report, shape: Shape, context: &str) {
    let touched = shape.grow.div_ceil(shape.stride);
    assert!(
        report.after.stack >= 1024,
        "{context}: stack markers: {}",
        report.text
    );
    assert!(
        report.after.memory >= 1024,
        "{context}: heap markers: {}",
        report.text
    );
    assert_eq!(
        report.after.grown,
        touched * MARKERS_PER_PAGE,
        "{context}: grown-page markers: {}",
        report.text
    );
}

/// Every shape after every shape (and itself), on one slot reused by all evaluations.
fn every_transition(keep_resident: usize, pagemap_scan: bool) {
    let context = format!(
        "keep_resident={keep_resident} pagemap_scan={pagemap_scan} (PAGEMAP_SCAN available: {})",
        RuntimeConfig::pagemap_scan_available()
    );
    eprintln!("canary: {context}");
    let rt = runtime(1, keep_resident, pagemap_scan);
    let p = load(&rt);
    let mut id = 1;
    for a in SHAPES {
        for b in SHAPES {
            for shape in [a, b] {
                canary(&rt, &p, id, shape, &context);
                id += 1;
            }
        }
    }
}

#[test]
fn nothing_leaks_between_evaluations_with_pagemap_scan_off() {
    for keep_resident in [0, RuntimeConfig::default().keep_resident, 16 << 20] {
        every_transition(keep_resident, false);
    }
}

/// Whether the kernel has PAGEMAP_SCAN, so that the opt-in is really exercised (where it
/// lacks it, wasmtime falls back to the default reset and an "on" test would test nothing).
fn pagemap_scan_here(test: &str) -> bool {
    let ok = RuntimeConfig::pagemap_scan_available();
    if !ok {
        skip_or_fail(
            test,
            "the kernel has no PAGEMAP_SCAN (Linux 6.7 or later has it)",
        );
    }
    ok
}

#[test]
fn nothing_leaks_between_evaluations_with_pagemap_scan_on() {
    if !pagemap_scan_here("nothing_leaks_between_evaluations_with_pagemap_scan_on") {
        return;
    }
    for keep_resident in [0, RuntimeConfig::default().keep_resident, 16 << 20] {
        every_transition(keep_resident, true);
    }
}

/// Many evaluations at once on fewer slots than threads: slots change hands between
/// evaluations of different sizes.
fn concurrent(pagemap_scan: bool) {
    let rt = Arc::new(runtime(
        2,
        RuntimeConfig::default().keep_resident,
        pagemap_scan,
    ));
    let p = load(&rt);
    let context = format!("concurrent, pagemap_scan={pagemap_scan}");
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let (rt, p, context) = (rt.clone(), p.clone(), context.clone());
            std::thread::spawn(move || {
                for i in 0..12u64 {
                    let shape = SHAPES[((t + i) % 4) as usize];
                    canary(&rt, &p, 1000 * (t + 1) + i, shape, &context);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("no leak seen by any thread");
    }
}

#[test]
fn nothing_leaks_between_concurrent_evaluations_with_pagemap_scan_off() {
    concurrent(false);
}

#[test]
fn nothing_leaks_between_concurrent_evaluations_with_pagemap_scan_on() {
    if !pagemap_scan_here("nothing_leaks_between_concurrent_evaluations_with_pagemap_scan_on") {
        return;
    }
    concurrent(true);
}

#[test]
fn pagemap_scan_is_off_by_default() {
    assert!(!RuntimeConfig::default().pagemap_scan);
}

// Under memory pressure: the pages an evaluation dirtied are pushed out to swap while its
// instance is still alive, then the slot is reset and reused.

/// Iterations the canary spins after writing its markers, while the pager pushes its pages
/// out (about a quarter of a second of guest time on the 2-core test machine).
const SPIN: u64 = 300_000_000;

/// Swap for one test: the machine's, or a file the test adds (as root) and removes after.
/// Holds a lock for its lifetime, so that two pressure tests (nextest runs them in parallel
/// processes) never share or remove each other's swap.
struct Swap {
    file: Option<std::path::PathBuf>,
    _lock: std::fs::File,
}

impl Swap {
    /// Swap in use, or `None` after [`skip_or_fail`] when none can be added here.
    fn ensure(test: &str) -> Option<Swap> {
        // On disk, under the build's own scratch directory: swapon refuses tmpfs (where /tmp
        // may be).
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(dir).expect("the target's tmp directory");
        let lock = std::fs::File::create(dir.join("tether-swap-test.lock")).expect("lock file");
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .expect("lock the swap tests");
        if kib_field("/proc/meminfo", "SwapTotal:") > 0 {
            return Some(Swap {
                file: None,
                _lock: lock,
            });
        }
        if !rustix::process::geteuid().is_root() {
            skip_or_fail(
                test,
                "the machine has no swap, and adding a swap file needs root",
            );
            return None;
        }
        let file = dir.join(format!("tether-{test}-{}.swap", std::process::id()));
        // swapon refuses files with holes: write every byte.
        let zeros = vec![0u8; 1 << 20];
        let mut out = std::fs::File::create(&file).expect("create the swap file");
        for _ in 0..256 {
            std::io::Write::write_all(&mut out, &zeros).expect("write the swap file");
        }
        out.sync_all().expect("sync the swap file");
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod the swap file");
        let swap = Swap {
            file: Some(file.clone()),
            _lock: lock,
        };
        for cmd in [["mkswap", "-q"], ["swapon", "--"]] {
            let status = std::process::Command::new(cmd[0])
                .arg(cmd[1])
                .arg(&file)
                .status();
            if !status.as_ref().is_ok_and(|s| s.success()) {
                skip_or_fail(
                    test,
                    &format!("{} {} failed: {status:?}", cmd[0], file.display()),
                );
                return None;
            }
        }
        Some(swap)
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        if let Some(file) = &self.file {
            let _ = std::process::Command::new("swapoff").arg(file).status();
            let _ = std::fs::remove_file(file);
        }
    }
}

/// In CI a test that cannot run its setup fails; elsewhere it says SKIPPED and passes.
fn skip_or_fail(test: &str, why: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    assert!(
        !ci,
        "{test} cannot run its real setup, and in CI every test must run: {why}"
    );
    eprintln!("SKIPPED {test}: {why} (with CI set, this is a failure)");
}

/// A `Key: N kB` line of a /proc file, in KiB (0 if absent).
fn kib_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Asks the kernel to push every page of this process out (`MADV_PAGEOUT` on each mapping);
/// with swap, dirty anonymous pages (a policy's linear memory and stack among them) go to it.
#[allow(unsafe_code)]
fn page_out_everything() {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    for line in maps.lines() {
        if line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((start, end)) = line
            .split_whitespace()
            .next()
            .and_then(|range| range.split_once('-'))
            .and_then(|(a, b)| {
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            })
        else {
            continue;
        };
        // SAFETY: MADV_PAGEOUT is advice: it writes pages out and drops them from memory,
        // and the next access reads them back unchanged. It never changes what a mapping
        // holds, so no Rust object or guest memory is affected. Errors (a mapping the kernel
        // will not page out) are ignored.
        let _ = unsafe {
            rustix::mm::madvise(
                std::ptr::without_provenance_mut(start),
                end - start,
                rustix::mm::Advice::LinuxPageOut,
            )
        };
    }
}

/// Pushes this process's pages out, again and again, until stopped.
struct Pager {
    stop: Arc<std::sync::atomic::AtomicBool>,
    passes: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Pager {
    fn start() -> Pager {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let passes = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), passes.clone());
        let thread = std::thread::spawn(move || {
            let mut most_swapped = 0;
            while !s.load(Ordering::Relaxed) {
                page_out_everything();
                most_swapped = most_swapped.max(kib_field("/proc/self/status", "VmSwap:"));
                p.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            most_swapped
        });
        Pager {
            stop,
            passes,
            thread: Some(thread),
        }
    }

    fn passes(&self) -> u64 {
        self.passes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops; the most KiB of this process it saw in swap.
    fn finish(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map_or(0, |t| t.join().expect("the pager does not panic"))
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Shapes of evaluations whose pages go out while they spin, each followed by a scan of the
/// slot by the next evaluation of the same shape (so that it scans the grown pages too).
/// Returns the reports of those next evaluations.
fn under_pressure(pagemap_scan: bool, test: &str) -> Option<Vec<(Shape, Report)>> {
    let _swap = Swap::ensure(test)?;
    let context = format!(
        "{test}: pagemap_scan={pagemap_scan} (PAGEMAP_SCAN available: {})",
        RuntimeConfig::pagemap_scan_available()
    );
    let rt = runtime(1, RuntimeConfig::default().keep_resident, pagemap_scan);
    let p = load(&rt);
    canary(&rt, &p, 1, SHAPES[0], &context);
    let pager = Pager::start();
    // The first pass writes the whole process out and can take longer than a spin: wait
    // for it, so that every spin below overlaps passes of the steady state.
    let started = std::time::Instant::now();
    while pager.passes() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{context}: the pager's first pass took over a minute"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut next = Vec::new();
    for (i, shape) in SHAPES.into_iter().enumerate() {
        let id = 10 + 2 * i as u64;
        // A spin that the pager did not overlap at least three times (a slow pass on a busy
        // machine) is run again, longer: the same evaluation, its slot reset in between.
        let mut spin = SPIN;
        let spun = loop {
            let before = pager.passes();
            let spun = run_canary(&rt, &p, id, shape, spin, &context);
            let during = pager.passes() - before;
            if during >= 3 {
                break spun;
            }
            assert!(
                spin < SPIN * 8,
                "{context}: only {during} page-out passes ran while evaluation {id} spun \
                 {spin} iterations: raise SPIN"
            );
            eprintln!(
                "{context}: {during} page-out passes during evaluation {id}; spinning longer"
            );
            spin *= 2;
        };
        if pagemap_scan {
            // Leaks of earlier evaluations may add to the count; the markers must be there.
            let touched = shape.grow.div_ceil(shape.stride);
            assert!(
                spun.after.grown >= touched * MARKERS_PER_PAGE,
                "{context}: {}",
                spun.text
            );
        } else {
            assert_landed(&spun, shape, &context);
        }
        next.push((shape, run_canary(&rt, &p, id + 1, shape, 0, &context)));
    }
    let swapped = pager.finish();
    eprintln!("{context}: up to {swapped} KiB of the test process were in swap");
    assert!(
        swapped > 0,
        "{context}: nothing went to swap; the test proves nothing"
    );
    Some(next)
}

/// The default reset (kept-resident bytes cleared, the rest released) under memory pressure:
/// pages that went to swap while the instance ran are cleared or released like any other.
#[test]
fn nothing_leaks_under_memory_pressure_with_pagemap_scan_off() {
    let test = "nothing_leaks_under_memory_pressure_with_pagemap_scan_off";
    let Some(next) = under_pressure(false, test) else {
        return;
    };
    for (i, (shape, report)) in next.iter().enumerate() {
        assert_clean(
            report,
            11 + 2 * i as u64,
            *shape,
            &format!("{test}, after {shape:?}"),
        );
    }
}

/// The hazard that keeps `pagemap_scan` off by default, reproduced: with it on, a dirty page
/// that was swapped out while the instance ran is neither reset nor released, and the next
/// evaluation in the slot reads it. This also proves the test above can see a leak. If a
/// wasmtime upgrade fixes the reset, this test fails: then `pagemap_scan` can be offered on
/// nodes with swap too (tetherd refuses it there today).
#[test]
fn pagemap_scan_on_leaks_pages_that_were_swapped_out() {
    let test = "pagemap_scan_on_leaks_pages_that_were_swapped_out";
    if !pagemap_scan_here(test) {
        return;
    }
    let Some(next) = under_pressure(true, test) else {
        return;
    };
    let leaked: Vec<&Report> = next
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r.before.grown + r.before.memory + r.before.stack > 0)
        .collect();
    eprintln!(
        "{test}: {} of {} evaluations saw an earlier one's markers: {:?}",
        leaked.len(),
        next.len(),
        leaked.iter().map(|r| &r.text).collect::<Vec<_>>()
    );
    assert!(
        !leaked.is_empty(),
        "{test}: no leak with pagemap_scan on under swap"
    );
}
