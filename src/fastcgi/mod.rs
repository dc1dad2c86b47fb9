//! FastCGI 1.0 wire codec, shared by both sides of anteroom.
//!
//! anteroom speaks FastCGI in two directions: as a client it hands requests to
//! worker processes (php-cgi, Perl `FCGI`, Python flup), and as a server it
//! accepts requests from nginx's `fastcgi_pass`. Both directions use the same
//! framing, so this module holds only the byte-level encoding and decoding and
//! leaves request state machines to the callers.
//!
//! # Records
//!
//! Everything on a FastCGI connection is a record: an 8-byte header
//! (`version`, `type`, `requestId` as big-endian u16, `contentLength` as
//! big-endian u16, `paddingLength`, one reserved byte), then the content, then
//! `paddingLength` bytes of padding. The padding exists so that senders can keep
//! records aligned to 8 bytes; it carries nothing, and a receiver must skip
//! however much the header announces (nginx, for one, pads every record).
//! [`decode_record`] strips it so callers only see [`Record::content`];
//! [`encode_record`] always pads to a multiple of 8, as the specification
//! recommends.
//!
//! Because `contentLength` is 16 bits, a record carries at most
//! [`MAX_CONTENT_LEN`] bytes. Larger bodies are sent as a *stream*: any number
//! of records of the same type ([`encode_stream`]), closed by one record with
//! empty content ([`encode_stream_end`]). The empty record is the only way a
//! peer learns that PARAMS, STDIN, STDOUT, STDERR or DATA is complete, so
//! forgetting it leaves the other side waiting forever.
//!
//! # Name-value pairs
//!
//! PARAMS (the CGI environment), GET_VALUES and GET_VALUES_RESULT bodies are a
//! sequence of name-value pairs, each written as name length, value length,
//! name bytes, value bytes. To keep the common short lengths cheap, a length
//! below 128 takes one byte; anything longer takes four bytes, big-endian, with
//! the high bit of the first byte set to tell the two forms apart. That caps a
//! name or value at `0x7fff_ffff` bytes. A pair may straddle record
//! boundaries, so [`decode_pairs`] works on the concatenated stream contents,
//! not on single records.
//!
//! # Entry points
//!
//! - [`decode_record`] / [`encode_record`] and friends for buffer-level work.
//! - [`read_record`] for blocking, synchronous apps such as the demo worker.

mod codec;
mod pairs;
mod record;

pub use codec::read_record;
pub use pairs::{decode_pairs, encode_pair};
pub use record::{
    decode_record, encode_record, encode_stream, encode_stream_end, encode_unknown_type,
    parse_unknown_type, BeginRequest, EndRequest, Record,
};

/// The only protocol version defined; anything else is rejected.
pub const FCGI_VERSION_1: u8 = 1;
/// Size of the fixed record header.
pub const HEADER_LEN: usize = 8;
/// Largest content a single record can carry (`contentLength` is a u16).
pub const MAX_CONTENT_LEN: usize = 65535;

// Record types.
pub const BEGIN_REQUEST: u8 = 1;
pub const ABORT_REQUEST: u8 = 2;
pub const END_REQUEST: u8 = 3;
pub const PARAMS: u8 = 4;
pub const STDIN: u8 = 5;
pub const STDOUT: u8 = 6;
pub const STDERR: u8 = 7;
pub const DATA: u8 = 8;
pub const GET_VALUES: u8 = 9;
pub const GET_VALUES_RESULT: u8 = 10;
pub const UNKNOWN_TYPE: u8 = 11;

// Roles carried in BEGIN_REQUEST.
pub const RESPONDER: u16 = 1;
pub const AUTHORIZER: u16 = 2;
pub const FILTER: u16 = 3;

/// BEGIN_REQUEST flag: the application must not close the connection after
/// answering, so the web server can reuse it.
pub const KEEP_CONN: u8 = 1;

// END_REQUEST protocol status.
pub const REQUEST_COMPLETE: u8 = 0;
pub const CANT_MPX_CONN: u8 = 1;
pub const OVERLOADED: u8 = 2;
pub const UNKNOWN_ROLE: u8 = 3;

/// Malformed FastCGI input, or a value that cannot be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("unsupported FastCGI version {0}")]
    UnsupportedVersion(u8),
    #[error("BEGIN_REQUEST body is {0} bytes, expected 8")]
    BeginRequestLength(usize),
    #[error("END_REQUEST body is {0} bytes, expected 8")]
    EndRequestLength(usize),
    #[error("UNKNOWN_TYPE body is {0} bytes, expected 8")]
    UnknownTypeLength(usize),
    #[error("truncated name-value pair")]
    TruncatedPair,
    #[error("name-value pair declares {declared} bytes but only {available} remain")]
    PairOverrun { declared: usize, available: usize },
    #[error("name or value is {0} bytes, longer than the 0x7fffffff limit")]
    PairTooLong(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_name_the_problem() {
        assert_eq!(
            ProtocolError::UnsupportedVersion(2).to_string(),
            "unsupported FastCGI version 2"
        );
        assert_eq!(
            ProtocolError::TruncatedPair.to_string(),
            "truncated name-value pair"
        );
        assert_eq!(
            ProtocolError::BeginRequestLength(3).to_string(),
            "BEGIN_REQUEST body is 3 bytes, expected 8"
        );
        assert_eq!(
            ProtocolError::EndRequestLength(0).to_string(),
            "END_REQUEST body is 0 bytes, expected 8"
        );
        assert_eq!(
            ProtocolError::PairOverrun {
                declared: 10,
                available: 4
            }
            .to_string(),
            "name-value pair declares 10 bytes but only 4 remain"
        );
    }
}
