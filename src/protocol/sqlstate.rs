//! The SQLSTATEs pgpar acts on, by name (PostgreSQL's `src/backend/utils/errcodes.txt`).
//!
//! Code compares an error's SQLSTATE only against these constants, so a reader can grep for
//! every place that reacts to, say, a missing parameter. This module holds names, no logic.

/// `28000` invalid_authorization_specification (pg_hba.conf refused us, unknown role).
pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
/// `28P01` invalid_password.
pub const INVALID_PASSWORD: &str = "28P01";
/// `42501` insufficient_privilege (a role without REPLICATION).
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// `42704` undefined_object (`SHOW` of a parameter the server does not know).
pub const UNDEFINED_OBJECT: &str = "42704";
/// `53300` too_many_connections (every WAL sender slot is taken).
pub const TOO_MANY_CONNECTIONS: &str = "53300";
/// `53400` configuration_limit_exceeded (every replication slot is taken).
pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
/// Class `57`, operator_intervention: the server ended the session (shutdown, termination);
/// a fresh connection may get past it.
pub const CLASS_OPERATOR_INTERVENTION: &str = "57";
/// `57P01` admin_shutdown (`pg_ctl stop -m fast` or `-m smart` ended the session).
pub const ADMIN_SHUTDOWN: &str = "57P01";
/// `57P02` crash_shutdown (another backend crashed; the server restarts).
pub const CRASH_SHUTDOWN: &str = "57P02";
/// `57P03` cannot_connect_now (starting up or shutting down).
pub const CANNOT_CONNECT_NOW: &str = "57P03";
/// `XX001` data_corrupted (BASE_BACKUP found pages whose checksums fail).
pub const DATA_CORRUPTED: &str = "XX001";
