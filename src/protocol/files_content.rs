//! The SEND_FILES_CONTENT CopyData framing (protocol-notes/parallel-backup.md), without I/O:
//! `H` a file or range starts (offset, length or -1 for a missing file, path), `d` its bytes,
//! `T` it ended (bytes sent, pages that failed verification, their first block numbers).

use bytes::{Buf, Bytes};

use crate::error::{Error, Result};

/// A CopyData message of SEND_FILES_CONTENT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentMessage {
    /// A file or range starts; `length` is `None` when the file is missing.
    Header {
        /// First byte.
        offset: u64,
        /// Bytes that follow, `None` for a missing file.
        length: Option<u64>,
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
            Ok(ContentMessage::Header {
                offset,
                length: (length >= 0).then_some(length as u64),
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
            Ok(ContentMessage::Trailer {
                bytes_sent,
                failures,
                blocks,
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

    fn trailer(sent: u64, fails: u32, blocks: &[u32]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(b'T');
        b.put_u64(sent);
        b.put_u32(fails);
        b.put_u32(blocks.len() as u32);
        for x in blocks {
            b.put_u32(*x);
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
                trailer(5, 1, &[0]),
                header(8192, -1, "gone"),
                trailer(0, 0, &[]),
            ];
            for p in &payloads {
                wire.extend(msg(b'd', p));
            }
            wire.extend(msg(b'c', b""));
            let want = vec![
                ContentMessage::Header { offset: 0, length: Some(5), path: Bytes::from_static(b"base/1/2") },
                ContentMessage::Data(Bytes::from_static(b"hello")),
                ContentMessage::Trailer { bytes_sent: 5, failures: 1, blocks: vec![0] },
                ContentMessage::Header { offset: 8192, length: None, path: Bytes::from_static(b"gone") },
                ContentMessage::Trailer { bytes_sent: 0, failures: 0, blocks: vec![] },
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
        assert!(parse_content(Bytes::from(trailer(1, 2, &[1, 2])[..20].to_vec())).is_err());
        assert!(parse_content(Bytes::from_static(b"Z")).is_err());
        let mut h = header(0, 1, "x");
        h.pop();
        assert!(parse_content(Bytes::from(h)).is_err());
    }
}
