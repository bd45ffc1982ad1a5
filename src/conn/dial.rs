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
use crate::conninfo::{ConnConfig, Host, Keepalives, SslMode, Target};
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
            set_keepalives(&tcp, &cfg.keepalives).map_err(|m| fail(m, None, false))?;
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
                        let config = tls::client_config(cfg).map_err(|m| fail(m, None, false))?;
                        let sn = tls::server_name(name).map_err(|m| fail(m, None, false))?;
                        let conn = tokio_rustls::TlsConnector::from(config)
                                .connect(sn, tcp)
                                .await
                                .map_err(|e| {
                                    fail(
                                        format!("TLS handshake failed: {}", tls_error_text(&e)),
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

/// A TLS handshake failure in words. rustls writes the names a certificate presents as Rust
/// Debug (`DnsName("localhost")`); a person reads `localhost`.
fn tls_error_text(e: &io::Error) -> String {
    use rustls::{CertificateError, Error as TlsError};
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<TlsError>());
    if let Some(TlsError::InvalidCertificate(CertificateError::NotValidForNameContext {
        expected,
        presented,
    })) = inner
    {
        let names: Vec<String> = presented
            .iter()
            .map(|p| {
                let bare = ["DnsName(", "IpAddress(", "UniformResourceIdentifier("]
                    .iter()
                    .find_map(|pre| p.strip_prefix(pre).and_then(|r| r.strip_suffix(')')))
                    .unwrap_or(p);
                format!("\"{}\"", bare.trim_matches('"'))
            })
            .collect();
        return if names.is_empty() {
            format!(
                "the server certificate is not valid for \"{}\" and names no host",
                expected.to_str()
            )
        } else {
            format!(
                "the server certificate is not valid for \"{}\"; it names {}",
                expected.to_str(),
                names.join(", ")
            )
        };
    }
    e.to_string()
}

/// libpq's `keepalives*` and `tcp_user_timeout` on a TCP socket (Unix sockets have none).
/// Keepalives are on unless `keepalives=0`, as in libpq, so a peer that vanishes without a
/// FIN is noticed by the kernel instead of leaving a read waiting for ever.
fn set_keepalives(tcp: &TcpStream, k: &Keepalives) -> std::result::Result<(), String> {
    use std::os::fd::AsRawFd;
    let fd = tcp.as_raw_fd();
    let set = |level: libc::c_int, opt: libc::c_int, name: &str, v: u32| {
        let v = v as libc::c_int;
        // SAFETY: fd is an open socket owned by `tcp` for the duration of the call; the
        // option value is a c_int on the stack whose size we pass.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(format!(
                "could not set socket option {name} to {v}: {}",
                io::Error::last_os_error()
            ))
        }
    };
    set(
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        "SO_KEEPALIVE",
        u32::from(k.enabled),
    )?;
    if k.enabled {
        if let Some(v) = k.idle {
            set(
                libc::IPPROTO_TCP,
                libc::TCP_KEEPIDLE,
                "TCP_KEEPIDLE (keepalives_idle)",
                v,
            )?;
        }
        if let Some(v) = k.interval {
            set(
                libc::IPPROTO_TCP,
                libc::TCP_KEEPINTVL,
                "TCP_KEEPINTVL (keepalives_interval)",
                v,
            )?;
        }
        if let Some(v) = k.count {
            set(
                libc::IPPROTO_TCP,
                libc::TCP_KEEPCNT,
                "TCP_KEEPCNT (keepalives_count)",
                v,
            )?;
        }
    }
    if let Some(v) = k.user_timeout_ms {
        set(
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            "TCP_USER_TIMEOUT (tcp_user_timeout)",
            v,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(tcp: &TcpStream, level: libc::c_int, opt: libc::c_int) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket and a c_int-sized out buffer whose length we pass.
        let rc = unsafe {
            libc::getsockopt(
                tcp.as_raw_fd(),
                level,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        v
    }

    #[tokio::test]
    async fn keepalive_options_land_on_the_socket() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let k = Keepalives {
            enabled: true,
            idle: Some(7),
            interval: Some(3),
            count: Some(4),
            user_timeout_ms: Some(9000),
        };
        set_keepalives(&tcp, &k).unwrap();
        assert_eq!(get(&tcp, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(&tcp, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 7);
        assert_eq!(get(&tcp, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 3);
        assert_eq!(get(&tcp, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 4);
        assert_eq!(get(&tcp, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 9000);
        let off = Keepalives {
            enabled: false,
            idle: None,
            interval: None,
            count: None,
            user_timeout_ms: None,
        };
        set_keepalives(&tcp, &off).unwrap();
        assert_eq!(get(&tcp, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 0);
    }
}
