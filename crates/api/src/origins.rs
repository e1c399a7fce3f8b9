//! Origins: HTTPProxy backends without a connector, which the edge's sidecar reaches
//! itself over HTTP or HTTPS (Datum's plain reverse proxy). An origin may not be the edge
//! machine or its cloud's metadata service: addresses in [`FORBIDDEN`] are refused,
//! unless the installation allows a network explicitly (`--allow-origin-network`, for a
//! development machine or tests). The operator checks what the spec names; the sidecar
//! checks every address a name resolves to, when it connects.

use std::net::IpAddr;

use ipnet::IpNet;

/// Loopback, unspecified, link-local (cloud metadata at 169.254.169.254), multicast and
/// broadcast: never an origin by default.
pub const FORBIDDEN: &[&str] = &[
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "255.255.255.255/32",
    "::/128",
    "::1/128",
    "fe80::/10",
    "ff00::/8",
];

/// Why `ip` may not be an origin, unless one of `allowed` holds it.
///
/// # Errors
/// The forbidden network it is in.
pub fn check(ip: IpAddr, allowed: &[IpNet]) -> Result<(), String> {
    // An IPv4-mapped IPv6 address is the IPv4 one.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    if allowed.iter().any(|n| n.contains(&ip)) {
        return Ok(());
    }
    match FORBIDDEN
        .iter()
        .filter_map(|n| n.parse::<IpNet>().ok())
        .find(|n| n.contains(&ip))
    {
        Some(net) => Err(format!(
            "{ip} is in {net}, which an origin may not be (the edge's own machine, or its link); an administrator may allow it with --allow-origin-network"
        )),
        None => Ok(()),
    }
}

/// Whether a name is one every resolver answers with loopback (RFC 6761).
pub fn is_localhost(name: &str) -> bool {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    n == "localhost" || n.ends_with(".localhost")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edge_machine_and_its_link_are_refused_unless_allowed() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for bad in [
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "::ffff:127.0.0.1",
            "fe80::1",
        ] {
            assert!(check(ip(bad), &[]).is_err(), "{bad}");
        }
        for good in [
            "10.0.0.5",
            "192.168.1.1",
            "93.184.216.34",
            "2606:4700::1111",
        ] {
            assert!(check(ip(good), &[]).is_ok(), "{good}");
        }
        let loopback: IpNet = "127.0.0.0/8".parse().unwrap();
        assert!(check(ip("127.0.0.1"), &[loopback]).is_ok());
        assert!(check(ip("169.254.169.254"), &[loopback]).is_err());
        assert!(
            is_localhost("LocalHost.")
                && is_localhost("a.localhost")
                && !is_localhost("localhost.example")
        );
    }
}
