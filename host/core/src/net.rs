//! Address math: families, subnets ([`IpNet`], from the `ipnet` crate) and ranges, as `u128`
//! so IPv4 and IPv6 share one code path.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

pub use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Address width in bits.
    pub fn bits(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// An address as a number.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// A number as an address of `family`. The caller keeps IPv4 numbers under 2^32.
pub fn from_u128(family: Family, n: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX))),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// Malformed address text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NetError {
    /// Not an address.
    #[error("{0:?} is not an IP address")]
    BadAddress(String),
    /// Not a CIDR.
    #[error("{0:?} is not a CIDR (expected e.g. 10.6.0.0/16 or fd00::/64)")]
    BadCidr(String),
    /// Host bits set in a subnet.
    #[error("{given} has host bits set; did you mean {suggested}?")]
    HostBits {
        /// What was given.
        given: String,
        /// The network address.
        suggested: String,
    },
    /// Not a range.
    #[error("{0:?} is not an address or a range (expected 10.6.0.10 or 10.6.0.10-10.6.0.20)")]
    BadRange(String),
    /// Range reversed.
    #[error("range {0} ends before it starts")]
    Reversed(String),
    /// Mixed families.
    #[error("range {0} mixes IPv4 and IPv6")]
    MixedRange(String),
}

/// Parses a subnet, e.g. `10.6.0.0/16` or `fd00::/64`, into an [`IpNet`]. The address must be
/// the network address: `10.6.1.0/16` is refused with the network to write instead, since a
/// pool author who writes it most likely meant another subnet than the one the prefix makes.
pub fn parse_cidr(s: &str) -> Result<IpNet, NetError> {
    let text = s.trim();
    let bad = || NetError::BadCidr(s.to_owned());
    let net: IpNet = text.parse().map_err(|_| bad())?;
    // ipnet reads `010.6.0.0` as 10.6.0.0; the standard parser (used for every other address
    // of a pool) refuses such octal-looking octets, and so does a subnet.
    let std_addr = text
        .split_once('/')
        .is_some_and(|(a, _)| a.parse::<IpAddr>().is_ok());
    if !std_addr {
        return Err(bad());
    }
    if net.trunc() != net {
        return Err(NetError::HostBits {
            given: s.to_owned(),
            suggested: net.trunc().to_string(),
        });
    }
    Ok(net)
}

/// What the pool code needs of a subnet beyond [`IpNet`]'s own methods: its family and its
/// bounds as numbers (the interval math of pools is on `u128`).
pub trait SubnetExt {
    /// The family.
    fn family(&self) -> Family;
    /// First and last address as numbers.
    fn bounds(&self) -> (u128, u128);
    /// The usable host range: IPv4 leaves out the network and broadcast addresses (except on
    /// /31 and /32), IPv6 leaves out the subnet-router anycast address (except on /127, /128).
    fn host_range(&self) -> (u128, u128);
}

impl SubnetExt for IpNet {
    fn family(&self) -> Family {
        Family::of(self.addr())
    }

    fn bounds(&self) -> (u128, u128) {
        (to_u128(self.network()), to_u128(self.broadcast()))
    }

    fn host_range(&self) -> (u128, u128) {
        let (a, b) = self.bounds();
        let edge = self.prefix_len() + 1 >= self.max_prefix_len();
        match self.family() {
            _ if edge => (a, b),
            Family::V4 => (a + 1, b - 1),
            Family::V6 => (a + 1, b),
        }
    }
}

/// An inclusive address range of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    /// Family.
    pub family: Family,
    /// First address.
    pub start: u128,
    /// Last address.
    pub end: u128,
}

impl IpRange {
    /// Number of addresses.
    pub fn len(&self) -> u128 {
        self.end - self.start + 1
    }

    /// Never empty; for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl FromStr for IpRange {
    type Err = NetError;
    /// `10.0.0.1`, `10.0.0.1-10.0.0.9`, or a CIDR (its whole block).
    fn from_str(s: &str) -> Result<Self, NetError> {
        let s = s.trim();
        if s.contains('/') {
            let c = parse_cidr(s)?;
            let (start, end) = c.bounds();
            return Ok(IpRange {
                family: c.family(),
                start,
                end,
            });
        }
        let parse = |t: &str| {
            t.trim()
                .parse::<IpAddr>()
                .map_err(|_| NetError::BadRange(s.to_owned()))
        };
        let (a, b) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let a = parse(s)?;
                (a, a)
            }
        };
        if Family::of(a) != Family::of(b) {
            return Err(NetError::MixedRange(s.to_owned()));
        }
        let (start, end) = (to_u128(a), to_u128(b));
        if end < start {
            return Err(NetError::Reversed(s.to_owned()));
        }
        Ok(IpRange {
            family: Family::of(a),
            start,
            end,
        })
    }
}

/// Sorts and merges ranges into disjoint, non-adjacent ones.
pub fn normalize(mut ranges: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ranges.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// `ranges` minus `holes`; both normalized.
pub fn subtract(ranges: &[(u128, u128)], holes: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = Vec::with_capacity(ranges.len());
    let mut hi = 0;
    for &(mut a, b) in ranges {
        while hi < holes.len() && holes[hi].1 < a {
            hi += 1;
        }
        let mut h = hi;
        let mut done = false;
        while h < holes.len() && holes[h].0 <= b {
            let (ha, hb) = holes[h];
            if ha > a {
                out.push((a, ha - 1));
            }
            if hb >= b {
                done = true;
                break;
            }
            a = a.max(hb + 1);
            h += 1;
        }
        if !done {
            out.push((a, b));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = parse_cidr("10.6.0.0/16").expect("cidr");
        assert_eq!(c.family(), Family::V4);
        assert_eq!(c.prefix_len(), 16);
        assert_eq!(c.to_string(), "10.6.0.0/16");
        assert_eq!(
            c.host_range(),
            (
                to_u128("10.6.0.1".parse().expect("ip")),
                to_u128("10.6.255.254".parse().expect("ip"))
            )
        );
        assert!(c.contains(&"10.6.3.4".parse::<IpAddr>().expect("ip")));
        assert!(!c.contains(&"10.7.0.0".parse::<IpAddr>().expect("ip")));
        assert!(!c.contains(&"fd00::1".parse::<IpAddr>().expect("ip")));
        // Host bits set: refused, with the network address to write instead.
        let e = parse_cidr("10.6.0.1/16").expect_err("host bits");
        assert_eq!(
            e.to_string(),
            "10.6.0.1/16 has host bits set; did you mean 10.6.0.0/16?"
        );
        let e = parse_cidr("10.6.1.0/16").expect_err("host bits");
        assert!(e.to_string().contains("did you mean 10.6.0.0/16?"), "{e}");
        let e = parse_cidr("fd00::1/64").expect_err("v6 host bits");
        assert!(e.to_string().contains("did you mean fd00::/64?"), "{e}");
        let v6 = parse_cidr(" fd00::/64 ").expect("v6, trimmed");
        assert_eq!(v6.family(), Family::V6);
        assert_eq!(v6.host_range().1 - v6.host_range().0 + 1, (1u128 << 64) - 1);
        let all = parse_cidr("::/0").expect("all");
        assert_eq!(all.bounds(), (0, u128::MAX));
        assert_eq!(all.host_range(), (1, u128::MAX));
        let all4 = parse_cidr("0.0.0.0/0").expect("all v4");
        assert_eq!(all4.bounds(), (0, u128::from(u32::MAX)));
        let p31 = parse_cidr("10.0.0.0/31").expect("p31");
        assert_eq!(p31.host_range().1 - p31.host_range().0, 1);
        let p32 = parse_cidr("10.0.0.7/32").expect("p32");
        assert_eq!(p32.host_range(), p32.bounds());
        let p127 = parse_cidr("fd00::/127").expect("p127");
        assert_eq!(p127.host_range(), p127.bounds());
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0",
            "10.0.0.0/",
            "/16",
            "10.0.0/16",
            "010.0.0.0/16",
            "nope",
        ] {
            let e = parse_cidr(bad).expect_err(bad);
            assert_eq!(e, NetError::BadCidr(bad.to_owned()), "{bad}");
            assert!(e.to_string().contains("expected e.g. 10.6.0.0/16"), "{e}");
        }
    }

    #[test]
    fn ranges() {
        let r: IpRange = "10.6.168.101-10.6.168.110".parse().expect("range");
        assert_eq!(r.len(), 10);
        assert_eq!("10.0.0.1".parse::<IpRange>().expect("one").len(), 1);
        assert_eq!("10.0.0.0/30".parse::<IpRange>().expect("cidr").len(), 4);
        assert!(matches!(
            "10.0.0.9-10.0.0.1".parse::<IpRange>(),
            Err(NetError::Reversed(_))
        ));
        assert!(matches!(
            "10.0.0.1-fd00::1".parse::<IpRange>(),
            Err(NetError::MixedRange(_))
        ));
        assert!(matches!(
            "nope".parse::<IpRange>(),
            Err(NetError::BadRange(_))
        ));
    }

    #[test]
    fn set_ops() {
        assert_eq!(
            normalize(vec![(5, 9), (1, 3), (4, 4), (20, 30), (25, 26)]),
            vec![(1, 9), (20, 30)]
        );
        assert_eq!(
            subtract(&[(1, 10), (20, 30)], &[(0, 2), (5, 5), (9, 21), (30, 40)]),
            vec![(3, 4), (6, 8), (22, 29)]
        );
        assert_eq!(subtract(&[(1, 10)], &[]), vec![(1, 10)]);
        assert_eq!(subtract(&[(1, 10)], &[(1, 10)]), vec![]);
    }
}
