//! The response, written to the client: the head from [`http1::encode_head`] with the framing this
//! connection needs (the declared length, else chunked, else until close for HTTP/1.0), then the body as
//! the worker's bytes arrive, without copying them: the head, a chunk's size line, its data and its CRLF
//! go out in one `writev`. A write the client does not take for `--send-timeout` ends the connection,
//! which drops the response and whatever of it waited in memory or in a temp file.
//!
//! As it writes, it fills the request's [`Delivery`]: the body bytes the kernel took (nginx's
//! `$body_bytes_sent`, partial writes included), and why the response stopped short when it did (the
//! body broke off, the client left or took nothing for `--send-timeout`), which the access log and the
//! metrics then report.

use std::io::{self, IoSlice};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use http::header::{CONNECTION, CONTENT_LENGTH};
use http::{HeaderMap, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{read_some, Conn, Socket};
use crate::admission::Delivery;
use crate::http1::{self, BodyFraming};
use crate::metrics::Incomplete;
use crate::request::{Reply, REQUEST_ID};

/// How long a closing connection keeps reading (and dropping) what the client still sends.
const LINGER: Duration = Duration::from_secs(2);

impl<S: Socket> Conn<S> {
    /// Writes `reply` to a request of `version` (`is_head`: a HEAD request, answered without a body),
    /// noting in `sent` what the client took. `Ok(true)`: the connection can carry another request.
    pub(super) async fn write_response(
        &mut self,
        reply: Reply,
        is_head: bool,
        version: Version,
        keep_alive: bool,
        sent: &mut Delivery,
    ) -> io::Result<bool> {
        let (parts, body) = reply.into_parts();
        let framing = framing(parts.status, &parts.headers, &body, is_head, version);
        // A refusal that closes (408, a body left unread) says so itself.
        let keep_alive = keep_alive && !closes(&parts.headers) && framing != BodyFraming::Close;
        let mut head = Vec::with_capacity(256);
        http1::encode_head(
            parts.status,
            &parts.headers,
            framing,
            version,
            keep_alive,
            &mut head,
        );
        let mut out = Sender {
            io: &mut self.io,
            head: Some(head),
            framing,
            limit: self.front.cfg.send_timeout,
            sent,
            id: id(&parts.headers),
        };
        let written = if matches!(framing, BodyFraming::NoBody { .. }) {
            out.write(&[], &[], &[]).await.map(|()| true)
        } else {
            out.body(body).await
        };
        match written {
            Ok(whole) => Ok(keep_alive && whole),
            Err(e) => {
                out.sent.cut(match e.kind() {
                    io::ErrorKind::TimedOut => Incomplete::SendTimeout,
                    _ => Incomplete::ClientGone,
                });
                Err(e)
            }
        }
    }
}

/// How the body of this response is delimited: its declared length, else chunked, else until close for
/// HTTP/1.0; none at all for HEAD, 1xx, 204 and 304.
fn framing(
    status: StatusCode,
    headers: &HeaderMap,
    body: &crate::request::Body,
    is_head: bool,
    version: Version,
) -> BodyFraming {
    let declared = declared_length(headers);
    let length = declared.or_else(|| body.size_hint().exact());
    if is_head || status.is_informational() || status == StatusCode::NO_CONTENT {
        BodyFraming::NoBody {
            length: length.filter(|_| is_head),
        }
    } else if status == StatusCode::NOT_MODIFIED {
        BodyFraming::NoBody { length: declared }
    } else if let Some(n) = length {
        BodyFraming::Length(n)
    } else if version == Version::HTTP_11 {
        BodyFraming::Chunked
    } else {
        BodyFraming::Close
    }
}

/// One response body on its way out, with the head until it has been written.
struct Sender<'a, S> {
    io: &'a mut S,
    head: Option<Vec<u8>>,
    framing: BodyFraming,
    limit: Duration,
    /// What of the body the client has taken, and why it stopped short.
    sent: &'a mut Delivery,
    id: &'a str,
}

impl<S: Socket> Sender<'_, S> {
    /// Sends the body as it comes. `Ok(false)`: the client got less than a whole response (the body failed
    /// or ended short of its length), and the connection must close so that it can tell.
    async fn body(&mut self, mut body: crate::request::Body) -> io::Result<bool> {
        loop {
            let frame = if body.is_end_stream() {
                None
            } else if let Some(f) = body.frame().now_or_never() {
                f
            } else {
                // The worker's next bytes are not here yet: what we have goes out meanwhile.
                self.write(&[], &[], &[]).await?;
                body.frame().await
            };
            match frame {
                None => return self.end().await,
                Some(Err(e)) => {
                    tracing::warn!(
                        request_id = self.id,
                        "the response body failed mid-way: {e}"
                    );
                    self.sent.cut(Incomplete::AbortedUpstream);
                    self.write(&[], &[], &[]).await?;
                    return Ok(false);
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers: not passed on
                    };
                    if self.data(&data).await? {
                        // Whatever a worker sends beyond its declared length is not part of this response.
                        return self.end().await;
                    }
                }
            }
        }
    }

    /// Sends `data` in this response's framing; true once a declared length is complete.
    async fn data(&mut self, data: &[u8]) -> io::Result<bool> {
        if data.is_empty() {
            return Ok(false);
        }
        match self.framing {
            BodyFraming::Length(n) => {
                let room = usize::try_from(n - self.sent.body_bytes).unwrap_or(usize::MAX);
                let data = &data[..room.min(data.len())];
                self.write(&[], data, &[]).await?;
                Ok(self.sent.body_bytes == n)
            }
            BodyFraming::Chunked => {
                let size = format!("{:x}\r\n", data.len());
                self.write(size.as_bytes(), data, b"\r\n").await?;
                Ok(false)
            }
            BodyFraming::Close | BodyFraming::NoBody { .. } => {
                self.write(&[], data, &[]).await?;
                Ok(false)
            }
        }
    }

    async fn end(&mut self) -> io::Result<bool> {
        if self.framing == BodyFraming::Chunked {
            self.write(&[], &[], b"0\r\n\r\n").await?;
        } else {
            self.write(&[], &[], &[]).await?;
        }
        if let BodyFraming::Length(n) = self.framing {
            let sent = self.sent.body_bytes;
            if sent < n {
                tracing::warn!(
                    request_id = self.id,
                    "the response body ended after {sent} of the {n} bytes its Content-Length declared"
                );
                self.sent.cut(Incomplete::AbortedUpstream);
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes the head, if it has not gone yet, then `before`, the body's `data` and `after` (a chunk's
    /// framing), in one `writev` when the socket takes them; counts the bytes of `data` the socket took,
    /// also when it then fails.
    async fn write(&mut self, before: &[u8], data: &[u8], after: &[u8]) -> io::Result<()> {
        let head = self.head.take();
        let head = head.as_deref().unwrap_or_default();
        let mut slices = [
            IoSlice::new(head),
            IoSlice::new(before),
            IoSlice::new(data),
            IoSlice::new(after),
        ];
        let mut written = 0;
        let r = write_counted(self.io, &mut slices, self.limit, &mut written).await;
        let ahead = head.len() + before.len();
        let body = written.saturating_sub(ahead).min(data.len());
        self.sent.body_bytes += body as u64;
        r
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn closes(headers: &HeaderMap) -> bool {
    headers
        .get(CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
}

fn id(headers: &HeaderMap) -> &str {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

/// Writes all of `bufs`, each write within `limit` (nginx's `send_timeout`: the time between two writes
/// the client takes, not the whole transfer).
pub(super) async fn write_all<W: AsyncWrite + Unpin>(
    io: &mut W,
    bufs: &mut [IoSlice<'_>],
    limit: Duration,
) -> io::Result<()> {
    write_counted(io, bufs, limit, &mut 0).await
}

/// [`write_all`], adding to `written` the bytes the socket took, whether it then succeeds or fails.
async fn write_counted<W: AsyncWrite + Unpin>(
    io: &mut W,
    bufs: &mut [IoSlice<'_>],
    limit: Duration,
    written: &mut usize,
) -> io::Result<()> {
    let mut bufs = bufs;
    IoSlice::advance_slices(&mut bufs, 0);
    while bufs.iter().any(|b| !b.is_empty()) {
        let n = tokio::time::timeout(limit, io.write_vectored(bufs))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client took nothing"))??;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        *written += n;
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Closes a connection whose client may still be sending (a body we refused to read): our side first, then
/// its bytes are read and dropped for a while, so that closing does not reset the connection before the
/// client has read our answer.
pub(super) async fn linger<S: Socket>(io: &mut S) {
    let _ = io.shutdown().await;
    let mut sink = BytesMut::new();
    let _ = tokio::time::timeout(LINGER, async {
        loop {
            sink.clear();
            match read_some(io, &mut sink, 16 << 10).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}
