//! The extended query protocol without I/O: the frontend messages (Parse, Bind, Describe,
//! Execute, Close, Sync), the backend messages only it produces (ParseComplete, BindComplete,
//! CloseComplete, ParameterDescription, NoData, PortalSuspended), and a [`Pipeline`] that
//! pairs every response with the request it answers, so that many requests can be in flight
//! on one connection and their results still read in order.
//!
//! The messages shared with the simple query protocol (RowDescription, DataRow,
//! CommandComplete, ErrorResponse, ReadyForQuery) are decoded by [`super::backend`], which
//! hands the ones below to [`parse_body`]. Nothing here opens a socket: the SQL session in
//! `crate::conn::sql` writes what these functions encode and feeds back what it reads.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::backend::{BackendMessage, Column};
use crate::error::{DbError, Error, Result};

/// A value's wire format in Bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Text (format code 0).
    Text,
    /// Binary (format code 1): a bytea arrives as its bytes, with no hex to decode.
    Binary,
}

impl Format {
    fn code(self) -> i16 {
        match self {
            Format::Text => 0,
            Format::Binary => 1,
        }
    }
}

/// What Describe and Close name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A prepared statement ('S').
    Statement,
    /// A portal ('P').
    Portal,
}

impl Target {
    fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }
}

/// The backend messages only the extended protocol produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtendedMessage {
    /// '1'.
    ParseComplete,
    /// '2'.
    BindComplete,
    /// '3'.
    CloseComplete,
    /// 't': the parameter type OIDs of a described statement.
    ParameterDescription(Vec<u32>),
    /// 'n': the described statement or portal returns no rows.
    NoData,
    /// 's': Execute stopped at its row limit.
    PortalSuspended,
}

impl ExtendedMessage {
    /// The message's protocol name and type byte, for errors a user reads.
    pub fn name(&self) -> &'static str {
        match self {
            ExtendedMessage::ParseComplete => "ParseComplete ('1')",
            ExtendedMessage::BindComplete => "BindComplete ('2')",
            ExtendedMessage::CloseComplete => "CloseComplete ('3')",
            ExtendedMessage::ParameterDescription(_) => "ParameterDescription ('t')",
            ExtendedMessage::NoData => "NoData ('n')",
            ExtendedMessage::PortalSuspended => "PortalSuspended ('s')",
        }
    }
}

/// True for the type bytes [`parse_body`] decodes.
pub fn is_extended_tag(tag: u8) -> bool {
    matches!(tag, b'1' | b'2' | b'3' | b't' | b'n' | b's')
}

/// Decodes the body of an extended-protocol-only message (`tag` is one of
/// [`is_extended_tag`]'s).
pub fn parse_body(tag: u8, mut body: Bytes) -> Result<ExtendedMessage> {
    let short = || Error::Protocol(format!("message '{}' is truncated", tag as char));
    let m = match tag {
        b'1' => ExtendedMessage::ParseComplete,
        b'2' => ExtendedMessage::BindComplete,
        b'3' => ExtendedMessage::CloseComplete,
        b'n' => ExtendedMessage::NoData,
        b's' => ExtendedMessage::PortalSuspended,
        b't' => {
            if body.remaining() < 2 {
                return Err(short());
            }
            let n = body.get_i16().max(0) as usize;
            if body.remaining() < 4 * n {
                return Err(short());
            }
            ExtendedMessage::ParameterDescription((0..n).map(|_| body.get_u32()).collect())
        }
        other => {
            return Err(Error::Protocol(format!(
                "message type '{}' is not an extended-protocol message",
                other as char
            )))
        }
    };
    Ok(m)
}

fn cstr(buf: &mut BytesMut, s: &str) -> Result<()> {
    if s.as_bytes().contains(&0) {
        return Err(Error::Protocol(format!(
            "\"{}\" contains a NUL byte and cannot be sent",
            s.escape_default()
        )));
    }
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
    Ok(())
}

/// Writes a message: its type byte, then its length (filled in after `body` wrote the body).
fn message(
    buf: &mut BytesMut,
    tag: u8,
    body: impl FnOnce(&mut BytesMut) -> Result<()>,
) -> Result<()> {
    let start = buf.len();
    buf.put_u8(tag);
    buf.put_i32(0);
    if let Err(e) = body(buf) {
        buf.truncate(start);
        return Err(e);
    }
    let len = i32::try_from(buf.len() - start - 1)
        .map_err(|_| Error::Protocol("a message over 2 GiB cannot be sent".into()))?;
    buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Parse: prepares `sql` as statement `name` ("" for the unnamed one); `param_types` are
/// type OIDs (0 lets the server infer one).
pub fn parse(name: &str, sql: &str, param_types: &[u32], buf: &mut BytesMut) -> Result<()> {
    message(buf, b'P', |b| {
        cstr(b, name)?;
        cstr(b, sql)?;
        b.put_i16(count(param_types.len())?);
        for t in param_types {
            b.put_u32(*t);
        }
        Ok(())
    })
}

fn count(n: usize) -> Result<i16> {
    i16::try_from(n)
        .map_err(|_| Error::Protocol(format!("{n} values are more than a message can carry")))
}

/// Bind: makes portal `portal` from statement `statement` with `params` (`None` is NULL) in
/// `param_format`, asking for every result column in `result_format`.
pub fn bind(
    portal: &str,
    statement: &str,
    param_format: Format,
    params: &[Option<&[u8]>],
    result_format: Format,
    buf: &mut BytesMut,
) -> Result<()> {
    message(buf, b'B', |b| {
        cstr(b, portal)?;
        cstr(b, statement)?;
        // One format code applies to every parameter (and, below, every result column).
        b.put_i16(1);
        b.put_i16(param_format.code());
        b.put_i16(count(params.len())?);
        for p in params {
            match p {
                None => b.put_i32(-1),
                Some(v) => {
                    let len = i32::try_from(v.len()).map_err(|_| {
                        Error::Protocol("a parameter over 2 GiB cannot be sent".into())
                    })?;
                    b.put_i32(len);
                    b.put_slice(v);
                }
            }
        }
        b.put_i16(1);
        b.put_i16(result_format.code());
        Ok(())
    })
}

/// Describe: asks for a statement's parameter types and columns, or a portal's columns.
pub fn describe(target: Target, name: &str, buf: &mut BytesMut) -> Result<()> {
    message(buf, b'D', |b| {
        b.put_u8(target.byte());
        cstr(b, name)
    })
}

/// Execute: runs portal `portal`, returning at most `max_rows` rows (0: all).
pub fn execute(portal: &str, max_rows: u32, buf: &mut BytesMut) -> Result<()> {
    message(buf, b'E', |b| {
        cstr(b, portal)?;
        b.put_u32(max_rows);
        Ok(())
    })
}

/// Close: releases a statement or a portal.
pub fn close(target: Target, name: &str, buf: &mut BytesMut) -> Result<()> {
    message(buf, b'C', |b| {
        b.put_u8(target.byte());
        cstr(b, name)
    })
}

/// Sync: ends a pipeline segment; the server answers ReadyForQuery, and after an error skips
/// every message up to it.
pub fn sync(buf: &mut BytesMut) {
    buf.put_u8(b'S');
    buf.put_i32(4);
}

/// A response the client waits for, queued as the request that produces it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// After Parse.
    ParseComplete,
    /// After Bind.
    BindComplete,
    /// After Close.
    CloseComplete,
    /// After Describe of a statement: ParameterDescription, then RowDescription or NoData.
    DescribeStatement,
    /// After Describe of a portal: RowDescription or NoData.
    DescribePortal,
    /// After Execute: DataRows, then CommandComplete, EmptyQueryResponse or PortalSuspended.
    /// The number tells the caller which of its executions this is.
    Execute(u64),
    /// After Sync.
    Ready,
}

/// What one response means to the caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing to act on (ParseComplete, BindComplete, CloseComplete, ParameterStatus …).
    Nothing,
    /// A notice the server sent on the side.
    Notice(DbError),
    /// A described statement's parameter types.
    ParameterTypes(Vec<u32>),
    /// A description's columns (`None`: it returns no rows).
    Columns(Option<Vec<Column>>),
    /// A row of execution `n`.
    Row(u64, Vec<Option<Bytes>>),
    /// Execution `n` ended with this command tag ("" for an empty query, "SUSPENDED" when
    /// it stopped at its row limit).
    Executed(u64, String),
    /// A request failed; the server skipped every request after it up to the next Sync.
    /// `execute` is the execution it failed in, if it was one.
    Failed {
        /// The server's error.
        error: DbError,
        /// The execution that failed, or `None` for Parse, Bind, Describe or Close.
        execute: Option<u64>,
    },
    /// The server reached a Sync and is ready; `None` once nothing more is expected.
    Ready,
}

/// Pairs responses with the requests sent, in order (see the module doc).
#[derive(Debug, Default)]
pub struct Pipeline {
    expect: VecDeque<Expect>,
    /// Inside a DescribeStatement, after its ParameterDescription.
    described_params: bool,
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new() -> Pipeline {
        Pipeline::default()
    }

    /// Records that a request producing `e` was sent.
    pub fn push(&mut self, e: Expect) {
        self.expect.push_back(e);
    }

    /// True when no response is awaited.
    pub fn is_idle(&self) -> bool {
        self.expect.is_empty()
    }

    /// Executions sent but not yet ended.
    pub fn executions_in_flight(&self) -> usize {
        self.expect
            .iter()
            .filter(|e| matches!(e, Expect::Execute(_)))
            .count()
    }

    fn unexpected(&self, what: &str) -> Error {
        let due = match self.expect.front() {
            Some(Expect::ParseComplete) => "ParseComplete",
            Some(Expect::BindComplete) => "BindComplete",
            Some(Expect::CloseComplete) => "CloseComplete",
            Some(Expect::DescribeStatement) => "a statement description",
            Some(Expect::DescribePortal) => "a portal description",
            Some(Expect::Execute(_)) => "rows or CommandComplete",
            Some(Expect::Ready) => "ReadyForQuery",
            None => "nothing",
        };
        Error::Protocol(format!(
            "the server sent {what} where {due} was due (extended query protocol)"
        ))
    }

    /// Takes one backend message and says what it means; a message out of order is a
    /// protocol error (the connection cannot be trusted after it).
    pub fn on(&mut self, m: BackendMessage) -> Result<Step> {
        use BackendMessage as B;
        use ExtendedMessage as X;
        let front = self.expect.front().copied();
        let step = match (m, front) {
            (B::NoticeResponse(n), _) => return Ok(Step::Notice(n)),
            (B::ParameterStatus { .. } | B::Ignored(_), _) => return Ok(Step::Nothing),
            // An error may also come at the Sync itself (the implicit transaction failed to
            // commit, or the session was ended just then), or with nothing asked (a session
            // ended while idle): the caller learns of it the same way.
            (B::ErrorResponse(error), f) => {
                let execute = match f {
                    Some(Expect::Execute(n)) => Some(n),
                    _ => None,
                };
                // The server skips everything up to the next Sync.
                while self.expect.front().is_some_and(|e| *e != Expect::Ready) {
                    self.expect.pop_front();
                }
                self.described_params = false;
                return Ok(Step::Failed { error, execute });
            }
            (B::Extended(X::ParseComplete), Some(Expect::ParseComplete))
            | (B::Extended(X::BindComplete), Some(Expect::BindComplete))
            | (B::Extended(X::CloseComplete), Some(Expect::CloseComplete)) => {
                self.expect.pop_front();
                Step::Nothing
            }
            (B::Extended(X::ParameterDescription(t)), Some(Expect::DescribeStatement))
                if !self.described_params =>
            {
                self.described_params = true;
                Step::ParameterTypes(t)
            }
            (B::RowDescription(c), Some(Expect::DescribePortal))
            | (B::RowDescription(c), Some(Expect::DescribeStatement))
                if front == Some(Expect::DescribePortal) || self.described_params =>
            {
                self.end_describe();
                Step::Columns(Some(c))
            }
            (B::Extended(X::NoData), Some(Expect::DescribePortal))
            | (B::Extended(X::NoData), Some(Expect::DescribeStatement))
                if front == Some(Expect::DescribePortal) || self.described_params =>
            {
                self.end_describe();
                Step::Columns(None)
            }
            (B::DataRow(v), Some(Expect::Execute(n))) => Step::Row(n, v),
            (B::CommandComplete(tag), Some(Expect::Execute(n))) => {
                self.expect.pop_front();
                Step::Executed(n, tag)
            }
            (B::EmptyQueryResponse, Some(Expect::Execute(n))) => {
                self.expect.pop_front();
                Step::Executed(n, String::new())
            }
            (B::Extended(X::PortalSuspended), Some(Expect::Execute(n))) => {
                self.expect.pop_front();
                Step::Executed(n, "SUSPENDED".into())
            }
            (B::ReadyForQuery(_), Some(Expect::Ready)) => {
                self.expect.pop_front();
                Step::Ready
            }
            (m, _) => return Err(self.unexpected(&m.name())),
        };
        Ok(step)
    }

    fn end_describe(&mut self) {
        self.expect.pop_front();
        self.described_params = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::tests::{decode_in_chunks, msg};
    use postgres_protocol::message::frontend as oracle;
    use proptest::prelude::*;

    /// Our encoders against postgres-protocol's, byte for byte.
    #[test]
    fn frontend_messages_match_an_independent_encoder() {
        let mut ours = BytesMut::new();
        let mut theirs = BytesMut::new();
        parse("pgpar_read", "SELECT $1", &[25, 20], &mut ours).unwrap();
        oracle::parse("pgpar_read", "SELECT $1", [25u32, 20], &mut theirs).unwrap();
        assert_eq!(ours, theirs, "Parse");

        ours.clear();
        theirs.clear();
        let params: [Option<&[u8]>; 3] = [Some(b"base/1/1259"), None, Some(b"8192")];
        bind(
            "",
            "pgpar_read",
            Format::Text,
            &params,
            Format::Binary,
            &mut ours,
        )
        .unwrap();
        let r = oracle::bind(
            "",
            "pgpar_read",
            [0i16],
            params,
            |p, buf| match p {
                None => Ok(postgres_protocol::IsNull::Yes),
                Some(v) => {
                    buf.put_slice(v);
                    Ok(postgres_protocol::IsNull::No)
                }
            },
            [1i16],
            &mut theirs,
        );
        assert!(r.is_ok());
        assert_eq!(ours, theirs, "Bind");

        for (t, b) in [(Target::Statement, b'S'), (Target::Portal, b'P')] {
            ours.clear();
            theirs.clear();
            describe(t, "s1", &mut ours).unwrap();
            oracle::describe(b, "s1", &mut theirs).unwrap();
            assert_eq!(ours, theirs, "Describe");
            ours.clear();
            theirs.clear();
            close(t, "s1", &mut ours).unwrap();
            oracle::close(b, "s1", &mut theirs).unwrap();
            assert_eq!(ours, theirs, "Close");
        }

        ours.clear();
        theirs.clear();
        execute("", 0, &mut ours).unwrap();
        oracle::execute("", 0, &mut theirs).unwrap();
        assert_eq!(ours, theirs, "Execute");
        ours.clear();
        theirs.clear();
        sync(&mut ours);
        oracle::sync(&mut theirs);
        assert_eq!(ours, theirs, "Sync");
    }

    #[test]
    fn refuses_names_with_nul_and_leaves_the_buffer_as_it_was() {
        let mut buf = BytesMut::from(&b"xyz"[..]);
        assert!(parse("a\0b", "SELECT 1", &[], &mut buf).is_err());
        assert_eq!(&buf[..], b"xyz");
    }

    fn data_row(v: &[Option<&[u8]>]) -> Vec<u8> {
        let mut d = BytesMut::new();
        d.put_i16(v.len() as i16);
        for x in v {
            match x {
                None => d.put_i32(-1),
                Some(b) => {
                    d.put_i32(b.len() as i32);
                    d.put_slice(b);
                }
            }
        }
        msg(b'D', &d)
    }

    /// The server's answer to: Parse, Describe statement, Sync, then three Bind/Execute pairs
    /// and a Sync, where the second execution fails (so the third is skipped).
    fn pipelined_session() -> (Vec<Expect>, Vec<u8>, Vec<Step>) {
        let mut expect = vec![
            Expect::ParseComplete,
            Expect::DescribeStatement,
            Expect::Ready,
        ];
        for n in 0..3 {
            expect.push(Expect::BindComplete);
            expect.push(Expect::Execute(n));
        }
        expect.push(Expect::Ready);

        let mut wire = Vec::new();
        wire.extend(msg(b'1', b""));
        let mut t = BytesMut::new();
        t.put_i16(3);
        for oid in [25u32, 20, 20] {
            t.put_u32(oid);
        }
        wire.extend(msg(b't', &t));
        let mut rd = BytesMut::new();
        rd.put_i16(1);
        rd.put_slice(b"pg_read_binary_file\0");
        rd.put_i32(0);
        rd.put_i16(0);
        rd.put_u32(17);
        rd.put_i16(-1);
        rd.put_i32(-1);
        rd.put_i16(1);
        wire.extend(msg(b'T', &rd));
        wire.extend(msg(b'Z', b"I"));
        let page: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        wire.extend(msg(b'2', b""));
        wire.extend(data_row(&[Some(&page)]));
        wire.extend(msg(b'C', b"SELECT 1\0"));
        wire.extend(msg(b'2', b""));
        wire.extend(msg(
            b'E',
            b"SERROR\0VERROR\0C42501\0Mpermission denied for function pg_read_binary_file\0\0",
        ));
        wire.extend(msg(b'Z', b"I"));

        let steps = vec![
            Step::Nothing,
            Step::ParameterTypes(vec![25, 20, 20]),
            Step::Columns(Some(vec![Column {
                name: "pg_read_binary_file".into(),
                type_oid: 17,
            }])),
            Step::Ready,
            Step::Nothing,
            Step::Row(0, vec![Some(Bytes::from(page))]),
            Step::Executed(0, "SELECT 1".into()),
            Step::Nothing,
            Step::Failed {
                error: DbError {
                    severity: "ERROR".into(),
                    code: "42501".into(),
                    message: "permission denied for function pg_read_binary_file".into(),
                    detail: None,
                    hint: None,
                },
                execute: Some(1),
            },
            Step::Ready,
        ];
        (expect, wire, steps)
    }

    proptest! {
        /// Decoded at any read boundaries, the responses pair with their requests the same way.
        #[test]
        fn pairs_pipelined_responses_whatever_the_read_boundaries(
            cuts in proptest::collection::vec(1usize..200, 1..40)
        ) {
            let (expect, wire, want) = pipelined_session();
            let mut p = Pipeline::new();
            for e in expect {
                p.push(e);
            }
            let got: Vec<Step> = decode_in_chunks(&wire, &cuts)
                .into_iter()
                .map(|m| p.on(m).unwrap())
                .collect();
            prop_assert_eq!(got, want);
            prop_assert!(p.is_idle());
        }

        /// Any parameter values survive Bind: the length prefixes frame them exactly.
        #[test]
        fn bind_frames_any_parameters(
            params in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..50)), 0..6)
        ) {
            let refs: Vec<Option<&[u8]>> = params.iter().map(|p| p.as_deref()).collect();
            let mut buf = BytesMut::new();
            bind("", "st", Format::Text, &refs, Format::Binary, &mut buf).unwrap();
            let mut b = buf.freeze();
            prop_assert_eq!(b.get_u8(), b'B');
            prop_assert_eq!(b.get_i32() as usize, b.len() + 4);
            prop_assert_eq!(&b[..4], b"\0st\0");
            b.advance(4);
            prop_assert_eq!((b.get_i16(), b.get_i16()), (1, 0));
            prop_assert_eq!(b.get_i16() as usize, params.len());
            for p in &params {
                let len = b.get_i32();
                match p {
                    None => prop_assert_eq!(len, -1),
                    Some(v) => {
                        prop_assert_eq!(len as usize, v.len());
                        prop_assert_eq!(&b[..v.len()], &v[..]);
                        b.advance(v.len());
                    }
                }
            }
            prop_assert_eq!((b.get_i16(), b.get_i16()), (1, 1));
            prop_assert!(b.is_empty());
        }
    }

    #[test]
    fn a_response_out_of_order_is_a_protocol_error() {
        let mut p = Pipeline::new();
        p.push(Expect::BindComplete);
        p.push(Expect::Execute(0));
        let e = p
            .on(BackendMessage::DataRow(vec![None]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("DataRow ('D') where BindComplete was due"),
            "{e}"
        );
        let mut p = Pipeline::new();
        let e = p
            .on(BackendMessage::ReadyForQuery(b'I'))
            .unwrap_err()
            .to_string();
        assert!(e.contains("where nothing was due"), "{e}");
    }

    #[test]
    fn a_fatal_error_anywhere_is_reported_with_its_execution() {
        let mut p = Pipeline::new();
        p.push(Expect::BindComplete);
        p.push(Expect::Execute(7));
        p.push(Expect::Ready);
        assert_eq!(
            p.on(BackendMessage::Extended(ExtendedMessage::BindComplete))
                .unwrap(),
            Step::Nothing
        );
        assert_eq!(p.executions_in_flight(), 1);
        let fatal = DbError {
            severity: "FATAL".into(),
            code: "57P01".into(),
            message: "terminating connection due to administrator command".into(),
            ..Default::default()
        };
        assert_eq!(
            p.on(BackendMessage::ErrorResponse(fatal.clone())).unwrap(),
            Step::Failed {
                error: fatal,
                execute: Some(7)
            }
        );
        assert_eq!(p.executions_in_flight(), 0);
    }

    #[test]
    fn an_error_at_the_sync_or_while_idle_is_a_failure_not_a_protocol_error() {
        let fatal = DbError {
            severity: "FATAL".into(),
            code: "57P01".into(),
            message: "terminating connection due to administrator command".into(),
            ..Default::default()
        };
        let mut p = Pipeline::new();
        p.push(Expect::Ready);
        let step = p.on(BackendMessage::ErrorResponse(fatal.clone())).unwrap();
        assert_eq!(
            step,
            Step::Failed {
                error: fatal.clone(),
                execute: None
            }
        );
        // A non-fatal one at the Sync is still followed by ReadyForQuery.
        assert_eq!(
            p.on(BackendMessage::ReadyForQuery(b'I')).unwrap(),
            Step::Ready
        );
        let mut idle = Pipeline::new();
        assert!(matches!(
            idle.on(BackendMessage::ErrorResponse(fatal)).unwrap(),
            Step::Failed { execute: None, .. }
        ));
    }

    #[test]
    fn decodes_parameter_description_and_refuses_a_short_one() {
        let mut body = BytesMut::new();
        body.put_i16(2);
        body.put_u32(25);
        body.put_u32(20);
        assert_eq!(
            parse_body(b't', body.clone().freeze()).unwrap(),
            ExtendedMessage::ParameterDescription(vec![25, 20])
        );
        body.truncate(7);
        assert!(parse_body(b't', body.freeze()).is_err());
    }
}
