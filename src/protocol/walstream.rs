//! The physical replication stream's CopyData messages, without I/O: `w` XLogData and `k`
//! keepalive from the server, `r` standby status updates from us.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::lsn::Lsn;

/// Microseconds since 2000-01-01, PostgreSQL's epoch.
fn pg_now() -> i64 {
    const PG_EPOCH_OFFSET: u64 = 946_684_800;
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_micros() as i64) - (PG_EPOCH_OFFSET as i64) * 1_000_000
}

/// Encodes a standby status update ('r').
pub fn status_update(written: Lsn, reply: bool) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(34);
    b.put_u8(b'r');
    b.put_u64(written.0);
    b.put_u64(written.0);
    b.put_u64(0);
    b.put_i64(pg_now());
    b.put_u8(reply as u8);
    b.to_vec()
}

/// A message of the physical replication stream.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplMessage {
    /// 'w': WAL bytes starting at `start`.
    XLogData {
        /// LSN of the first byte.
        start: Lsn,
        /// The bytes.
        data: Bytes,
    },
    /// 'k': keepalive; the server wants a reply when `reply` is set.
    Keepalive {
        /// Server's WAL end.
        wal_end: Lsn,
        /// Reply requested.
        reply: bool,
    },
}

/// Parses a CopyData payload of the replication stream.
pub fn parse_repl(mut b: Bytes) -> Result<ReplMessage> {
    let short = || Error::Protocol("short message in the replication stream".into());
    if b.is_empty() {
        return Err(short());
    }
    match b.get_u8() {
        b'w' => {
            if b.len() < 24 {
                return Err(short());
            }
            let start = Lsn(b.get_u64());
            let _wal_end = b.get_u64();
            let _time = b.get_i64();
            Ok(ReplMessage::XLogData { start, data: b })
        }
        b'k' => {
            if b.len() < 17 {
                return Err(short());
            }
            let wal_end = Lsn(b.get_u64());
            let _time = b.get_i64();
            Ok(ReplMessage::Keepalive {
                wal_end,
                reply: b.get_u8() != 0,
            })
        }
        t => Err(Error::Protocol(format!(
            "unknown message '{}' in the replication stream",
            t as char
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replication_messages() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(0x1000);
        b.put_u64(0x2000);
        b.put_i64(0);
        b.put_slice(b"abc");
        assert_eq!(
            parse_repl(b.freeze()).unwrap(),
            ReplMessage::XLogData {
                start: Lsn(0x1000),
                data: Bytes::from_static(b"abc")
            }
        );
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(0x3000);
        b.put_i64(0);
        b.put_u8(1);
        assert_eq!(
            parse_repl(b.freeze()).unwrap(),
            ReplMessage::Keepalive {
                wal_end: Lsn(0x3000),
                reply: true
            }
        );
        assert!(parse_repl(Bytes::from_static(b"w\0")).is_err());
        let s = status_update(Lsn(5), true);
        assert_eq!(s.len(), 34);
        assert_eq!(s[0], b'r');
        assert_eq!(s[33], 1);
    }
}
