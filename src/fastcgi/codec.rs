//! Connection-level adapters: a tokio-util codec for async connections and a
//! blocking reader for simple synchronous apps.

use std::io::{self, Read};

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use super::record::record_len;
use super::{decode_record, encode_record, encode_stream, ProtocolError, Record};

/// Frames a FastCGI connection as a sequence of [`Record`]s.
///
/// Encoding a record whose content is longer than [`MAX_CONTENT_LEN`]
/// writes several records of the same kind and id rather than failing, so a
/// caller can hand over a whole STDOUT body at once. It never writes the empty
/// stream-end record on its own; send one explicitly.
///
/// [`MAX_CONTENT_LEN`]: super::MAX_CONTENT_LEN
#[derive(Debug, Default)]
pub struct RecordCodec;

/// Error from [`RecordCodec`]: the connection failed or the peer sent
/// something that is not FastCGI.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

impl Decoder for RecordCodec {
    type Item = Record;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Record>, CodecError> {
        let record = decode_record(src)?;
        if record.is_none() {
            // Once the header is in, we know exactly how much is missing;
            // reserving it now saves repeated small reallocations.
            if let Some(total) = record_len(src) {
                src.reserve(total.saturating_sub(src.len()));
            }
        }
        Ok(record)
    }
}

impl Encoder<Record> for RecordCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Record, dst: &mut BytesMut) -> Result<(), CodecError> {
        if item.content.is_empty() {
            // encode_stream writes nothing for empty data, but an empty
            // record here is meaningful (usually a stream end).
            encode_record(item.kind, item.request_id, &[], dst);
        } else {
            encode_stream(item.kind, item.request_id, &item.content, dst);
        }
        Ok(())
    }
}

/// Blocking helper for simple synchronous FastCGI apps (anteroom's built-in
/// demo worker): reads from `r` into `buf` until a whole record is decoded.
///
/// Bytes read past the record stay in `buf` for the next call, so the same
/// `buf` must be passed every time. `Ok(None)` on a clean EOF between records;
/// an EOF in the middle of a record is an [`io::ErrorKind::UnexpectedEof`]
/// error, and a protocol error is [`io::ErrorKind::InvalidData`].
pub fn read_record<R: Read>(r: &mut R, buf: &mut BytesMut) -> io::Result<Option<Record>> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(record) =
            decode_record(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        {
            return Ok(Some(record));
        }
        let n = match r.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed with {} bytes of an incomplete FastCGI record",
                    buf.len()
                ),
            ));
        }
        // A reader claiming more than it was given breaks the Read contract;
        // refuse it rather than panic on the slice.
        let read = chunk.get(..n).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "reader returned an impossible length",
            )
        })?;
        buf.extend_from_slice(read);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        encode_stream_end, BeginRequest, HEADER_LEN, KEEP_CONN, MAX_CONTENT_LEN, PARAMS, RESPONDER,
        STDIN, STDOUT,
    };
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    /// Hands out its data a few bytes at a time, with interruptions, like a
    /// slow socket.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
        interrupt_next: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            self.interrupt_next = !self.interrupt_next;
            if self.interrupt_next {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = self.step.min(out.len()).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn trickle(data: Vec<u8>, step: usize) -> Trickle {
        Trickle {
            data,
            pos: 0,
            step,
            interrupt_next: false,
        }
    }

    fn record(kind: u8, request_id: u16, content: &'static [u8]) -> Record {
        Record {
            kind,
            request_id,
            content: Bytes::from_static(content),
        }
    }

    #[test]
    fn read_record_reassembles_byte_by_byte() {
        let mut wire = BytesMut::new();
        BeginRequest {
            role: RESPONDER,
            flags: KEEP_CONN,
        }
        .encode(1, &mut wire);
        encode_record(PARAMS, 1, b"\x01\x01ab", &mut wire);
        encode_stream_end(PARAMS, 1, &mut wire);
        let mut r = trickle(wire.to_vec(), 1);
        let mut buf = BytesMut::new();

        let first = read_record(&mut r, &mut buf).unwrap().unwrap();
        assert_eq!(
            BeginRequest::parse(&first.content).unwrap(),
            BeginRequest {
                role: RESPONDER,
                flags: KEEP_CONN
            }
        );
        assert_eq!(
            read_record(&mut r, &mut buf).unwrap(),
            Some(record(PARAMS, 1, b"\x01\x01ab"))
        );
        assert_eq!(
            read_record(&mut r, &mut buf).unwrap(),
            Some(record(PARAMS, 1, b""))
        );
        assert_eq!(read_record(&mut r, &mut buf).unwrap(), None);
    }

    #[test]
    fn read_record_keeps_bytes_read_past_a_record() {
        let mut wire = BytesMut::new();
        encode_record(STDIN, 2, b"one", &mut wire);
        encode_record(STDIN, 2, b"two", &mut wire);
        // One read delivers both records; the second must not be lost.
        let mut r = trickle(wire.to_vec(), 1000);
        let mut buf = BytesMut::new();
        assert_eq!(
            read_record(&mut r, &mut buf).unwrap(),
            Some(record(STDIN, 2, b"one"))
        );
        assert_eq!(
            read_record(&mut r, &mut buf).unwrap(),
            Some(record(STDIN, 2, b"two"))
        );
        assert_eq!(read_record(&mut r, &mut buf).unwrap(), None);
    }

    #[test]
    fn read_record_eof_mid_record() {
        let mut wire = BytesMut::new();
        encode_record(STDIN, 1, b"abcdef", &mut wire);
        for cut in 1..wire.len() {
            let mut r = trickle(wire[..cut].to_vec(), 3);
            let err = read_record(&mut r, &mut BytesMut::new()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
    }

    #[test]
    fn read_record_bad_version_is_invalid_data() {
        let mut r = trickle(vec![9, 1, 0, 1, 0, 0, 0, 0], 8);
        let err = read_record(&mut r, &mut BytesMut::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("unsupported FastCGI version 9"));
    }

    #[test]
    fn read_record_passes_through_io_errors() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::ConnectionReset.into())
            }
        }
        let err = read_record(&mut Broken, &mut BytesMut::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn codec_decodes_and_reports_protocol_errors() {
        let mut codec = RecordCodec;
        let mut src = BytesMut::new();
        encode_record(STDOUT, 4, b"hi", &mut src);
        assert_eq!(
            codec.decode(&mut src).unwrap(),
            Some(record(STDOUT, 4, b"hi"))
        );
        assert!(codec.decode(&mut src).unwrap().is_none());

        src.extend_from_slice(&[1, 6, 0, 4, 0x10, 0, 0, 0]);
        assert!(codec.decode(&mut src).unwrap().is_none());
        assert!(
            src.capacity() >= HEADER_LEN + 0x1000,
            "reserves the rest of the record"
        );

        let mut bad = BytesMut::from(&[0u8; 8][..]);
        assert!(matches!(
            codec.decode(&mut bad),
            Err(CodecError::Protocol(ProtocolError::UnsupportedVersion(0)))
        ));
    }

    #[test]
    fn codec_splits_long_content_and_keeps_empty_records() {
        let mut codec = RecordCodec;
        let mut dst = BytesMut::new();
        let body = Bytes::from(vec![b'x'; MAX_CONTENT_LEN + 10]);
        codec
            .encode(
                Record {
                    kind: STDOUT,
                    request_id: 5,
                    content: body,
                },
                &mut dst,
            )
            .unwrap();
        codec.encode(record(STDOUT, 5, b""), &mut dst).unwrap();

        let mut lens = Vec::new();
        while let Some(r) = codec.decode(&mut dst).unwrap() {
            assert_eq!((r.kind, r.request_id), (STDOUT, 5));
            lens.push(r.content.len());
        }
        assert_eq!(lens, [MAX_CONTENT_LEN, 10, 0]);
    }

    /// What the encoder should turn one record into.
    fn expected_pieces(kind: u8, request_id: u16, content: &[u8]) -> Vec<Record> {
        if content.is_empty() {
            return vec![Record {
                kind,
                request_id,
                content: Bytes::new(),
            }];
        }
        content
            .chunks(MAX_CONTENT_LEN)
            .map(|c| Record {
                kind,
                request_id,
                content: Bytes::copy_from_slice(c),
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn codec_round_trips_any_records_through_any_chunking(
            records in prop::collection::vec(
                (any::<u8>(), any::<u16>(), prop::collection::vec(any::<u8>(), 0..70_000)),
                0..4,
            ),
            chunks in prop::collection::vec(prop_oneof![1usize..16, 1usize..70_000], 1..20),
        ) {
            let mut codec = RecordCodec;
            let mut wire = BytesMut::new();
            let mut expected = Vec::new();
            for (kind, id, content) in &records {
                expected.extend(expected_pieces(*kind, *id, content));
                codec
                    .encode(Record { kind: *kind, request_id: *id, content: Bytes::copy_from_slice(content) }, &mut wire)
                    .unwrap();
            }

            let mut src = BytesMut::new();
            let mut decoded = Vec::new();
            let mut rest = &wire[..];
            for size in chunks.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (head, tail) = rest.split_at((*size).min(rest.len()));
                src.extend_from_slice(head);
                rest = tail;
                while let Some(record) = codec.decode(&mut src).unwrap() {
                    decoded.push(record);
                }
            }
            prop_assert!(src.is_empty());
            prop_assert_eq!(&decoded, &expected);

            // The blocking reader must agree with the async codec.
            let mut r = trickle(wire.to_vec(), chunks[0]);
            let mut buf = BytesMut::new();
            let mut read = Vec::new();
            while let Some(record) = read_record(&mut r, &mut buf).unwrap() {
                read.push(record);
            }
            prop_assert_eq!(read, expected);
        }

        #[test]
        fn codec_decode_never_panics(data in prop::collection::vec(prop_oneof![Just(1u8), any::<u8>()], 0..600)) {
            let mut codec = RecordCodec;
            let mut src = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = codec.decode(&mut src) {}
        }
    }
}
