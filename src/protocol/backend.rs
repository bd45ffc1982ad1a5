//! Backend message framing and decoding, without I/O.
//!
//! [`decode`] takes one complete message off the front of a buffer, or nothing when the buffer
//! holds only part of one, so the caller's partial state lives in the buffer and reads stay
//! cancel-safe. Messages larger than the configured cap are refused before they are buffered.
//! Frontend messages are built with `postgres_protocol::message::frontend`.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::{DbError, Error, Result};

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type OID (25 text, 20 int8, 23 int4, 26 oid, 3220 pg_lsn …).
    pub type_oid: u32,
}

/// A decoded backend message (the subset a replication client meets).
#[derive(Debug, Clone, PartialEq)]
pub enum BackendMessage {
    /// 'R': authentication request; code and the rest of the body.
    Authentication {
        /// 0 ok, 3 cleartext, 5 md5, 10 SASL, 11 SASL continue, 12 SASL final.
        code: i32,
        /// Remaining bytes (salt, mechanism list, SASL data).
        data: Bytes,
    },
    /// 'S'.
    ParameterStatus {
        /// Parameter name.
        name: String,
        /// Its value.
        value: String,
    },
    /// 'K'.
    BackendKeyData {
        /// Backend process id.
        pid: i32,
        /// Cancel key.
        key: i32,
    },
    /// 'Z': transaction status byte.
    ReadyForQuery(u8),
    /// 'T'.
    RowDescription(Vec<Column>),
    /// 'D': column values, `None` for NULL.
    DataRow(Vec<Option<Bytes>>),
    /// 'C': command tag.
    CommandComplete(String),
    /// 'I'.
    EmptyQueryResponse,
    /// 'H'.
    CopyOutResponse,
    /// 'G'.
    CopyInResponse,
    /// 'W'.
    CopyBothResponse,
    /// 'd'.
    CopyData(Bytes),
    /// 'c'.
    CopyDone,
    /// 'E'.
    ErrorResponse(DbError),
    /// 'N'.
    NoticeResponse(DbError),
    /// 'A' and 'v' and anything else we tolerate but do not use.
    Ignored(u8),
    /// A message only the extended query protocol produces ('1', '2', '3', 't', 'n', 's').
    Extended(super::extended::ExtendedMessage),
}

impl BackendMessage {
    /// The message's name in the protocol documentation and its type byte, for errors a user
    /// reads ("DataRow ('D')"): never its contents, which may be large or secret.
    pub fn name(&self) -> String {
        let (name, tag) = match self {
            BackendMessage::Authentication { .. } => ("Authentication", b'R'),
            BackendMessage::ParameterStatus { .. } => ("ParameterStatus", b'S'),
            BackendMessage::BackendKeyData { .. } => ("BackendKeyData", b'K'),
            BackendMessage::ReadyForQuery(_) => ("ReadyForQuery", b'Z'),
            BackendMessage::RowDescription(_) => ("RowDescription", b'T'),
            BackendMessage::DataRow(_) => ("DataRow", b'D'),
            BackendMessage::CommandComplete(_) => ("CommandComplete", b'C'),
            BackendMessage::EmptyQueryResponse => ("EmptyQueryResponse", b'I'),
            BackendMessage::CopyOutResponse => ("CopyOutResponse", b'H'),
            BackendMessage::CopyInResponse => ("CopyInResponse", b'G'),
            BackendMessage::CopyBothResponse => ("CopyBothResponse", b'W'),
            BackendMessage::CopyData(_) => ("CopyData", b'd'),
            BackendMessage::CopyDone => ("CopyDone", b'c'),
            BackendMessage::ErrorResponse(_) => ("ErrorResponse", b'E'),
            BackendMessage::NoticeResponse(_) => ("NoticeResponse", b'N'),
            BackendMessage::Ignored(t) => return format!("message of type '{}'", t.escape_ascii()),
            BackendMessage::Extended(m) => return m.name().to_string(),
        };
        format!("{name} ('{}')", tag as char)
    }
}

/// Default cap on one backend message: CopyData chunks are far smaller; a DataRow of a
/// file-list row or a backup_label is tiny. 64 MiB leaves room for odd servers.
pub const DEFAULT_MAX_MESSAGE: usize = 64 << 20;

/// Takes one complete message off `buf`. `Ok(None)` means more bytes are needed.
pub fn decode(buf: &mut BytesMut, max_message: usize) -> Result<Option<BackendMessage>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(Error::Protocol(format!(
            "message '{}' has invalid length {len}",
            tag as char
        )));
    }
    if len > max_message {
        return Err(Error::Protocol(format!(
            "message '{}' of {len} bytes exceeds the {max_message}-byte limit",
            tag as char
        )));
    }
    if buf.len() < 1 + len {
        buf.reserve(1 + len - buf.len());
        return Ok(None);
    }
    buf.advance(5);
    let body = buf.split_to(len - 4).freeze();
    parse_body(tag, body).map(Some)
}

struct Reader {
    tag: u8,
    b: Bytes,
}

impl Reader {
    fn short(&self) -> Error {
        Error::Protocol(format!("message '{}' is truncated", self.tag as char))
    }
    fn u8(&mut self) -> Result<u8> {
        if self.b.remaining() < 1 {
            return Err(self.short());
        }
        Ok(self.b.get_u8())
    }
    fn i16(&mut self) -> Result<i16> {
        if self.b.remaining() < 2 {
            return Err(self.short());
        }
        Ok(self.b.get_i16())
    }
    fn i32(&mut self) -> Result<i32> {
        if self.b.remaining() < 4 {
            return Err(self.short());
        }
        Ok(self.b.get_i32())
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes> {
        if self.b.remaining() < n {
            return Err(self.short());
        }
        Ok(self.b.split_to(n))
    }
    fn cstr(&mut self) -> Result<String> {
        let pos = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| self.short())?;
        // Text; a byte that is not UTF-8 (a file name in a server's message, unconverted
        // with client_encoding SQL_ASCII) is shown as \xNN, never dropped or replaced.
        let s = crate::relpath::escaped(&self.b[..pos]);
        self.b.advance(pos + 1);
        Ok(s)
    }
}

fn parse_fields(r: &mut Reader) -> Result<DbError> {
    let mut e = DbError::default();
    loop {
        let t = r.u8()?;
        if t == 0 {
            break;
        }
        let v = r.cstr()?;
        match t {
            b'V' => e.severity = v,
            b'S' if e.severity.is_empty() => e.severity = v,
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'H' => e.hint = Some(v),
            _ => {}
        }
    }
    Ok(e)
}

fn parse_body(tag: u8, body: Bytes) -> Result<BackendMessage> {
    let mut r = Reader { tag, b: body };
    let m = match tag {
        b'R' => {
            let code = r.i32()?;
            BackendMessage::Authentication { code, data: r.b }
        }
        b'S' => BackendMessage::ParameterStatus {
            name: r.cstr()?,
            value: r.cstr()?,
        },
        b'K' => BackendMessage::BackendKeyData {
            pid: r.i32()?,
            key: r.i32()?,
        },
        b'Z' => BackendMessage::ReadyForQuery(r.u8()?),
        b'T' => {
            let n = r.i16()?;
            let mut cols = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let name = r.cstr()?;
                let _table = r.i32()?;
                let _col = r.i16()?;
                let type_oid = r.i32()? as u32;
                let _size = r.i16()?;
                let _mod = r.i32()?;
                let _fmt = r.i16()?;
                cols.push(Column { name, type_oid });
            }
            BackendMessage::RowDescription(cols)
        }
        b'D' => {
            let n = r.i16()?;
            let mut vals = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let len = r.i32()?;
                if len < 0 {
                    vals.push(None);
                } else {
                    vals.push(Some(r.bytes(len as usize)?));
                }
            }
            BackendMessage::DataRow(vals)
        }
        b'C' => BackendMessage::CommandComplete(r.cstr()?),
        b'I' => BackendMessage::EmptyQueryResponse,
        b'H' => BackendMessage::CopyOutResponse,
        b'G' => BackendMessage::CopyInResponse,
        b'W' => BackendMessage::CopyBothResponse,
        b'd' => BackendMessage::CopyData(r.b),
        b'c' => BackendMessage::CopyDone,
        b'E' => BackendMessage::ErrorResponse(parse_fields(&mut r)?),
        b'N' => BackendMessage::NoticeResponse(parse_fields(&mut r)?),
        b'A' | b'v' => BackendMessage::Ignored(tag),
        t if super::extended::is_extended_tag(t) => {
            BackendMessage::Extended(super::extended::parse_body(t, r.b)?)
        }
        other => {
            return Err(Error::Protocol(format!(
                "unexpected message type '{}' (0x{other:02x})",
                other as char
            )))
        }
    };
    Ok(m)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::BufMut;
    use proptest::prelude::*;

    #[test]
    fn names_a_message_by_its_protocol_name_not_its_contents() {
        let row = BackendMessage::DataRow(vec![Some(Bytes::from_static(b"secret"))]);
        assert_eq!(row.name(), "DataRow ('D')");
        assert_eq!(BackendMessage::Ignored(b'v').name(), "message of type 'v'");
        assert_eq!(BackendMessage::Ignored(0).name(), "message of type '\\x00'");
    }

    /// Feeds `wire` to the decoder in chunks of the given sizes (cycled), as reads from a
    /// socket would arrive, and returns every message decoded.
    pub(crate) fn decode_in_chunks(wire: &[u8], cuts: &[usize]) -> Vec<BackendMessage> {
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let (mut pos, mut i) = (0, 0);
        while pos < wire.len() {
            let n = cuts[i % cuts.len()].min(wire.len() - pos);
            buf.extend_from_slice(&wire[pos..pos + n]);
            pos += n;
            i += 1;
            while let Some(m) = decode(&mut buf, DEFAULT_MAX_MESSAGE).unwrap() {
                got.push(m);
            }
        }
        assert!(buf.is_empty(), "{} bytes left undecoded", buf.len());
        got
    }

    /// The CopyData payloads among decoded messages.
    pub(crate) fn copy_payloads(msgs: Vec<BackendMessage>) -> Vec<Bytes> {
        msgs.into_iter()
            .filter_map(|m| match m {
                BackendMessage::CopyData(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn sample_stream() -> (Vec<u8>, Vec<BackendMessage>) {
        let mut out = Vec::new();
        let mut want = Vec::new();
        let mut body = BytesMut::new();
        body.put_i32(10);
        body.put_slice(b"SCRAM-SHA-256\0\0");
        out.extend(msg(b'R', &body));
        want.push(BackendMessage::Authentication {
            code: 10,
            data: Bytes::from_static(b"SCRAM-SHA-256\0\0"),
        });
        out.extend(msg(b'S', b"server_version\x0015.18\0"));
        want.push(BackendMessage::ParameterStatus {
            name: "server_version".into(),
            value: "15.18".into(),
        });
        let mut t = BytesMut::new();
        t.put_i16(2);
        for (name, oid) in [("systemid", 25u32), ("timeline", 23)] {
            t.put_slice(name.as_bytes());
            t.put_u8(0);
            t.put_i32(0);
            t.put_i16(0);
            t.put_u32(oid);
            t.put_i16(-1);
            t.put_i32(-1);
            t.put_i16(0);
        }
        out.extend(msg(b'T', &t));
        want.push(BackendMessage::RowDescription(vec![
            Column {
                name: "systemid".into(),
                type_oid: 25,
            },
            Column {
                name: "timeline".into(),
                type_oid: 23,
            },
        ]));
        let mut d = BytesMut::new();
        d.put_i16(2);
        d.put_i32(3);
        d.put_slice(b"123");
        d.put_i32(-1);
        out.extend(msg(b'D', &d));
        want.push(BackendMessage::DataRow(vec![
            Some(Bytes::from_static(b"123")),
            None,
        ]));
        out.extend(msg(b'C', b"IDENTIFY_SYSTEM\0"));
        want.push(BackendMessage::CommandComplete("IDENTIFY_SYSTEM".into()));
        out.extend(msg(b'H', &[0, 0, 0]));
        want.push(BackendMessage::CopyOutResponse);
        out.extend(msg(b'd', &[7u8; 300]));
        want.push(BackendMessage::CopyData(Bytes::from(vec![7u8; 300])));
        out.extend(msg(b'c', b""));
        want.push(BackendMessage::CopyDone);
        out.extend(msg(
            b'E',
            b"SERROR\0VERROR\0C42501\0Mmust be superuser\0Hgrant it\0\0",
        ));
        want.push(BackendMessage::ErrorResponse(DbError {
            severity: "ERROR".into(),
            code: "42501".into(),
            message: "must be superuser".into(),
            detail: None,
            hint: Some("grant it".into()),
        }));
        out.extend(msg(b'Z', b"I"));
        want.push(BackendMessage::ReadyForQuery(b'I'));
        (out, want)
    }

    proptest! {
        #[test]
        fn decodes_the_same_whatever_the_read_boundaries(cuts in proptest::collection::vec(1usize..64, 1..40)) {
            let (stream, want) = sample_stream();
            prop_assert_eq!(decode_in_chunks(&stream, &cuts), want);
        }
    }

    #[test]
    fn refuses_oversized_and_truncated_messages() {
        let mut buf = BytesMut::from(&msg(b'd', &[0u8; 100])[..]);
        assert!(decode(&mut buf, 50).is_err());
        let mut buf = BytesMut::from(&msg(b'K', &[0u8; 3])[..]);
        assert!(decode(&mut buf, 1024).is_err());
        let mut buf = BytesMut::from(&b"Z\0\0\0\x01"[..]);
        assert!(decode(&mut buf, 1024).is_err());
    }
}
