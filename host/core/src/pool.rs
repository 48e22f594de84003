//! IP pools: the `IPPool` resource's spec, its validation, and the set of free addresses.
//!
//! The spec has the shape users know from Spiderpool's SpiderIPPool: `subnet`, `ips` (single
//! addresses, `a-b` ranges or CIDR blocks; the whole subnet when empty), `excludeIPs`, `gateway`,
//! `routes`, `default`. The gateway is never allocated.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::labels::LabelSelector;
use crate::net::{
    Family, IpNet, IpRange, NetError, SubnetExt, from_u128, normalize, parse_cidr, subtract,
    to_u128,
};

/// API group/version of the IPPool resource.
pub const API_VERSION: &str = "ipam.tether.dev/v1alpha1";
/// Kind of the IPPool resource.
pub const KIND: &str = "IPPool";

/// A route as written in a pool spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Destination CIDR.
    pub dst: String,
    /// Gateway; the pool's gateway when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
}

/// `spec` of an IPPool, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpPoolSpec {
    /// The subnet, e.g. `10.6.0.0/16`.
    pub subnet: String,
    /// Allocatable addresses: `10.6.168.101`, `10.6.168.101-10.6.168.110`, `10.6.168.0/28`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// Addresses never allocated.
    #[serde(default, rename = "excludeIPs", skip_serializing_if = "Vec::is_empty")]
    pub exclude_ips: Vec<String>,
    /// The gateway given to pods (never allocated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Routes given to pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// A cluster default pool: used when nothing else names a pool.
    #[serde(default)]
    pub default: bool,
    /// Only nodes whose labels match hand out addresses of this pool (every node when
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Only pods of namespaces whose labels match get addresses of this pool (every
    /// namespace when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// Who asks for an address, as a pool's selectors see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Requester<'a> {
    /// The node.
    pub node: &'a str,
    /// The node's labels (`None`: not known).
    pub node_labels: Option<&'a [(String, String)]>,
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The namespace's labels (`None`: not known).
    pub namespace_labels: Option<&'a [(String, String)]>,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Gateway.
    pub gw: Option<IpAddr>,
}

/// A pool spec that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PoolError {
    /// A selector that cannot be evaluated.
    #[error("pool {pool}: {field}: {reason}")]
    Selector {
        /// Pool.
        pool: String,
        /// `nodeSelector` or `namespaceSelector`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Bad pool name.
    #[error("pool name {0:?} must be 1-253 characters of a-z, 0-9, '-' and '.'")]
    BadName(String),
    /// Bad address text.
    #[error("pool {pool}: {field}: {source}")]
    Net {
        /// Pool.
        pool: String,
        /// Field.
        field: &'static str,
        /// What is wrong.
        source: NetError,
    },
    /// Address outside the subnet.
    #[error("pool {pool}: {field} {value} is outside subnet {subnet}")]
    OutsideSubnet {
        /// Pool.
        pool: String,
        /// Field.
        field: &'static str,
        /// Offending value.
        value: String,
        /// The subnet.
        subnet: String,
    },
    /// Nothing left to allocate.
    #[error("pool {0}: no allocatable address (ips minus excludeIPs and the gateway is empty)")]
    Empty(String),
    /// Not an IPPool manifest.
    #[error(
        "expected apiVersion {API_VERSION}, kind {KIND}; found apiVersion {api_version:?}, kind {kind:?}"
    )]
    NotAPool {
        /// Found apiVersion.
        api_version: String,
        /// Found kind.
        kind: String,
    },
    /// Two pools share allocatable addresses: both would hand them out.
    #[error(
        "pools {first} and {second} overlap at {from}-{to}: an address may belong to one pool only (narrow one with ips or excludeIPs)"
    )]
    Overlap {
        /// One pool.
        first: String,
        /// The other.
        second: String,
        /// First shared address.
        from: IpAddr,
        /// Last shared address of the first shared range.
        to: IpAddr,
    },
    /// Two pools of one name.
    #[error("pool {0} is defined twice")]
    Duplicate(String),
    /// The manifest does not parse.
    #[error("IPPool {name}: {reason}")]
    BadManifest {
        /// metadata.name, if any.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// Reads an IPPool manifest (a parsed YAML/JSON document).
pub fn from_manifest(v: &serde_json::Value) -> Result<Pool, PoolError> {
    let text = |p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
    };
    let (api_version, kind) = (text("/apiVersion"), text("/kind"));
    if api_version != API_VERSION || kind != KIND {
        return Err(PoolError::NotAPool {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
        });
    }
    let name = text("/metadata/name");
    let bad = |reason: String| PoolError::BadManifest {
        name: if name.is_empty() {
            "(no metadata.name)".into()
        } else {
            name.to_owned()
        },
        reason,
    };
    if name.is_empty() {
        return Err(bad("metadata.name is missing".into()));
    }
    let spec = v.get("spec").ok_or_else(|| bad("spec is missing".into()))?;
    let spec: IpPoolSpec =
        serde_json::from_value(spec.clone()).map_err(|e| bad(format!("spec: {e}")))?;
    Pool::new(name, &spec)
}

/// A validated pool: what the allocator works with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Name.
    pub name: String,
    /// Subnet.
    pub subnet: IpNet,
    /// Gateway.
    pub gateway: Option<IpAddr>,
    /// Routes.
    pub routes: Vec<Route>,
    /// Cluster default.
    pub default: bool,
    /// Allocatable addresses: sorted, disjoint, non-adjacent, inclusive.
    pub ranges: Vec<(u128, u128)>,
    /// How many addresses the ranges hold.
    pub total: u128,
    /// The spec it came from.
    pub spec: IpPoolSpec,
}

impl Pool {
    /// Validates a spec.
    pub fn new(name: &str, spec: &IpPoolSpec) -> Result<Pool, PoolError> {
        if !crate::decision::is_dns_label_ish(name) {
            return Err(PoolError::BadName(name.to_owned()));
        }
        let net = |field: &'static str| {
            move |source: NetError| PoolError::Net {
                pool: name.to_owned(),
                field,
                source,
            }
        };
        let subnet = parse_cidr(&spec.subnet).map_err(net("subnet"))?;
        let outside = |field: &'static str, value: &str| PoolError::OutsideSubnet {
            pool: name.to_owned(),
            field,
            value: value.to_owned(),
            subnet: subnet.to_string(),
        };
        let (lo, hi) = subnet.bounds();
        let parse_ranges =
            |field: &'static str, list: &[String]| -> Result<Vec<(u128, u128)>, PoolError> {
                let mut out = Vec::with_capacity(list.len());
                for text in list {
                    let r: IpRange = text.parse().map_err(net(field))?;
                    if r.family != subnet.family() || r.start < lo || r.end > hi {
                        return Err(outside(field, text));
                    }
                    out.push((r.start, r.end));
                }
                Ok(normalize(out))
            };
        let gateway = match &spec.gateway {
            None => None,
            Some(g) => {
                let ip: IpAddr = g
                    .parse()
                    .map_err(|_| net("gateway")(NetError::BadAddress(g.clone())))?;
                if !subnet.contains(&ip) {
                    return Err(outside("gateway", g));
                }
                Some(ip)
            }
        };
        let mut routes = Vec::with_capacity(spec.routes.len());
        for r in &spec.routes {
            let dst = parse_cidr(&r.dst).map_err(net("routes.dst"))?;
            let gw = match &r.gw {
                None => gateway,
                Some(g) => Some(
                    g.parse::<IpAddr>()
                        .map_err(|_| net("routes.gw")(NetError::BadAddress(g.clone())))?,
                ),
            };
            routes.push(Route { dst, gw });
        }
        let ips = if spec.ips.is_empty() {
            vec![subnet.host_range()]
        } else {
            parse_ranges("ips", &spec.ips)?
        };
        let mut holes = parse_ranges("excludeIPs", &spec.exclude_ips)?;
        if let Some(g) = gateway {
            let g = to_u128(g);
            holes.push((g, g));
        }
        // The unspecified address (`::`, `0.0.0.0`) is nobody's. Leaving it out also keeps
        // every count within u128: `ips: ["::/0"]` would otherwise hold 2^128 addresses.
        holes.push((0, 0));
        holes = normalize(holes);
        for (field, selector) in [
            ("nodeSelector", &spec.node_selector),
            ("namespaceSelector", &spec.namespace_selector),
        ] {
            if let Some(Err(reason)) = selector.as_ref().map(LabelSelector::validate) {
                return Err(PoolError::Selector {
                    pool: name.to_owned(),
                    field,
                    reason,
                });
            }
        }
        let ranges = subtract(&ips, &holes);
        if ranges.is_empty() {
            return Err(PoolError::Empty(name.to_owned()));
        }
        let total = ranges.iter().map(|(a, b)| b - a + 1).sum();
        Ok(Pool {
            name: name.to_owned(),
            subnet,
            gateway,
            routes,
            default: spec.default,
            ranges,
            total,
            spec: spec.clone(),
        })
    }

    /// Why this pool may not serve `who`, if it may not: its `nodeSelector` does not match
    /// the node's labels, or its `namespaceSelector` the namespace's. Labels that are not
    /// known match no selector; the flag says the answer may change in a moment (the node's
    /// labels are not known yet).
    pub fn refuses(&self, who: &Requester<'_>) -> Option<(String, bool)> {
        if let Some(sel) = &self.spec.node_selector {
            match who.node_labels {
                None => {
                    return Some((
                        format!(
                            "its nodeSelector ({sel}) cannot be checked yet: the labels of node {:?} are not known",
                            who.node
                        ),
                        true,
                    ));
                }
                Some(l) if !sel.matches(l) => {
                    return Some((
                        format!(
                            "its nodeSelector ({sel}) does not match node {:?}",
                            who.node
                        ),
                        false,
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some(sel) = &self.spec.namespace_selector {
            match who.namespace_labels {
                None => {
                    return Some((
                        format!(
                            "its namespaceSelector ({sel}) cannot be checked: namespace {:?} is not known",
                            who.namespace
                        ),
                        false,
                    ));
                }
                Some(l) if !sel.matches(l) => {
                    return Some((
                        format!(
                            "its namespaceSelector ({sel}) does not match namespace {:?}",
                            who.namespace
                        ),
                        false,
                    ));
                }
                Some(_) => {}
            }
        }
        None
    }

    /// The family.
    pub fn family(&self) -> Family {
        self.subnet.family()
    }

    /// Whether `ip` is allocatable in this pool (ignoring whether it is free).
    pub fn contains(&self, ip: IpAddr) -> bool {
        if Family::of(ip) != self.family() {
            return false;
        }
        let n = to_u128(ip);
        let i = self.ranges.partition_point(|&(_, end)| end < n);
        self.ranges.get(i).is_some_and(|&(start, _)| start <= n)
    }
}

/// Checks that pool names are unique and no two pools share an allocatable address. Pools in
/// the same subnet are fine as long as their ranges (after excludeIPs and the gateway) are
/// disjoint.
pub fn check_disjoint(pools: &[Pool]) -> Result<(), PoolError> {
    // Every range, tagged with its family and pool, sorted by start: an overlap shows up
    // between neighbours (or between a range and the widest earlier one of its family).
    let mut all: Vec<(Family, u128, u128, usize)> = Vec::new();
    for (i, p) in pools.iter().enumerate() {
        if pools[..i].iter().any(|q| q.name == p.name) {
            return Err(PoolError::Duplicate(p.name.clone()));
        }
        all.extend(p.ranges.iter().map(|&(a, b)| (p.family(), a, b, i)));
    }
    all.sort_unstable_by_key(|&(f, a, b, _)| (f == Family::V6, a, b));
    let mut reach: Option<(Family, u128, usize)> = None;
    for &(f, a, b, i) in &all {
        if let Some((rf, rend, ri)) = reach
            && rf == f
            && a <= rend
            && ri != i
        {
            return Err(PoolError::Overlap {
                first: pools[ri].name.clone(),
                second: pools[i].name.clone(),
                from: from_u128(f, a),
                to: from_u128(f, b.min(rend)),
            });
        }
        match reach {
            Some((rf, rend, _)) if rf == f && rend >= b => {}
            _ => reach = Some((f, b, i)),
        }
    }
    Ok(())
}

/// The free addresses of a pool as disjoint intervals, allocated next-fit: every operation is
/// O(log n) in the number of intervals, whatever the pool's size.
#[derive(Debug, Clone, Default)]
pub struct FreeSet {
    free: BTreeMap<u128, u128>,
    count: u128,
    cursor: u128,
}

impl FreeSet {
    /// All of `ranges` free.
    pub fn new(ranges: &[(u128, u128)]) -> Self {
        Self::without(ranges, &[])
    }

    /// `ranges` minus the `taken` addresses (sorted and deduplicated; those outside the ranges
    /// are ignored), in one linear pass (rebuilding a pool with a million allocations takes milliseconds, not a
    /// million interval splits). The cursor resumes after the highest address taken, as it
    /// would after taking them one by one.
    pub fn without(ranges: &[(u128, u128)], taken: &[u128]) -> Self {
        let mut free = Vec::with_capacity(ranges.len() + taken.len());
        let mut count = 0;
        let mut last_taken = None;
        let mut t = taken.iter().copied().peekable();
        for &(start, end) in ranges {
            // The next address that may be free; None once past u128::MAX.
            let mut from = Some(start);
            while let Some(n) = t.next_if(|&n| n <= end) {
                let Some(f) = from else { continue };
                if n < f {
                    continue; // between ranges: outside the pool
                }
                if n > f {
                    free.push((f, n - 1));
                    count += n - f;
                }
                last_taken = Some(n);
                from = n.checked_add(1);
            }
            if let Some(f) = from
                && f <= end
            {
                free.push((f, end));
                count += end - f + 1;
            }
        }
        let cursor = match (last_taken, ranges.first()) {
            (Some(max), _) => max.wrapping_add(1),
            (None, Some(&(first, _))) => first,
            (None, None) => 0,
        };
        FreeSet {
            free: free.into_iter().collect(),
            count,
            cursor,
        }
    }

    /// Free addresses.
    pub fn count(&self) -> u128 {
        self.count
    }

    /// Number of intervals (a measure of fragmentation).
    pub fn intervals(&self) -> usize {
        self.free.len()
    }

    fn interval_of(&self, n: u128) -> Option<(u128, u128)> {
        self.free
            .range(..=n)
            .next_back()
            .filter(|&(_, &end)| end >= n)
            .map(|(&s, &e)| (s, e))
    }

    /// Whether `n` is free.
    pub fn is_free(&self, n: u128) -> bool {
        self.interval_of(n).is_some()
    }

    /// The address the next [`FreeSet::take_next`] would return, without taking it.
    pub fn peek_next(&self) -> Option<u128> {
        if self.interval_of(self.cursor).is_some() {
            return Some(self.cursor);
        }
        self.free
            .range(self.cursor..)
            .next()
            .or_else(|| self.free.iter().next())
            .map(|(&s, _)| s)
    }

    /// Takes the next free address at or after the cursor, wrapping around: recently freed
    /// addresses are not handed out again at once (stale ARP and conntrack entries age out).
    pub fn take_next(&mut self) -> Option<u128> {
        let n = self.peek_next()?;
        self.take(n);
        self.cursor = n.wrapping_add(1);
        Some(n)
    }

    /// Takes a specific address; false when it was not free. An address at or after the
    /// cursor moves the cursor past it, so planning with [`FreeSet::peek_next`] and applying
    /// with `take` is next-fit too, and a rebuilt set resumes after the highest address taken.
    pub fn take(&mut self, n: u128) -> bool {
        if !self.take_quiet(n) {
            return false;
        }
        if n >= self.cursor {
            self.cursor = n.wrapping_add(1);
        }
        true
    }

    /// Takes a specific address without moving the cursor: for an address another writer
    /// took (another node's), so that this one keeps to its own part of the pool.
    pub fn take_quiet(&mut self, n: u128) -> bool {
        let Some((s, e)) = self.interval_of(n) else {
            return false;
        };
        self.free.remove(&s);
        if s < n {
            self.free.insert(s, n - 1);
        }
        if n < e {
            self.free.insert(n + 1, e);
        }
        self.count -= 1;
        true
    }

    /// Moves the cursor: the next [`FreeSet::take_next`] searches from `n`.
    pub fn set_cursor(&mut self, n: u128) {
        self.cursor = n;
    }

    /// Gives an address back; false when it was already free.
    pub fn put(&mut self, n: u128) -> bool {
        if self.is_free(n) {
            return false;
        }
        let mut start = n;
        let mut end = n;
        if let Some((&ls, &le)) = self.free.range(..n).next_back()
            && le.checked_add(1) == Some(n)
        {
            start = ls;
        }
        if let Some(re) = n.checked_add(1).and_then(|r| self.free.get(&r).copied()) {
            self.free.remove(&(n + 1));
            end = re;
        }
        self.free.insert(start, end);
        self.count += 1;
        true
    }

    /// Every free address, in order (for tests and small pools).
    pub fn iter(&self) -> impl Iterator<Item = u128> + '_ {
        self.free.iter().flat_map(|(&s, &e)| s..=e)
    }
}

/// The address `n` of `pool`'s family.
pub fn addr(pool: &Pool, n: u128) -> IpAddr {
    from_u128(pool.family(), n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Disjoint, sorted ranges from cut points (pairs of a sorted, deduplicated list), shifted
    /// by `base` so that the top of the u128 space is covered too.
    fn ranges_from(mut cuts: Vec<u128>, base: u128) -> Vec<(u128, u128)> {
        cuts.sort_unstable();
        cuts.dedup();
        cuts.chunks_exact(2)
            .map(|c| (base + c[0], base + c[1]))
            .collect()
    }

    proptest! {
        #[test]
        fn without_equals_taking_one_by_one(
            cuts in proptest::collection::vec(0u128..300, 2..12),
            taken in proptest::collection::vec(0u128..320, 0..200),
            top in any::<bool>(),
        ) {
            let base = if top { u128::MAX - 319 } else { 0 };
            let ranges = ranges_from(cuts, base);
            prop_assume!(!ranges.is_empty());
            let mut taken: Vec<u128> = taken.into_iter().map(|t| base + t).collect();
            let mut one_by_one = FreeSet::new(&ranges);
            for &t in &taken {
                one_by_one.take(t);
            }
            taken.sort_unstable();
            taken.dedup();
            let bulk = FreeSet::without(&ranges, &taken);
            prop_assert_eq!(bulk.iter().collect::<Vec<_>>(), one_by_one.iter().collect::<Vec<_>>());
            prop_assert_eq!(bulk.count(), one_by_one.count());
            prop_assert_eq!(bulk.intervals(), one_by_one.intervals());
            prop_assert_eq!(bulk.peek_next(), one_by_one.peek_next());
        }
    }

    fn spec(subnet: &str, ips: &[&str]) -> IpPoolSpec {
        IpPoolSpec {
            subnet: subnet.into(),
            ips: ips.iter().map(|s| (*s).into()).collect(),
            ..IpPoolSpec::default()
        }
    }

    #[test]
    fn seed_pool() {
        let mut s = spec("10.6.0.0/16", &["10.6.168.101-10.6.168.110"]);
        s.gateway = Some("10.6.0.1".into());
        s.routes = vec![RouteSpec {
            dst: "0.0.0.0/0".into(),
            gw: None,
        }];
        let p = Pool::new("test-ippool", &s).expect("valid");
        assert_eq!(p.total, 10);
        assert_eq!(p.routes[0].gw, Some("10.6.0.1".parse().expect("ip")));
        assert!(p.contains("10.6.168.105".parse().expect("ip")));
        assert!(!p.contains("10.6.168.111".parse().expect("ip")));
        assert!(!p.contains("fd00::1".parse().expect("ip")));
    }

    #[test]
    fn whole_subnet_minus_gateway_and_excludes() {
        let mut s = spec("10.0.0.0/24", &[]);
        s.gateway = Some("10.0.0.1".into());
        s.exclude_ips = vec!["10.0.0.200-10.0.0.254".into()];
        let p = Pool::new("p", &s).expect("valid");
        // .1-.254 is 254 hosts; minus the gateway, minus 55 excluded.
        assert_eq!(p.total, 254 - 1 - 55);
        let v6 = Pool::new("v6", &spec("fd00::/120", &[])).expect("valid");
        assert_eq!(v6.total, 255);
        assert_eq!(v6.family(), Family::V6);
    }

    #[test]
    fn errors_say_what_to_fix() {
        let e = Pool::new("p", &spec("10.0.0.0/24", &["10.0.1.5"])).expect_err("outside");
        assert_eq!(
            e.to_string(),
            "pool p: ips 10.0.1.5 is outside subnet 10.0.0.0/24"
        );
        let e = Pool::new("p", &spec("10.0.0.0/24", &["fd00::1"])).expect_err("family");
        assert!(matches!(e, PoolError::OutsideSubnet { .. }));
        let e = Pool::new("p", &spec("10.0.0.1/24", &[])).expect_err("host bits");
        assert!(e.to_string().contains("did you mean 10.0.0.0/24"), "{e}");
        let mut s = spec("10.0.0.0/30", &["10.0.0.1"]);
        s.gateway = Some("10.0.0.1".into());
        assert_eq!(Pool::new("p", &s), Err(PoolError::Empty("p".into())));
        assert!(matches!(
            Pool::new("Bad_Name", &spec("10.0.0.0/24", &[])),
            Err(PoolError::BadName(_))
        ));
        let bad: Result<IpPoolSpec, _> =
            serde_json::from_value(serde_json::json!({"subnet": "10.0.0.0/24", "ipz": []}));
        assert!(
            bad.expect_err("unknown field")
                .to_string()
                .contains("unknown field `ipz`")
        );
    }

    #[test]
    fn manifests() {
        let v = serde_json::json!({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "test-ippool"},
            "spec": {"subnet": "10.6.0.0/16", "ips": ["10.6.168.101-10.6.168.110"], "gateway": "10.6.0.1"}});
        assert_eq!(from_manifest(&v).expect("pool").total, 10);
        let e = from_manifest(&serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap"}))
            .expect_err("kind");
        assert!(
            e.to_string()
                .contains("expected apiVersion ipam.tether.dev/v1alpha1"),
            "{e}"
        );
        let e = from_manifest(
            &serde_json::json!({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "p"},
            "spec": {"subnet": "10.0.0.0/24", "exclude": []}}),
        )
        .expect_err("unknown field");
        assert!(
            e.to_string()
                .starts_with("IPPool p: spec: unknown field `exclude`"),
            "{e}"
        );
    }

    /// Another writer's address taken quietly leaves this writer's search where it was.
    #[test]
    fn a_quiet_take_leaves_the_cursor() {
        let mut f = FreeSet::new(&[(0, 99)]);
        f.set_cursor(50);
        assert!(f.take_quiet(60), "another node took 60");
        assert!(f.take_quiet(10));
        assert!(!f.take_quiet(60));
        assert_eq!(f.take_next(), Some(50));
        assert_eq!(f.take_next(), Some(51));
        assert_eq!(f.count(), 96);
        // A loud take ahead moves it past.
        assert!(f.take(70));
        assert_eq!(f.take_next(), Some(71));
    }

    #[test]
    fn free_set_next_fit_and_merge() {
        let mut f = FreeSet::new(&[(10, 14), (20, 21)]);
        assert_eq!(f.count(), 7);
        assert_eq!(f.take_next(), Some(10));
        assert_eq!(f.take_next(), Some(11));
        assert!(f.put(10));
        assert!(!f.put(10), "double free is refused");
        // Next-fit: 12 comes before the freed 10.
        assert_eq!(f.peek_next(), Some(12));
        assert!(f.take(12), "planned with peek, applied with take");
        assert_eq!(f.take_next(), Some(13));
        // A specific take behind the cursor leaves it; one ahead moves it past.
        assert!(f.take(20));
        assert!(!f.take(20));
        assert_eq!(f.take_next(), Some(21));
        assert_eq!(f.take_next(), Some(10), "wraps around");
        assert_eq!(f.take_next(), Some(14));
        assert_eq!(f.take_next(), None);
        assert_eq!(f.count(), 0);
        for n in [12, 11, 13] {
            assert!(f.put(n));
        }
        assert_eq!(f.intervals(), 1, "11..=13 merged");
        assert_eq!(f.iter().collect::<Vec<_>>(), vec![11, 12, 13]);
    }
}
