//! The request body, read whole before the request is queued: by its `Content-Length`, or de-chunked, into
//! memory or a temp file ([`BodyWriter`]), `--body-timeout` between two reads, `--max-body-size` in all.

use std::time::Duration;

use std::io::IoSlice;

use bytes::Buf;

use super::{read_some, write, Conn, Socket};
use crate::admission::refusal;
use crate::http1::{ChunkedDecoder, Framing, Step};
use crate::request::{Reply, RequestBody};
use crate::spill::BodyWriter;

/// The most body bytes read from the socket at a time.
const READ_CHUNK: usize = 64 << 10;

/// Why a body was not read to its end.
pub(super) enum Failed {
    /// Refused (400, 408, 413, 503): the answer to send, after which the connection closes.
    Answer(Reply),
    /// The client left mid-body (499).
    Gone,
}

impl<S: Socket> Conn<S> {
    pub(super) async fn read_body(
        &mut self,
        framing: Framing,
        expect_continue: bool,
        id: &str,
    ) -> Result<RequestBody, Failed> {
        let max = self.front.cfg.max_body_size;
        let declared = match framing {
            Framing::Empty | Framing::Length(0) => {
                return Ok(RequestBody::Memory(bytes::Bytes::new(), None))
            }
            Framing::Length(n) => Some(n),
            Framing::Chunked => None,
        };
        if declared.is_some_and(|n| n > max) {
            // Refused before a byte of it is read, and before the client is told to send it.
            return Err(Failed::Answer(refusal::too_large(id, max)));
        }
        if expect_continue && self.buf.is_empty() {
            let mut continue_ = [IoSlice::new(b"HTTP/1.1 100 Continue\r\n\r\n")];
            let limit = self.front.cfg.send_timeout;
            if let Err(e) = write::write_all(&mut self.io, &mut continue_, limit).await {
                tracing::debug!("could not send 100 Continue: {e}");
                return Err(Failed::Gone);
            }
        }
        let mut w = BodyWriter::new(crate::spill::settings(), declared);
        match declared {
            Some(n) => self.read_length(&mut w, n, id).await?,
            None => self.read_chunked(&mut w, max, id).await?,
        }
        w.finish()
            .await
            .map_err(|e| Failed::Answer(refusal::no_temp_file(id, &e)))
    }

    async fn read_length(&mut self, w: &mut BodyWriter, len: u64, id: &str) -> Result<(), Failed> {
        let mut left = len;
        loop {
            let take = usize::try_from(left).map_or(self.buf.len(), |l| l.min(self.buf.len()));
            if take > 0 {
                push(w, &self.buf[..take], id).await?;
                self.buf.advance(take);
                left -= take as u64;
            }
            if left == 0 {
                return Ok(());
            }
            let room = usize::try_from(left).map_or(READ_CHUNK, |l| l.min(READ_CHUNK));
            self.more(room, w.len(), id).await?;
        }
    }

    async fn read_chunked(&mut self, w: &mut BodyWriter, max: u64, id: &str) -> Result<(), Failed> {
        let mut decoder = ChunkedDecoder::new();
        loop {
            match decoder.decode(&self.buf) {
                Err(e) => {
                    tracing::debug!("bad chunked body: {e}");
                    return Err(Failed::Answer(refusal::bad_request(
                        id,
                        &format!("The request body could not be read: {e}."),
                    )));
                }
                Ok(Step::Data { used, len }) => {
                    if w.len() + len as u64 > max {
                        return Err(Failed::Answer(refusal::too_large(id, max)));
                    }
                    push(w, &self.buf[used..used + len], id).await?;
                    self.buf.advance(used + len);
                }
                Ok(Step::Done { used }) => {
                    self.buf.advance(used);
                    return Ok(());
                }
                Ok(Step::More { used }) => {
                    self.buf.advance(used);
                    self.more(READ_CHUNK, w.len(), id).await?;
                }
            }
        }
    }

    /// Reads more of the body into the buffer, within `--body-timeout`.
    async fn more(&mut self, room: usize, received: u64, id: &str) -> Result<(), Failed> {
        let limit: Duration = self.front.cfg.body_timeout;
        match tokio::time::timeout(limit, read_some(&self.io, &mut self.buf, room)).await {
            Err(_) => {
                tracing::debug!(received, "no body bytes for {limit:?}: 408");
                Err(Failed::Answer(refusal::body_timeout(id)))
            }
            Ok(Ok(0)) => {
                tracing::debug!(received, "the client left mid-body");
                Err(Failed::Gone)
            }
            Ok(Err(e)) => {
                tracing::debug!(received, "the client left mid-body: {e}");
                Err(Failed::Gone)
            }
            Ok(Ok(_)) => Ok(()),
        }
    }
}

async fn push(w: &mut BodyWriter, data: &[u8], id: &str) -> Result<(), Failed> {
    w.push(data)
        .await
        .map_err(|e| Failed::Answer(refusal::no_temp_file(id, &e)))
}
