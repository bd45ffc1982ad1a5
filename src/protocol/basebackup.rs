//! The BASE_BACKUP CopyData stream of PostgreSQL 15 and later, without I/O.
//!
//! Each CopyData payload starts with a type byte: `n` a new archive (archive name and
//! tablespace path, NUL-terminated), `d` archive or manifest bytes, `p` progress (int64 bytes
//! sent so far), `m` the manifest follows. See protocol-notes/stream-method.md.

use bytes::{Buf, Bytes};

use crate::error::{Error, Result};

/// One message of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamMessage {
    /// A new tar archive starts: `base.tar` for the data directory, `<oid>.tar` for a
    /// tablespace whose server path is `tablespace_path`.
    NewArchive {
        /// Archive file name.
        name: String,
        /// Tablespace location on the server, empty for the main data directory.
        tablespace_path: String,
    },
    /// The backup manifest starts; `Data` that follows is manifest text.
    ManifestStart,
    /// Archive or manifest bytes.
    Data(Bytes),
    /// Bytes of the backup sent so far.
    Progress(u64),
}

fn cstr(b: &mut Bytes) -> Result<String> {
    let pos = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| Error::Protocol("unterminated string in BASE_BACKUP stream".into()))?;
    let s = String::from_utf8_lossy(&b[..pos]).into_owned();
    b.advance(pos + 1);
    Ok(s)
}

/// Parses one CopyData payload.
pub fn parse(mut b: Bytes) -> Result<StreamMessage> {
    if b.is_empty() {
        return Err(Error::Protocol(
            "empty CopyData in BASE_BACKUP stream".into(),
        ));
    }
    let t = b.get_u8();
    Ok(match t {
        b'n' => StreamMessage::NewArchive {
            name: cstr(&mut b)?,
            tablespace_path: cstr(&mut b)?,
        },
        b'm' => StreamMessage::ManifestStart,
        b'd' => StreamMessage::Data(b),
        b'p' => {
            if b.len() < 8 {
                return Err(Error::Protocol(
                    "short progress message in BASE_BACKUP stream".into(),
                ));
            }
            StreamMessage::Progress(b.get_u64())
        }
        other => {
            return Err(Error::Protocol(format!(
                "unknown message type '{}' in BASE_BACKUP stream",
                other as char
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::tests::{copy_payloads, decode_in_chunks, msg};
    use proptest::prelude::*;

    fn stream() -> (Vec<u8>, Vec<StreamMessage>) {
        let payloads: Vec<(Vec<u8>, StreamMessage)> = vec![
            (
                b"nbase.tar\0\0".to_vec(),
                StreamMessage::NewArchive {
                    name: "base.tar".into(),
                    tablespace_path: String::new(),
                },
            ),
            (
                [b"d".to_vec(), vec![1u8; 700]].concat(),
                StreamMessage::Data(Bytes::from(vec![1u8; 700])),
            ),
            (
                [b"p".to_vec(), 4096u64.to_be_bytes().to_vec()].concat(),
                StreamMessage::Progress(4096),
            ),
            (
                b"n16384.tar\0/srv/ts\0".to_vec(),
                StreamMessage::NewArchive {
                    name: "16384.tar".into(),
                    tablespace_path: "/srv/ts".into(),
                },
            ),
            (b"m".to_vec(), StreamMessage::ManifestStart),
            (
                b"d{}".to_vec(),
                StreamMessage::Data(Bytes::from_static(b"{}")),
            ),
        ];
        let mut wire = Vec::new();
        wire.extend(msg(b'H', &[0, 0, 0]));
        let mut want = Vec::new();
        for (p, m) in payloads {
            wire.extend(msg(b'd', &p));
            want.push(m);
        }
        wire.extend(msg(b'c', b""));
        (wire, want)
    }

    proptest! {
        #[test]
        fn stream_survives_any_read_boundaries(cuts in proptest::collection::vec(1usize..100, 1..50)) {
            let (wire, want) = stream();
            let got: Vec<StreamMessage> = copy_payloads(decode_in_chunks(&wire, &cuts))
                .into_iter()
                .map(|d| parse(d).unwrap())
                .collect();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn rejects_unknown_and_short_messages() {
        assert!(parse(Bytes::from_static(b"x")).is_err());
        assert!(parse(Bytes::from_static(b"p\0\0")).is_err());
        assert!(parse(Bytes::from_static(b"nbase.tar")).is_err());
        assert!(parse(Bytes::new()).is_err());
    }
}
