//! The HTTP client side: one request at a time to a worker that speaks HTTP/1.1 (gunicorn and the like),
//! served whole on the slot's own task.
//!
//! Why not hyper's client: it runs each connection as a task of its own, reached through channels (a spawn
//! per connection and two task hand-offs per request), and shuts a connection down before closing it,
//! which wakes the worker's process once more for nothing. Towards gunicorn's sync worker, which closes
//! every connection after its response, that was about a third of anteroom's CPU per request. Here the
//! slot's task connects, writes the request head and a small body in one `writev`, reads the answer into
//! one buffer, and closes: the codec is [`crate::http1::parse_response`] and its chunked decoder.
//!
//! A small body of known length (up to [`super::WHOLE_BODY`]), or a chunked one already complete in what
//! was read with its head, is handed to the client in one piece, the read buffer itself becoming its body.
//! A larger or unsized one streams through a [`ChannelBody`], which spills what the client has not read
//! beyond `--response-buffer-size` to a temp file. A body cut short (the worker closed before its
//! Content-Length or its last chunk) is a 502 while the head has not gone to the client, and aborts the
//! client's response once it has: the client's connection is closed mid-body, never ended as if whole.

use std::io::{self, IoSlice};
use std::path::Path;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_LENGTH, HOST};
use http::{Method, Response};
use http_body_util::BodyExt;
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use super::{BadResponse, Progress, WorkerError};
use crate::cgi::is_hop_by_hop;
use crate::http1::{self, ChunkedDecoder, ParsedResponse, ResponseFraming, ResponseHead, Step};
use crate::request::{ChannelBody, Job, REQUEST_ID};
use crate::spill::BodyStream;

/// The first read's buffer: a trivial app's whole answer, head and body, fits in it.
const FIRST_READ: usize = 4 << 10;
/// A streamed body is read into buffers of this size; its pieces share a buffer's allocation, so that a
/// worker writing in small pieces does not cost a buffer per piece.
const RELAY_READ: usize = 64 << 10;
/// With less room than this left in a buffer, the next read takes a new one.
const MIN_ROOM: usize = 2 << 10;

pub struct HttpConn {
    io: UnixStream,
    /// False once the worker said it closes the connection after its response (`Connection: close`, as
    /// gunicorn's sync worker does on every one, HTTP/1.0 without keep-alive, a body delimited by the
    /// close), or left the exchange in doubt (bytes beyond its response, a request it did not read whole):
    /// reusing it would race the worker's close or misread its next answer.
    keep: bool,
}

/// The worker's answer as far as it was read while nothing had gone to the client.
enum Answer {
    /// Complete, body and all.
    Whole(http::response::Parts, Bytes),
    /// The head, the body's pieces decoded so far, what reads the rest, and the bytes read past them.
    Stream(http::response::Parts, Vec<Bytes>, BodyReader, BytesMut),
}

/// The rest of a streamed body, in its framing.
enum BodyReader {
    /// This many bytes are left.
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Until the worker closes.
    Close,
}

/// What [`BodyReader::next`] found in the bytes read so far.
enum Piece {
    Data(Bytes),
    More,
    Done,
}

impl BodyReader {
    /// The next piece of body out of `buf` (without copying it), or whether more must be read first.
    fn next(&mut self, buf: &mut BytesMut) -> Result<Piece, http1::ChunkError> {
        match self {
            BodyReader::Length(0) => Ok(Piece::Done),
            BodyReader::Length(_) | BodyReader::Close if buf.is_empty() => Ok(Piece::More),
            BodyReader::Length(left) => {
                let n = usize::try_from(*left).map_or(buf.len(), |l| l.min(buf.len()));
                *left -= n as u64;
                Ok(Piece::Data(buf.split_to(n).freeze()))
            }
            BodyReader::Close => Ok(Piece::Data(buf.split().freeze())),
            BodyReader::Chunked(d) => Ok(match d.decode(buf)? {
                Step::More { used } => {
                    buf.advance(used);
                    Piece::More
                }
                Step::Data { used, len } => {
                    buf.advance(used);
                    Piece::Data(buf.split_to(len).freeze())
                }
                Step::Done { used } => {
                    buf.advance(used);
                    Piece::Done
                }
            }),
        }
    }
}

impl HttpConn {
    /// Connects without waiting on the runtime: a unix socket's connect completes at once, or fails (a full
    /// backlog is `EAGAIN`, an error here as it was with tokio's own connect).
    pub async fn connect(path: &Path) -> Result<HttpConn, WorkerError> {
        let connect = || -> io::Result<UnixStream> {
            let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
            socket.connect(&SockAddr::unix(path)?)?;
            UnixStream::from_std(std::os::unix::net::UnixStream::from(socket))
        };
        let io = connect().map_err(WorkerError::Connect)?;
        Ok(HttpConn { io, keep: true })
    }

    /// Whether a kept-alive connection may carry the next request: the worker has not closed it nor sent
    /// anything unasked. Costs no system call while the socket has not become readable.
    pub fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    pub fn keep(&self) -> bool {
        self.keep
    }

    pub async fn serve(
        &mut self,
        job: &mut Job,
        progress: &mut Progress,
    ) -> Result<(), WorkerError> {
        let head = encode_request(job);
        progress.sent_bytes = job.body.len() as u64;
        let is_head = job.head.method == Method::HEAD;
        let body = job.body.stream();
        self.keep = false;
        let answer = {
            let (id, reply) = (&job.id, &mut job.reply);
            let gone = async {
                match reply {
                    Some(r) => r.closed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                a = self.exchange(head, body, is_head, id, progress) => a?,
                // Dropping the connection is how an HTTP worker learns that nobody waits any more.
                () = gone => return Err(WorkerError::ClientGone),
            }
        };
        match answer {
            Answer::Whole(parts, body) => {
                let body = crate::spill::whole(crate::spill::settings(), body).await;
                job.respond(Response::from_parts(parts, body));
                progress.head_sent = true;
                Ok(())
            }
            Answer::Stream(parts, first, reader, buf) => {
                self.relay(parts, first, reader, buf, job, progress).await
            }
        }
    }

    /// Sends the request and reads the answer up to what can go to the client: all of it when it is
    /// small, else its head and what came with it.
    async fn exchange(
        &mut self,
        request: Vec<u8>,
        body: BodyStream,
        is_head: bool,
        id: &str,
        progress: &mut Progress,
    ) -> Result<Answer, WorkerError> {
        let mut buf = BytesMut::with_capacity(FIRST_READ);
        let sent_whole = self
            .send(&request, body, &mut buf, is_head, progress)
            .await?;
        drop(request);
        let (head, len) = loop {
            match http1::parse_response(&buf, is_head) {
                Ok(ParsedResponse::Complete(head, len)) => break (head, len),
                // 100 Continue and the like: the final head follows.
                Ok(ParsedResponse::Interim(len)) => {
                    buf.advance(len);
                    continue;
                }
                Ok(ParsedResponse::Partial) => {}
                Err(e) => return Err(BadResponse::Http(e).into()),
            }
            if self.read(&mut buf, progress).await? == 0 {
                // Not a byte: the worker closed before answering (`Closed`, progress says whether
                // anything came at all).
                return Err(WorkerError::Closed);
            }
        };
        buf.advance(len);
        self.keep = head.keep_alive && sent_whole;
        let framing = head.framing;
        let parts = parts(head);
        match framing {
            ResponseFraming::Empty => {
                self.keep &= buf.is_empty();
                Ok(Answer::Whole(parts, Bytes::new()))
            }
            ResponseFraming::Length(n) if n <= super::WHOLE_BODY as u64 => {
                let n = n as usize;
                // One allocation that becomes the client's body.
                buf.reserve(n.saturating_sub(buf.len()));
                while buf.len() < n {
                    if self.read_into(&mut buf, progress).await? == 0 {
                        tracing::warn!(
                            request_id = id,
                            "the worker closed the connection after {} of the {n} bytes its \
                             Content-Length declared",
                            buf.len()
                        );
                        return Err(WorkerError::Closed);
                    }
                }
                // Bytes beyond the declared length: the worker's framing is in doubt.
                self.keep &= buf.len() == n;
                Ok(Answer::Whole(parts, buf.split_to(n).freeze()))
            }
            ResponseFraming::Length(n) => Ok(Answer::Stream(
                parts,
                Vec::new(),
                BodyReader::Length(n),
                buf,
            )),
            ResponseFraming::Chunked => {
                let mut reader = BodyReader::Chunked(ChunkedDecoder::new());
                let mut pieces = Vec::new();
                loop {
                    match reader.next(&mut buf).map_err(BadResponse::Chunked)? {
                        Piece::Data(b) => pieces.push(b),
                        Piece::More => return Ok(Answer::Stream(parts, pieces, reader, buf)),
                        // Complete in what came with the head: sent whole, with its length.
                        Piece::Done => {
                            self.keep &= buf.is_empty();
                            return Ok(Answer::Whole(parts, concat(pieces)));
                        }
                    }
                }
            }
            ResponseFraming::Close => Ok(Answer::Stream(parts, Vec::new(), BodyReader::Close, buf)),
        }
    }

    /// A large or unsized body: the head goes to the client now, the body follows through a channel
    /// (which spills what the client has not read) as it is read.
    async fn relay(
        &mut self,
        parts: http::response::Parts,
        first: Vec<Bytes>,
        mut reader: BodyReader,
        mut buf: BytesMut,
        job: &mut Job,
        progress: &mut Progress,
    ) -> Result<(), WorkerError> {
        let (mut tx, body) = ChannelBody::new();
        job.respond(Response::from_parts(parts, body.boxed_unsync()));
        progress.head_sent = true;
        for piece in first {
            tx.send(piece).await;
        }
        loop {
            match reader.next(&mut buf) {
                Ok(Piece::Data(b)) => {
                    tx.send(b).await;
                    continue;
                }
                Ok(Piece::Done) => break,
                Ok(Piece::More) => {}
                Err(e) => {
                    tx.fail("the worker's response was cut short");
                    return Err(BadResponse::Chunked(e).into());
                }
            }
            let read = tokio::select! {
                r = self.read(&mut buf, progress) => r,
                () = tx.closed() => return Err(WorkerError::ClientGone),
            };
            match read {
                Ok(0) if matches!(reader, BodyReader::Close) => break,
                Ok(0) => {
                    let left = match &reader {
                        BodyReader::Length(n) => format!("{n} bytes short of its Content-Length"),
                        _ => "before its last chunk".to_string(),
                    };
                    tracing::warn!(
                        request_id = %job.id,
                        "the worker closed the connection {left}: the client's response is aborted"
                    );
                    tx.fail("the worker's response was cut short");
                    return Err(WorkerError::Closed);
                }
                Ok(_) => {}
                Err(e) => {
                    tx.fail("the worker's response was cut short");
                    return Err(e);
                }
            }
        }
        // Whatever follows a delimited body is not part of it.
        self.keep &= buf.is_empty() && !matches!(reader, BodyReader::Close);
        tx.finish();
        Ok(())
    }

    /// Writes the request: its head and first chunk of body in one `writev`, tried at once (a fresh
    /// socket has room; waiting for the runtime to say so would cost a turn of its loop), then the rest.
    /// `Ok(false)`: the worker closed its end after taking part of it; its answer (a 413, say) is still
    /// to be read.
    ///
    /// Meanwhile the worker's answer is watched for: one that answers before it has read the whole request
    /// (an app refusing an upload), with more than the socket holds, would wait for us to read while we
    /// waited for it to read. Once its final head is in (or it closed), the rest of the body is not sent,
    /// `Ok(false)`, and what it sent is in `buf` for [`Self::exchange`] to read on from.
    async fn send(
        &mut self,
        head: &[u8],
        mut body: BodyStream,
        buf: &mut BytesMut,
        is_head: bool,
        progress: &mut Progress,
    ) -> Result<bool, WorkerError> {
        let first = body.next_chunk().await.map_err(WorkerError::Io)?;
        let first = first.unwrap_or_default();
        let mut written = 0;
        let mut next: [&[u8]; 2] = [head, &first];
        let mut chunk;
        let r = loop {
            let write = write_all(&self.io, &next, &mut written);
            let answered = answered_early(&self.io, buf, is_head, &mut progress.received_bytes);
            // Biased: a write that completes at once (most do) never polls the watch, which would cost a
            // `recvfrom` per request on a kept-alive connection whose readiness is left from its last answer.
            tokio::select! {
                biased;
                r = write => if r.is_err() { break r },
                a = answered => {
                    a?;
                    return Ok(false);
                }
            }
            chunk = match body.next_chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break Ok(()),
                // Our temp file, not the worker: whatever was sent, the exchange is off.
                Err(e) => return Err(WorkerError::Io(e)),
            };
            next = [&chunk, &[]];
        };
        match r {
            Ok(()) => Ok(true),
            // Not a byte went: a kept-alive connection the worker had closed (EPIPE).
            Err(e) if written == 0 => Err(WorkerError::NotDelivered(e)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(WorkerError::Io(e)),
        }
    }

    /// Reads what has come into `buf`, into a new buffer when this one is nearly full; 0 at the end.
    async fn read(
        &mut self,
        buf: &mut BytesMut,
        progress: &mut Progress,
    ) -> Result<usize, WorkerError> {
        if buf.capacity() - buf.len() < MIN_ROOM {
            buf.reserve(RELAY_READ.max(buf.len()));
        }
        self.read_into(buf, progress).await
    }

    /// Reads into the room `buf` has (some must be left).
    async fn read_into(
        &mut self,
        buf: &mut BytesMut,
        progress: &mut Progress,
    ) -> Result<usize, WorkerError> {
        let n = self.io.read_buf(buf).await?;
        progress.received_bytes += n as u64;
        Ok(n)
    }
}

/// Resolves once the worker has sent a final head (or bytes that are none, or closed) before the request
/// went whole; what it sent is left in `buf`. Interim heads (1xx) do not count: the worker still reads.
async fn answered_early(
    io: &UnixStream,
    buf: &mut BytesMut,
    is_head: bool,
    received: &mut u64,
) -> Result<(), WorkerError> {
    loop {
        io.readable().await?;
        if buf.capacity() - buf.len() < MIN_ROOM {
            buf.reserve(FIRST_READ);
        }
        match io.try_read_buf(buf) {
            // Closed: the reads that follow find the end.
            Ok(0) => return Ok(()),
            Ok(n) => *received += n as u64,
            // Readiness left from the previous answer on a kept-alive connection.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
        let mut at = 0;
        loop {
            match http1::parse_response(&buf[at..], is_head) {
                Ok(ParsedResponse::Interim(len)) => at += len,
                Ok(ParsedResponse::Partial) => break,
                // A final head, or a bad one: the exchange reads on from `buf` and judges it.
                Ok(ParsedResponse::Complete(..)) | Err(_) => return Ok(()),
            }
        }
    }
}

/// Writes all of `parts`, counting into `written` what went.
async fn write_all(io: &UnixStream, parts: &[&[u8]], written: &mut usize) -> io::Result<()> {
    let mut storage = [IoSlice::new(&[]); 2];
    for (s, p) in storage.iter_mut().zip(parts) {
        *s = IoSlice::new(p);
    }
    let mut slices = &mut storage[..parts.len().min(2)];
    IoSlice::advance_slices(&mut slices, 0);
    let mut first = true;
    while !slices.is_empty() {
        let n = if std::mem::take(&mut first) {
            // Straight to the kernel: tokio would wait for a readiness event first on a new socket.
            match rustix::io::writev(io, slices) {
                Ok(n) => n,
                Err(e) if e == rustix::io::Errno::AGAIN => continue,
                Err(e) => return Err(e.into()),
            }
        } else {
            io.writable().await?;
            match io.try_write_vectored(slices) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        *written += n;
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// The pieces of a body as one.
fn concat(mut pieces: Vec<Bytes>) -> Bytes {
    if pieces.len() <= 1 {
        return pieces.pop().unwrap_or_default();
    }
    let mut all = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
    for p in pieces {
        all.extend_from_slice(&p);
    }
    all.freeze()
}

/// The response for the client: the worker's status and headers without the hop-by-hop ones, in HTTP/1.1.
fn parts(head: ResponseHead) -> http::response::Parts {
    let mut headers = head.headers;
    if headers.keys().any(is_hop_by_hop) {
        let hop: Vec<_> = headers
            .keys()
            .filter(|n| is_hop_by_hop(n))
            .cloned()
            .collect();
        for n in hop {
            headers.remove(n);
        }
    }
    let mut resp = Response::new(());
    *resp.status_mut() = head.status;
    *resp.headers_mut() = headers;
    resp.into_parts().0
}

/// The request head for the worker, in HTTP/1.1.
fn encode_request(job: &Job) -> Vec<u8> {
    let head = &job.head;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        head.uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // The peer that connected, as any proxy appends it: the worker's own trusted-proxy rules then decide.
    let xff = job.origin.hop().and_then(|peer| {
        let ip = peer.ip().to_string();
        let v = match head
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        HeaderValue::from_str(&v).ok()
    });
    // The fronts have removed hop-by-hop headers and names with `_` (`RequestHead::check`); this holds for
    // any `Job`, as `cgi::params` does for FastCGI workers.
    for (name, value) in &head.headers {
        let forwarded = !is_hop_by_hop(name) && !name.as_str().contains('_');
        let ours = name == CONTENT_LENGTH
            || name == REQUEST_ID
            || (xff.is_some() && name == "x-forwarded-for");
        if forwarded && !ours {
            header(&mut out, name.as_str(), value.as_bytes());
        }
    }
    if !head.headers.contains_key(HOST) {
        // HTTP/1.0 clients may send none; HTTP/1.1 requires one towards the worker.
        header(&mut out, "host", b"localhost");
    }
    if !job.body.is_empty() || head.headers.contains_key(CONTENT_LENGTH) {
        header(
            &mut out,
            "content-length",
            job.body.len().to_string().as_bytes(),
        );
    }
    if HeaderValue::from_str(&job.id).is_ok() {
        header(&mut out, REQUEST_ID, job.id.as_bytes());
    }
    if let Some(v) = xff {
        header(&mut out, "x-forwarded-for", v.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    /// The request line and headers of a head `encode_request` wrote.
    fn headers_of(raw: &[u8]) -> (String, HeaderMap) {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        assert!(req.parse(raw).unwrap().is_complete());
        let line = format!("{} {}", req.method.unwrap(), req.path.unwrap());
        let mut h = HeaderMap::new();
        for x in req.headers.iter() {
            h.append(
                http::HeaderName::from_bytes(x.name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(x.value).unwrap(),
            );
        }
        (line, h)
    }

    #[test]
    fn the_request_for_the_worker() {
        let mut job = crate::request::tests::job("/a/b?c=d");
        job.head
            .headers
            .insert("x-a", HeaderValue::from_static("1"));
        job.head
            .headers
            .insert("x_b", HeaderValue::from_static("2"));
        job.head
            .headers
            .insert("connection", HeaderValue::from_static("close"));
        job.head
            .headers
            .insert(REQUEST_ID, HeaderValue::from_static("forged"));
        let (line, h) = headers_of(&encode_request(&job));
        assert_eq!(line, "GET /a/b?c=d");
        assert_eq!(h["x-a"], "1");
        assert_eq!(h["host"], "localhost");
        assert_eq!(h.get_all(REQUEST_ID).iter().count(), 1);
        assert_eq!(h[REQUEST_ID], job.id.as_str());
        for absent in ["x_b", "connection", "content-length"] {
            assert!(!h.contains_key(absent), "{absent}: {h:?}");
        }
        job.body = Bytes::from_static(b"hello").into();
        let (_, h) = headers_of(&encode_request(&job));
        assert_eq!(h["content-length"], "5");
    }
}
