//! Reading the PROXY protocol header (HAProxy's spec, versions 1 and 2) that a TCP load
//! balancer in front (nginx `proxy_protocol on`, HAProxy `send-proxy`) writes before the
//! client's first byte, so the server knows the client's address rather than the
//! balancer's. Bounded: a v1 line is at most 107 bytes, a v2 header at most 16 + 216
//! bytes of addresses (longer TLVs are refused).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the spec's figure).
const V1_MAX: usize = 107;
/// The most of a v2 header's address block read (addresses and TLVs).
const V2_MAX: usize = 216;

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("PROXY protocol: {why}"))
}

/// Reads one header from `io`, leaving the stream at the client's first byte. Returns
/// the client's address, or `None` when the header says it has none (v1 `UNKNOWN`, v2
/// `LOCAL`: a health check from the balancer itself).
///
/// # Errors
/// `InvalidData` when the stream does not start with a valid header.
pub async fn read<R: AsyncRead + Unpin>(io: &mut R) -> io::Result<Option<SocketAddr>> {
    let mut first = [0u8; 12];
    io.read_exact(&mut first[..5]).await?;
    if &first[..5] == b"PROXY" {
        return read_v1(io).await;
    }
    io.read_exact(&mut first[5..]).await?;
    if first != V2_SIGNATURE {
        return Err(bad("no header from a balancer that should send one"));
    }
    let mut head = [0u8; 4];
    io.read_exact(&mut head).await?;
    let [version_command, family, hi, lo] = head;
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if version_command >> 4 != 2 {
        return Err(bad("not version 2"));
    }
    if len > V2_MAX {
        return Err(bad("header too long"));
    }
    let mut block = vec![0u8; len];
    io.read_exact(&mut block).await?;
    match version_command & 0x0f {
        // LOCAL: the balancer's own connection; keep its address.
        0x0 => return Ok(None),
        0x1 => {}
        _ => return Err(bad("unknown command")),
    }
    let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
    match family >> 4 {
        0x1 if len >= 12 => {
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(8))))
        }
        0x2 if len >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block[..16]);
            let ip = Ipv6Addr::from(octets);
            // An IPv4 client written IPv4-mapped is an IPv4 client.
            let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
            Ok(Some(SocketAddr::new(ip, port(32))))
        }
        // UNSPEC, or a Unix socket: no address to use.
        0x0 | 0x3 => Ok(None),
        _ => Err(bad("address block too short for its family")),
    }
}

async fn read_v1<R: AsyncRead + Unpin>(io: &mut R) -> io::Result<Option<SocketAddr>> {
    let mut line = b"PROXY".to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(bad("v1 line too long"));
        }
        line.push(io.read_u8().await?);
    }
    let text = std::str::from_utf8(&line[..line.len() - 2]).map_err(|_| bad("v1 not text"))?;
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", "TCP4" | "TCP6", src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| bad("v1 source address"))?;
            let port: u16 = sport.parse().map_err(|_| bad("v1 source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(bad("v1 line malformed")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (io::Result<Option<SocketAddr>>, Vec<u8>) {
        let mut input = bytes;
        let r = read(&mut input).await;
        (r, input.to_vec())
    }

    #[tokio::test]
    async fn headers_of_both_versions_give_the_client_and_leave_its_bytes() {
        let (r, rest) = parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\nGET /").await;
        assert_eq!(r.unwrap(), Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(rest, b"GET /");
        let (r, _) = parse(b"PROXY TCP6 2001:db8::1 ::1 443 8443\r\n").await;
        assert_eq!(r.unwrap(), Some("[2001:db8::1]:443".parse().unwrap()));
        let (r, rest) = parse(b"PROXY UNKNOWN\r\nx").await;
        assert_eq!((r.unwrap(), rest.as_slice()), (None, &b"x"[..]));

        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend([
            0x21, 0x11, 0, 12, 203, 0, 113, 7, 10, 0, 0, 1, 0xc7, 0x38, 0, 80,
        ]);
        v2.extend(b"GET /");
        let (r, rest) = parse(&v2).await;
        assert_eq!(r.unwrap(), Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(rest, b"GET /");
        // IPv6, with an IPv4-mapped client; and a TLV after the addresses.
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend([0x21, 0x21, 0, 36 + 4]);
        v2.extend("::ffff:198.51.100.2".parse::<Ipv6Addr>().unwrap().octets());
        v2.extend(Ipv6Addr::LOCALHOST.octets());
        v2.extend([0x01, 0xbb, 0x1f, 0x90, 0x04, 0, 1, 0]);
        let (r, rest) = parse(&v2).await;
        assert_eq!(r.unwrap(), Some("198.51.100.2:443".parse().unwrap()));
        assert!(rest.is_empty());
        // LOCAL: the balancer's own health check.
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend([0x20, 0x00, 0, 0]);
        assert_eq!(parse(&v2).await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        let long = format!("PROXY TCP4 {} 1 2\r\n", "1".repeat(200));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend([0x21, 0x11, 0xff, 0xff]);
        let mut short = V2_SIGNATURE.to_vec();
        short.extend([0x21, 0x21, 0, 12]);
        short.extend([0; 12]);
        for input in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            long.as_bytes(),
            &huge,
            &short,
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1",
        ] {
            assert!(parse(input).await.0.is_err(), "{input:?}");
        }
    }
}
