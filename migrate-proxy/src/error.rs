//! Errors, classified by who caused them.
//!
//! - the peer sent bytes that are not our protocol ([`ProxyError::Hello`],
//!   [`ProxyError::Frame`]) or that fail authentication
//!   ([`ProxyError::Record`]): a broken network, a misconfigured peer, or an
//!   attack; the migration is aborted either way;
//! - the peer refused us, or was armed differently ([`ProxyError::Refused`],
//!   [`ProxyError::KindMismatch`]);
//! - the stream ended early ([`ProxyError::Truncated`]);
//! - local failures ([`ProxyError::Io`], [`ProxyError::Timeout`]).

use crate::wire::frame::{FrameType, HeaderError};
use crate::wire::hello::{HelloError, Kind, Refusal};
use crate::wire::record::RecordError;

/// Why a connection or migration failed. The message is one line, meant for
/// the operator.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// The OS error (part of the message, so not also a `source`).
        source: std::io::Error,
    },
    /// The peer's hello is not valid.
    #[error("bad hello from peer: {0}")]
    Hello(#[from] HelloError),
    /// A frame header is not valid.
    #[error("bad frame from peer: {0}")]
    Frame(#[from] HeaderError),
    /// A frame failed authentication, or a key limit was hit.
    #[error("{0}")]
    Record(#[from] RecordError),
    /// The destination refused the connection.
    #[error("destination refused: {0}")]
    Refused(Refusal),
    /// The two sides are armed for different kinds of stream.
    #[error(
        "this side is armed {ours} but the peer sent {theirs}: both sides must be armed alike"
    )]
    KindMismatch {
        /// Our kind.
        ours: Kind,
        /// The peer's.
        theirs: Kind,
    },
    /// The peer's answer does not match our hello.
    #[error("peer answered for another migration or connection")]
    WrongAnswer,
    /// The peer's ephemeral public key is not a usable X25519 key.
    #[error("the peer's ephemeral key is invalid")]
    BadKeyShare,
    /// A frame of an unexpected type.
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedFrame {
        /// What the protocol state allows.
        expected: FrameType,
        /// What came.
        got: FrameType,
    },
    /// Bytes after the authenticated end of stream.
    #[error("peer sent data after the end of the stream")]
    DataAfterEnd,
    /// The connection ended without the authenticated end-of-stream frame.
    #[error("stream truncated: the peer's connection ended before its end-of-stream frame")]
    Truncated,
    /// Something took too long.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// Another connection of this migration failed, so this one was cut.
    #[error("aborted because another connection of this migration failed")]
    Aborted,
}

impl ProxyError {
    /// Wraps an I/O error with what we were doing.
    pub fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> ProxyError {
        move |source| ProxyError::Io { what, source }
    }

    /// Whether this is the peer misbehaving or an attack (as opposed to a
    /// local or network failure).
    pub fn is_peer_misbehaviour(&self) -> bool {
        match self {
            ProxyError::Hello(_)
            | ProxyError::Frame(_)
            | ProxyError::Record(_)
            | ProxyError::WrongAnswer
            | ProxyError::BadKeyShare
            | ProxyError::UnexpectedFrame { .. }
            | ProxyError::DataAfterEnd => true,
            ProxyError::Io { .. }
            | ProxyError::Refused(_)
            | ProxyError::KindMismatch { .. }
            | ProxyError::Truncated
            | ProxyError::Timeout(_)
            | ProxyError::Aborted => false,
        }
    }
}
