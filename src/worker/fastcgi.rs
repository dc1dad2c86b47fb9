//! The FastCGI client side: one request at a time to a worker such as php-cgi, Perl FCGI or flup.
//!
//! The request body goes out as STDIN records a chunk at a time, from memory or from its temp file. The
//! response is held until it is complete or larger than 256 KiB (to send a Content-Length); a larger one
//! streams through a [`ChannelBody`], which keeps what the client has not read within
//! `--response-buffer-size` of memory and spills the rest to a temp file.

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;

use bytes::BytesMut;
use http::Response;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Notify;

use super::{BadResponse, Progress, WorkerError};
use crate::cgi;
use crate::fastcgi::{self as fcgi, BeginRequest, EndRequest};
use crate::request::{BodySender, ChannelBody, Job};

/// Requests on a connection are serial, so one id is enough; 0 is reserved for management records.
const REQUEST_ID: u16 = 1;
/// A CGI response head larger than this is not a head but a worker that forgot the blank line.
const MAX_HEAD: usize = 64 << 10;

pub struct FcgiConn {
    stream: UnixStream,
    buf: BytesMut,
    keep: bool,
}

impl FcgiConn {
    pub async fn connect(path: &Path) -> Result<FcgiConn, WorkerError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(WorkerError::Connect)?;
        Ok(FcgiConn {
            stream,
            buf: BytesMut::with_capacity(16 << 10),
            keep: true,
        })
    }

    /// False once the worker has closed its end (for instance after its own max-requests).
    pub fn is_open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    pub fn keep(&self) -> bool {
        self.keep
    }

    pub async fn serve(
        &mut self,
        job: &mut Job,
        fixed: &[(String, String)],
        progress: &mut Progress,
    ) -> Result<(), WorkerError> {
        let out = encode_request(job, fixed)?;
        let mut stdin = job.body.stream();
        progress.sent_bytes = (out.len() + job.body.len()) as u64;
        self.buf.clear();

        let (mut rd, mut wr) = self.stream.split();
        let abort = Notify::new();
        // The worker's end was already closed when we first wrote (EPIPE): it read nothing of this request.
        let refused = std::sync::atomic::AtomicBool::new(false);
        // Written while reading: a worker may answer (or fail) before it has read all of a large body.
        // Then, if the client goes away, FCGI_ABORT_REQUEST follows on the same stream.
        let write = async {
            match send_request(&mut wr, &out, &mut stdin).await {
                Ok(()) => {
                    abort.notified().await;
                    let _ = wr.write_all(&abort_record()).await;
                }
                // The body's temp file could not be read: the worker would wait for the rest forever.
                Err(Sending::Body(e)) => return e,
                // A failed write to the worker shows on the read side.
                Err(Sending::Socket { refused: r }) => refused.store(r, Relaxed),
            }
            // Park so that select keeps reading.
            std::future::pending::<std::io::Error>().await
        };
        tokio::pin!(write);
        // Nothing of the request reached the worker: its end was closed before our first byte.
        let not_delivered =
            |progress: &Progress| refused.load(Relaxed) && progress.received_bytes == 0;

        let mut answer = Answer::default();
        loop {
            let record = loop {
                if let Some(r) = fcgi::decode_record(&mut self.buf)? {
                    break r;
                }
                let n = tokio::select! {
                    e = &mut write => return Err(WorkerError::Io(e)),
                    n = rd.read_buf(&mut self.buf) => match n {
                        Err(e) if not_delivered(progress) => return Err(WorkerError::NotDelivered(e)),
                        n => n?,
                    },
                    () = client_gone(&mut job.reply, answer.body_tx.as_ref()), if !answer.aborted => {
                        // Nobody waits for this answer: tell the worker, then read on to its
                        // END_REQUEST so that the worker is back in rotation.
                        tracing::debug!(request_id = %job.id, "client gone: FCGI_ABORT_REQUEST to the worker");
                        answer.aborted = true;
                        abort.notify_one();
                        continue;
                    }
                };
                if n == 0 {
                    if not_delivered(progress) {
                        return Err(WorkerError::NotDelivered(
                            std::io::ErrorKind::BrokenPipe.into(),
                        ));
                    }
                    return Err(WorkerError::Closed);
                }
            };
            if record.request_id != REQUEST_ID {
                return Err(WorkerError::bad(format!(
                    "record of type {} for request id {}, expected {REQUEST_ID}",
                    record.kind, record.request_id
                )));
            }
            if let Step::Done = answer.take(record, job, progress).await? {
                // Anything left means the worker does not keep connections as asked; after an abort
                // the stream's state is the worker's guess. Either way, start afresh next time.
                self.keep = self.buf.is_empty() && !answer.aborted;
                return Ok(());
            }
        }
    }
}

/// FCGI_ABORT_REQUEST for our request.
fn abort_record() -> BytesMut {
    let mut rec = BytesMut::new();
    fcgi::encode_record(fcgi::ABORT_REQUEST, REQUEST_ID, &[], &mut rec);
    rec
}

/// Whether the response is complete.
enum Step {
    More,
    Done,
}

/// The response as its records come: the head's bytes until its blank line, then the parsed head with
/// the body held back (a response whose length is known gets a Content-Length, which HTTP/1.0 keep-alive
/// clients need), then, once the body is large, the channel it streams through.
#[derive(Default)]
struct Answer {
    head: BytesMut,
    held: Option<(http::StatusCode, http::HeaderMap, BytesMut)>,
    body_tx: Option<BodySender>,
    /// FCGI_ABORT_REQUEST went to the worker: the client left.
    aborted: bool,
}

impl Answer {
    async fn take(
        &mut self,
        record: fcgi::Record,
        job: &mut Job,
        progress: &mut Progress,
    ) -> Result<Step, WorkerError> {
        match record.kind {
            fcgi::STDOUT if record.content.is_empty() => {}
            fcgi::STDOUT => {
                progress.received_bytes += record.content.len() as u64;
                self.stdout(record.content, job, progress).await?;
            }
            fcgi::STDERR => {
                for line in String::from_utf8_lossy(&record.content).lines() {
                    if !line.trim().is_empty() {
                        tracing::info!(target: "worker", request_id = %job.id, stream = "fcgi-stderr", "{line}");
                    }
                }
            }
            fcgi::END_REQUEST => {
                self.end(&EndRequest::parse(&record.content)?, job, progress)
                    .await?;
                return Ok(Step::Done);
            }
            _ => {}
        }
        Ok(Step::More)
    }

    async fn stdout(
        &mut self,
        content: bytes::Bytes,
        job: &mut Job,
        progress: &mut Progress,
    ) -> Result<(), WorkerError> {
        if let Some(tx) = &mut self.body_tx {
            // A client that has gone is no reason to stop reading: the worker must finish to be
            // reusable (the sender drops what nobody reads).
            tx.send(content).await;
            return Ok(());
        }
        if let Some((_, _, body)) = &mut self.held {
            body.extend_from_slice(&content);
            if body.len() > super::WHOLE_BODY {
                if let Some((status, headers, body)) = self.held.take() {
                    let (mut tx, chan) = ChannelBody::new();
                    // The client gets its body first: without a disk, send waits for it.
                    job.respond(response(status, headers, chan.boxed_unsync()));
                    progress.head_sent = true;
                    tx.send(body.freeze()).await;
                    self.body_tx = Some(tx);
                }
            }
            return Ok(());
        }
        self.head.extend_from_slice(&content);
        if let Some(end) = cgi::head_end(&self.head) {
            let rest = self.head.split_off(end);
            let (status, headers) = cgi::parse_head(&self.head[..end])?;
            self.held = Some((status, headers, rest));
        } else if self.head.len() > MAX_HEAD {
            return Err(WorkerError::bad(format!(
                "no blank line after the first {MAX_HEAD} bytes of the response head"
            )));
        }
        Ok(())
    }

    async fn end(
        &mut self,
        end: &EndRequest,
        job: &mut Job,
        progress: &mut Progress,
    ) -> Result<(), WorkerError> {
        if end.protocol_status != fcgi::REQUEST_COMPLETE {
            return Err(WorkerError::bad(format!(
                "the worker refused the request (protocol status {})",
                match end.protocol_status {
                    fcgi::CANT_MPX_CONN => "CANT_MPX_CONN",
                    fcgi::OVERLOADED => "OVERLOADED",
                    fcgi::UNKNOWN_ROLE => "UNKNOWN_ROLE",
                    _ => "unknown",
                }
            )));
        }
        if let Some((status, mut headers, body)) = self.held.take() {
            if job.head.method != http::Method::HEAD || !body.is_empty() {
                headers.insert(http::header::CONTENT_LENGTH, body.len().into());
            }
            let body = crate::spill::whole(crate::spill::settings(), body.freeze()).await;
            job.respond(response(status, headers, body));
            progress.head_sent = true;
        } else if let Some(tx) = self.body_tx.take() {
            tx.finish();
        } else {
            return Err(WorkerError::bad(if self.head.is_empty() {
                "the worker ended the request without writing a response".into()
            } else {
                format!(
                    "the response head has no blank line after it: {:?}",
                    String::from_utf8_lossy(&self.head[..self.head.len().min(200)])
                )
            }));
        }
        Ok(())
    }
}

fn response(
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: crate::request::Body,
) -> Response<crate::request::Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// Resolves when the client no longer waits: its reply channel, or its body channel, was dropped.
async fn client_gone(
    reply: &mut Option<tokio::sync::oneshot::Sender<crate::request::Reply>>,
    body: Option<&BodySender>,
) {
    match (body, reply) {
        (Some(tx), _) => tx.closed().await,
        (None, Some(r)) => r.closed().await,
        (None, None) => std::future::pending().await,
    }
}

/// Why the request could not be written to the worker.
enum Sending {
    /// The socket failed: the read side sees it too. `refused`: the very first write found the worker's
    /// end closed (EPIPE), so it read nothing of this request.
    Socket { refused: bool },
    /// The request body could not be read from its temp file.
    Body(std::io::Error),
}

/// BEGIN_REQUEST and PARAMS (`head`), then the body as STDIN records, chunk by chunk, then its end; a
/// small request goes in one write.
async fn send_request<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    head: &[u8],
    stdin: &mut crate::spill::BodyStream,
) -> Result<(), Sending> {
    const BATCH: usize = 64 << 10;
    let mut first = true;
    let failed = |e: std::io::Error, first: bool| Sending::Socket {
        refused: first && e.kind() == std::io::ErrorKind::BrokenPipe,
    };
    let mut out = BytesMut::with_capacity(head.len() + 64);
    out.extend_from_slice(head);
    while let Some(chunk) = stdin.next_chunk().await.map_err(Sending::Body)? {
        fcgi::encode_stream(fcgi::STDIN, REQUEST_ID, &chunk, &mut out);
        if out.len() >= BATCH {
            wr.write_all(&out).await.map_err(|e| failed(e, first))?;
            first = false;
            out.clear();
        }
    }
    fcgi::encode_stream_end(fcgi::STDIN, REQUEST_ID, &mut out);
    wr.write_all(&out).await.map_err(|e| failed(e, first))
}

/// BEGIN_REQUEST and PARAMS; STDIN follows from [`send_request`].
fn encode_request(job: &Job, fixed: &[(String, String)]) -> Result<BytesMut, WorkerError> {
    let mut pairs = Vec::with_capacity(1024);
    let mut put = |k: &[u8], v: &[u8]| {
        fcgi::encode_pair(k, v, &mut pairs)
            .map_err(|e| WorkerError::Protocol(BadResponse::Request(Box::new(e))))
    };
    match &job.cgi_params {
        Some(given) => {
            // As the peer sent them, but never HTTP_PROXY (httpoxy), and with --param on top.
            for (k, v) in given {
                let k = k.as_ref();
                if k != b"HTTP_PROXY" && !fixed.iter().any(|(f, _)| f.as_bytes() == k) {
                    put(k, v)?;
                }
            }
            for (k, v) in fixed {
                put(k.as_bytes(), v.as_bytes())?;
            }
        }
        None => {
            for (k, v) in &cgi::params(job, fixed) {
                put(k, v)?;
            }
        }
    }
    let mut out = BytesMut::with_capacity(pairs.len() + 64);
    BeginRequest {
        role: fcgi::RESPONDER,
        flags: fcgi::KEEP_CONN,
    }
    .encode(REQUEST_ID, &mut out);
    fcgi::encode_stream(fcgi::PARAMS, REQUEST_ID, &pairs, &mut out);
    fcgi::encode_stream_end(fcgi::PARAMS, REQUEST_ID, &mut out);
    Ok(out)
}
