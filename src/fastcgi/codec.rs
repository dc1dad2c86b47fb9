//! A blocking record reader for simple synchronous apps.
//!
//! (A tokio-util `Decoder`/`Encoder` for `Framed` connections lived here too; neither the worker client nor
//! the FastCGI front used it, since both read records straight from their own buffers with
//! [`decode_record`], so it went, and with it tokio-util's `codec` feature.)

use std::io::{self, Read};

use super::{decode_record, Record};
use bytes::BytesMut;

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
        encode_record, encode_stream, encode_stream_end, BeginRequest, KEEP_CONN, MAX_CONTENT_LEN,
        PARAMS, RESPONDER, STDIN,
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

    /// A record as a connection writes it: long content split into several records, an empty one kept (it
    /// is usually a stream end).
    fn encode(rec: &Record, dst: &mut BytesMut) {
        if rec.content.is_empty() {
            encode_record(rec.kind, rec.request_id, &[], dst);
        } else {
            encode_stream(rec.kind, rec.request_id, &rec.content, dst);
        }
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
        fn records_round_trip_through_any_chunking(
            records in prop::collection::vec(
                (any::<u8>(), any::<u16>(), prop::collection::vec(any::<u8>(), 0..70_000)),
                0..4,
            ),
            chunks in prop::collection::vec(prop_oneof![1usize..16, 1usize..70_000], 1..20),
        ) {
            let mut wire = BytesMut::new();
            let mut expected = Vec::new();
            for (kind, id, content) in &records {
                expected.extend(expected_pieces(*kind, *id, content));
                encode(&Record { kind: *kind, request_id: *id, content: Bytes::copy_from_slice(content) }, &mut wire);
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
                while let Some(record) = decode_record(&mut src).unwrap() {
                    decoded.push(record);
                }
            }
            prop_assert!(src.is_empty());
            prop_assert_eq!(&decoded, &expected);

            // The blocking reader must agree with the buffer-level decoder.
            let mut r = trickle(wire.to_vec(), chunks[0]);
            let mut buf = BytesMut::new();
            let mut read = Vec::new();
            while let Some(record) = read_record(&mut r, &mut buf).unwrap() {
                read.push(record);
            }
            prop_assert_eq!(read, expected);
        }

        #[test]
        fn decode_never_panics(data in prop::collection::vec(prop_oneof![Just(1u8), any::<u8>()], 0..600)) {
            let mut src = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = decode_record(&mut src) {}
        }
    }
}
