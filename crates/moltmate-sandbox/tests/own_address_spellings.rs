//! Regression (issue 9 review, §2): the gateway's own addresses in translated IPv6 spellings.

use moltmate_sandbox::proxy::{embedded_ipv4, is_forbidden_address, OwnAddresses};
use std::net::{IpAddr, Ipv6Addr};

/// Regression: `OwnAddresses::contains` canonicalised only IPv4-mapped addresses
/// (`::ffff:a.b.c.d`), while `is_forbidden_address` judged NAT64 (`64:ff9b::a.b.c.d`) and 6to4
/// (`2002:aabb:ccdd::`) by the IPv4 address they embed. For the gateway's own *public* IPv4
/// address (not forbidden, only "own"), those spellings passed both checks: on an IPv6-only host
/// behind NAT64 (DNS64), a name with `AAAA 64:ff9b::<gateway's IPv4>` reached the gateway's own
/// public address through the translator. Now both checks map every IPv4-carrying spelling
/// through one function (`embedded_ipv4`).
#[test]
fn the_gateways_own_ipv4_in_nat64_or_6to4_spelling_is_refused() {
    let own = OwnAddresses::from_addresses(vec!["93.184.215.14".parse().unwrap()]);
    let mut passed = Vec::new();
    for spelling in [
        "93.184.215.14",
        "::ffff:93.184.215.14",
        "::ffff:0:93.184.215.14",
        "64:ff9b::5db8:d70e",
        "64:ff9b::93.184.215.14",
        "2002:5db8:d70e::1",
        "2002:5db8:d70e:ffff:ffff:ffff:ffff:ffff",
    ] {
        let ip: IpAddr = spelling.parse().unwrap();
        if !own.contains(ip) && !is_forbidden_address(ip) {
            passed.push(spelling);
        }
    }
    assert!(passed.is_empty(), "reach the gateway itself: {passed:?}");
    // A neighbour of the gateway's address in the same spellings is not "own".
    for spelling in ["64:ff9b::5db8:d70f", "2002:5db8:d70f::1"] {
        assert!(!own.contains(spelling.parse().unwrap()), "{spelling}");
    }
}

/// The same class for forbidden ranges: every IPv4-carrying spelling of a forbidden IPv4
/// address is forbidden, and the embedded address is what `embedded_ipv4` reads.
#[test]
fn forbidden_ipv4_in_any_ipv6_spelling_is_forbidden() {
    for v4 in [
        "127.0.0.1",
        "10.1.2.3",
        "169.254.169.254",
        "192.168.0.1",
        "100.64.0.1",
    ] {
        let v4: std::net::Ipv4Addr = v4.parse().unwrap();
        let [a, b, c, d] = v4.octets();
        let hi = u16::from_be_bytes([a, b]);
        let lo = u16::from_be_bytes([c, d]);
        for v6 in [
            v4.to_ipv6_mapped(),
            Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, hi, lo),
            Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, hi, lo),
            Ipv6Addr::new(0x2002, hi, lo, 0, 0, 0, 0, 1),
        ] {
            assert_eq!(embedded_ipv4(v6), Some(v4), "{v6}");
            assert!(is_forbidden_address(IpAddr::V6(v6)), "{v6} passes");
        }
    }
    // A public IPv4 in NAT64 spelling stays reachable (it is what DNS64 hands out).
    assert!(!is_forbidden_address("64:ff9b::808:808".parse().unwrap()));
    // NAT64 local-use may be translated to anything: refused.
    assert!(is_forbidden_address("64:ff9b:1::808:808".parse().unwrap()));
}
