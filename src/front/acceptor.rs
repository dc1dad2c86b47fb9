//! Accepting connections on a thread of its own, so that the kernel's accept queue is always drained.
//!
//! This is the heart of anteroom's promise. The kernel's queue of connections waiting for `accept()` is
//! clamped to `net.core.somaxconn` (128 in many containers); when it is full, nginx gets EAGAIN and answers
//! 502. An accept loop that is one task among thousands on a busy two-core runtime falls behind exactly
//! during a burst, when it matters. So each listener gets a dedicated OS thread that does nothing but
//! `poll` and `accept` until the queue is empty, and hands each connection to the runtime.
//!
//! Tried and measured (2026-11-27): accepting on the runtime while it keeps up, with this thread as a
//! backstop armed by signs of a burst. On a quiet host a new connection then cost about 50 µs less (no
//! hand-off), but under nginx's burst of 1,000 the runtime's threads, ordinary threads on two cores shared
//! with nginx and the load generator, woke to their first accept only once the 128-deep queue was full:
//! the thread, armed then, took 125 connections at once, and nginx had met `EAGAIN` 20 to 49 times
//! (`tests/burst.rs`, one run in three). Only a thread that the kernel wakes at the first connection, at a
//! priority above the burst's own processes, keeps that queue empty; a thread woken for every connection
//! anyway is what this design already is.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::task::TaskTracker;

use super::conns::{ConnHandle, Counted, Table};
use super::listen::Listener;
use crate::config::ListenAddr;
use crate::ratelog::LogLimit;
use crate::request::Origin;

/// How a front turns a connection away when the connection table has no idle connection to close for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// HTTP: `503` with `Retry-After` and `Connection: close`, then close.
    Http503,
    /// Close at once (FastCGI: nginx sees the connection closed and answers its client itself).
    Close,
}

/// The whole answer to an HTTP client refused at the connection limit: it is written before the request is
/// parsed, so it cannot depend on it.
pub const RESPONSE_503: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 58\r\n\r\nThe server has too many open connections; try again soon.\n";

/// Longest a refused HTTP connection is kept to read the client's request and let it read the 503 (closing
/// with its request unread would reset the connection, and the client might never see the answer).
const REFUSE_LINGER: Duration = Duration::from_secs(1);

/// Accepts on `listener` and serves each connection with `serve`, on the runtime, tracked by `conns`.
///
/// Every connection is counted in `table` from the moment it is accepted. The acceptor thread only pushes
/// accepted sockets into a channel; one task on the runtime takes them out, admits them into the table
/// (closing the oldest idle connection if the table is full, or refusing this one as `refusal` says if
/// nothing can be closed) and spawns their tasks. So a burst costs the acceptor one wake-up of that task,
/// not one runtime spawn per connection, and the acceptor never waits on a lock held by a runtime thread
/// that the burst has pushed off its core.
pub fn serve_each<F, Fut>(
    listener: Listener,
    table: Arc<Table>,
    refusal: Refusal,
    conns: TaskTracker,
    serve: F,
) -> io::Result<Acceptor>
where
    F: Fn(ClientStream, ConnHandle, Option<Box<Origin>>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Arrival>();
    let handoff = conns.clone();
    let admit = table.clone();
    tokio::spawn(async move {
        static REGISTER: LogLimit = LogLimit::per_second();
        while let Some((accepted, counted, known)) = rx.recv().await {
            // Registered with the runtime here, on a runtime thread, not on the acceptor's.
            let conn = match accepted {
                Accepted::Tcp(s, peer) => {
                    tokio::net::TcpStream::from_std(s).map(|s| ClientStream::Tcp(s, peer))
                }
                Accepted::Unix(s) => tokio::net::UnixStream::from_std(s).map(ClientStream::Unix),
            };
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    if let Some(suppressed) = REGISTER.check() {
                        tracing::warn!(suppressed, "cannot register a connection: {e}");
                    }
                    continue;
                }
            };
            match admit.admit(counted) {
                Ok(handle) => handoff.spawn(serve(conn, handle, known)),
                Err(counted) => handoff.spawn(refuse(conn, counted, refusal)),
            };
        }
    });
    let adopter = Adopter {
        tx: tx.clone(),
        table: table.clone(),
    };
    let mut acceptor = Acceptor::start(listener, table, refusal, move |accepted, counted| {
        // Fails only when the runtime is shutting down; the connection is then just closed.
        let _ = tx.send((accepted, counted, None));
    })?;
    acceptor.adopter = Some(adopter);
    Ok(acceptor)
}

/// Takes in connections that were accepted elsewhere (by the process an upgrade replaces, which passes its
/// kept-alive ones on: see `upgrade`) by the same path as this acceptor's own: counted in the table, then
/// admitted and served, or refused when nothing can make room.
#[derive(Clone)]
pub struct Adopter {
    tx: tokio::sync::mpsc::UnboundedSender<Arrival>,
    table: Arc<Table>,
}

/// A connection on its way to the runtime, with the origin the process that passed it had read from its
/// PROXY header (None: it was accepted here, or had none).
type Arrival = (Accepted, Counted, Option<Box<Origin>>);

impl Adopter {
    /// Serves `conn`, a connected TCP or unix stream socket, whose PROXY header (if any) gave `known`; one
    /// whose client has gone already, or over the table's hard cap, is closed.
    pub fn adopt(&self, conn: OwnedFd, known: Option<Box<Origin>>) {
        let unix = rustix::net::getsockname(&conn)
            .is_ok_and(|a| a.address_family() == rustix::net::AddressFamily::UNIX);
        // Non-blocking already (the flag belongs to the open socket, which the old process set), but the
        // runtime must be sure of it.
        let accepted = if unix {
            let s = std::os::unix::net::UnixStream::from(conn);
            match s.set_nonblocking(true) {
                Ok(()) => Accepted::Unix(s),
                Err(_) => return,
            }
        } else {
            let s = std::net::TcpStream::from(conn);
            match (s.peer_addr(), s.set_nonblocking(true)) {
                (Ok(peer), Ok(())) => Accepted::Tcp(s, peer),
                _ => return,
            }
        };
        if let Some(counted) = self.table.count() {
            let _ = self.tx.send((accepted, counted, known));
        }
    }
}

/// Turns a connection away on the runtime; it stays counted until it is closed.
async fn refuse(conn: ClientStream, counted: Counted, refusal: Refusal) {
    match conn {
        ClientStream::Tcp(s, _) => refuse_io(s, refusal).await,
        ClientStream::Unix(s) => refuse_io(s, refusal).await,
    }
    drop(counted);
}

async fn refuse_io<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, refusal: Refusal) {
    if refusal == Refusal::Close {
        return;
    }
    let _ = tokio::time::timeout(REFUSE_LINGER, async {
        let mut buf = [0u8; 2048];
        // Most clients send their request with the connection: take it first, briefly.
        let _ = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await;
        s.write_all(RESPONSE_503).await?;
        s.shutdown().await?;
        // Until the client closes, having read the answer.
        while s.read(&mut buf).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// A connection ready for the runtime.
pub enum ClientStream {
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
    Unix(tokio::net::UnixStream),
}

/// A connection just accepted, still a blocking-mode-agnostic std socket.
pub enum Accepted {
    Tcp(std::net::TcpStream, std::net::SocketAddr),
    Unix(std::os::unix::net::UnixStream),
}

/// Turns a connection away on the acceptor thread itself (the table's hard cap): what the client sent is
/// read, the answer written, all without blocking; then the socket closes.
fn refuse_now(conn: Accepted, refusal: Refusal) {
    if refusal == Refusal::Close {
        return;
    }
    let mut buf = [0u8; 2048];
    match &conn {
        Accepted::Tcp(s, _) => {
            let _ = (&*s).read(&mut buf);
            let _ = (&*s).write(RESPONSE_503);
        }
        Accepted::Unix(s) => {
            let _ = (&*s).read(&mut buf);
            let _ = (&*s).write(RESPONSE_503);
        }
    }
}

pub struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Serves connections passed by an upgrade's old process as this listener's own.
    adopter: Option<Adopter>,
}

/// How often the thread looks at the stop flag when no connection comes.
const STOP_POLL: Duration = Duration::from_millis(100);

impl Acceptor {
    /// Starts accepting on `listener`, counting each connection in `table`; `on_conn` runs on the acceptor
    /// thread and must only hand off. Beyond the table's hard cap a connection is refused on the thread.
    pub fn start(
        listener: Listener,
        table: Arc<Table>,
        refusal: Refusal,
        on_conn: impl Fn(Accepted, Counted) + Send + 'static,
    ) -> io::Result<Acceptor> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = listener.local_addr();
        let thread = std::thread::Builder::new()
            .name(format!("accept {name}"))
            .spawn(move || run(listener, name, flag, &table, refusal, on_conn))?;
        Ok(Acceptor {
            stop,
            thread: Some(thread),
            adopter: None,
        })
    }

    /// The way in for connections accepted elsewhere, served as this listener's own.
    pub fn adopter(&self) -> Option<Adopter> {
        self.adopter.clone()
    }

    /// Stops accepting and waits for the thread; the listener is closed (its unix socket file removed).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn run(
    listener: Listener,
    name: ListenAddr,
    stop: Arc<AtomicBool>,
    table: &Arc<Table>,
    refusal: Refusal,
    on_conn: impl Fn(Accepted, Counted),
) {
    raise_priority(&name);
    let fd = match &listener {
        Listener::Tcp(l) => l.as_fd(),
        Listener::Unix { listener, .. } => listener.as_fd(),
    };
    static ACCEPT_FAILED: LogLimit = LogLimit::per_second();
    while !stop.load(Ordering::Acquire) {
        // Timed out, or interrupted: look at the stop flag and poll again.
        if !matches!(crate::sys::fd::wait_readable(fd, STOP_POLL), Ok(true)) {
            continue;
        }
        // Drain the whole queue before polling again.
        loop {
            wait_for_closing(table, &stop);
            let r = match &listener {
                Listener::Tcp(l) => l.accept_std().map(|(s, a)| Accepted::Tcp(s, a)),
                Listener::Unix { listener, .. } => listener.accept_std().map(Accepted::Unix),
            };
            match r {
                Ok(conn) => match table.count() {
                    Some(counted) => on_conn(conn, counted),
                    None => refuse_now(conn, refusal),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and the like: say so (at most once a second), and give the process a moment.
                    if let Some(suppressed) = ACCEPT_FAILED.check() {
                        tracing::error!(listener = %name, suppressed, "accept failed: {e}");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
    }
    drop(listener);
}

/// Longest the acceptor waits at the hard cap for connections the table has told to close.
const CLOSING_WAIT: Duration = Duration::from_millis(200);

/// At the table's hard cap while idle connections it closed to make room are still closing (their tasks
/// have not run yet: a burst outpaces the runtime), waits for them rather than refuse clients there would
/// be room for a moment later. Meanwhile new connections wait in the kernel's queue, for milliseconds.
fn wait_for_closing(table: &Table, stop: &AtomicBool) {
    let started = std::time::Instant::now();
    while table.closing_at_cap()
        && started.elapsed() < CLOSING_WAIT
        && !stop.load(Ordering::Acquire)
    {
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// This thread runs for a few microseconds at a time, but it must run the moment connections arrive, even
/// when the machine is saturated by the very burst it is absorbing. So it asks for the lowest real-time
/// priority (SCHED_FIFO 1: it preempts ordinary threads, and it always sleeps in `poll` again at once), or
/// failing that (no CAP_SYS_NICE, or a container without a real-time budget) a lower nice value.
fn raise_priority(name: &ListenAddr) {
    if let Err(e) = crate::sys::sched::raise_thread_priority() {
        tracing::debug!(listener = %name, "acceptor thread keeps normal priority: {e}");
    }
}

/// The accepted socket is non-blocking and close-on-exec from the start: one `accept4`, no `ioctl` after it.
const ACCEPT_FLAGS: libc::c_int = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;

/// Non-blocking accept straight on the tokio listener's socket, from a thread outside the runtime.
trait AcceptStd {
    type Out;
    fn accept_std(&self) -> io::Result<Self::Out>;
}

impl AcceptStd for tokio::net::TcpListener {
    type Out = (std::net::TcpStream, std::net::SocketAddr);

    fn accept_std(&self) -> io::Result<Self::Out> {
        let sock = socket2::SockRef::from(self);
        let (s, addr) = sock.accept4(ACCEPT_FLAGS)?;
        let addr = addr
            .as_socket()
            .ok_or_else(|| io::Error::other("accepted a TCP connection without an IP address"))?;
        let s: std::net::TcpStream = s.into();
        let _ = s.set_nodelay(true);
        Ok((s, addr))
    }
}

impl AcceptStd for tokio::net::UnixListener {
    type Out = std::os::unix::net::UnixStream;

    fn accept_std(&self) -> io::Result<Self::Out> {
        let sock = socket2::SockRef::from(self);
        let (s, _) = sock.accept4(ACCEPT_FLAGS)?;
        Ok(s.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_503_is_well_formed() {
        let text = std::str::from_utf8(RESPONSE_503).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
    }
}
