//! Name-value pair bodies (PARAMS, GET_VALUES, GET_VALUES_RESULT).

use bytes::Bytes;

use super::ProtocolError;

/// Longest name or value the 31-bit length field can describe.
const MAX_PAIR_LEN: usize = 0x7fff_ffff;

/// Appends one name-value pair. Lengths below 128 take one byte, longer ones
/// four bytes with the high bit set.
///
/// A name or value longer than `0x7fff_ffff` bytes is an error, and then
/// nothing is written, so `out` never holds half a pair.
pub fn encode_pair(name: &[u8], value: &[u8], out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    for part in [name, value] {
        if part.len() > MAX_PAIR_LEN {
            return Err(ProtocolError::PairTooLong(part.len()));
        }
    }
    out.reserve(8 + name.len() + value.len());
    put_len(name.len(), out);
    put_len(value.len(), out);
    out.extend_from_slice(name);
    out.extend_from_slice(value);
    Ok(())
}

/// Callers have checked `len <= MAX_PAIR_LEN`, so it fits in 31 bits.
fn put_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        out.extend_from_slice(&((len as u32) | 0x8000_0000).to_be_bytes());
    }
}

/// Decodes a complete pairs body (the concatenation of all PARAMS records'
/// contents, since a pair may straddle records). Truncation or a length that
/// overruns the data is an error.
pub fn decode_pairs(data: &[u8]) -> Result<Vec<(Bytes, Bytes)>, ProtocolError> {
    let mut pairs = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let name_len = take_len(&mut rest)?;
        let value_len = take_len(&mut rest)?;
        let name = take(&mut rest, name_len)?;
        let value = take(&mut rest, value_len)?;
        pairs.push((Bytes::copy_from_slice(name), Bytes::copy_from_slice(value)));
    }
    Ok(pairs)
}

fn take_len(rest: &mut &[u8]) -> Result<usize, ProtocolError> {
    match *rest {
        [b, tail @ ..] if b & 0x80 == 0 => {
            *rest = tail;
            Ok(usize::from(*b))
        }
        [b0, b1, b2, b3, tail @ ..] => {
            *rest = tail;
            let len = u32::from_be_bytes([b0 & 0x7f, *b1, *b2, *b3]);
            // u32 -> usize only fails on 16-bit targets, where such a length
            // could never be satisfied by the data anyway.
            usize::try_from(len).map_err(|_| ProtocolError::TruncatedPair)
        }
        _ => Err(ProtocolError::TruncatedPair),
    }
}

fn take<'a>(rest: &mut &'a [u8], len: usize) -> Result<&'a [u8], ProtocolError> {
    if len > rest.len() {
        return Err(ProtocolError::PairOverrun {
            declared: len,
            available: rest.len(),
        });
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(name: &[u8], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_pair(name, value, &mut out).unwrap();
        out
    }

    #[test]
    fn short_lengths_take_one_byte() {
        let mut expected = vec![0x0f, 0x02];
        expected.extend_from_slice(b"SCRIPT_FILENAME/x");
        assert_eq!(encoded(b"SCRIPT_FILENAME", b"/x"), expected);
        assert_eq!(encoded(b"", b""), [0, 0]);
    }

    #[test]
    fn length_boundary_127_128() {
        let v127 = vec![b'a'; 127];
        let out = encoded(b"N", &v127);
        assert_eq!(&out[..3], [0x01, 0x7f, b'N']);
        assert_eq!(out.len(), 2 + 1 + 127);

        let v128 = vec![b'a'; 128];
        let out = encoded(b"N", &v128);
        assert_eq!(&out[..6], [0x01, 0x80, 0x00, 0x00, 0x80, b'N']);
        assert_eq!(out.len(), 5 + 1 + 128);

        let out = encoded(&v128, b"v");
        assert_eq!(&out[..5], [0x80, 0x00, 0x00, 0x80, 0x01]);

        for (name, value) in [(&v127, &v128), (&v128, &v127)] {
            let decoded = decode_pairs(&encoded(name, value)).unwrap();
            assert_eq!(
                decoded,
                [(Bytes::from(name.clone()), Bytes::from(value.clone()))]
            );
        }
    }

    #[test]
    fn decoder_accepts_four_byte_form_for_short_lengths() {
        // Legal though wasteful; some encoders always use the long form.
        let data = [0x80, 0, 0, 1, 0x80, 0, 0, 2, b'A', b'x', b'y'];
        assert_eq!(
            decode_pairs(&data).unwrap(),
            [(Bytes::from_static(b"A"), Bytes::from_static(b"xy"))]
        );
    }

    #[test]
    fn decodes_several_pairs() {
        let mut data = Vec::new();
        encode_pair(b"REQUEST_METHOD", b"GET", &mut data).unwrap();
        encode_pair(b"QUERY_STRING", b"", &mut data).unwrap();
        encode_pair(b"HTTP_X", &[0xff; 300], &mut data).unwrap();
        let pairs = decode_pairs(&data).unwrap();
        assert_eq!(pairs.len(), 3);
        assert_eq!(&pairs[0].0[..], b"REQUEST_METHOD");
        assert_eq!(&pairs[0].1[..], b"GET");
        assert!(pairs[1].1.is_empty());
        assert_eq!(pairs[2].1.len(), 300);
        assert_eq!(decode_pairs(&[]).unwrap(), []);
    }

    #[test]
    fn truncated_lengths_are_errors() {
        // Name length present, value length missing.
        assert_eq!(decode_pairs(&[3]), Err(ProtocolError::TruncatedPair));
        // Four-byte length cut short.
        assert_eq!(
            decode_pairs(&[0x80, 0, 1]),
            Err(ProtocolError::TruncatedPair)
        );
        assert_eq!(
            decode_pairs(&[1, 0x80, 0]),
            Err(ProtocolError::TruncatedPair)
        );
    }

    #[test]
    fn lengths_overrunning_the_data_are_errors() {
        assert_eq!(
            decode_pairs(&[3, 1, b'a', b'b']),
            Err(ProtocolError::PairOverrun {
                declared: 3,
                available: 2
            })
        );
        assert_eq!(
            decode_pairs(&[1, 2, b'a', b'b']),
            Err(ProtocolError::PairOverrun {
                declared: 2,
                available: 1
            })
        );
        assert_eq!(
            decode_pairs(&[0xff, 0xff, 0xff, 0xff, 0, b'a']),
            Err(ProtocolError::PairOverrun {
                declared: 0x7fff_ffff,
                available: 1
            })
        );
        // A good pair followed by a cut one still fails as a whole.
        let mut data = encoded(b"A", b"b");
        data.extend_from_slice(&[5, 5, b'x']);
        assert!(decode_pairs(&data).is_err());
    }

    #[test]
    fn encode_rejects_oversized_without_writing() {
        // A zero-filled allocation this size is lazily mapped, so it is cheap.
        let huge = vec![0u8; MAX_PAIR_LEN + 1];
        let mut out = vec![9];
        assert_eq!(
            encode_pair(&huge, b"", &mut out),
            Err(ProtocolError::PairTooLong(MAX_PAIR_LEN + 1))
        );
        assert_eq!(
            encode_pair(b"n", &huge, &mut out),
            Err(ProtocolError::PairTooLong(MAX_PAIR_LEN + 1))
        );
        assert_eq!(out, [9]);
    }

    proptest! {
        #[test]
        fn pairs_round_trip(
            pairs in prop::collection::vec(
                (
                    prop::collection::vec(any::<u8>(), 0..300),
                    prop::collection::vec(any::<u8>(), 0..300),
                ),
                0..10,
            )
        ) {
            let mut data = Vec::new();
            for (name, value) in &pairs {
                encode_pair(name, value, &mut data).unwrap();
            }
            let decoded = decode_pairs(&data).unwrap();
            let expected: Vec<(Bytes, Bytes)> = pairs
                .into_iter()
                .map(|(n, v)| (Bytes::from(n), Bytes::from(v)))
                .collect();
            prop_assert_eq!(decoded, expected);
        }

        #[test]
        fn decode_pairs_never_panics(
            // Small bytes make plausible lengths, so decoding gets past the first pair.
            data in prop::collection::vec(prop_oneof![0u8..8, any::<u8>()], 0..300),
        ) {
            let _ = decode_pairs(&data);
        }
    }
}
