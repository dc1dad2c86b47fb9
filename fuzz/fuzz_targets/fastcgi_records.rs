//! The FastCGI record decoder and pair decoder on arbitrary bytes, fed in arbitrary pieces: they must never
//! panic, never loop, and decoding what the encoder wrote must give it back.
#![no_main]

use anteroom::fastcgi;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| (*b as usize % 64) + 1);
    let mut buf = BytesMut::new();
    for chunk in data.chunks(split) {
        buf.extend_from_slice(chunk);
        loop {
            match fastcgi::decode_record(&mut buf) {
                Ok(Some(rec)) => {
                    let _ = fastcgi::decode_pairs(&rec.content);
                    let _ = fastcgi::BeginRequest::parse(&rec.content);
                    let _ = fastcgi::EndRequest::parse(&rec.content);
                    // Round trip: what we encode, we decode the same.
                    let mut out = BytesMut::new();
                    fastcgi::encode_record(rec.kind, rec.request_id, &rec.content, &mut out);
                    let back = fastcgi::decode_record(&mut out).unwrap().unwrap();
                    assert_eq!(back, rec);
                    assert!(out.is_empty());
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
