//! Network allowlists: which client addresses may reach a plane.
//!
//! Each plane (inference, management, metrics) may list CIDR blocks; a
//! connection from anywhere else is refused before a byte of HTTP is read.
//! IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, what a dual-stack socket
//! reports for IPv4 clients) are compared as the IPv4 address they are, so
//! an IPv4 rule cannot be bypassed by connecting over a v6 socket.

use std::net::IpAddr;

/// One CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `fd00::/8`, or a bare address (a /32 or /128).
    /// Host bits set below the prefix are an error: `10.0.0.1/8` is almost
    /// always a typo for something narrower.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0..={max}"))?,
        };
        let cidr = Cidr { addr, prefix };
        if cidr.network() != bits(addr) {
            return Err(format!(
                "{text:?}: address has bits set beyond the /{prefix} prefix"
            ));
        }
        Ok(cidr)
    }

    fn mask(&self) -> u128 {
        let width = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == 0 {
            0
        } else {
            let ones = u128::MAX << (128 - u32::from(self.prefix));
            if width == 32 { ones >> 96 } else { ones }
        }
    }

    fn network(&self) -> u128 {
        bits(self.addr) & self.mask()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && bits(ip) & self.mask() == self.network()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// A plane's allowlist; empty means "no restriction configured".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    blocks: Vec<Cidr>,
}

impl Allowlist {
    /// Parses every entry, naming the first bad one.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let blocks = entries
            .iter()
            .map(|e| Cidr::parse(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Allowlist { blocks })
    }

    pub fn is_unrestricted(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.blocks.is_empty() || self.blocks.iter().any(|b| b.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_blocks() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains(ip("10.1.255.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("203.0.113.9")));
        assert!(Cidr::parse("192.0.2.7").unwrap().contains(ip("192.0.2.7")));
        assert!(!Cidr::parse("192.0.2.7").unwrap().contains(ip("192.0.2.8")));
    }

    #[test]
    fn v6_blocks_and_mapped_v4() {
        let c = Cidr::parse("fd00::/8").unwrap();
        assert!(c.contains(ip("fd12::1")));
        assert!(!c.contains(ip("fe80::1")));
        // A v4 client seen through a dual-stack socket still matches v4 rules.
        let v4 = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(v4.contains(ip("::ffff:127.0.0.1")));
        assert!(!Cidr::parse("::/0").unwrap().contains(ip("::ffff:127.0.0.1")));
    }

    #[test]
    fn bad_entries_name_themselves() {
        for bad in ["10.0.0.1/8", "10.0.0.0/33", "nonsense", "fd00::1/8", "1.2.3.4/x"] {
            let err = Cidr::parse(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn empty_allowlist_allows_everything() {
        let a = Allowlist::default();
        assert!(a.allows(ip("198.51.100.1")));
        let a = Allowlist::parse(&["127.0.0.1", "10.0.0.0/8"]).unwrap();
        assert!(a.allows(ip("10.9.9.9")));
        assert!(!a.allows(ip("192.168.1.1")));
    }
}
