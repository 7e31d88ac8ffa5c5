//! The egress proxy behind `sandbox.network = proxy`, and the address rules it enforces.
//!
//! [`is_forbidden_address`] is a pure function shared with every other component that fetches
//! URLs on a user's behalf (e.g. the `web_fetch` tool): an address the proxy would refuse must be
//! refused there too, or the tool becomes the way around the proxy.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// True when `ip` must never be contacted on a user's behalf: loopback, private (RFC 1918),
/// carrier-grade NAT (100.64/10), link-local (169.254/16, which holds the cloud metadata address
/// 169.254.169.254; fe80::/10), unique-local (fc00::/7), multicast, broadcast, unspecified,
/// documentation/benchmark/reserved ranges, and every IPv6 form that embeds an IPv4 address
/// (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo) whose embedded address is itself
/// forbidden — or, for translation prefixes that could point anywhere, always.
pub fn is_forbidden_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => is_forbidden_v6(v6),
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()            // 0.0.0.0
        || a == 0                  // 0/8 "this network": reaches the local host on Linux
        || ip.is_loopback()        // 127/8
        || ip.is_private()         // 10/8, 172.16/12, 192.168/16
        || (a == 100 && (64..128).contains(&b)) // 100.64/10 CGNAT
        || ip.is_link_local()      // 169.254/16 incl. metadata 169.254.169.254
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24 IETF protocol assignments
        || ip.is_documentation()   // 192.0.2/24, 198.51.100/24, 203.0.113/24
        || (a == 198 && (b == 18 || b == 19)) // 198.18/15 benchmarking
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast (deprecated)
        || ip.is_multicast()       // 224/4
        || a >= 240 // 240/4 reserved, incl. broadcast 255.255.255.255
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return true;
    }
    // IPv4-mapped ::ffff:a.b.c.d — judged as the IPv4 address it reaches.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_forbidden_v4(v4);
    }
    // IPv4-compatible ::a.b.c.d (deprecated) and the all-zero prefix generally: never a
    // legitimate public destination.
    if seg[..6].iter().all(|&s| s == 0) {
        return true;
    }
    // IPv4-translated ::ffff:0:a.b.c.d (RFC 2765).
    if seg[..4].iter().all(|&s| s == 0) && seg[4] == 0xffff && seg[5] == 0 {
        return true;
    }
    // NAT64 64:ff9b::/96 and local-use 64:ff9b:1::/48: the embedded IPv4 decides; the local-use
    // prefix may be translated to anything, so refuse it outright.
    if seg[0] == 0x64 && seg[1] == 0xff9b {
        if seg[2..6].iter().all(|&s| s == 0) {
            let v4 = Ipv4Addr::new(
                (seg[6] >> 8) as u8,
                seg[6] as u8,
                (seg[7] >> 8) as u8,
                seg[7] as u8,
            );
            return is_forbidden_v4(v4);
        }
        return true;
    }
    match seg[0] {
        // fc00::/7 unique local.
        s if s & 0xfe00 == 0xfc00 => true,
        // fe80::/10 link-local, fec0::/10 deprecated site-local.
        s if s & 0xffc0 == 0xfe80 || s & 0xffc0 == 0xfec0 => true,
        // 2001:db8::/32 documentation.
        0x2001 if seg[1] == 0x0db8 => true,
        // 2001:0::/32 Teredo: tunnels to an IPv4 address the proxy cannot vet.
        0x2001 if seg[1] == 0 => true,
        // 2001:10::/28 ORCHID, 2001:20::/28 ORCHIDv2, 2001:2::/48 benchmarking.
        0x2001 if (seg[1] & 0xfff0) == 0x0010 || (seg[1] & 0xfff0) == 0x0020 => true,
        0x2001 if seg[1] == 0x0002 && seg[2] == 0 => true,
        // 2002::/16 6to4: judged by the embedded IPv4 address.
        0x2002 => {
            let v4 = Ipv4Addr::new(
                (seg[1] >> 8) as u8,
                seg[1] as u8,
                (seg[2] >> 8) as u8,
                seg[2] as u8,
            );
            is_forbidden_v4(v4)
        }
        // 100::/64 discard-only.
        0x0100 if seg[1..4].iter().all(|&s| s == 0) => true,
        // 3fff::/20 documentation (RFC 9637).
        0x3fff if seg[1] & 0xf000 == 0 => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(s: &str) -> bool {
        is_forbidden_address(s.parse().unwrap())
    }

    #[test]
    fn public_addresses_pass() {
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001:82a::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!forbidden(s), "{s} should be allowed");
        }
    }

    #[test]
    fn internal_addresses_are_refused() {
        for s in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "169.254.0.1",
            "192.0.0.170",
            "192.0.2.1",
            "198.18.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "::ffff:0:127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "2001:db8::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "100::1",
        ] {
            assert!(forbidden(s), "{s} should be refused");
        }
    }
}
