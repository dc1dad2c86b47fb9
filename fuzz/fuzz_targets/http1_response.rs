//! A worker's response on arbitrary bytes, as `worker/http` reads it: interim heads skipped, then the final
//! head, then a chunked body. The parser must never panic nor loop, and must give the same answer whatever
//! the pieces: a head is Partial on every prefix shorter than its length and the same head after, and a
//! chunked body decodes to the same data, end and error fed at once or byte by byte.
#![no_main]

use anteroom::http1::{self, ChunkedDecoder, ParsedResponse, ResponseFraming, Step};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&flags, mut data)) = input.split_first() else {
        return;
    };
    let is_head = flags & 1 == 1;
    // At most a few interim heads, as a worker may send 100 Continue and 103 Early Hints.
    for _ in 0..4 {
        let (head, len) = match http1::parse_response(data, is_head) {
            Ok(ParsedResponse::Interim(len)) => {
                assert!(len > 0 && len <= data.len());
                same_prefixes(&data[..len], is_head);
                data = &data[len..];
                continue;
            }
            Ok(ParsedResponse::Complete(head, len)) => (head, len),
            _ => {
                let cut = data.len() / 2;
                assert!(!matches!(
                    http1::parse_response(&data[..cut], is_head),
                    Ok(ParsedResponse::Complete(..) | ParsedResponse::Interim(_))
                ));
                return;
            }
        };
        assert!(len <= data.len() && len <= http1::MAX_RESPONSE_HEAD);
        assert!(!head.status.is_informational());
        if is_head {
            assert_eq!(head.framing, ResponseFraming::Empty);
        }
        same_prefixes(&data[..len], is_head);
        if head.framing == ResponseFraming::Chunked {
            let body = &data[len..];
            assert_eq!(dechunk(body, body.len().max(1)), dechunk(body, 1));
        }
        return;
    }
});

/// The head's own bytes give the same answer; any shorter prefix is partial or refused.
fn same_prefixes(head: &[u8], is_head: bool) {
    let whole = http1::parse_response(head, is_head);
    assert!(matches!(
        whole,
        Ok(ParsedResponse::Complete(..) | ParsedResponse::Interim(_))
    ));
    assert!(matches!(
        http1::parse_response(&head[..head.len() - 1], is_head),
        Ok(ParsedResponse::Partial) | Err(_)
    ));
}

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
