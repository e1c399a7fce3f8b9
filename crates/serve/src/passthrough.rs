//! TLS passthrough: handing connections, chosen by their ClientHello's server name, over undecrypted.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::server::Acceptor;

use crate::Peer;

/// Decides, per TLS connection, whether it is passed through raw.
pub trait Passthrough: Send + Sync + 'static {
    /// Whether any name is passed through now; when false, handshakes are not sniffed at all
    /// (no cost for listeners without passthrough names).
    fn active(&self) -> bool;

    /// Called with the ClientHello's server name (SNI, lower-cased, no trailing dot).
    ///
    /// Returns `Ok(future)` that carries the connection when this name is passed through:
    /// the future owns `io` (which replays the bytes already read, the ClientHello, before
    /// the rest of the stream) and runs to the connection's end. It holds one of the
    /// listener's connection slots while it runs, and is dropped when the shutdown grace
    /// has passed. `peer.tls` is `false`: TLS is not terminated here.
    ///
    /// # Errors
    /// Gives `io` back when the name is not passed through: TLS is terminated as usual.
    fn claim(
        &self,
        server_name: &str,
        io: Prefixed<TcpStream>,
        peer: Peer,
    ) -> Result<BoxFuture<'static, ()>, Prefixed<TcpStream>>;
}

/// A stream that yields `prefix` before reading from `inner`; writes go to `inner`.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }

    /// The part of the prefix not read yet, and the inner stream.
    pub fn into_parts(self) -> (Bytes, T) {
        (self.prefix, self.inner)
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

// `T: Unpin` because the crate forbids the `unsafe` a pinned projection of `inner` would take;
// sockets and TLS streams are all `Unpin`.
impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The first bytes of a TLS connection, read to learn its server name.
pub(crate) struct Sniffed {
    /// Everything read, to be replayed to whoever takes the connection.
    pub(crate) bytes: Bytes,
    /// Lower-cased, without a trailing dot; `None` without SNI or when the hello did not parse.
    pub(crate) server_name: Option<String>,
}

/// A ClientHello fills at most one 16 KiB handshake message, which may come split across
/// records; a client that needs more than this is left to the terminating handshake.
const SNIFF_MAX: usize = 18 * 1024;
/// Most ClientHellos fit one read of this size; larger ones grow the buffer.
const SNIFF_CHUNK: usize = 4096;

/// Reads until rustls has the whole ClientHello.
///
/// # Errors
/// When reading fails or the client closes first: the connection is of no further use.
pub(crate) async fn sniff<R: AsyncRead + Unpin>(stream: &mut R) -> io::Result<Sniffed> {
    let mut acceptor = Acceptor::default();
    let mut buf = BytesMut::new();
    loop {
        let room = SNIFF_MAX - buf.len();
        if room == 0 {
            tracing::debug!("no complete ClientHello within {SNIFF_MAX} bytes; terminating");
            return Ok(unparsed(buf));
        }
        buf.reserve(room.min(SNIFF_CHUNK));
        let start = buf.len();
        let n = (&mut *stream).take(room as u64).read_buf(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut new = &buf[start..];
        while !new.is_empty() {
            match acceptor.read_tls(&mut new) {
                Ok(n) if n > 0 => {}
                // rustls reads nothing from a record whose length is out of range.
                Ok(_) => return Ok(unparsed(buf)),
                Err(e) => {
                    tracing::debug!(error = %e, "ClientHello does not parse; terminating");
                    return Ok(unparsed(buf));
                }
            }
        }
        match acceptor.accept() {
            Ok(None) => {}
            Ok(Some(accepted)) => {
                let server_name = accepted
                    .client_hello()
                    .server_name()
                    .map(|name| name.trim_end_matches('.').to_ascii_lowercase());
                return Ok(Sniffed {
                    bytes: buf.freeze(),
                    server_name,
                });
            }
            // The terminating handshake meets the same error and answers it with an alert.
            Err((e, _)) => {
                tracing::debug!(error = %e, "ClientHello does not parse; terminating");
                return Ok(unparsed(buf));
            }
        }
    }
}

fn unparsed(buf: BytesMut) -> Sniffed {
    Sniffed {
        bytes: buf.freeze(),
        server_name: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn prefixed_replays_its_prefix_then_reads_on() {
        let (mut far, near) = tokio::io::duplex(64);
        far.write_all(b" world").await.unwrap();
        drop(far);
        let mut io = Prefixed::new(Bytes::from_static(b"hello"), near);
        let mut first = [0u8; 3];
        io.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hel");
        let mut rest = String::new();
        io.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "lo world");
    }

    #[tokio::test]
    async fn into_parts_gives_back_the_unread_prefix() {
        let (_far, near) = tokio::io::duplex(64);
        let mut io = Prefixed::new(Bytes::from_static(b"hello"), near);
        let mut first = [0u8; 2];
        io.read_exact(&mut first).await.unwrap();
        let (prefix, _inner) = io.into_parts();
        assert_eq!(&prefix[..], b"llo");
    }

    #[tokio::test]
    async fn bytes_that_are_not_tls_are_kept_whole_without_a_name() {
        let (mut far, mut near) = tokio::io::duplex(64);
        far.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let sniffed = sniff(&mut near).await.unwrap();
        assert_eq!(&sniffed.bytes[..], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(sniffed.server_name, None);
    }

    #[tokio::test]
    async fn a_client_that_closes_mid_hello_is_an_error() {
        let (mut far, mut near) = tokio::io::duplex(64);
        // A handshake record header promising more than is sent.
        far.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        drop(far);
        assert!(sniff(&mut near).await.is_err());
    }
}
