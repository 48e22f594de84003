//! IPPool and workload manifests. Input: the text of a manifest file, read as tetherd's
//! manifests.rs `read_documents` reads one (a YAML stream, one JSON value per document, a
//! `kind: List` flattened), then every document as an IPPool (as the daemon's pool files are
//! loaded: a duplicate name or an overlap refuses the set) and as a workload object and Pod.
//! The pool math is checked against a direct computation.

use std::net::IpAddr;

use serde_json::Value;
use tether_core::manifest::{ObjectIndex, object_from_value, workload_from_pod};
use tether_core::pool::{Pool, PoolError, check_disjoint, from_manifest};

/// tetherd's `read_documents`, on text instead of a path: the same function.
pub fn documents(text: &str) -> Result<Vec<Value>, String> {
    tether_core::manifest::documents(text).map_err(|(index, e)| format!("document {index}: {e}"))
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// What a validated pool must be.
fn check_pool(p: &Pool) {
    let (lo, hi) = (to_u128(p.subnet.network()), to_u128(p.subnet.broadcast()));
    let mut total: u128 = 0;
    let mut prev: Option<u128> = None;
    for &(a, b) in &p.ranges {
        assert!(a <= b, "{}: range {a}-{b} is reversed", p.name);
        assert!(
            lo <= a && b <= hi,
            "{}: range {a}-{b} is outside {}",
            p.name,
            p.subnet
        );
        if let Some(end) = prev {
            assert!(
                end.checked_add(1).is_some_and(|n| n < a),
                "{}: ranges not sorted, disjoint and non-adjacent: {:?}",
                p.name,
                p.ranges
            );
        }
        prev = Some(b);
        total += b - a + 1;
        if let Some(g) = p.gateway {
            let g = to_u128(g);
            assert!(
                !(a <= g && g <= b),
                "{}: the gateway is allocatable",
                p.name
            );
        }
    }
    assert_eq!(total, p.total, "{}: total", p.name);
    assert!(
        p.total > 0,
        "{}: a valid pool with nothing to allocate",
        p.name
    );
}

fn overlaps(a: &Pool, b: &Pool) -> Option<(u128, u128)> {
    if a.family() != b.family() {
        return None;
    }
    for &(a0, a1) in &a.ranges {
        for &(b0, b1) in &b.ranges {
            if a0.max(b0) <= a1.min(b1) {
                return Some((a0.max(b0), a1.min(b1)));
            }
        }
    }
    None
}

/// One input.
pub fn one(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(docs) = documents(text) else {
        return;
    };
    let mut pools: Vec<Pool> = Vec::new();
    let mut index = ObjectIndex::new();
    for doc in &docs {
        match from_manifest(doc) {
            Ok(p) => {
                check_pool(&p);
                // The daemon refuses a second pool of one name before the overlap check.
                if !pools.iter().any(|q| q.name == p.name) {
                    pools.push(p);
                }
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        if let Ok(o) = object_from_value(doc) {
            index.insert(o);
        }
        if let Ok(w) = workload_from_pod(doc) {
            // Owner chains end, whatever the objects say (cycles, depth).
            let chain = index.owner_chain(&w.namespace, &w.owner_references);
            assert!(chain.len() <= tether_core::manifest::MAX_OWNER_DEPTH);
        }
    }
    let overlapping = pools.iter().enumerate().find_map(|(i, a)| {
        pools[i + 1..]
            .iter()
            .find_map(|b| overlaps(a, b).map(|r| (a.name.clone(), b.name.clone(), r)))
    });
    match (check_disjoint(&pools), overlapping) {
        (Ok(()), None) => {}
        (
            Err(PoolError::Overlap {
                first, from, to, ..
            }),
            Some(_),
        ) => {
            // What it names is shared by two pools.
            let (from, to) = (to_u128(from), to_u128(to));
            assert!(from <= to);
            let family = pools
                .iter()
                .find(|p| p.name == first)
                .map(Pool::family)
                .expect("the overlap names a pool of the set");
            let holders = pools
                .iter()
                .filter(|p| p.family() == family)
                .filter(|p| p.ranges.iter().any(|&(a, b)| a <= from && from <= b))
                .count();
            assert!(
                holders >= 2,
                "the overlap it names is held by {holders} pool(s)"
            );
        }
        (r, o) => panic!("check_disjoint said {r:?}, direct computation {o:?}"),
    }
}
