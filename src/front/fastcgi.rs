//! The FastCGI front: anteroom as the server of nginx's `fastcgi_pass`, in the FastCGI responder role.
//!
//! A connection may carry several requests at once (multiplexing) up to a per-connection bound; beyond
//! it a request is refused with FCGI_OVERLOADED. Each request is its own task, which owns the request's
//! [`Ticket`](crate::queue::Ticket): an FCGI_ABORT_REQUEST, or the peer hanging up, drops the task, and with
//! it everything the request held: its place in the queue, or, at a worker, the reply channel, which tells
//! the worker's slot to abort it there. Nothing is left behind for a peer that vanishes, which is the leak
//! that made flup users turn multiplexing off.
//!
//! Malformed input (a bad version, lengths that overrun, params that do not parse, a request id reused
//! while in flight, a stream that stops mid-record) closes that one connection with a log line saying why.
//!
//! Bodies and answers are bounded as on the HTTP front: STDIN goes to memory or to a temp file
//! ([`crate::spill`]); a peer that sends nothing for `--body-timeout` while a request is incomplete, or takes
//! nothing of what is written to it for `--send-timeout`, is closed. A request the peer abandons before its
//! STDIN is complete (an abort, or the connection ending) is counted as 499.
//!
//! This file only speaks the protocol and builds the [`Job`], with the rules of every front
//! ([`RequestHead::check`] on the params' HTTP view; a missing `HTTP_HOST` is nginx's call) and without the
//! hop-by-hop headers nginx passes on as params; [`crate::admission`] queues or refuses it and ends every
//! request as for the HTTP front: metrics, the access-log line, the request id on the answer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::acceptor::{serve_each, Acceptor, ClientStream, Refusal};
use super::conns::{ConnHandle, InProgress, Table};
use super::listen::Listener;
use crate::admission::{refusal, Admission, Delivery, Outcome};
use crate::fastcgi::{self as fcgi, BeginRequest, EndRequest};
use crate::metrics::Incomplete;
use crate::request::{
    client_closed, new_request_id, request_id, request_start, BadHead, HostRule, Job, Origin,
    Reply, RequestBody, RequestHead, HOP_BY_HOP, REQUEST_START,
};
use crate::spill::BodyWriter;
use crate::sync::lock;
use crate::upgrade::{Handed, Handover};

/// Requests one connection may have in flight at once.
pub const MAX_REQS_PER_CONN: usize = 256;
/// Most PARAMS bytes one request may send: far beyond any real request, small enough to bound memory.
const MAX_PARAMS: usize = 1 << 20;
/// Bytes queued towards a slow peer before request tasks wait for it.
const WRITE_QUEUE: usize = 64;

/// Serves FastCGI on `listener`: a dedicated thread accepts, each connection is a task tracked by `conns`
/// and counted in `table`. At the limit, a connection with no request in flight may be closed to make room
/// (nginx reconnects); when none can be, a new connection is closed at once.
pub fn start(
    listener: Listener,
    front: Arc<Admission>,
    table: Arc<Table>,
    conns: TaskTracker,
) -> std::io::Result<Acceptor> {
    serve_each(
        listener,
        table,
        Refusal::Close,
        conns,
        // No PROXY header on FastCGI listeners: nothing known beyond the socket.
        move |conn, entry, _known| {
            let front = front.clone();
            async move {
                match conn {
                    ClientStream::Tcp(s, _) => serve_conn(s, front, entry).await,
                    ClientStream::Unix(s) => serve_conn(s, front, entry).await,
                }
            }
        },
    )
}

type Active = Arc<std::sync::Mutex<std::collections::HashSet<u16>>>;

/// What the request tasks send to the connection's writer.
enum Out {
    Bytes(Bytes),
    /// The last bytes of the connection's last response: written, then the connection is shut down in the
    /// same breath (see `run_request`).
    Last(Bytes),
    /// The request that said FCGI_KEEP_CONN = 0 is complete: close after this.
    Close,
    /// The connection goes to an upgrade's new process: everything before this is written; stop without
    /// shutting it down and give the socket's half back.
    Leave,
}

/// A request being received: its params and stdin arrive in records, possibly interleaved with others'.
struct Receiving {
    keep_conn: bool,
    params: Vec<u8>,
    params_done: bool,
    stdin: BodyWriter,
    /// Set when the body cannot be taken: read on, answer 413 or 503 at the end.
    refuse: Option<Refuse>,
    started: Instant,
    /// The request counts in the connection table from BEGIN_REQUEST until its task ends.
    in_progress: InProgress,
}

impl Receiving {
    /// Keeps a chunk of STDIN. Past `max`, or with no temp file for it, what was kept goes at once and the
    /// request is marked to be refused when its STDIN ends: the peer sends the rest anyway, and it is read
    /// and dropped.
    async fn keep_stdin(&mut self, chunk: &[u8], max: u64) {
        if self.refuse.is_some() {
            return;
        }
        let fresh = || BodyWriter::new(crate::spill::settings(), None);
        if self.stdin.len() + chunk.len() as u64 > max {
            self.refuse = Some(Refuse::TooLarge);
            self.stdin = fresh(); // what was kept (memory, a temp file) goes now
        } else if let Err(e) = self.stdin.push(chunk).await {
            self.refuse = Some(Refuse::TempFile(e));
            self.stdin = fresh();
        }
    }
}

/// Why a request whose body was read to its end is refused.
enum Refuse {
    /// Over --max-body-size: 413.
    TooLarge,
    /// No temp file for it: 503.
    TempFile(std::io::Error),
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("no record for {0:?} while a request was incomplete (body timeout)")]
    BodyTimeout(Duration),
}

fn malformed(why: impl Into<String>) -> ConnError {
    ConnError::Protocol(why.into())
}

/// How a connection's reading ended without an error.
enum Ended {
    /// The peer closed, or the connection is done (KEEP_CONN = 0, stopping, closed by the table).
    Closed,
    /// Nothing in flight and nothing of a next record read: the connection goes to an upgrade's new
    /// process.
    HandOver(Handover),
}

async fn serve_conn<S>(io: S, front: Arc<Admission>, entry: ConnHandle)
where
    S: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(io);
    let (tx, rx) = mpsc::channel::<Out>(WRITE_QUEUE);
    let writer = tokio::spawn(write_loop(wr, rx, front.cfg.send_timeout));
    let mut conn = PeerConn {
        front: front.clone(),
        tx,
        receiving: HashMap::new(),
        running: HashMap::new(),
        active: Arc::default(),
        tasks: JoinSet::new(),
        closing: false,
        entry: entry.clone(),
    };
    let ended = tokio::select! {
        r = conn.read_loop(&mut rd) => r,
        // Closed by the table to make room, while no request was in flight on it.
        () = entry.closed() => Ok(Ended::Closed),
    };
    if let Ok(Ended::HandOver(to)) = ended {
        // Nothing in flight: the writer has only earlier answers to finish before it lets go.
        let _ = conn.tx.send(Out::Leave).await;
        drop(conn);
        if let Ok(Some(wr)) = writer.await {
            hand_over(rd.unsplit(wr), to).await;
        }
        return;
    }
    let timed_out = matches!(ended, Err(ConnError::BodyTimeout(_)));
    if let Err(e) = ended {
        match e {
            ConnError::Protocol(why) => {
                tracing::warn!("FastCGI connection closed: malformed input: {why}")
            }
            e @ ConnError::BodyTimeout(_) => tracing::debug!("FastCGI connection closed: {e}"),
            ConnError::Io(e) => tracing::debug!("FastCGI connection ended: {e}"),
        }
    }
    // Requests still incomplete never reach a worker: they end as the peer's leaving (or its timeout).
    for (_, r) in conn.receiving.drain() {
        abandoned(&front, r, timed_out);
    }
    // Dropping the tasks aborts every request still queued or at a worker: the peer is gone.
    conn.tasks.abort_all();
    drop(conn);
    let _ = writer.await;
}

struct PeerConn {
    front: Arc<Admission>,
    tx: mpsc::Sender<Out>,
    receiving: HashMap<u16, Receiving>,
    running: HashMap<u16, AbortHandle>,
    /// Ids whose requests are admitted and not yet ended. A task takes its id out just before it queues
    /// its END_REQUEST, so that a peer reusing the id as soon as it reads that record (as it may) is
    /// never taken for one reusing an id in flight.
    active: Active,
    tasks: JoinSet<u16>,
    /// A request without KEEP_CONN was admitted: no further request is accepted on this connection.
    closing: bool,
    entry: ConnHandle,
}

impl PeerConn {
    async fn read_loop<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> Result<Ended, ConnError> {
        let mut buf = BytesMut::with_capacity(16 << 10);
        let body_timeout = self.front.cfg.body_timeout;
        let mut last_read = tokio::time::Instant::now();
        let writer = self.tx.clone();
        loop {
            while let Some(rec) =
                fcgi::decode_record(&mut buf).map_err(|e| malformed(e.to_string()))?
            {
                self.on_record(rec).await?;
            }
            let n = tokio::select! {
                n = rd.read_buf(&mut buf) => n?,
                () = tokio::time::sleep_until(last_read + body_timeout), if !self.receiving.is_empty() => {
                    return Err(ConnError::BodyTimeout(body_timeout));
                }
                // The writer gave up (the peer takes nothing: send timeout, or it failed): so does the reader.
                () = writer.closed() => {
                    return Err(ConnError::Io(std::io::ErrorKind::BrokenPipe.into()));
                }
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    if let Ok((task, id)) = done {
                        // The id may already belong to a newer request: forget only this task.
                        if self.running.get(&id).is_some_and(|h| h.id() == task) {
                            self.running.remove(&id);
                        }
                    }
                    // Also when anteroom is stopping (an upgrade hands the connection over instead, below):
                    // FastCGI has no `Connection: close`, so the connection closes once it has nothing in
                    // flight, and the peer's next request goes to a new connection (nginx retries a request
                    // that finds its kept-alive upstream connection closed on another one).
                    let closing = self.closing || self.entry.closes_after_response();
                    if closing && lock(&self.active).is_empty() && self.receiving.is_empty() {
                        return Ok(Ended::Closed);
                    }
                    continue;
                }
                // Told once it has nothing in flight; followed only with nothing of a next record read.
                to = self.entry.handed_over(), if buf.is_empty() && !self.closing
                    && self.receiving.is_empty() && self.tasks.is_empty() => {
                    return Ok(Ended::HandOver(to));
                }
            };
            last_read = tokio::time::Instant::now();
            if n == 0 {
                if !buf.is_empty() {
                    return Err(malformed(format!(
                        "the connection ended inside a record ({} bytes of it)",
                        buf.len()
                    )));
                }
                return Ok(Ended::Closed);
            }
        }
    }

    async fn send(&self, bytes: BytesMut) -> Result<(), ConnError> {
        self.tx
            .send(Out::Bytes(bytes.freeze()))
            .await
            .map_err(|_| ConnError::Io(std::io::ErrorKind::BrokenPipe.into()))
    }

    async fn on_record(&mut self, rec: fcgi::Record) -> Result<(), ConnError> {
        let id = rec.request_id;
        if id == 0 {
            return self.on_management(rec).await;
        }
        match rec.kind {
            fcgi::BEGIN_REQUEST => self.on_begin(id, &rec.content).await,
            fcgi::PARAMS => self.on_params(id, &rec.content),
            fcgi::STDIN if rec.content.is_empty() => self.on_stdin_end(id).await,
            fcgi::STDIN => {
                let max = self.front.cfg.max_body_size;
                if let Some(r) = self.receiving.get_mut(&id) {
                    r.keep_stdin(&rec.content, max).await;
                }
                // else for an aborted or refused request: ignored, as the spec allows
                Ok(())
            }
            fcgi::ABORT_REQUEST => self.on_abort(id).await,
            fcgi::DATA => Ok(()), // only for the filter role, which is refused at BEGIN_REQUEST
            other => {
                let mut out = BytesMut::new();
                fcgi::encode_unknown_type(other, &mut out);
                self.send(out).await
            }
        }
    }

    /// Queues END_REQUEST for request `id` with `status`.
    async fn end_request(&self, id: u16, status: u8) -> Result<(), ConnError> {
        let mut out = BytesMut::new();
        EndRequest {
            app_status: 0,
            protocol_status: status,
        }
        .encode(id, &mut out);
        self.send(out).await
    }

    async fn on_begin(&mut self, id: u16, content: &[u8]) -> Result<(), ConnError> {
        let begin = BeginRequest::parse(content).map_err(|e| malformed(e.to_string()))?;
        if self.receiving.contains_key(&id) || lock(&self.active).contains(&id) {
            return Err(malformed(format!("request id {id} reused while in flight")));
        }
        if begin.role != fcgi::RESPONDER {
            return self.end_request(id, fcgi::UNKNOWN_ROLE).await;
        }
        if self.closing || self.receiving.len() + lock(&self.active).len() >= MAX_REQS_PER_CONN {
            return self.end_request(id, fcgi::OVERLOADED).await;
        }
        self.receiving.insert(
            id,
            Receiving {
                keep_conn: begin.keep_conn(),
                params: Vec::new(),
                params_done: false,
                stdin: BodyWriter::new(crate::spill::settings(), None),
                refuse: None,
                started: Instant::now(),
                in_progress: self.entry.request_started(),
            },
        );
        Ok(())
    }

    fn on_params(&mut self, id: u16, content: &[u8]) -> Result<(), ConnError> {
        let Some(r) = self.receiving.get_mut(&id) else {
            return Ok(()); // for an aborted or refused request: ignored, as the spec allows
        };
        if r.params_done {
            return Err(malformed(format!("PARAMS for request {id} after its end")));
        }
        if content.is_empty() {
            r.params_done = true;
        } else if r.params.len() + content.len() > MAX_PARAMS {
            return Err(malformed(format!(
                "request {id} sent over {MAX_PARAMS} bytes of params"
            )));
        } else {
            r.params.extend_from_slice(content);
        }
        Ok(())
    }

    /// The request's STDIN is complete: it becomes a task of its own, which admits it and sends its answer.
    async fn on_stdin_end(&mut self, id: u16) -> Result<(), ConnError> {
        let Some(r) = self.receiving.remove(&id) else {
            return Ok(());
        };
        if !r.params_done {
            return Err(malformed(format!(
                "STDIN of request {id} ended before its PARAMS"
            )));
        }
        let params = fcgi::decode_pairs(&r.params).map_err(|e| malformed(e.to_string()))?;
        if !r.keep_conn {
            self.closing = true;
        }
        let mut refuse = r.refuse;
        let body = match r.stdin.finish().await {
            Ok(b) => b,
            Err(e) => {
                refuse.get_or_insert(Refuse::TempFile(e));
                RequestBody::default()
            }
        };
        let job = job_from_params(params, body).map(|j| stamp_start(j, r.started));
        // The account opens at BEGIN_REQUEST's time, with the id and head the params give.
        let outcome = match &job {
            Ok(job) => {
                let view = Some((&job.head, &job.origin));
                self.front.open(r.started, job.id.clone(), view)
            }
            Err(_) => self.front.open(r.started, new_request_id(), None),
        };
        let span = outcome.span().clone();
        lock(&self.active).insert(id);
        let request = run_request(
            self.front.clone(),
            Admitted {
                outcome,
                job,
                refuse,
            },
            Answer {
                id,
                keep_conn: r.keep_conn,
                tx: self.tx.clone(),
                active: self.active.clone(),
                conn: self.entry.clone(),
            },
        )
        .instrument(span);
        let in_progress = r.in_progress;
        let handle = self.tasks.spawn(async move {
            let _in_progress = in_progress;
            request.await
        });
        self.running.insert(id, handle);
        Ok(())
    }

    async fn on_abort(&mut self, id: u16) -> Result<(), ConnError> {
        let receiving = self.receiving.remove(&id);
        let known = receiving.is_some();
        if let Some(r) = receiving {
            abandoned(&self.front, r, false);
        }
        // Not active any more: its task has queued (or is queueing) its own END_REQUEST, and a second one
        // must not follow.
        let running = lock(&self.active).remove(&id);
        if running {
            if let Some(h) = self.running.remove(&id) {
                // The task owns the ticket or the reply channel: aborting it frees both.
                h.abort();
            }
        }
        if known || running {
            self.end_request(id, fcgi::REQUEST_COMPLETE).await?;
        }
        Ok(())
    }

    async fn on_management(&mut self, rec: fcgi::Record) -> Result<(), ConnError> {
        let mut out = BytesMut::new();
        if rec.kind == fcgi::GET_VALUES {
            let asked = fcgi::decode_pairs(&rec.content).map_err(|e| malformed(e.to_string()))?;
            let mut pairs = Vec::new();
            for (name, _) in asked {
                let value = match name.as_ref() {
                    b"FCGI_MAX_CONNS" => self.entry.max_connections().to_string(),
                    b"FCGI_MAX_REQS" => self.front.cfg.max_queue.to_string(),
                    b"FCGI_MPXS_CONNS" => "1".to_string(),
                    _ => continue, // unknown variables are left out of the reply, per the spec
                };
                fcgi::encode_pair(&name, value.as_bytes(), &mut pairs)
                    .map_err(|e| malformed(e.to_string()))?;
            }
            fcgi::encode_record(fcgi::GET_VALUES_RESULT, 0, &pairs, &mut out);
        } else {
            fcgi::encode_unknown_type(rec.kind, &mut out);
        }
        self.send(out).await
    }
}

/// Writes what the connection's requests send, in order; gives `wr` back when told to leave (the
/// connection goes to an upgrade's new process), else shuts it down at the end.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Out>,
    send_timeout: Duration,
) -> Option<W> {
    while let Some(out) = rx.recv().await {
        match out {
            Out::Bytes(b) => {
                if let Err(e) = write_timed(&mut wr, &b, send_timeout).await {
                    tracing::debug!("FastCGI connection: {e}");
                    return None;
                }
            }
            Out::Last(b) => {
                if let Err(e) = write_timed(&mut wr, &b, send_timeout).await {
                    tracing::debug!("FastCGI connection: {e}");
                    return None;
                }
                break;
            }
            Out::Close => break,
            Out::Leave => return Some(wr),
        }
    }
    let _ = wr.shutdown().await;
    None
}

/// Passes a connection with nothing in flight to an upgrade's new process; closed here if that fails. Our
/// descriptor closes either way: the connection stays open in the new process.
async fn hand_over<S: AsFd>(io: S, to: Handover) {
    let sent = match io.as_fd().try_clone_to_owned() {
        Ok(fd) => to.send(Handed::FastCgi, b"", fd).await,
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        tracing::debug!("upgrade: cannot pass a kept-alive FastCGI connection on; closed: {e}");
    }
}

/// Writes all of `buf`, failing when the peer takes nothing for `limit` (nginx's send_timeout).
async fn write_timed<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut buf: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = tokio::time::timeout(limit, wr.write(buf))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the peer took nothing for {limit:?} (send timeout)"),
                )
            })??;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// A request whose STDIN is complete, as its task takes it.
struct Admitted {
    /// Its account, opened with the time of its BEGIN_REQUEST.
    outcome: Outcome,
    /// Err: its params do not make an HTTP request (400).
    job: Result<Job, BadParams>,
    /// Its body could not be kept: answered without queueing it.
    refuse: Option<Refuse>,
}

/// Where a request's answer goes: its id on the connection, and the connection's writer.
struct Answer {
    id: u16,
    /// False: the connection closes after this answer.
    keep_conn: bool,
    tx: mpsc::Sender<Out>,
    active: Active,
    conn: ConnHandle,
}

/// One request's task, run in its span: admits it (or refuses it), ends it, and sends the answer back.
async fn run_request(front: Arc<Admission>, req: Admitted, to: Answer) -> u16 {
    let Admitted {
        mut outcome,
        job,
        refuse,
    } = req;
    let rid = outcome.id();
    let resp = match (job, refuse) {
        (Err(BadParams::Head(why)), _) => refusal::bad_head(rid, &why),
        (Err(why), _) => {
            tracing::debug!("bad FastCGI request: {why}");
            refusal::bad_request(rid, &why.to_string())
        }
        (Ok(_), Some(Refuse::TooLarge)) => refusal::too_large(rid, front.cfg.max_body_size),
        (Ok(_), Some(Refuse::TempFile(e))) => refusal::no_temp_file(rid, &e),
        (Ok(job), None) => front.dispatch(job).await,
    };
    let resp = outcome.respond(resp);
    // Aborted (FCGI_ABORT_REQUEST, the peer gone) while this is written: the task is dropped, and the
    // outcome with it records the response as cut short.
    let sent = outcome.delivery();
    let Ok(tail) = send_response(to.id, resp, &to.tx, &to.active, sent).await else {
        sent.cut(Incomplete::ClientGone);
        outcome.delivered();
        return to.id;
    };
    // Stopping (not an upgrade, which hands the connection over), and this was the connection's only
    // request: it closes with this answer. FastCGI has no `Connection: close`, so the close itself is the signal, and it must
    // follow END_REQUEST at once: nginx drops a kept-alive connection whose end has arrived by the time it
    // has read the answer, but reuses one that still looks open, and a POST sent on it as it closes gets a
    // 502 (nginx retries only idempotent requests).
    let last = !to.keep_conn || (to.conn.closes_after_response() && to.conn.requests() == 1);
    let ended = match (tail, last) {
        (Some(tail), true) => to.tx.send(Out::Last(tail.freeze())).await,
        (Some(tail), false) => to.tx.send(Out::Bytes(tail.freeze())).await,
        (None, true) => to.tx.send(Out::Close).await,
        (None, false) => Ok(()),
    };
    if ended.is_err() {
        // The writer is gone (the peer hung up, or took nothing for --send-timeout): no END_REQUEST.
        outcome.delivery().cut(Incomplete::ClientGone);
    }
    outcome.delivered();
    to.id
}

/// Ends a request the peer left (or let stall past `--body-timeout`) before its STDIN was complete: 499
/// (or 408) in the metrics, and in the access log when its params had arrived.
fn abandoned(front: &Admission, r: Receiving, timed_out: bool) {
    let view = if r.params_done {
        fcgi::decode_pairs(&r.params)
            .ok()
            .and_then(|p| http_view(&p).ok())
    } else {
        None
    };
    let rid = view.as_ref().map_or_else(new_request_id, |v| v.id.clone());
    let outcome = front.open(r.started, rid, view.as_ref().map(|v| (&v.head, &v.origin)));
    let resp = if timed_out {
        refusal::body_timeout(outcome.id())
    } else {
        client_closed(outcome.id())
    };
    // Nobody to send it to: only its account is kept.
    drop(outcome.finish(resp));
}

/// The HTTP response as a CGI response on STDOUT. Returns what ends it (STDOUT's end and END_REQUEST) for
/// the caller to send, or None when the request was aborted meanwhile and nothing more is owed; Err when
/// the connection's writer is gone. `sent` counts the body bytes handed to the writer, and notes a body
/// that broke off or a request the peer aborted.
async fn send_response(
    id: u16,
    resp: Reply,
    tx: &mpsc::Sender<Out>,
    active: &Active,
    sent: &mut Delivery,
) -> Result<Option<BytesMut>, ()> {
    let (parts, mut body) = resp.into_parts();
    let mut head = format!(
        "Status: {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        head.push_str(name.as_str());
        head.push_str(": ");
        head.push_str(&String::from_utf8_lossy(value.as_bytes()));
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut out = BytesMut::with_capacity(head.len() + 16);
    fcgi::encode_stream(fcgi::STDOUT, id, head.as_bytes(), &mut out);
    let send = |b: BytesMut| async move { tx.send(Out::Bytes(b.freeze())).await.map_err(|_| ()) };
    send(out).await?;
    let mut app_status = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    let mut out = BytesMut::with_capacity(data.len() + 16);
                    fcgi::encode_stream(fcgi::STDOUT, id, &data, &mut out);
                    send(out).await?;
                    sent.body_bytes += data.len() as u64;
                }
            }
            Err(e) => {
                // The worker's answer broke off after its head: say so on STDERR, the peer logs it.
                tracing::warn!("response body cut short: {e}");
                sent.cut(Incomplete::AbortedUpstream);
                let mut out = BytesMut::new();
                fcgi::encode_stream(
                    fcgi::STDERR,
                    id,
                    format!("anteroom: {e}\n").as_bytes(),
                    &mut out,
                );
                send(out).await?;
                app_status = 1;
                break;
            }
        }
    }
    let mut out = BytesMut::new();
    fcgi::encode_stream_end(fcgi::STDOUT, id, &mut out);
    if !lock(active).remove(&id) {
        // Aborted meanwhile: the connection's loop has answered the abort with END_REQUEST already.
        sent.cut(Incomplete::ClientGone);
        return Ok(None);
    }
    EndRequest {
        app_status,
        protocol_status: fcgi::REQUEST_COMPLETE,
    }
    .encode(id, &mut out);
    Ok(Some(out))
}

/// Params that do not make an HTTP request: answered 400.
#[derive(Debug, thiserror::Error)]
enum BadParams {
    #[error("REQUEST_METHOD {0:?} is not an HTTP method")]
    Method(String),
    /// The head fails the rules every front applies (400, or 405 for CONNECT).
    #[error(transparent)]
    Head(BadHead),
}

/// Builds the queued request from the peer's params: they go to FastCGI workers as they came, less the
/// hop-by-hop headers; the HTTP view of them (method, target, headers) serves HTTP workers, logs and
/// quarantine.
fn job_from_params(params: Vec<(Bytes, Bytes)>, body: RequestBody) -> Result<Job, BadParams> {
    let view = http_view(&params)?;
    let params = without_hop_by_hop(params);
    Ok(Job::new(view.id, view.head, body, view.origin).with_cgi_params(params))
}

/// Adds `X-Request-Start` (`HTTP_X_REQUEST_START`) from BEGIN_REQUEST's time, unless the peer set one: it
/// is the web server in front (`fastcgi_param HTTP_X_REQUEST_START "t=${msec}";`), which saw the request
/// first.
fn stamp_start(mut job: Job, began: Instant) -> Job {
    if !job.head.headers.contains_key(REQUEST_START) {
        let v = request_start(began);
        if let Some(p) = job.cgi_params.as_mut() {
            p.push((
                Bytes::from_static(b"HTTP_X_REQUEST_START"),
                Bytes::copy_from_slice(v.as_bytes()),
            ));
        }
        job.head.headers.insert(REQUEST_START, v);
    }
    job
}

/// The params less the hop-by-hop headers nginx passes on as `HTTP_*` (and those its `HTTP_CONNECTION`
/// names), as the HTTP view loses them: they describe the client's connection to nginx. Above all
/// `HTTP_TRANSFER_ENCODING`: nginx de-chunks the body and sends its `CONTENT_LENGTH`, but passes
/// `HTTP_TRANSFER_ENCODING=chunked` on too, and a framework that trusts it (Werkzeug) reads an empty
/// body. php-fpm behind nginx does get them; this is where anteroom's params differ from its, on purpose.
fn without_hop_by_hop(params: Vec<(Bytes, Bytes)>) -> Vec<(Bytes, Bytes)> {
    let var = |header: &[u8]| -> Vec<u8> {
        let mut v = b"HTTP_".to_vec();
        v.extend(header.iter().map(|b| match b {
            b'-' => b'_',
            b => b.to_ascii_uppercase(),
        }));
        v
    };
    let mut hop: Vec<Vec<u8>> = params
        .iter()
        .filter(|(k, _)| k.as_ref() == b"HTTP_CONNECTION")
        .flat_map(|(_, v)| v.split(|b| *b == b','))
        .map(|t| var(t.trim_ascii()))
        // As on the HTTP front, `Connection: host` removes nothing that anteroom or the worker reads.
        .filter(|v| v != b"HTTP_HOST" && v != b"HTTP_CONTENT_LENGTH")
        .collect();
    hop.extend(HOP_BY_HOP.map(|h| var(h.as_bytes())));
    params
        .into_iter()
        .filter(|(k, _)| !hop.iter().any(|h| h == k.as_ref()))
        .collect()
}

/// What the params say as HTTP: the request id, head and origin.
struct HttpView {
    id: String,
    head: RequestHead,
    origin: Origin,
}

/// The last value the peer gave `name`, if any (a later param overrides an earlier one, as in nginx).
fn param(params: &[(Bytes, Bytes)], name: &str) -> Option<String> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k.as_ref() == name.as_bytes())
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

fn http_view(params: &[(Bytes, Bytes)]) -> Result<HttpView, BadParams> {
    let get = |name: &str| param(params, name);
    let method = get("REQUEST_METHOD").unwrap_or_else(|| "GET".into());
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| BadParams::Method(method))?;
    let target = get("REQUEST_URI").unwrap_or_else(|| {
        let mut t = get("SCRIPT_NAME").unwrap_or_default() + &get("PATH_INFO").unwrap_or_default();
        if t.is_empty() {
            t.push('/');
        }
        match get("QUERY_STRING") {
            Some(q) if !q.is_empty() => format!("{t}?{q}"),
            _ => t,
        }
    });
    // A target that is not a valid URI still reaches FastCGI workers in its params; the HTTP view says "/".
    let uri: Uri = target.parse().unwrap_or_else(|_| Uri::from_static("/"));
    let version = match get("SERVER_PROTOCOL").as_deref() {
        Some("HTTP/1.0") => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let headers = headers_from_params(params);
    let ip = |a: Option<String>, p: Option<String>| -> Option<SocketAddr> {
        let ip: IpAddr = a?.parse().ok()?;
        Some(SocketAddr::new(
            ip,
            p.and_then(|p| p.parse().ok()).unwrap_or(0),
        ))
    };
    let origin = Origin {
        peer: ip(get("REMOTE_ADDR"), get("REMOTE_PORT")),
        local: ip(get("SERVER_ADDR"), get("SERVER_PORT")),
        proxied: None,
    };
    let id = request_id(&headers);
    let mut head = RequestHead {
        method,
        uri,
        version,
        headers,
    };
    // The same rules as on the HTTP front, for the HTTP view. nginx enforced RFC 9112's Host rules as the
    // HTTP server, and sends requests without HTTP_HOST (HTTP/1.0 ones, health checks), so a Host must only
    // be valid when present. FastCGI workers get the params as they came (parity with php-fpm).
    head.check(HostRule::IfPresent).map_err(BadParams::Head)?;
    Ok(HttpView { id, head, origin })
}

/// The request's headers back from their CGI names (`HTTP_USER_AGENT`, `CONTENT_TYPE`...), less the
/// `Proxy` header (httpoxy), which no worker should see.
fn headers_from_params(params: &[(Bytes, Bytes)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (k, v) in params {
        let name = match k.as_ref() {
            b"CONTENT_TYPE" => Some("content-type".to_string()),
            b"CONTENT_LENGTH" => Some("content-length".to_string()),
            k => k
                .strip_prefix(b"HTTP_")
                .filter(|n| *n != b"PROXY")
                .map(|n| {
                    String::from_utf8_lossy(n)
                        .to_ascii_lowercase()
                        .replace('_', "-")
                }),
        };
        let Some(name) = name else { continue };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            // nginx sends an empty CONTENT_TYPE for a request without one: not a header.
            if !v.is_empty() || n != http::header::CONTENT_TYPE {
                headers.append(n, v);
            }
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(Bytes, Bytes)> {
        pairs
            .iter()
            .map(|(k, v)| (Bytes::from(k.to_string()), Bytes::from(v.to_string())))
            .collect()
    }

    #[test]
    fn request_start_is_added_unless_the_web_server_set_one() {
        let base = [("REQUEST_METHOD", "GET"), ("REQUEST_URI", "/")];
        let start = |job: &Job| {
            let params = job.cgi_params.as_ref().unwrap();
            let given: Vec<_> = params
                .iter()
                .filter(|(k, _)| k.as_ref() == b"HTTP_X_REQUEST_START")
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .collect();
            (given, job.head.headers.get(REQUEST_START).cloned())
        };
        let ours = stamp_start(
            job_from_params(p(&base), RequestBody::default()).unwrap(),
            Instant::now(),
        );
        let (given, header) = start(&ours);
        assert_eq!(given.len(), 1);
        assert!(
            given[0].starts_with("t=") && given[0].len() > 12,
            "{given:?}"
        );
        assert_eq!(header.unwrap().to_str().unwrap(), given[0]);
        let mut theirs = base.to_vec();
        theirs.push(("HTTP_X_REQUEST_START", "t=1700000000.123"));
        let kept = stamp_start(
            job_from_params(p(&theirs), RequestBody::default()).unwrap(),
            Instant::now(),
        );
        assert_eq!(start(&kept).0, ["t=1700000000.123"]);
    }

    #[test]
    fn params_give_the_http_view() {
        let job = job_from_params(
            p(&[
                ("REQUEST_METHOD", "POST"),
                ("REQUEST_URI", "/a/b?x=1"),
                ("SERVER_PROTOCOL", "HTTP/1.0"),
                ("CONTENT_TYPE", "text/plain"),
                ("CONTENT_LENGTH", "3"),
                ("HTTP_USER_AGENT", "curl"),
                ("HTTP_X_REQUEST_ID", "abc"),
                ("HTTP_PROXY", "http://evil"),
                ("REMOTE_ADDR", "10.0.0.1"),
                ("REMOTE_PORT", "5555"),
            ]),
            Bytes::from_static(b"abc").into(),
        )
        .unwrap();
        assert_eq!(job.head.method, Method::POST);
        assert_eq!(job.head.uri.path(), "/a/b");
        assert_eq!(job.head.version, Version::HTTP_10);
        assert_eq!(job.head.headers["user-agent"], "curl");
        assert_eq!(job.head.headers["content-type"], "text/plain");
        assert!(!job.head.headers.contains_key("proxy"));
        assert_eq!(job.id, "abc");
        assert_eq!(job.origin.peer, Some("10.0.0.1:5555".parse().unwrap()));
        assert_eq!(job.cgi_params.as_ref().unwrap().len(), 10);
    }

    #[test]
    fn target_from_script_name_and_path_info() {
        let job = job_from_params(
            p(&[
                ("SCRIPT_NAME", "/index.php"),
                ("PATH_INFO", "/x"),
                ("QUERY_STRING", "q=1"),
            ]),
            RequestBody::default(),
        )
        .unwrap();
        assert_eq!(job.head.method, Method::GET);
        assert_eq!(job.head.uri, "/index.php/x?q=1");
        assert!(
            job_from_params(p(&[("REQUEST_METHOD", "B A D")]), RequestBody::default()).is_err()
        );
    }

    #[test]
    fn the_http_view_meets_the_rules_of_every_front() {
        let view = |pairs: &[(&str, &str)]| job_from_params(p(pairs), RequestBody::default());
        let refused = |pairs: &[(&str, &str)]| match view(pairs) {
            Err(BadParams::Head(why)) => why,
            other => panic!("{pairs:?}: {:?}", other.map(|j| j.head)),
        };
        // No HTTP_HOST is nginx's right (HTTP/1.0 clients, its own checks); a bad or doubled one is not.
        assert!(view(&[("REQUEST_URI", "/")]).is_ok());
        assert!(matches!(
            refused(&[("HTTP_HOST", "a b")]),
            BadHead::BadHost(_)
        ));
        assert_eq!(
            refused(&[("HTTP_HOST", "a"), ("HTTP_HOST", "b")]),
            BadHead::ManyHosts(2)
        );
        assert_eq!(
            refused(&[("REQUEST_METHOD", "CONNECT"), ("HTTP_HOST", "a")]),
            BadHead::Connect
        );
        // No worker of either protocol gets a hop-by-hop header, nor one that Connection names.
        let job = view(&[
            ("HTTP_HOST", "a"),
            ("HTTP_TRANSFER_ENCODING", "chunked"),
            ("HTTP_CONNECTION", "close, X-Hop, Host"),
            ("HTTP_X_HOP", "1"),
            ("CONTENT_LENGTH", "5"),
        ])
        .unwrap();
        assert!(!job.head.headers.contains_key("transfer-encoding"));
        assert!(!job.head.headers.contains_key("connection"));
        assert!(!job.head.headers.contains_key("x-hop"));
        let names: Vec<&[u8]> = job
            .cgi_params
            .as_ref()
            .unwrap()
            .iter()
            .map(|(k, _)| k.as_ref())
            .collect();
        assert_eq!(names, [&b"HTTP_HOST"[..], b"CONTENT_LENGTH"]);
    }
}
