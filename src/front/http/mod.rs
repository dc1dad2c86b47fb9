//! The HTTP/1.x front: accept every connection at once, read each request whole, queue it, relay the answer.
//!
//! The protocol is [`crate::http1`], our own codec, driven here one connection at a time, so that a
//! connection holds only the bytes it has to: none while it is idle, a head buffer that starts at 1 KiB
//! and grows only for a large head while a head arrives, and nothing but the parsed request while the
//! request waits in the queue (the buffer is let go once the request is whole). A head that is too large
//! gets 431, one that cannot be read 400 (501 for an unknown transfer coding, 505 for HTTP/2 over
//! HTTP/1's syntax), one that is late 408 (`--header-timeout`; a silent connection just closes). Then the
//! head is checked as every front does ([`RequestHead::check`]: one Host, valid, the target's authority
//! first, no CONNECT, no hop-by-hop headers nor names with `_` for the worker: 400 or 405 before any
//! worker sees it) and the [`Job`] is built; [`crate::admission`] queues it or refuses it, and ends every
//! request (metrics, access log, request id) as it does for the other fronts, including the ones refused
//! here for their syntax.
//!
//! A body (`body.rs`) is read with `--body-timeout` between reads (then 408), into memory or, when large,
//! into a temp file (see [`crate::spill`]); a client that hangs up mid-body is counted as 499, as nginx
//! does, not as a bad request. While the request waits, the connection is watched: if the client hangs up,
//! the request's future is dropped, the [`Ticket`] with it, and the request leaves the queue before any
//! worker sees it (bytes of a pipelined next request are kept for later). The answer is written by
//! `write.rs`, its head and first bytes in one `writev`, each write within `--send-timeout`.
//!
//! [`Ticket`]: crate::queue::Ticket

mod body;
mod write;

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::BytesMut;
use futures_util::future::Either;
use http::header::EXPECT;
use http::HeaderMap;
use tokio::io::{AsyncWrite, Interest};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::acceptor::{serve_each, Acceptor, ClientStream, Refusal};
use super::conns::{ConnHandle, Leave, Table};
use super::listen::Listener;
use crate::admission::{refusal, Admission, Outcome};
use crate::http1::{self, Framing, Head, HeadError, Parsed};
use crate::request::{
    client_closed, request_id, request_start, HostRule, Job, Origin, Reply, RequestHead,
    REQUEST_START,
};
use crate::upgrade::{Handed, Handover};

/// The head buffer's first size: most heads fit (nginx's `client_header_buffer_size` is 1k too).
const HEAD_BUFFER: usize = 1024;

/// Serves HTTP on `listener`: a dedicated thread accepts, each connection is a task tracked by `conns` and
/// counted in `table` (which may close it while it is idle, to make room for a new one).
pub fn start(
    listener: Listener,
    front: Arc<Admission>,
    table: Arc<Table>,
    conns: TaskTracker,
) -> std::io::Result<Acceptor> {
    // Silent connections are closed by the table's sweep, not by a timer in each.
    table.expire_idle_in_background(front.cfg.header_timeout);
    serve_each(
        listener,
        table,
        Refusal::Http503,
        conns,
        move |conn, entry, known: Option<Box<Origin>>| {
            // Passed by an upgrade's old process after its PROXY header: not read again.
            let header = front.cfg.proxy_protocol && known.is_none();
            // One future per connection type, of which this task holds the one it needs, not both side by
            // side (which an `async` block with a `match` would hold: measured 1544 bytes against 712).
            match conn {
                ClientStream::Tcp(s, peer) => {
                    let origin = known.map_or_else(
                        || Origin {
                            peer: Some(peer),
                            local: s.local_addr().ok(),
                            proxied: None,
                        },
                        |o| *o,
                    );
                    Either::Left(Conn::new(s, origin, front.clone(), entry).serve(header))
                }
                ClientStream::Unix(s) => {
                    let origin = known.map(|o| *o).unwrap_or_default();
                    Either::Right(Conn::new(s, origin, front.clone(), entry).serve(header))
                }
            }
        },
    )
}

/// A client socket: TCP or unix, read without an intermediate buffer of tokio's.
///
/// Readiness is polled (`poll_read_ready`), not awaited through tokio's `readable()`, whose future is 152
/// bytes: a connection waits for bytes while idle and while its request is queued, so that is paid by
/// every connection.
pub(super) trait Socket: AsyncWrite + AsFd + Unpin + Send + 'static {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize>;
    /// Whether a byte is waiting (false: the end of the stream), without reading it; `WouldBlock` (which
    /// clears tokio's readiness) when none is.
    fn try_has_byte(&self) -> io::Result<bool>;
}

impl Socket for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        TcpStream::try_read_buf(self, buf)
    }
    fn try_has_byte(&self) -> io::Result<bool> {
        self.try_io(Interest::READABLE, || crate::sys::fd::has_byte(self))
    }
}

impl Socket for UnixStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        UnixStream::poll_read_ready(self, cx)
    }
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        UnixStream::try_read_buf(self, buf)
    }
    fn try_has_byte(&self) -> io::Result<bool> {
        self.try_io(Interest::READABLE, || crate::sys::fd::has_byte(self))
    }
}

/// One client connection.
struct Conn<S> {
    io: S,
    /// Bytes read and not yet used: part of a head, of a body, or a pipelined next request. Empty and
    /// without capacity between requests.
    buf: BytesMut,
    origin: Origin,
    front: Arc<Admission>,
    entry: ConnHandle,
}

/// How reading the next head ended.
enum NextHead {
    /// Boxed: a future's arguments stay in it for its whole life, and this one waits in the queue.
    Head(Box<Head>, Instant),
    /// The client closed, went silent past the deadline before sending a byte, or the table closed the
    /// idle connection.
    Gone,
    /// A head that cannot be served: answered (its account ends once the answer is written), then the
    /// connection closes.
    Refused(Box<(Reply, Outcome)>),
}

/// How an idle connection's wait for its next request ended.
enum Woke {
    Spoke,
    /// The socket failed, or the table closed the connection.
    Gone,
    /// The table sent it to an upgrade's new process.
    HandOver(Handover),
}

/// After a response: whether the connection carries another request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
    /// Close, but let the client's unread bytes (a body we did not read) drain first, so that the
    /// kernel does not answer them with a reset that destroys the response before it is read.
    Linger,
}

impl<S: Socket> Conn<S> {
    fn new(io: S, origin: Origin, front: Arc<Admission>, entry: ConnHandle) -> Conn<S> {
        Conn {
            io,
            buf: BytesMut::new(),
            origin,
            front,
            entry,
        }
    }

    /// Serves the connection to its end; `proxy_header`: a PROXY protocol header comes first.
    async fn serve(mut self, proxy_header: bool) {
        let cfg = &self.front.cfg;
        if proxy_header {
            let (trusted, timeout) = (&cfg.trusted_proxy, cfg.header_timeout);
            let read = super::proxy::accept(&self.io, &self.origin, trusted, timeout, &self.entry);
            let Some((origin, buf)) = Box::pin(read).await else {
                return;
            };
            (self.origin, self.buf) = (origin, buf);
        }
        // A new connection's first head has --header-timeout from the accept, so a client that trickles it
        // never gets more; a kept-alive connection's next head has it from its first byte, as in nginx (a
        // head begun just before the idle limit must not be cut short by it: 408s, found with heads sent
        // in pieces after 30 s between requests).
        let mut head_since = Some(tokio::time::Instant::now());
        loop {
            // Idle, this task is only as large as waiting for a byte takes (no timer: the table closes a
            // connection silent for --header-timeout); reading the head and serving the request are
            // boxed, allocated while a request is under way (measured: 6.4 KiB unboxed).
            if self.buf.is_empty() {
                self.entry.expire_when_idle(true);
                let woke = self.wait_for_bytes().await;
                // A head is arriving: `deadline` is its own (408), the table's sweep no longer applies.
                self.entry.expire_when_idle(false);
                match woke {
                    Woke::Spoke => {}
                    Woke::Gone => return,
                    // Boxed: an idle connection's task stays as small as its wait.
                    Woke::HandOver(to) => return Box::pin(self.hand_over(to)).await,
                }
            }
            let since = head_since.take().unwrap_or_else(tokio::time::Instant::now);
            let deadline = since + self.front.cfg.header_timeout;
            match Box::pin(self.one(deadline)).await {
                Next::KeepAlive => {}
                Next::Close => return,
                Next::Linger => return Box::pin(write::linger(&mut self.io)).await,
            }
            if self.buf.is_empty() {
                // Idle: the connection holds no buffer until the client speaks again.
                self.buf = BytesMut::new();
            }
        }
    }

    /// Waits for the client's next bytes (the end of the stream too: the read that follows finds it), the
    /// socket's failure, or the table telling the idle connection to leave: to close (silent for
    /// `--header-timeout`, or to make room) or to go to an upgrade's new process.
    fn wait_for_bytes(&self) -> impl Future<Output = Woke> + '_ {
        std::future::poll_fn(|cx| {
            if let Poll::Ready(leave) = self.entry.poll_leave(cx) {
                return Poll::Ready(match leave {
                    Leave::HandOver(to) => Woke::HandOver(to),
                    Leave::Close => Woke::Gone,
                });
            }
            self.io
                .poll_read_ready(cx)
                .map(|r| if r.is_ok() { Woke::Spoke } else { Woke::Gone })
        })
    }

    /// Passes the idle connection, with nothing of a next request read, to an upgrade's new process; closed
    /// here if that fails. Our descriptor closes either way: the connection stays open in the new process.
    async fn hand_over(self, to: Handover) {
        // The client a PROXY header named goes with it (the new process will not read a header again).
        let note = if self.front.cfg.proxy_protocol {
            self.origin.to_note()
        } else {
            String::new()
        };
        let sent = match self.io.as_fd().try_clone_to_owned() {
            Ok(fd) => to.send(Handed::Http, note.as_bytes(), fd).await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            tracing::debug!("upgrade: cannot pass a kept-alive HTTP connection on; closed: {e}");
        }
    }

    /// Reads one head and serves its request.
    async fn one(&mut self, deadline: tokio::time::Instant) -> Next {
        match self.next_head(deadline).await {
            NextHead::Gone => Next::Close,
            NextHead::Refused(refused) => {
                let (reply, mut outcome) = *refused;
                let v = http::Version::HTTP_11;
                let sent = outcome.delivery();
                let _ = Box::pin(self.write_response(reply, false, v, false, sent)).await;
                outcome.delivered();
                Next::Linger
            }
            NextHead::Head(head, started) => self.request(head, started).await,
        }
    }

    /// Reads until a whole head is in, within `--header-timeout`.
    async fn next_head(&mut self, deadline: tokio::time::Instant) -> NextHead {
        let limits = http1::Limits {
            max_head: self.front.cfg.max_header_size,
        };
        let mut fresh = !self.buf.is_empty();
        loop {
            if fresh {
                match http1::parse_request(&self.buf, limits) {
                    Ok(Parsed::Complete(head, len)) => {
                        let _ = self.buf.split_to(len);
                        return NextHead::Head(Box::new(head), Instant::now());
                    }
                    Ok(Parsed::Partial) => {}
                    Err(e) => {
                        let (reply, outcome) = self.refuse_head(&e);
                        return NextHead::Refused(Box::new((reply, outcome)));
                    }
                }
            }
            let room =
                (self.buf.len().max(HEAD_BUFFER / 2)).min(limits.max_head + 1 - self.buf.len());
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, read_some(&self.io, &mut self.buf, room)) => r,
                () = self.entry.closed() => return NextHead::Gone,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return NextHead::Gone,
                Ok(Ok(n)) => {
                    // Parse again only when a line may have ended (or a bare CR may need refusing).
                    let len = self.buf.len();
                    fresh = self.buf[len - n..]
                        .iter()
                        .any(|&b| b == b'\n' || b == b'\r');
                }
                Err(_) if self.buf.is_empty() => return NextHead::Gone,
                Err(_) => {
                    let (reply, outcome) = self.refuse_late_head();
                    return NextHead::Refused(Box::new((reply, outcome)));
                }
            }
        }
    }

    fn refuse_head(&self, e: &HeadError) -> (Reply, Outcome) {
        self.refuse(|id| {
            tracing::debug!("request head refused: {e}");
            refusal::bad_syntax(id, e)
        })
    }

    fn refuse_late_head(&self) -> (Reply, Outcome) {
        self.refuse(refusal::head_timeout)
    }

    /// A request refused before it had a head to log: counted, under a new request id, once its answer
    /// has been written.
    fn refuse(&self, answer: impl FnOnce(&str) -> Reply) -> (Reply, Outcome) {
        let mut outcome = self
            .front
            .open(Instant::now(), request_id(&HeaderMap::new()), None);
        let reply = outcome.span().in_scope(|| answer(outcome.id()));
        (outcome.respond(reply), outcome)
    }

    /// One request, from its parsed head to the end of its response.
    async fn request(&mut self, parsed: Box<Head>, started: Instant) -> Next {
        // Not idle from here until the response has been written: the table never closes it meanwhile.
        let _in_progress = self.entry.request_started();
        // Everything the head decides is done before the first await, in a plain function, so that this
        // future (which waits as long as the request is queued) holds the few things it still needs, not
        // the head's parts on their way into the job.
        let Opened {
            mut outcome,
            next,
            origin,
            framing,
            is_head,
            version,
            keep_alive,
            expect_continue,
        } = self.open(parsed, started);
        let (reply, body_read) = match next {
            Err(refused) => (*refused, framing == Framing::Empty),
            Ok(head) => {
                let span = outcome.span().clone();
                let admitted = self
                    .admit(head, origin, framing, expect_continue, outcome.id())
                    .instrument(span)
                    .await;
                match admitted {
                    Admitted::Answer(r) => (r, true),
                    Admitted::BodyUnread(r) => (r, false),
                    // The client left: counted and logged as 499 by the outcome, nothing to write.
                    Admitted::Gone => {
                        let gone = client_closed(outcome.id());
                        drop(outcome.finish(gone));
                        return Next::Close;
                    }
                }
            }
        };
        let reply = outcome.respond(reply);
        let keep = keep_alive && body_read && !self.entry.closes_after_response();
        // Boxed: the request's future then holds the body's or the queue's state, not also this.
        let sent = outcome.delivery();
        let written = Box::pin(self.write_response(reply, is_head, version, keep, sent)).await;
        // Recorded with what the client got, before a lingering close or the next request.
        outcome.delivered();
        match written {
            Ok(true) => Next::KeepAlive,
            Ok(false) if !body_read => Next::Linger,
            Ok(false) => Next::Close,
            Err(e) => {
                tracing::debug!("could not send a response: {e}");
                Next::Close
            }
        }
    }

    /// Opens the request's account and checks its head: the head a worker may see, boxed, or the answer
    /// to one it must not.
    fn open(&self, parsed: Box<Head>, started: Instant) -> Opened {
        let Head {
            method,
            uri,
            version,
            mut headers,
            framing,
            keep_alive,
            expect_continue,
        } = *parsed;
        if expect_continue {
            // Answered here: the worker gets the whole body, and nothing to wait for.
            headers.remove(EXPECT);
        }
        let mut head = RequestHead {
            method,
            uri,
            version,
            headers,
        };
        let is_head = head.method == http::Method::HEAD;
        // httparse read the syntax; what the worker would trust (Host, the target, hop-by-hop headers) is
        // checked here, before the account opens, so that the log shows the head a worker would have seen.
        let checked = head.check(HostRule::Required);
        // The client as a trusted proxy names it, for the log, the queue and the worker.
        let (cfg, conn) = (&self.front.cfg, &self.origin);
        let origin = crate::request::resolve_origin(
            conn,
            &head.headers,
            &cfg.trusted_proxy,
            cfg.forwarded_header,
        )
        .map(Box::new);
        // Ours, never the client's: an app that autoscales on queue time must not be steered by a client.
        head.headers.insert(REQUEST_START, request_start(started));
        let outcome = self.front.open(
            started,
            request_id(&head.headers),
            Some((&head, origin.as_deref().unwrap_or(&self.origin))),
        );
        let next = match checked {
            Ok(()) => Ok(Box::new(head)),
            Err(why) => Err(Box::new(
                outcome
                    .span()
                    .in_scope(|| refusal::bad_head(outcome.id(), &why)),
            )),
        };
        Opened {
            outcome,
            next,
            origin,
            framing,
            is_head,
            version,
            keep_alive,
            expect_continue,
        }
    }

    /// Reads the body and hands the request to admission, watching for the client leaving meanwhile.
    async fn admit(
        &mut self,
        head: Box<RequestHead>,
        origin: Option<Box<Origin>>,
        framing: Framing,
        expect_continue: bool,
        id: &str,
    ) -> Admitted {
        let body = match Box::pin(self.read_body(framing, expect_continue, id)).await {
            Ok(b) => b,
            Err(body::Failed::Answer(r)) => return Admitted::BodyUnread(r),
            Err(body::Failed::Gone) => return Admitted::Gone,
        };
        if self.buf.is_empty() {
            // Nothing pipelined: the request waits holding its head and body, and no buffer.
            self.buf = BytesMut::new();
        }
        let front = self.front.clone();
        // Queued now; the future that waits holds the ticket, not the job.
        let origin = origin.map_or_else(|| self.origin.clone(), |o| *o);
        let answer = front.dispatch(Job::new(id.to_string(), *head, body, origin));
        let max_pipelined = self.front.cfg.max_header_size;
        tokio::select! {
            r = answer => Admitted::Answer(r),
            () = watch_hangup(&self.io, &mut self.buf, max_pipelined) => Admitted::Gone,
        }
    }
}

/// A request whose head has been read and checked, as [`Conn::request`] holds it while it waits.
struct Opened {
    outcome: Outcome,
    /// The head for the worker, or anteroom's answer (both boxed: this waits as long as the request).
    next: Result<Box<RequestHead>, Box<Reply>>,
    /// The client a trusted proxy named, when it is not the peer.
    origin: Option<Box<Origin>>,
    framing: Framing,
    is_head: bool,
    version: http::Version,
    keep_alive: bool,
    expect_continue: bool,
}

enum Admitted {
    Answer(Reply),
    /// Answered before the body was read to its end: the connection cannot carry another request.
    BodyUnread(Reply),
    Gone,
}

/// Waits until the socket may be read (see [`Socket`] for why it is polled).
pub(super) async fn readable<S: Socket>(io: &S) -> io::Result<()> {
    std::future::poll_fn(|cx| io.poll_read_ready(cx)).await
}

/// Reads what the socket has (at least one byte, or 0 at its end) into `buf`, with room for up to `room`
/// more bytes.
async fn read_some<S: Socket>(io: &S, buf: &mut BytesMut, room: usize) -> io::Result<usize> {
    loop {
        readable(io).await?;
        if buf.capacity() - buf.len() < room.min(HEAD_BUFFER) {
            buf.reserve(room);
        }
        match io.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Resolves when the client hangs up (end of stream or error). Bytes it sends meanwhile (a pipelined
/// request) are kept in `buf`, up to `max` of them; past that the socket is no longer watched.
///
/// The buffer is given room only once a byte is really there: tokio's readiness is still set from the
/// head that was just read (the read that took it did not drain the socket to `WouldBlock`), so waiting
/// for it alone would hand every queued request a 1 KiB buffer for nothing (measured: 10 MB at 10,000).
async fn watch_hangup<S: Socket>(io: &S, buf: &mut BytesMut, max: usize) {
    // One readiness future at a time, not `read_some`'s besides: this future waits as long as the request.
    while buf.len() < max {
        if readable(io).await.is_err() {
            return;
        }
        match io.try_has_byte() {
            Ok(true) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Ok(false) | Err(_) => return,
        }
        if buf.capacity() - buf.len() < HEAD_BUFFER {
            buf.reserve(HEAD_BUFFER);
        }
        match io.try_read_buf(buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
    std::future::pending().await
}
