//! One DNS question over UDP, for the checks the operator makes itself: that an ACME
//! answer is published (or where to fetch it), and that a project proved it controls a
//! hostname.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// What a question got back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// TXT values (each record's strings joined).
    pub txt: Vec<String>,
    /// CNAME targets, lowercase, without the trailing dot.
    pub cname: Vec<String>,
    /// A and AAAA addresses.
    pub addrs: Vec<std::net::IpAddr>,
}

/// Asks `server` (recursion desired) for `name`'s records of `rtype`, waiting 2 s.
/// NXDOMAIN and NODATA are empty answers, not errors.
pub async fn ask(server: SocketAddr, name: &str, rtype: RecordType) -> Result<Answer, String> {
    let qname = Name::from_ascii(format!("{}.", name.trim_end_matches('.')))
        .map_err(|e| format!("{name} is not a DNS name: {e}"))?;
    let mut msg = Message::query();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(qname, rtype));
    let bytes = msg.to_vec().map_err(|e| e.to_string())?;
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| e.to_string())?;
    socket
        .send_to(&bytes, server)
        .await
        .map_err(|e| format!("asking {server}: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let answer = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let n = socket
                .recv(&mut buf)
                .await
                .map_err(|e| format!("asking {server}: {e}"))?;
            // A datagram that is not the answer to this question is ignored.
            if let Ok(m) = Message::from_vec(&buf[..n])
                && m.metadata.id == msg.metadata.id
            {
                return Ok::<_, String>(m);
            }
        }
    })
    .await
    .map_err(|_| format!("{server} did not answer within 2 s"))??;
    match answer.metadata.response_code {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        other => return Err(format!("{server} answered {other} for {name}")),
    }
    let mut out = Answer::default();
    for r in &answer.answers {
        match &r.data {
            RData::TXT(t) => out.txt.push(
                t.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect(),
            ),
            RData::CNAME(c) => out
                .cname
                .push(c.0.to_ascii().trim_end_matches('.').to_ascii_lowercase()),
            RData::A(a) => out.addrs.push(a.0.into()),
            RData::AAAA(a) => out.addrs.push(a.0.into()),
            _ => {}
        }
    }
    Ok(out)
}
