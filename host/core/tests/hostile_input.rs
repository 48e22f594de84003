//! Pool files at their extremes (docs/reliability.md, "Hostile input"): a pool defined twice,
//! and pools as large as the address families allow.

use tether_core::pool::{IpPoolSpec, Pool, PoolError, check_disjoint, from_manifest};

fn pool(name: &str, subnet: &str) -> Pool {
    Pool::new(
        name,
        &IpPoolSpec {
            subnet: subnet.into(),
            ..IpPoolSpec::default()
        },
    )
    .expect("valid")
}

#[test]
fn a_pool_defined_twice_is_refused_naming_it() {
    let e =
        check_disjoint(&[pool("a", "10.0.0.0/24"), pool("a", "10.1.0.0/24")]).expect_err("refused");
    assert_eq!(e, PoolError::Duplicate("a".into()));
    assert_eq!(e.to_string(), "pool a is defined twice");
}

#[test]
fn the_largest_pools_are_counted_without_overflow() {
    // fd00::/48: 2^80 addresses, one of them (the subnet-router anycast) never handed out.
    let big = pool("big", "fd00::/48");
    assert_eq!(big.total, (1u128 << 80) - 1);
    assert_eq!(big.ranges.len(), 1, "one interval, whatever the size");
    // The whole IPv6 space and the whole IPv4 space: totals at the edge of u128 and u32.
    let all6 = pool("all6", "::/0");
    assert_eq!(all6.total, u128::MAX);
    let all4 = pool("all4", "0.0.0.0/0");
    assert!(all4.total > 0 && all4.total < 1u128 << 32, "{}", all4.total);
    // The same through a manifest, with a gateway and an exclusion at the very top.
    let m = serde_json::json!({"apiVersion": "ipam.tether.dev/v1alpha1", "kind": "IPPool",
        "metadata": {"name": "edge"},
        "spec": {"subnet": "::/0", "gateway": "::1",
            "excludeIPs": ["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]}});
    let edge = from_manifest(&m).expect("valid");
    assert_eq!(edge.total, u128::MAX - 2);
    check_disjoint(&[big, all4]).expect("different families never overlap");
}

/// Found while writing the test above: the whole IPv6 space listed in `ips` (`::/0`, or
/// `::-ffff:...:ffff`) made a range of 2^128 addresses, whose count overflowed u128: a panic
/// loading the pool file (debug builds) or a total wrapped to 0 (release). The unspecified
/// address is no host's and is left out of every pool.
#[test]
fn the_whole_address_space_listed_in_ips_is_counted_without_overflow() {
    for ips in ["::/0", "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"] {
        let p = Pool::new(
            "full",
            &IpPoolSpec {
                subnet: "::/0".into(),
                ips: vec![ips.into()],
                ..IpPoolSpec::default()
            },
        )
        .expect("valid");
        assert_eq!(p.total, u128::MAX, "{ips}");
        assert!(!p.contains("::".parse().expect("ip")), "{ips}");
        assert!(
            p.contains(
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                    .parse()
                    .expect("ip")
            )
        );
    }
    // The unspecified address alone is nothing to allocate.
    let e = Pool::new(
        "zero",
        &IpPoolSpec {
            subnet: "0.0.0.0/0".into(),
            ips: vec!["0.0.0.0".into()],
            ..IpPoolSpec::default()
        },
    )
    .expect_err("empty");
    assert_eq!(e, PoolError::Empty("zero".into()));
}
