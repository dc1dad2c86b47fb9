//! Accepting connections on a thread of its own, so that the kernel's accept queue is always drained.
//!
//! This is the heart of anteroom's promise. The kernel's queue of connections waiting for `accept()` is
//! clamped to `net.core.somaxconn` (128 in many containers); when it is full, nginx gets EAGAIN and answers
//! 502. An accept loop that is one task among thousands on a busy two-core runtime falls behind exactly
//! during a burst, when it matters. So each listener gets a dedicated OS thread that does nothing but
//! `poll` and `accept` until the queue is empty, and hands each connection to the runtime.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::listen::Listener;
use crate::config::ListenAddr;

/// Accepts on `listener` and serves each connection with `serve`, on the runtime, tracked by `conns`.
///
/// The acceptor thread only pushes accepted sockets into a channel; one task on the runtime takes them
/// out and spawns their tasks. So a burst costs the acceptor one wake-up of that task, not one runtime
/// spawn per connection, and the acceptor never waits on a lock held by a runtime thread that the
/// burst has pushed off its core.
pub fn serve_each<F, Fut>(listener: Listener, conns: TaskTracker, serve: F) -> io::Result<Acceptor>
where
    F: Fn(Conn) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
    let handoff = conns.clone();
    tokio::spawn(async move {
        while let Some(accepted) = rx.recv().await {
            let serve_it = serve(match accepted {
                // Registered with the runtime here, on a runtime thread, not on the acceptor's.
                Accepted::Tcp(s, peer) => match tokio::net::TcpStream::from_std(s) {
                    Ok(s) => Conn::Tcp(s, peer),
                    Err(e) => {
                        tracing::warn!("cannot register a connection: {e}");
                        continue;
                    }
                },
                Accepted::Unix(s) => match tokio::net::UnixStream::from_std(s) {
                    Ok(s) => Conn::Unix(s),
                    Err(e) => {
                        tracing::warn!("cannot register a connection: {e}");
                        continue;
                    }
                },
            });
            handoff.spawn(serve_it);
        }
    });
    Acceptor::start(listener, move |accepted| {
        // Fails only when the runtime is shutting down; the connection is then just closed.
        let _ = tx.send(accepted);
    })
}

/// A connection ready for the runtime.
pub enum Conn {
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
    Unix(tokio::net::UnixStream),
}

/// A connection just accepted, still a blocking-mode-agnostic std socket.
pub enum Accepted {
    Tcp(std::net::TcpStream, std::net::SocketAddr),
    Unix(std::os::unix::net::UnixStream),
}

pub struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the thread looks at the stop flag when no connection comes.
const STOP_POLL_MS: i32 = 100;

impl Acceptor {
    /// Starts accepting on `listener`; `on_conn` runs on the acceptor thread and must only hand off.
    pub fn start(
        listener: Listener,
        on_conn: impl Fn(Accepted) + Send + 'static,
    ) -> io::Result<Acceptor> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = listener.local_addr();
        let thread = std::thread::Builder::new()
            .name(format!("accept {name}"))
            .spawn(move || run(listener, name, flag, on_conn))?;
        Ok(Acceptor {
            stop,
            thread: Some(thread),
        })
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

fn run(listener: Listener, name: ListenAddr, stop: Arc<AtomicBool>, on_conn: impl Fn(Accepted)) {
    raise_priority(&name);
    let fd = match &listener {
        Listener::Tcp(l) => l.as_raw_fd(),
        Listener::Unix { listener, .. } => listener.as_raw_fd(),
    };
    let mut last_error_log: Option<std::time::Instant> = None;
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call's duration; the listener outlives the loop.
        let n = unsafe { libc::poll(&mut pfd, 1, STOP_POLL_MS) };
        if n <= 0 {
            continue;
        }
        // Drain the whole queue before polling again.
        loop {
            let r = match &listener {
                Listener::Tcp(l) => l.accept_std().map(|(s, a)| Accepted::Tcp(s, a)),
                Listener::Unix { listener, .. } => listener.accept_std().map(Accepted::Unix),
            };
            match r {
                Ok(conn) => on_conn(conn),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and the like: say so (at most once a second), and give the process a moment.
                    if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                        tracing::error!(listener = %name, "accept failed: {e}");
                        last_error_log = Some(std::time::Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
            }
        }
    }
    drop(listener);
}

/// This thread runs for a few microseconds at a time, but it must run the moment connections arrive, even
/// when the machine is saturated by the very burst it is absorbing. So it asks for the lowest real-time
/// priority (SCHED_FIFO 1: it preempts ordinary threads, and it always sleeps in `poll` again at once), or
/// failing that (no CAP_SYS_NICE, or a container without a real-time budget) a lower nice value.
fn raise_priority(name: &ListenAddr) {
    // SAFETY: sched_setscheduler on the calling thread (0) with a valid param struct; setpriority and
    // gettid have no memory-safety preconditions.
    unsafe {
        let param = libc::sched_param { sched_priority: 1 };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 {
            return;
        }
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, -10) != 0 {
            tracing::debug!(
                listener = %name,
                "acceptor thread keeps normal priority: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Non-blocking accept straight on the tokio listener's socket, from a thread outside the runtime.
trait AcceptStd {
    type Out;
    fn accept_std(&self) -> io::Result<Self::Out>;
}

impl AcceptStd for tokio::net::TcpListener {
    type Out = (std::net::TcpStream, std::net::SocketAddr);

    fn accept_std(&self) -> io::Result<Self::Out> {
        let sock = socket2::SockRef::from(self);
        let (s, addr) = sock.accept()?;
        let addr = addr
            .as_socket()
            .ok_or_else(|| io::Error::other("accepted a TCP connection without an IP address"))?;
        let s: std::net::TcpStream = s.into();
        s.set_nonblocking(true)?;
        let _ = s.set_nodelay(true);
        Ok((s, addr))
    }
}

impl AcceptStd for tokio::net::UnixListener {
    type Out = std::os::unix::net::UnixStream;

    fn accept_std(&self) -> io::Result<Self::Out> {
        let sock = socket2::SockRef::from(self);
        let (s, _) = sock.accept()?;
        let s: std::os::unix::net::UnixStream = s.into();
        s.set_nonblocking(true)?;
        Ok(s)
    }
}
