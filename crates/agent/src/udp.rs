//! UDP over a tunnel stream: datagrams framed by their 2-byte length, relayed between the
//! stream and a UDP socket connected to the app.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::codec::{LengthDelimitedCodec, length_delimited};

/// A flow that moves nothing either way for this long ends: UDP has no close, so this is
/// how the device learns the client is gone.
pub(crate) const UDP_IDLE: Duration = Duration::from_secs(60);

/// Largest datagram: the most a 2-byte length can say (and above any UDP payload).
const MAX_DATAGRAM: usize = u16::MAX as usize;

/// The framing both ends of a UDP tunnel use.
fn framing() -> length_delimited::Builder {
    let mut b = LengthDelimitedCodec::builder();
    b.length_field_length(portway_api::UDP_FRAME_LENGTH_BYTES)
        .max_frame_length(MAX_DATAGRAM);
    b
}

/// Whether a socket error says only that the app is not there right now (an ICMP port
/// unreachable, reported on the next call): UDP apps come and go, so the flow stays.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
    )
}

/// Relays frames from the gateway to `socket` and datagrams from `socket` back as frames,
/// until the gateway ends its side, either side fails, or nothing moves for `idle`; then
/// ends the stream to the gateway.
///
/// # Errors
/// A broken stream, a frame that is not one, or a fatal socket error.
pub(crate) async fn relay<R, W>(
    socket: UdpSocket,
    from_gateway: R,
    to_gateway: W,
    idle: Duration,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds after `start` that something last moved.
    let last = AtomicU64::new(0);
    let touch = || {
        let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last.store(ms, Ordering::Relaxed);
    };
    let mut reader = framing().new_read(from_gateway);
    let mut writer = framing().new_write(to_gateway);
    let result = {
        let to_app = async {
            while let Some(frame) = reader.next().await {
                let frame = frame?;
                touch();
                match socket.send(&frame).await {
                    Ok(_) => {}
                    Err(e) if transient(&e) => {
                        tracing::debug!(error = %e, "the UDP app is not listening; datagram dropped");
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        };
        let to_gateway = async {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                match socket.recv(&mut buf).await {
                    Ok(n) => {
                        touch();
                        writer.send(Bytes::copy_from_slice(&buf[..n])).await?;
                    }
                    // One error per ICMP message, then `recv` waits again: no spin.
                    Err(e) if transient(&e) => {
                        tracing::debug!(error = %e, "the UDP app is not listening");
                    }
                    Err(e) => return Err::<(), _>(e),
                }
            }
        };
        let quiet = async {
            loop {
                let deadline = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
                if deadline <= Instant::now() {
                    return;
                }
                tokio::time::sleep_until(deadline).await;
            }
        };
        tokio::select! {
            r = to_app => r,
            r = to_gateway => r,
            () = quiet => {
                tracing::debug!(?idle, "idle UDP flow ended");
                Ok(())
            }
        }
    };
    // The gateway hears the flow is over; a frame cut short by the end is moot.
    let _ = writer.get_mut().shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::DuplexStream;
    use tokio_util::codec::{FramedRead, FramedWrite};

    /// A UDP app that sends every datagram back; and the socket a relay uses to reach it.
    async fn echo_app() -> UdpSocket {
        let app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = app.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = app.recv_from(&mut buf).await {
                let _ = app.send_to(&buf[..n], from).await;
            }
        });
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(addr).await.unwrap();
        socket
    }

    type Gateway = (
        FramedWrite<tokio::io::WriteHalf<DuplexStream>, LengthDelimitedCodec>,
        FramedRead<tokio::io::ReadHalf<DuplexStream>, LengthDelimitedCodec>,
    );

    /// Starts a relay on a duplex stream; returns the gateway's framed ends and the relay.
    async fn start(idle: Duration) -> (Gateway, tokio::task::JoinHandle<io::Result<()>>) {
        let socket = echo_app().await;
        let (gateway, device) = tokio::io::duplex(256 * 1024);
        let (from_gateway, to_gateway) = tokio::io::split(device);
        let relay = tokio::spawn(relay(socket, from_gateway, to_gateway, idle));
        let (read, write) = tokio::io::split(gateway);
        (
            (framing().new_write(write), framing().new_read(read)),
            relay,
        )
    }

    const DEADLINE: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn datagrams_round_trip_intact_and_in_order() {
        let ((mut tx, mut rx), _relay) = start(UDP_IDLE).await;
        let payload = |i: usize| -> Bytes {
            let len = if i == 500 {
                65_000
            } else {
                1 + (i * 37) % 1400
            };
            (0..len).map(|j| (i + j) as u8).collect()
        };
        // A window in flight, not all at once: loopback UDP drops what overflows a buffer.
        let window = 16;
        let total = 1000;
        tokio::time::timeout(DEADLINE, async {
            for i in 0..window {
                tx.send(payload(i)).await.unwrap();
            }
            for i in 0..total {
                let got = rx.next().await.unwrap().unwrap();
                assert_eq!(got, payload(i), "datagram {i}");
                if i + window < total {
                    tx.send(payload(i + window)).await.unwrap();
                }
            }
        })
        .await
        .expect("all datagrams back in time");
    }

    #[tokio::test]
    async fn the_gateway_ending_its_side_ends_the_relay() {
        let ((mut tx, mut rx), relay) = start(UDP_IDLE).await;
        tx.send(Bytes::from_static(b"ping")).await.unwrap();
        assert_eq!(&rx.next().await.unwrap().unwrap()[..], b"ping");
        SinkExt::<Bytes>::close(&mut tx).await.unwrap();
        let ended = tokio::time::timeout(DEADLINE, relay).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
        assert!(rx.next().await.is_none(), "the relay ends its side too");
    }

    #[tokio::test]
    async fn an_idle_flow_ends() {
        let ((mut tx, mut rx), relay) = start(Duration::from_millis(200)).await;
        tx.send(Bytes::from_static(b"ping")).await.unwrap();
        assert_eq!(&rx.next().await.unwrap().unwrap()[..], b"ping");
        let ended = tokio::time::timeout(DEADLINE, relay).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
        assert!(rx.next().await.is_none());
    }

    #[tokio::test]
    async fn an_app_not_listening_does_not_end_the_flow() {
        let gone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = gone.local_addr().unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(addr).await.unwrap();
        drop(gone);
        let (gateway, device) = tokio::io::duplex(64 * 1024);
        let (from_gateway, to_gateway) = tokio::io::split(device);
        let relay = tokio::spawn(relay(socket, from_gateway, to_gateway, UDP_IDLE));
        let (read, write) = tokio::io::split(gateway);
        let (mut tx, mut rx) = (framing().new_write(write), framing().new_read(read));
        for _ in 0..5 {
            tx.send(Bytes::from_static(b"anyone?")).await.unwrap();
        }
        // Lets the relay send them and meet the refusals (not a wait for time).
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(!relay.is_finished(), "refusals end nothing");
        // The app comes back on its port: the same flow reaches it.
        let app = UdpSocket::bind(addr).await.unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = app.recv_from(&mut buf).await {
                let _ = app.send_to(&buf[..n], from).await;
            }
        });
        tx.send(Bytes::from_static(b"ping")).await.unwrap();
        tokio::time::timeout(DEADLINE, async {
            while let Some(frame) = rx.next().await {
                if &frame.unwrap()[..] == b"ping" {
                    return;
                }
            }
            panic!("the relay ended");
        })
        .await
        .expect("the app answers in time");
        SinkExt::<Bytes>::close(&mut tx).await.unwrap();
        let ended = tokio::time::timeout(DEADLINE, relay).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }
}
