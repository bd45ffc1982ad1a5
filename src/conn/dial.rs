//! Dialling: the socket (TCP or Unix), the SSLRequest byte, and the TLS handshake.
//!
//! Owns nothing after it returns: it hands back one byte stream, whether it is TLS, and the
//! server certificate's hash for SCRAM channel binding. It must not speak the startup
//! protocol (that is [`super::auth`]) nor choose which TLS attempts to make (that is
//! libpq's sslmode order, in [`super::Connection::connect`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::tls;
use crate::conninfo::{ConnConfig, Host, SslMode, Target};
use crate::error::Error;

trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// One byte stream to the server: TCP, Unix socket, or TLS over TCP.
pub(super) struct Stream(Box<dyn Socket>);

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// A dialled stream: the stream, whether it is TLS, and the certificate hash for channel
/// binding (TLS only).
pub(super) type Dialled = (Stream, bool, Option<Vec<u8>>);

/// Opens the socket to `t` and, when `want_tls`, negotiates TLS. A failure carries whether
/// the caller may try again without TLS (sslmode=prefer and the server said no).
pub(super) async fn open(
    cfg: &ConnConfig,
    t: &Target,
    want_tls: bool,
    target: &str,
) -> std::result::Result<Dialled, (Error, bool)> {
    let fail = |reason: String, hint: Option<String>, retry: bool| {
        (
            Error::Connect {
                target: target.to_string(),
                reason,
                sqlstate: None,
                hint,
            },
            retry,
        )
    };
    let dialled = match &t.host {
        Host::Socket(dir) => {
            let path = dir.join(format!(".s.PGSQL.{}", t.port));
            let s = UnixStream::connect(&path).await.map_err(|e| {
                fail(
                    e.to_string(),
                    Some(
                        "is the server running locally and accepting connections on that socket? \
                             (-h names the socket directory)"
                            .into(),
                    ),
                    false,
                )
            })?;
            (Stream(Box::new(s)), false, None)
        }
        Host::Tcp { name, addr } => {
            let dial = addr.as_deref().unwrap_or(name);
            let tcp = TcpStream::connect((dial, t.port)).await.map_err(|e| {
                    fail(
                        e.to_string(),
                        Some(format!(
                            "is the server running on \"{name}\" and accepting TCP/IP connections on port {}?",
                            t.port
                        )),
                        false,
                    )
                })?;
            let _ = tcp.set_nodelay(true);
            if want_tls {
                let mut tcp = tcp;
                let mut buf = BytesMut::new();
                frontend::ssl_request(&mut buf);
                let mut answer = [0u8; 1];
                let io_res = async {
                    tcp.write_all(&buf).await?;
                    tcp.read_exact(&mut answer).await
                }
                .await;
                io_res.map_err(|e| {
                    fail(format!("could not send SSL negotiation: {e}"), None, false)
                })?;
                match answer[0] {
                    b'S' => {
                        let config = tls::client_config(cfg.sslmode, cfg.sslrootcert.as_deref())
                            .map_err(|m| fail(m, None, false))?;
                        let sn = tls::server_name(name).map_err(|m| fail(m, None, false))?;
                        let conn = tokio_rustls::TlsConnector::from(config)
                                .connect(sn, tcp)
                                .await
                                .map_err(|e| {
                                    fail(
                                        format!("TLS handshake failed: {e}"),
                                        Some(match cfg.sslmode {
                                            SslMode::VerifyFull => "the server certificate must be signed by sslrootcert and name the host given in host= (or -h)".into(),
                                            SslMode::VerifyCa => "the server certificate must be signed by a certificate in sslrootcert".into(),
                                            _ => "check the server's TLS set-up, or use sslmode=disable".into(),
                                        }),
                                        false,
                                    )
                                })?;
                        let endpoint = conn
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| tls::server_end_point(c.as_ref()));
                        (Stream(Box::new(conn)), true, endpoint)
                    }
                    b'N' => {
                        let retry = cfg.sslmode == SslMode::Prefer;
                        if !retry {
                            return Err(fail(
                                "server does not support SSL, but SSL was required".into(),
                                Some("enable ssl on the server, or use a weaker sslmode".into()),
                                false,
                            ));
                        }
                        // Reconnect without TLS (the server may have closed the socket).
                        return Err(fail("server does not support SSL".into(), None, true));
                    }
                    other => {
                        return Err(fail(
                            format!("unexpected answer 0x{other:02x} to SSL negotiation"),
                            None,
                            false,
                        ))
                    }
                }
            } else {
                (Stream(Box::new(tcp)), false, None)
            }
        }
    };
    Ok(dialled)
}
