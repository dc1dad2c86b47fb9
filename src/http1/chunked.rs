//! The chunked body (RFC 9112 §7.1) of a request or of a worker's response, decoded incrementally from
//! whatever bytes have arrived.
//!
//! Strict on every byte where a lenient reader could find a different end of the body: a chunk size is 1 to
//! 16 hex digits (no sign, no `0x`, no whitespace before it), every line ends with CRLF, the data is followed
//! by CRLF. Chunk extensions are skipped (bounded, no control bytes); trailers are read and dropped
//! (bounded): nothing of them reaches a worker, which gets a body of known length.

/// The longest chunk-size line (size, extensions, CRLF), and the most trailer bytes in all.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("a chunk size is not hex digits")]
    Size,
    #[error("a chunk size overflows")]
    Overflow,
    #[error("a chunk line does not end with CRLF")]
    LineEnd,
    #[error("a chunk's data is not followed by CRLF")]
    DataEnd,
    #[error("a chunk extension is malformed")]
    Extension,
    #[error("a chunk line is longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("the trailers are larger than {MAX_TRAILERS} bytes")]
    TrailersTooLarge,
    #[error("a trailer line is malformed")]
    Trailer,
}

/// What the decoder found at the start of the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `used` framing bytes were consumed, and more are needed.
    More { used: usize },
    /// After `used` framing bytes come `len` bytes of data.
    Data { used: usize, len: usize },
    /// The body ended after `used` bytes (its trailers included).
    Done { used: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a size; `digits` read so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: chunk extensions, up to CR.
    Ext {
        size: u64,
        at: Ext,
    },
    /// CR seen at the end of a size line.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    /// In a trailer's name, up to its colon.
    TrailerName,
    /// In a trailer's value.
    Trailer,
    TrailerLf,
    /// CR of the final empty line seen.
    EndLf,
    Done,
}

/// Where in `*( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )` (RFC 9112 §7.1.1) a size
/// line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ext {
    /// Whitespace after the size or a value: a `;` must come.
    Bws,
    /// After `;`: a name must come.
    NameBws,
    Name,
    /// Whitespace after a name: `=` or `;` must come.
    NameEndBws,
    /// After `=`: a value must come.
    ValueBws,
    Token,
    Quoted,
    Escape,
    /// Right after a quoted value.
    ValueEnd,
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    line: usize,
    trailers: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: State::Size { size: 0, digits: 0 },
            line: 0,
            trailers: 0,
        }
    }
}

impl ChunkedDecoder {
    pub fn new() -> ChunkedDecoder {
        ChunkedDecoder::default()
    }

    /// Reads framing from the start of `buf` up to the next data, the end, or the end of `buf`.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Step, ChunkError> {
        let mut used = 0;
        loop {
            if let State::Data { left } = self.state {
                let avail = buf.len() - used;
                if avail == 0 {
                    return Ok(Step::More { used });
                }
                let len = usize::try_from(left).map_or(avail, |l| l.min(avail));
                let left = left - len as u64;
                self.state = if left == 0 {
                    State::DataCr
                } else {
                    State::Data { left }
                };
                return Ok(Step::Data { used, len });
            }
            if self.state == State::Done {
                return Ok(Step::Done { used });
            }
            let Some(&b) = buf.get(used) else {
                return Ok(Step::More { used });
            };
            used += 1;
            self.state = self.byte(b)?;
        }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn byte(&mut self, b: u8) -> Result<State, ChunkError> {
        Ok(match self.state {
            State::Size { size, digits } => {
                self.count_line()?;
                match (hex(b), b) {
                    (Some(d), _) => {
                        let size = size
                            .checked_mul(16)
                            .map(|s| s | u64::from(d))
                            .ok_or(ChunkError::Overflow)?;
                        State::Size {
                            size,
                            digits: digits.saturating_add(1),
                        }
                    }
                    _ if digits == 0 => return Err(ChunkError::Size),
                    (None, b'\r') => State::SizeLf { size },
                    (None, b' ' | b'\t') => State::Ext { size, at: Ext::Bws },
                    (None, b';') => State::Ext {
                        size,
                        at: Ext::NameBws,
                    },
                    _ => return Err(ChunkError::Size),
                }
            }
            State::Ext { size, at } => {
                self.count_line()?;
                match extension(at, b)? {
                    Some(at) => State::Ext { size, at },
                    None => State::SizeLf { size },
                }
            }
            State::SizeLf { size } => {
                if b != b'\n' {
                    return Err(ChunkError::LineEnd);
                }
                self.line = 0;
                if size == 0 {
                    State::TrailerStart
                } else {
                    State::Data { left: size }
                }
            }
            State::DataCr if b == b'\r' => State::DataLf,
            State::DataLf if b == b'\n' => State::Size { size: 0, digits: 0 },
            State::DataCr | State::DataLf => return Err(ChunkError::DataEnd),
            State::TrailerStart if b == b'\r' => State::EndLf,
            // A trailer is `name: value`; anything else (obs-fold, no name, a request line) is refused.
            State::TrailerStart | State::TrailerName if is_tchar(b) => {
                self.count_trailer()?;
                State::TrailerName
            }
            State::TrailerName if b == b':' => {
                self.count_trailer()?;
                State::Trailer
            }
            State::TrailerStart | State::TrailerName => return Err(ChunkError::Trailer),
            State::Trailer => {
                self.count_trailer()?;
                match b {
                    b'\r' => State::TrailerLf,
                    b'\t' => State::Trailer,
                    0..=0x1f | 0x7f => return Err(ChunkError::Trailer),
                    _ => State::Trailer,
                }
            }
            State::TrailerLf if b == b'\n' => State::TrailerStart,
            State::TrailerLf => return Err(ChunkError::LineEnd),
            State::EndLf if b == b'\n' => State::Done,
            State::EndLf => return Err(ChunkError::LineEnd),
            State::Data { .. } | State::Done => unreachable!("handled in decode"),
        })
    }

    fn count_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(ChunkError::TrailersTooLarge);
        }
        Ok(())
    }

    fn count_line(&mut self) -> Result<(), ChunkError> {
        self.line += 1;
        if self.line > MAX_LINE {
            return Err(ChunkError::LineTooLong);
        }
        Ok(())
    }
}

/// The next place in a chunk extension after `b`; None at the CR that ends the size line.
fn extension(at: Ext, b: u8) -> Result<Option<Ext>, ChunkError> {
    let ws = b == b' ' || b == b'\t';
    let next = match at {
        Ext::Bws if ws => Ext::Bws,
        Ext::Bws | Ext::Name | Ext::NameEndBws | Ext::Token | Ext::ValueEnd if b == b';' => {
            Ext::NameBws
        }
        Ext::NameBws if ws => Ext::NameBws,
        Ext::NameBws | Ext::Name if is_tchar(b) => Ext::Name,
        Ext::Name | Ext::Token | Ext::ValueEnd if b == b'\r' => return Ok(None),
        Ext::Name | Ext::NameEndBws if ws => Ext::NameEndBws,
        Ext::Name | Ext::NameEndBws if b == b'=' => Ext::ValueBws,
        Ext::ValueBws if ws => Ext::ValueBws,
        Ext::ValueBws if b == b'"' => Ext::Quoted,
        Ext::ValueBws | Ext::Token if is_tchar(b) => Ext::Token,
        Ext::Token | Ext::ValueEnd if ws => Ext::Bws,
        Ext::Quoted if b == b'"' => Ext::ValueEnd,
        Ext::Quoted if b == b'\\' => Ext::Escape,
        // qdtext, and what a quoted-pair may escape: HTAB, SP, visible and obs-text bytes.
        Ext::Quoted | Ext::Escape
            if b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80 =>
        {
            Ext::Quoted
        }
        _ => return Err(ChunkError::Extension),
    };
    Ok(Some(next))
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `raw` fed in pieces of `split` bytes: the data, and the bytes left after the body.
    fn decode(raw: &[u8], split: usize) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut d = ChunkedDecoder::new();
        let mut pending = Vec::new();
        let mut data = Vec::new();
        let mut fed = 0;
        loop {
            match d.decode(&pending)? {
                Step::More { used } => {
                    pending.drain(..used);
                    if fed == raw.len() {
                        return Err(ChunkError::LineEnd); // truncated: a test failure below
                    }
                    let end = (fed + split).min(raw.len());
                    pending.extend_from_slice(&raw[fed..end]);
                    fed = end;
                }
                Step::Data { used, len } => {
                    data.extend_from_slice(&pending[used..used + len]);
                    pending.drain(..used + len);
                }
                Step::Done { used } => {
                    pending.drain(..used);
                    return Ok((data, pending.len() + raw.len() - fed));
                }
            }
        }
    }

    #[test]
    fn decodes_in_any_split() {
        let raw =
            b"5 ; a ; b = c\r\nhello\r\nA;name=\"v\\\"\"\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nGET";
        for split in 1..raw.len() {
            let (data, left) = decode(raw, split).unwrap();
            assert_eq!(data, b"hello0123456789", "split {split}");
            assert_eq!(left, 3, "split {split}");
        }
    }

    #[test]
    fn refuses_what_could_be_read_two_ways() {
        for (bad, why) in [
            (&b"+5\r\nhello\r\n0\r\n\r\n"[..], ChunkError::Size),
            (b"-5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b" 5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"\r\n", ChunkError::Size),
            (b"5\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::DataEnd),
            (b"5\r\nhelloXX0\r\n\r\n", ChunkError::DataEnd),
            (b"5\rhello", ChunkError::LineEnd),
            (b"10000000000000000\r\n", ChunkError::Overflow),
            (b"5;a\0b\r\nhello\r\n0\r\n\r\n", ChunkError::Extension),
            (b"5 \r\nhello\r\n0\r\n\r\n", ChunkError::Extension),
            (b"5 x\r\n", ChunkError::Extension),
            (b"5;\r\n", ChunkError::Extension),
            (b"5;=v\r\n", ChunkError::Extension),
            (b"5;a=\"b\r\n", ChunkError::Extension),
            (b"0\r\nGET / HTTP/1.1\r\n\r\n", ChunkError::Trailer),
            (b"0\r\nX : 1\r\n\r\n", ChunkError::Trailer),
            (b"0\r\n folded\r\n\r\n", ChunkError::Trailer),
            (b"0\r\n\rX", ChunkError::LineEnd),
        ] {
            assert_eq!(
                decode(bad, 1).unwrap_err(),
                why,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn sizes_may_have_leading_zeros_up_to_the_line_limit() {
        let raw = b"0000000000000000000005\r\nhello\r\n0\r\n\r\n";
        assert_eq!(decode(raw, 7).unwrap().0, b"hello");
        assert_eq!(
            decode(b"ffffffffffffffff\r\n", 3).unwrap_err(),
            ChunkError::LineEnd // accepted as a size; the test's input then ends
        );
        let long = [&[b'0'; MAX_LINE + 1][..], b"\r\n"].concat();
        assert_eq!(decode(&long, 100).unwrap_err(), ChunkError::LineTooLong);
    }
}
