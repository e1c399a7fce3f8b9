//! The PROXY protocol v2 header (HAProxy's spec, section 2.2) a tunnel writes to its
//! target before any byte of the client's, when the tunnel asks for it: the target then
//! sees the public client's address instead of the agent's.

use std::net::{IpAddr, SocketAddr};

const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2; command PROXY (addresses follow) or LOCAL (none known).
const PROXY: u8 = 0x21;
const LOCAL: u8 = 0x20;
/// Address family and transport: TCP over IPv4, TCP over IPv6, unspecified.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
const UNSPEC: u8 = 0x00;

/// The header for a connection from `client` to `target`. Without a client (a gateway
/// that did not say), a LOCAL header: the target knows the header is there and that no
/// address is given, rather than mistaking the agent for the client. The two addresses
/// share one family: an IPv4 one is written IPv4-mapped beside an IPv6 one.
pub fn header(client: Option<SocketAddr>, target: SocketAddr) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    let Some(client) = client else {
        out.extend([LOCAL, UNSPEC, 0, 0]);
        return out;
    };
    match (client.ip(), target.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            out.extend([PROXY, TCP4, 0, 12]);
            out.extend(src.octets());
            out.extend(dst.octets());
        }
        (src, dst) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend([PROXY, TCP6, 0, 36]);
            out.extend(v6(src).octets());
            out.extend(v6(dst).octets());
        }
    }
    out.extend(client.port().to_be_bytes());
    out.extend(target.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_ipv6_mixed_and_local_headers() {
        let h = header(
            Some("203.0.113.7:51000".parse().unwrap()),
            "127.0.0.1:22".parse().unwrap(),
        );
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(
            &h[12..],
            &[
                0x21, 0x11, 0, 12, 203, 0, 113, 7, 127, 0, 0, 1, 0xc7, 0x38, 0, 22
            ]
        );
        let h = header(
            Some("[2001:db8::1]:443".parse().unwrap()),
            "127.0.0.1:8080".parse().unwrap(),
        );
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[16..18], &[0x20, 0x01]);
        // The IPv4 target, IPv4-mapped.
        assert_eq!(
            &h[32..48],
            &"::ffff:127.0.0.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(&h[48..], &[1, 0xbb, 0x1f, 0x90]);
        assert_eq!(
            &header(None, "127.0.0.1:22".parse().unwrap())[12..],
            &[0x20, 0x00, 0, 0]
        );
    }
}
