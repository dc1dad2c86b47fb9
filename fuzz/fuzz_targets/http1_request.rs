//! The HTTP/1 request codec on arbitrary bytes, fed in arbitrary pieces: the head parser and the chunked
//! decoder must never panic nor loop, and must give the same answer whatever the pieces: a head is
//! Partial on every prefix shorter than its length and the same head after, and a chunked body decodes to
//! the same data, end and error fed at once or byte by byte.
#![no_main]

use anteroom::http1::{self, ChunkedDecoder, Framing, Limits, Parsed, Step};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits { max_head: 4096 };

fuzz_target!(|data: &[u8]| {
    let whole = http1::parse_request(data, LIMITS);
    let (head, len) = match whole {
        Ok(Parsed::Complete(head, len)) => (head, len),
        _ => {
            // Refused or partial: any prefix is partial or refused too, never a complete head.
            let cut = data.len() / 2;
            assert!(!matches!(
                http1::parse_request(&data[..cut], LIMITS),
                Ok(Parsed::Complete(..))
            ));
            return;
        }
    };
    assert!(len <= data.len() && len <= LIMITS.max_head);
    // The same head is found from the same bytes; shorter, it is not complete yet.
    match http1::parse_request(&data[..len], LIMITS) {
        Ok(Parsed::Complete(again, n)) => {
            assert_eq!(n, len);
            assert_eq!(again.uri, head.uri);
            assert_eq!(again.framing, head.framing);
        }
        other => panic!("the head's own bytes parse as {other:?}"),
    }
    assert!(matches!(
        http1::parse_request(&data[..len - 1], LIMITS),
        Ok(Parsed::Partial) | Err(_)
    ));
    if head.framing == Framing::Chunked {
        let body = &data[len..];
        let at_once = dechunk(body, body.len().max(1));
        let by_byte = dechunk(body, 1);
        assert_eq!(at_once, by_byte);
    }
});

/// Decodes `body` fed `split` bytes at a time: the data, and whether and where it ended, or its error.
fn dechunk(body: &[u8], split: usize) -> Result<(Vec<u8>, Option<usize>), http1::ChunkError> {
    let mut d = ChunkedDecoder::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut consumed = 0;
    let mut fed = 0;
    let mut out = Vec::new();
    loop {
        match d.decode(&pending)? {
            Step::Data { used, len } => {
                assert!(len > 0 && used + len <= pending.len());
                out.extend_from_slice(&pending[used..used + len]);
                pending.drain(..used + len);
                consumed += used + len;
            }
            Step::Done { used } => return Ok((out, Some(consumed + used))),
            Step::More { used } => {
                assert_eq!(used, pending.len(), "More leaves nothing unread");
                pending.clear();
                consumed += used;
                if fed == body.len() {
                    return Ok((out, None));
                }
                let end = (fed + split).min(body.len());
                pending.extend_from_slice(&body[fed..end]);
                fed = end;
            }
        }
    }
}
