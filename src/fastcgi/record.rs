//! Record framing and the fixed-size bodies (BEGIN_REQUEST, END_REQUEST,
//! UNKNOWN_TYPE).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    ProtocolError, BEGIN_REQUEST, END_REQUEST, FCGI_VERSION_1, HEADER_LEN, KEEP_CONN,
    MAX_CONTENT_LEN, UNKNOWN_TYPE,
};

/// One record off the wire, padding already stripped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: u8,
    pub request_id: u16,
    pub content: Bytes,
}

/// Total bytes (header, content, padding) of the record whose header starts
/// `buf`, or `None` while the header itself is incomplete.
pub(super) fn record_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..HEADER_LEN)?;
    let content_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    Some(HEADER_LEN + content_len + usize::from(header[6]))
}

/// Decodes one record from the front of `buf` if a whole one (with its
/// padding) is there; consumes it.
///
/// `Ok(None)` means more bytes are needed and `buf` is left untouched. A bad
/// version is reported as soon as the first byte arrives, since nothing after
/// it can be trusted.
pub fn decode_record(buf: &mut BytesMut) -> Result<Option<Record>, ProtocolError> {
    match buf.first() {
        None => return Ok(None),
        Some(&v) if v != FCGI_VERSION_1 => return Err(ProtocolError::UnsupportedVersion(v)),
        Some(_) => {}
    }
    let total = match record_len(buf) {
        Some(total) if buf.len() >= total => total,
        _ => return Ok(None),
    };
    let kind = buf[1];
    let request_id = u16::from_be_bytes([buf[2], buf[3]]);
    let content_len = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
    let padding_len = total - HEADER_LEN - content_len;

    buf.advance(HEADER_LEN);
    // split_to hands out the content without copying it.
    let content = buf.split_to(content_len).freeze();
    buf.advance(padding_len);
    Ok(Some(Record {
        kind,
        request_id,
        content,
    }))
}

/// Appends one record: header, content, and padding to a multiple of 8.
///
/// `content.len()` must be at most [`MAX_CONTENT_LEN`]; streams are split by
/// [`encode_stream`]. The length is a caller contract, checked with
/// `debug_assert!`; a release build that gets it wrong still emits valid
/// records by splitting rather than writing a corrupt length.
pub fn encode_record(kind: u8, request_id: u16, content: &[u8], out: &mut BytesMut) {
    debug_assert!(
        content.len() <= MAX_CONTENT_LEN,
        "FastCGI record content is {} bytes, max {MAX_CONTENT_LEN}",
        content.len()
    );
    let Ok(content_len) = u16::try_from(content.len()) else {
        encode_stream(kind, request_id, content, out);
        return;
    };
    // Keeping records 8-byte aligned is what the specification recommends to
    // senders; receivers must accept any padding anyway.
    let padding_len = (8 - content.len() % 8) % 8;
    out.reserve(HEADER_LEN + content.len() + padding_len);
    out.put_u8(FCGI_VERSION_1);
    out.put_u8(kind);
    out.put_u16(request_id);
    out.put_u16(content_len);
    // padding_len < 8, so the cast cannot truncate.
    out.put_u8(padding_len as u8);
    out.put_u8(0);
    out.put_slice(content);
    out.put_bytes(0, padding_len);
}

/// Appends `data` as as many records of `kind` as needed (each at most
/// [`MAX_CONTENT_LEN`] bytes, none if `data` is empty).
///
/// Does not write the empty record that ends a stream, so a caller can feed a
/// body in pieces and close it with [`encode_stream_end`] once.
pub fn encode_stream(kind: u8, request_id: u16, data: &[u8], out: &mut BytesMut) {
    for chunk in data.chunks(MAX_CONTENT_LEN) {
        encode_record(kind, request_id, chunk, out);
    }
}

/// Appends the empty record that ends a stream (PARAMS, STDIN, STDOUT, STDERR,
/// DATA).
pub fn encode_stream_end(kind: u8, request_id: u16, out: &mut BytesMut) {
    encode_record(kind, request_id, &[], out);
}

/// FCGI_BeginRequestBody: which role the application plays and whether the
/// connection stays open afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeginRequest {
    pub role: u16,
    pub flags: u8,
}

impl BeginRequest {
    /// Parses a BEGIN_REQUEST record's content; the five reserved bytes are
    /// ignored.
    pub fn parse(content: &[u8]) -> Result<Self, ProtocolError> {
        let body: &[u8; 8] = content
            .try_into()
            .map_err(|_| ProtocolError::BeginRequestLength(content.len()))?;
        Ok(Self {
            role: u16::from_be_bytes([body[0], body[1]]),
            flags: body[2],
        })
    }

    /// Appends a whole BEGIN_REQUEST record.
    pub fn encode(&self, request_id: u16, out: &mut BytesMut) {
        let [r0, r1] = self.role.to_be_bytes();
        encode_record(
            BEGIN_REQUEST,
            request_id,
            &[r0, r1, self.flags, 0, 0, 0, 0, 0],
            out,
        );
    }

    /// Whether the web server wants to reuse the connection after this
    /// request.
    pub fn keep_conn(&self) -> bool {
        self.flags & KEEP_CONN != 0
    }
}

/// FCGI_EndRequestBody: the application's exit status and whether the request
/// was served at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndRequest {
    pub app_status: u32,
    pub protocol_status: u8,
}

impl EndRequest {
    /// Parses an END_REQUEST record's content; the three reserved bytes are
    /// ignored.
    pub fn parse(content: &[u8]) -> Result<Self, ProtocolError> {
        let body: &[u8; 8] = content
            .try_into()
            .map_err(|_| ProtocolError::EndRequestLength(content.len()))?;
        Ok(Self {
            app_status: u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
            protocol_status: body[4],
        })
    }

    /// Appends a whole END_REQUEST record.
    pub fn encode(&self, request_id: u16, out: &mut BytesMut) {
        let [a0, a1, a2, a3] = self.app_status.to_be_bytes();
        encode_record(
            END_REQUEST,
            request_id,
            &[a0, a1, a2, a3, self.protocol_status, 0, 0, 0],
            out,
        );
    }
}

/// Appends an UNKNOWN_TYPE management record (request id 0) whose body names
/// the record type we did not understand, so the peer can fall back instead
/// of waiting.
pub fn encode_unknown_type(unknown: u8, out: &mut BytesMut) {
    encode_record(UNKNOWN_TYPE, 0, &[unknown, 0, 0, 0, 0, 0, 0, 0], out);
}

/// Parses an UNKNOWN_TYPE body: the type the peer did not understand.
pub fn parse_unknown_type(content: &[u8]) -> Result<u8, ProtocolError> {
    match content {
        [unknown, _, _, _, _, _, _, _] => Ok(*unknown),
        _ => Err(ProtocolError::UnknownTypeLength(content.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{RESPONDER, STDIN, STDOUT, UNKNOWN_ROLE};
    use super::*;
    use proptest::prelude::*;

    fn decode_all(buf: &mut BytesMut) -> Vec<Record> {
        let mut records = Vec::new();
        while let Some(record) = decode_record(buf).expect("valid input") {
            records.push(record);
        }
        records
    }

    #[test]
    fn begin_request_matches_spec_bytes() {
        let mut out = BytesMut::new();
        BeginRequest {
            role: RESPONDER,
            flags: KEEP_CONN,
        }
        .encode(1, &mut out);
        assert_eq!(
            &out[..],
            [
                0x01, 0x01, 0x00, 0x01, 0x00, 0x08, 0x00, 0x00, //
                0x00, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00
            ]
        );

        let record = decode_record(&mut out).unwrap().unwrap();
        assert_eq!((record.kind, record.request_id), (BEGIN_REQUEST, 1));
        let begin = BeginRequest::parse(&record.content).unwrap();
        assert_eq!(begin.role, RESPONDER);
        assert!(begin.keep_conn());
        assert!(out.is_empty());
    }

    #[test]
    fn begin_request_without_keep_conn() {
        let begin = BeginRequest::parse(&[0, 3, 0, 9, 9, 9, 9, 9]).unwrap();
        assert_eq!(begin, BeginRequest { role: 3, flags: 0 });
        assert!(!begin.keep_conn());
    }

    #[test]
    fn begin_request_wrong_length() {
        assert_eq!(
            BeginRequest::parse(&[0, 1, 1]),
            Err(ProtocolError::BeginRequestLength(3))
        );
        assert_eq!(
            BeginRequest::parse(&[0; 9]),
            Err(ProtocolError::BeginRequestLength(9))
        );
    }

    #[test]
    fn end_request_matches_spec_bytes() {
        let mut out = BytesMut::new();
        EndRequest {
            app_status: 0x0102_0304,
            protocol_status: UNKNOWN_ROLE,
        }
        .encode(0x1234, &mut out);
        assert_eq!(
            &out[..],
            [
                0x01, 0x03, 0x12, 0x34, 0x00, 0x08, 0x00, 0x00, //
                0x01, 0x02, 0x03, 0x04, 0x03, 0x00, 0x00, 0x00
            ]
        );
        let record = decode_record(&mut out).unwrap().unwrap();
        assert_eq!(
            EndRequest::parse(&record.content).unwrap(),
            EndRequest {
                app_status: 0x0102_0304,
                protocol_status: UNKNOWN_ROLE
            }
        );
    }

    #[test]
    fn end_request_wrong_length() {
        assert_eq!(
            EndRequest::parse(&[]),
            Err(ProtocolError::EndRequestLength(0))
        );
    }

    #[test]
    fn unknown_type_round_trip() {
        let mut out = BytesMut::new();
        encode_unknown_type(99, &mut out);
        assert_eq!(
            &out[..],
            [
                0x01, 0x0b, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, //
                99, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        let record = decode_record(&mut out).unwrap().unwrap();
        assert_eq!((record.kind, record.request_id), (UNKNOWN_TYPE, 0));
        assert_eq!(parse_unknown_type(&record.content), Ok(99));
        assert_eq!(
            parse_unknown_type(&[99]),
            Err(ProtocolError::UnknownTypeLength(1))
        );
    }

    #[test]
    fn encode_pads_to_multiple_of_eight() {
        let mut out = BytesMut::new();
        encode_record(STDOUT, 1, b"hello", &mut out);
        assert_eq!(
            &out[..],
            [1, 6, 0, 1, 0, 5, 3, 0, b'h', b'e', b'l', b'l', b'o', 0, 0, 0]
        );
        for len in 0..=17 {
            let mut out = BytesMut::new();
            encode_record(STDOUT, 1, &vec![7; len], &mut out);
            assert_eq!(out.len() % 8, 0, "content length {len}");
            assert_eq!(usize::from(out[6]), out.len() - HEADER_LEN - len);
        }
    }

    #[test]
    fn decode_honours_any_padding_length() {
        // Peers may pad by more than alignment needs; the header's count rules.
        let mut buf = BytesMut::from(&[1, 5, 0, 2, 0, 2, 255, 0, b'h', b'i'][..]);
        buf.put_bytes(0xaa, 255);
        buf.extend_from_slice(&[1, 5, 0, 2, 0, 0, 0, 0]);
        assert_eq!(
            decode_all(&mut buf),
            [
                Record {
                    kind: STDIN,
                    request_id: 2,
                    content: Bytes::from_static(b"hi")
                },
                Record {
                    kind: STDIN,
                    request_id: 2,
                    content: Bytes::new()
                }
            ]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn decode_waits_for_whole_record_including_padding() {
        let mut whole = BytesMut::new();
        encode_record(STDOUT, 7, b"abc", &mut whole);
        for cut in 0..whole.len() {
            let mut partial = BytesMut::from(&whole[..cut]);
            assert_eq!(decode_record(&mut partial), Ok(None), "cut at {cut}");
            assert_eq!(partial.len(), cut, "incomplete input must not be consumed");
        }
    }

    #[test]
    fn record_split_across_many_reads() {
        let mut wire = BytesMut::new();
        encode_record(STDOUT, 3, b"split me into single bytes", &mut wire);
        encode_stream_end(STDOUT, 3, &mut wire);
        let mut buf = BytesMut::new();
        let mut records = Vec::new();
        for byte in wire.iter() {
            buf.put_u8(*byte);
            if let Some(record) = decode_record(&mut buf).unwrap() {
                records.push(record);
            }
        }
        assert_eq!(records.len(), 2);
        assert_eq!(&records[0].content[..], b"split me into single bytes");
        assert!(records[1].content.is_empty());
    }

    #[test]
    fn decode_rejects_bad_version_early() {
        let mut buf = BytesMut::from(&[2u8][..]);
        assert_eq!(
            decode_record(&mut buf),
            Err(ProtocolError::UnsupportedVersion(2))
        );
        let mut empty = BytesMut::new();
        assert_eq!(decode_record(&mut empty), Ok(None));
    }

    #[test]
    fn stream_longer_than_one_record() {
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = BytesMut::new();
        encode_stream(STDIN, 9, &data, &mut out);
        encode_stream_end(STDIN, 9, &mut out);
        let records = decode_all(&mut out);
        let lens: Vec<usize> = records.iter().map(|r| r.content.len()).collect();
        assert_eq!(lens, [65535, 65535, 150_000 - 2 * 65535, 0]);
        let joined: Vec<u8> = records.iter().flat_map(|r| r.content.to_vec()).collect();
        assert_eq!(joined, data);
        assert!(records.iter().all(|r| r.kind == STDIN && r.request_id == 9));
    }

    #[test]
    fn empty_stream_writes_nothing_and_end_writes_header_only() {
        let mut out = BytesMut::new();
        encode_stream(STDOUT, 1, &[], &mut out);
        assert!(out.is_empty());
        encode_stream_end(STDOUT, 1, &mut out);
        assert_eq!(&out[..], [1, 6, 0, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn max_content_fits_one_record() {
        let mut out = BytesMut::new();
        encode_record(STDOUT, 1, &[1; MAX_CONTENT_LEN], &mut out);
        assert_eq!(&out[4..7], [0xff, 0xff, 1]);
        let record = decode_record(&mut out).unwrap().unwrap();
        assert_eq!(record.content.len(), MAX_CONTENT_LEN);
        assert!(out.is_empty());
    }

    fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
        prop::collection::vec(prop_oneof![1usize..16, 1usize..70_000], 1..20)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn records_round_trip_through_any_chunking(
            records in prop::collection::vec(
                (any::<u8>(), any::<u16>(), prop::collection::vec(any::<u8>(), 0..=MAX_CONTENT_LEN)),
                0..4,
            ),
            chunks in chunk_sizes(),
        ) {
            let mut wire = BytesMut::new();
            for (kind, id, content) in &records {
                encode_record(*kind, *id, content, &mut wire);
            }
            prop_assert_eq!(wire.len() % 8, 0);

            let mut buf = BytesMut::new();
            let mut decoded = Vec::new();
            let mut rest = &wire[..];
            for size in chunks.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (head, tail) = rest.split_at((*size).min(rest.len()));
                buf.extend_from_slice(head);
                rest = tail;
                while let Some(record) = decode_record(&mut buf).unwrap() {
                    decoded.push(record);
                }
            }
            prop_assert!(buf.is_empty());
            let expected: Vec<Record> = records
                .into_iter()
                .map(|(kind, request_id, content)| Record { kind, request_id, content: content.into() })
                .collect();
            prop_assert_eq!(decoded, expected);
        }

        #[test]
        fn decode_record_never_panics(
            // Biased towards 1 so that version bytes and small lengths turn up
            // often enough to get past the first header.
            data in prop::collection::vec(prop_oneof![Just(1u8), any::<u8>()], 0..600),
        ) {
            let mut buf = BytesMut::from(&data[..]);
            loop {
                let before = buf.len();
                match decode_record(&mut buf) {
                    Ok(Some(_)) => prop_assert!(buf.len() < before),
                    Ok(None) => {
                        prop_assert_eq!(buf.len(), before);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }

        #[test]
        fn fixed_body_parsers_never_panic(data in prop::collection::vec(any::<u8>(), 0..20)) {
            let _ = BeginRequest::parse(&data);
            let _ = EndRequest::parse(&data);
            let _ = parse_unknown_type(&data);
        }
    }
}
