//! The SEND_FILES_CONTENT CopyData framing (protocol-notes/parallel-backup.md), without I/O:
//! `H` a file or range starts (offset; the length that follows, or -1 for a missing file, -2
//! for one the backup does not include; path), `d` its bytes, `T` it ended (bytes sent, pages
//! that failed verification, their first block numbers, whether the pages were verified).

use bytes::{Buf, Bytes};

use crate::error::{Error, Result};

/// What a header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announced {
    /// This many bytes follow.
    Bytes(u64),
    /// The file does not exist (any more): dropped since the listing.
    Missing,
    /// The file is not (or no longer) one the backup includes: it became excluded since the
    /// listing (an unlogged relation's fork once its init fork appears, a path component
    /// replaced by a link, …).
    Excluded,
}

/// A CopyData message of SEND_FILES_CONTENT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentMessage {
    /// A file or range starts.
    Header {
        /// First byte.
        offset: u64,
        /// What follows.
        length: Announced,
        /// The path as requested.
        path: Bytes,
    },
    /// File bytes.
    Data(Bytes),
    /// The file or range ended.
    Trailer {
        /// Bytes sent.
        bytes_sent: u64,
        /// Pages that failed checksum verification.
        failures: u32,
        /// The first failing block numbers, relative to the file.
        blocks: Vec<u32>,
        /// Whether the server verified the range's pages; `None` from a server that does
        /// not say (the first version of the patch).
        verified: Option<bool>,
    },
}

/// Parses one CopyData payload of SEND_FILES_CONTENT.
pub fn parse_content(mut b: Bytes) -> Result<ContentMessage> {
    let short = || Error::Protocol("short message in SEND_FILES_CONTENT stream".into());
    if b.is_empty() {
        return Err(short());
    }
    match b.get_u8() {
        b'H' => {
            if b.len() < 17 {
                return Err(short());
            }
            let offset = b.get_u64();
            let length = b.get_i64();
            let end = b.iter().position(|&c| c == 0).ok_or_else(short)?;
            let path = b.split_to(end);
            let length = match length {
                n if n >= 0 => Announced::Bytes(n as u64),
                -1 => Announced::Missing,
                -2 => Announced::Excluded,
                n => {
                    return Err(Error::Protocol(format!(
                        "header with length {n} in SEND_FILES_CONTENT stream"
                    )))
                }
            };
            Ok(ContentMessage::Header {
                offset,
                length,
                path,
            })
        }
        b'd' => Ok(ContentMessage::Data(b)),
        b'T' => {
            if b.len() < 16 {
                return Err(short());
            }
            let bytes_sent = b.get_u64();
            let failures = b.get_u32();
            let n = b.get_u32() as usize;
            if b.len() < n * 4 {
                return Err(short());
            }
            let blocks = (0..n).map(|_| b.get_u32()).collect();
            let verified = match b.first() {
                None => None,
                Some(0) => Some(false),
                Some(1) => Some(true),
                Some(v) => {
                    return Err(Error::Protocol(format!(
                        "trailer with verified byte {v} in SEND_FILES_CONTENT stream"
                    )))
                }
            };
            Ok(ContentMessage::Trailer {
                bytes_sent,
                failures,
                blocks,
                verified,
            })
        }
        t => Err(Error::Protocol(format!(
            "unknown message '{}' in SEND_FILES_CONTENT stream",
            t as char
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::tests::{copy_payloads, decode_in_chunks, msg};
    use bytes::{BufMut, BytesMut};
    use proptest::prelude::*;

    fn header(off: u64, len: i64, path: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(b'H');
        b.put_u64(off);
        b.put_i64(len);
        b.put_slice(path.as_bytes());
        b.put_u8(0);
        b.to_vec()
    }

    fn trailer(sent: u64, fails: u32, blocks: &[u32], verified: Option<bool>) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(b'T');
        b.put_u64(sent);
        b.put_u32(fails);
        b.put_u32(blocks.len() as u32);
        for x in blocks {
            b.put_u32(*x);
        }
        if let Some(v) = verified {
            b.put_u8(v.into());
        }
        b.to_vec()
    }

    proptest! {
        #[test]
        fn content_stream_survives_any_read_boundaries(cuts in proptest::collection::vec(1usize..80, 1..40)) {
            let mut wire = Vec::new();
            wire.extend(msg(b'H', &[0, 0, 0]));
            let payloads = vec![
                header(0, 5, "base/1/2"),
                [b"d".to_vec(), b"hello".to_vec()].concat(),
                trailer(5, 1, &[0], Some(true)),
                header(8192, -1, "gone"),
                trailer(0, 0, &[], Some(false)),
                header(0, -2, "postmaster.pid"),
                trailer(0, 0, &[], None),
            ];
            for p in &payloads {
                wire.extend(msg(b'd', p));
            }
            wire.extend(msg(b'c', b""));
            let want = vec![
                ContentMessage::Header { offset: 0, length: Announced::Bytes(5), path: Bytes::from_static(b"base/1/2") },
                ContentMessage::Data(Bytes::from_static(b"hello")),
                ContentMessage::Trailer { bytes_sent: 5, failures: 1, blocks: vec![0], verified: Some(true) },
                ContentMessage::Header { offset: 8192, length: Announced::Missing, path: Bytes::from_static(b"gone") },
                ContentMessage::Trailer { bytes_sent: 0, failures: 0, blocks: vec![], verified: Some(false) },
                ContentMessage::Header { offset: 0, length: Announced::Excluded, path: Bytes::from_static(b"postmaster.pid") },
                ContentMessage::Trailer { bytes_sent: 0, failures: 0, blocks: vec![], verified: None },
            ];
            let got: Vec<ContentMessage> = copy_payloads(decode_in_chunks(&wire, &cuts))
                .into_iter()
                .map(|d| parse_content(d).unwrap())
                .collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn rejects_malformed_content_messages() {
        assert!(parse_content(Bytes::from_static(b"H\0\0")).is_err());
        assert!(parse_content(Bytes::from(trailer(1, 2, &[1, 2], None)[..20].to_vec())).is_err());
        assert!(parse_content(Bytes::from(trailer(0, 0, &[], None))).is_ok());
        let mut t = trailer(0, 0, &[], None);
        t.push(7);
        assert!(parse_content(Bytes::from(t)).is_err(), "verified byte 7");
        assert!(parse_content(Bytes::from(header(0, -3, "x"))).is_err());
        assert!(parse_content(Bytes::from_static(b"Z")).is_err());
        let mut h = header(0, 1, "x");
        h.pop();
        assert!(parse_content(Bytes::from(h)).is_err());
    }
}
