//! Accepting connections so that the kernel's accept queue is always drained, at the lowest cost per connection.
//!
//! This is the heart of anteroom's promise. The kernel's queue of connections waiting for `accept()` is
//! clamped to `net.core.somaxconn` (128 in many containers); when it is full, nginx gets EAGAIN and answers
//! 502. An accept loop that is one task among thousands on a busy two-core runtime falls behind exactly
//! during a burst, when it matters. So each listener has a dedicated OS thread at raised priority that can
//! `poll` and `accept` until the queue is empty, and hands each connection to the runtime.
//!
//! But a hand-off from a thread costs a wake-up of that thread and one of a runtime thread for every
//! connection: on a quiet host that is most of what a new connection adds to a request's latency (about
//! 50 µs here, measured with `bench/run --scenarios latency`). So connections are accepted in two places:
//! - **on the runtime**, by one task per listener, while it keeps up: the connection's task is spawned where
//!   the readiness arrived, and no other thread wakes;
//! - **by the thread** (the backstop), from the moment the runtime shows it may not: it found
//!   [`ARM_AT`] connections waiting at once (a burst is arriving), the connection table is at its hard cap
//!   with closes under way, or the thread's own look every [`HEARTBEAT`] found a connection waiting that the
//!   runtime had not taken since the last look (the runtime is stalled). Then the runtime task steps aside,
//!   and the thread accepts everything, as soon as it arrives, until no burst has come for
//!   [`DISARM_AFTER`].
//!
//! A misfire either way costs little: armed for nothing, the thread does for a second what it always did
//! before; a burst the runtime task misses is seen by the heartbeat within [`HEARTBEAT`], far less than
//! the time a 128-deep queue takes to fill at any rate the runtime could not follow.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conns::{ConnHandle, Counted, Table};
use super::listen::Listener;
use crate::config::ListenAddr;
use crate::ratelog::LogLimit;

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
/// Every connection is counted in `table` from the moment it is accepted. The runtime's accept task
/// admits it into the table (closing the oldest idle connection if the table is full, or refusing this one
/// as `refusal` says if nothing can be closed) and spawns its task. The backstop thread, when armed, only
/// pushes accepted sockets into a channel; one task on the runtime takes them out, admits and spawns them.
/// So a burst costs the thread one wake-up of that task, not one runtime spawn per connection, and the
/// thread never waits on a lock held by a runtime thread that the burst has pushed off its core.
pub fn serve_each<F, Fut>(
    listener: Listener,
    table: Arc<Table>,
    refusal: Refusal,
    conns: TaskTracker,
    serve: F,
) -> io::Result<Acceptor>
where
    F: Fn(ClientStream, ConnHandle) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = Arc::new(listener);
    let backstop = Arc::new(Backstop::default());
    let serve = Arc::new(serve);
    let spawn = {
        let (table, conns, serve) = (table.clone(), conns.clone(), serve.clone());
        move |conn: ClientStream| {
            let Some(counted) = table.count() else {
                return refuse_uncounted(&conn, refusal);
            };
            match table.admit(counted) {
                Ok(handle) => conns.spawn(serve(conn, handle)),
                Err(counted) => conns.spawn(refuse(conn, counted, refusal)),
            };
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Accepted, Counted)>();
    let handoff = conns.clone();
    let admit = table.clone();
    tokio::spawn(async move {
        static REGISTER: LogLimit = LogLimit::per_second();
        while let Some((accepted, counted)) = rx.recv().await {
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
                Ok(handle) => handoff.spawn(serve(conn, handle)),
                Err(counted) => handoff.spawn(refuse(conn, counted, refusal)),
            };
        }
    });
    let stop_runtime = CancellationToken::new();
    tokio::spawn(accept_on_runtime(
        listener.clone(),
        table.clone(),
        backstop.clone(),
        stop_runtime.clone(),
        spawn,
    ));
    let mut acceptor = Acceptor::start(
        listener,
        table,
        refusal,
        backstop,
        move |accepted, counted| {
            // Fails only when the runtime is shutting down; the connection is then just closed.
            let _ = tx.send((accepted, counted));
        },
    )?;
    acceptor.runtime = Some(stop_runtime.drop_guard());
    Ok(acceptor)
}

/// Connections found waiting at once by the runtime's accept task that arm the backstop thread: more than
/// a quiet host ever queues (one client's new connection at a time), a small part of any backlog.
pub const ARM_AT: usize = 4;
/// How often the unarmed thread looks whether the runtime has left a connection waiting.
pub const HEARTBEAT: Duration = Duration::from_millis(20);
/// How long the armed thread keeps accepting after the last burst it saw.
pub const DISARM_AFTER: Duration = Duration::from_secs(1);

/// What the runtime's accept task and the backstop thread share.
#[derive(Default)]
struct Backstop {
    armed: AtomicBool,
    /// Connections the runtime's task accepted: the heartbeat's proof that the runtime is alive.
    on_runtime: AtomicU64,
    disarmed: Notify,
    thread: OnceLock<Thread>,
}

impl Backstop {
    fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    fn arm(&self) {
        if !self.armed.swap(true, Ordering::AcqRel) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
    }

    fn disarm(&self) {
        self.armed.store(false, Ordering::Release);
        self.disarmed.notify_waiters();
    }

    /// Until the thread hands accepting back to the runtime.
    async fn until_disarmed(&self) {
        loop {
            let notified = self.disarmed.notified();
            tokio::pin!(notified);
            // Registered before the flag is read, so a disarm in between is not missed.
            notified.as_mut().enable();
            if !self.armed() {
                return;
            }
            notified.await;
        }
    }
}

/// The runtime's side: accepts while the backstop is not armed, and arms it when the runtime may not keep up.
async fn accept_on_runtime(
    listener: Arc<Listener>,
    table: Arc<Table>,
    backstop: Arc<Backstop>,
    stop: CancellationToken,
    spawn: impl Fn(ClientStream),
) {
    static ACCEPT_FAILED: LogLimit = LogLimit::per_second();
    loop {
        let first = tokio::select! {
            () = stop.cancelled() => return,
            r = async {
                backstop.until_disarmed().await;
                std::future::poll_fn(|cx| poll_accept(&listener, cx)).await
            } => r,
        };
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(r) = next.take() {
            match r {
                Ok(conn) => {
                    taken += 1;
                    backstop.on_runtime.fetch_add(1, Ordering::Relaxed);
                    spawn(conn);
                }
                Err(e) if transient(&e) => {}
                Err(e) => {
                    // EMFILE and the like: say so (at most once a second), and give the process a moment.
                    if let Some(suppressed) = ACCEPT_FAILED.check() {
                        tracing::error!(listener = %listener.local_addr(), suppressed, "accept failed: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    break;
                }
            }
            // A burst, or the table waiting for closes at its cap (the thread knows how to wait for them):
            // the thread takes over from here.
            if taken >= ARM_AT || table.closing_at_cap() {
                backstop.arm();
                break;
            }
            // What else is waiting already, without waiting for more.
            next = std::future::poll_fn(|cx| match poll_accept(&listener, cx) {
                Poll::Ready(r) => Poll::Ready(Some(r)),
                Poll::Pending => Poll::Ready(None),
            })
            .await;
        }
    }
}

fn poll_accept(listener: &Listener, cx: &mut Context<'_>) -> Poll<io::Result<ClientStream>> {
    match listener {
        Listener::Tcp(l) => l.poll_accept(cx).map_ok(|(s, peer)| {
            let _ = s.set_nodelay(true);
            ClientStream::Tcp(s, peer)
        }),
        Listener::Unix { listener, .. } => listener
            .poll_accept(cx)
            .map_ok(|(s, _)| ClientStream::Unix(s)),
    }
}

/// Errors of one connection that went away before it was accepted: accept the next.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
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

/// Turns a connection away at once on the runtime (the table's hard cap, as `refuse_now` on the thread).
fn refuse_uncounted(conn: &ClientStream, refusal: Refusal) {
    if refusal == Refusal::Close {
        return;
    }
    let mut buf = [0u8; 2048];
    match conn {
        ClientStream::Tcp(s, _) => {
            let _ = s.try_read(&mut buf);
            let _ = s.try_write(RESPONSE_503);
        }
        ClientStream::Unix(s) => {
            let _ = s.try_read(&mut buf);
            let _ = s.try_write(RESPONSE_503);
        }
    }
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
    /// Stops the runtime's accept task when dropped.
    runtime: Option<tokio_util::sync::DropGuard>,
    #[cfg(test)]
    backstop: Arc<Backstop>,
}

/// How often the thread looks at the stop flag when no connection comes.
const STOP_POLL: Duration = Duration::from_millis(100);

impl Acceptor {
    /// Starts the backstop thread on `listener`, counting each connection in `table`; `on_conn` runs on the
    /// thread and must only hand off. Beyond the table's hard cap a connection is refused on the thread.
    fn start(
        listener: Arc<Listener>,
        table: Arc<Table>,
        refusal: Refusal,
        backstop: Arc<Backstop>,
        on_conn: impl Fn(Accepted, Counted) + Send + 'static,
    ) -> io::Result<Acceptor> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = listener.local_addr();
        let shared = backstop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("accept {name}"))
            .spawn(move || run(&listener, &name, &flag, &table, refusal, &shared, on_conn))?;
        let _ = backstop.thread.set(thread.thread().clone());
        // Armed before the handle was known: its unpark was lost.
        if backstop.armed() {
            thread.thread().unpark();
        }
        Ok(Acceptor {
            stop,
            thread: Some(thread),
            runtime: None,
            #[cfg(test)]
            backstop,
        })
    }

    /// Stops accepting and waits for the thread; the listener is closed (its unix socket file removed) once
    /// the runtime's task has seen the stop too.
    pub fn stop(mut self) {
        drop(self.runtime.take());
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }
}

/// The backstop thread: asleep but for a look every [`HEARTBEAT`] while the runtime accepts; accepting
/// everything as it arrives while armed.
fn run(
    listener: &Listener,
    name: &ListenAddr,
    stop: &AtomicBool,
    table: &Arc<Table>,
    refusal: Refusal,
    backstop: &Backstop,
    on_conn: impl Fn(Accepted, Counted),
) {
    raise_priority(name);
    let fd = match listener {
        Listener::Tcp(l) => l.as_fd(),
        Listener::Unix { listener, .. } => listener.as_fd(),
    };
    let mut seen = backstop.on_runtime.load(Ordering::Relaxed);
    // When the thread last saw a burst (or was armed).
    let mut busy = Instant::now();
    let mut was_armed = false;
    while !stop.load(Ordering::Acquire) {
        if !backstop.armed() {
            was_armed = false;
            std::thread::park_timeout(HEARTBEAT);
            if stop.load(Ordering::Acquire) || backstop.armed() {
                continue;
            }
            // Stalled: a connection waits, and the runtime has taken none since the last look.
            let now = backstop.on_runtime.load(Ordering::Relaxed);
            if now == seen && matches!(crate::sys::fd::wait_readable(fd, Duration::ZERO), Ok(true))
            {
                tracing::debug!(listener = %name, "the runtime left a connection waiting: the acceptor thread takes over");
                backstop.arm();
            }
            seen = now;
            continue;
        }
        if !was_armed {
            was_armed = true;
            busy = Instant::now();
        }
        // Timed out, or interrupted: look at the stop flag and whether the burst is over, and poll again.
        let taken = if matches!(crate::sys::fd::wait_readable(fd, STOP_POLL), Ok(true)) {
            drain(listener, name, stop, table, refusal, &on_conn)
        } else {
            0
        };
        if taken >= ARM_AT {
            busy = Instant::now();
        } else if busy.elapsed() >= DISARM_AFTER {
            seen = backstop.on_runtime.load(Ordering::Relaxed);
            backstop.disarm();
        }
    }
}

/// Accepts the whole queue; returns how many connections it took.
fn drain(
    listener: &Listener,
    name: &ListenAddr,
    stop: &AtomicBool,
    table: &Arc<Table>,
    refusal: Refusal,
    on_conn: &impl Fn(Accepted, Counted),
) -> usize {
    static ACCEPT_FAILED: LogLimit = LogLimit::per_second();
    let mut taken = 0;
    loop {
        wait_for_closing(table, stop);
        let r = match listener {
            Listener::Tcp(l) => l.accept_std().map(|(s, a)| Accepted::Tcp(s, a)),
            Listener::Unix { listener, .. } => listener.accept_std().map(Accepted::Unix),
        };
        match r {
            Ok(conn) => {
                taken += 1;
                table.accepted_by_thread();
                match table.count() {
                    Some(counted) => on_conn(conn, counted),
                    None => refuse_now(conn, refusal),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return taken,
            Err(e) if transient(&e) => {}
            Err(e) => {
                // EMFILE and the like: say so (at most once a second), and give the process a moment.
                if let Some(suppressed) = ACCEPT_FAILED.check() {
                    tracing::error!(listener = %name, suppressed, "accept failed: {e}");
                }
                std::thread::sleep(Duration::from_millis(10));
                return taken;
            }
        }
    }
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

    use crate::front::conns::table_for_tests;

    fn tcp_listener(backlog: u32) -> Listener {
        Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), backlog).unwrap()
    }

    fn port(l: &Listener) -> std::net::SocketAddr {
        match l.local_addr() {
            ListenAddr::Tcp(a) => a,
            ListenAddr::Unix(_) => unreachable!(),
        }
    }

    /// Each connection is answered "ok" and closed.
    fn start(listener: Listener, table: &Arc<Table>) -> Acceptor {
        serve_each(
            listener,
            table.clone(),
            Refusal::Close,
            TaskTracker::new(),
            |conn, handle| async move {
                if let ClientStream::Tcp(mut s, _) = conn {
                    let _ = s.write_all(b"ok").await;
                }
                drop(handle);
            },
        )
        .unwrap()
    }

    fn get(addr: std::net::SocketAddr) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ok() {
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn one_connection_at_a_time_is_accepted_on_the_runtime() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _in = rt.enter();
        let table = table_for_tests(100, 1000);
        let listener = tcp_listener(64);
        let addr = port(&listener);
        let acceptor = start(listener, &table);
        for _ in 0..20 {
            assert_eq!(get(addr), "ok");
        }
        assert!(
            !acceptor.backstop.armed(),
            "the thread was armed by single connections"
        );
        assert_eq!(acceptor.backstop.on_runtime.load(Ordering::Relaxed), 20);
        acceptor.stop();
    }

    #[test]
    fn a_burst_arms_the_thread_which_hands_back_once_it_is_over() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _in = rt.enter();
        let table = table_for_tests(100, 1000);
        let listener = tcp_listener(64);
        let addr = port(&listener);
        // Twelve connections wait in the kernel's queue before anything accepts.
        let clients: Vec<_> = (0..12)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let acceptor = start(listener, &table);
        until("armed", Duration::from_secs(2), || {
            acceptor.backstop.armed()
        });
        for mut c in clients {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            assert_eq!(out, "ok");
        }
        let armed = acceptor.backstop.on_runtime.load(Ordering::Relaxed);
        assert!(armed <= ARM_AT as u64, "the runtime took {armed}");
        until("disarmed", DISARM_AFTER * 4, || !acceptor.backstop.armed());
        assert_eq!(get(addr), "ok");
        assert_eq!(
            acceptor.backstop.on_runtime.load(Ordering::Relaxed),
            armed + 1
        );
        acceptor.stop();
    }

    /// The case the thread exists for: the runtime does not run at all (here its only thread is blocked), and
    /// the kernel's queue is drained anyway.
    #[test]
    fn a_stalled_runtime_is_backed_by_the_thread() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let table = table_for_tests(100, 1000);
        rt.block_on(async {
            let listener = tcp_listener(64);
            let addr = port(&listener);
            let acceptor = start(listener, &table);
            // Let the accept task start waiting, as it would on a quiet host.
            tokio::task::yield_now().await;
            let clients: Vec<_> = (0..16)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            // The runtime's only thread is blocked here: only the acceptor thread can take them.
            until("16 accepted", Duration::from_secs(2), || table.open() == 16);
            assert!(acceptor.backstop.armed());
            assert_eq!(acceptor.backstop.on_runtime.load(Ordering::Relaxed), 0);
            drop(clients);
            acceptor.stop();
        });
    }

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
