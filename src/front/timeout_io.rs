//! The client's time limit for sending a request head, with a real `408 Request Timeout`.
//!
//! hyper can close a connection whose head is late, but says nothing to the client. This wrapper around the
//! client's socket keeps one deadline that runs while no request is in progress: from the connection's start,
//! and again from the moment a response has been handed over. When it passes, a client that had started a
//! request gets a 408 and the connection closes; an idle keep-alive connection just closes. While a request
//! is in progress (queued, or at a worker) there is no deadline: the queue has its own.
//!
//! On the write side it keeps nginx's `send_timeout`: a write that the client's socket cannot take for
//! `--send-timeout` (the client reads nothing) fails with `TimedOut`, and hyper closes the connection, which
//! drops the response and whatever of it was waiting in memory or in a temp file.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

const RESPONSE_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 54\r\n\r\nThe request head did not arrive in time; closing now.\n";

#[derive(Default)]
struct State {
    armed: AtomicBool,
    /// The connection task, parked in a read: arming must wake it so that it starts the deadline.
    reader: AtomicWaker,
    /// Bumped by every arm, so the reader knows to restart its deadline.
    generation: AtomicU64,
}

/// The service's side: disarm when a request head has arrived, arm when its response is done.
#[derive(Clone)]
pub struct Arming(Arc<State>);

impl Arming {
    pub fn arm(&self) {
        self.0.generation.fetch_add(1, Ordering::Relaxed);
        self.0.armed.store(true, Ordering::Release);
        self.0.reader.wake();
    }

    pub fn disarm(&self) {
        self.0.armed.store(false, Ordering::Release);
    }
}

pub struct HeadTimeoutIo<S> {
    inner: S,
    state: Arc<State>,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    seen_generation: u64,
    read_since_arm: bool,
    write_blocked: bool,
    fired: bool,
    send_timeout: Option<Duration>,
    /// Runs from the first write the socket could not take; disarmed by every write it takes.
    send_sleep: Option<Pin<Box<Sleep>>>,
    send_armed: bool,
}

impl<S> HeadTimeoutIo<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        let state = Arc::new(State::default());
        state.armed.store(true, Ordering::Relaxed);
        HeadTimeoutIo {
            inner,
            state,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            seen_generation: 0,
            read_since_arm: false,
            write_blocked: false,
            fired: false,
            send_timeout: None,
            send_sleep: None,
            send_armed: false,
        }
    }

    /// Closes the connection when the client takes nothing of what is written to it for `limit`.
    pub fn send_timeout(mut self, limit: Duration) -> Self {
        self.send_timeout = Some(limit);
        self
    }

    /// Keeps the send deadline after a write attempt: cleared by progress, started by a blocked write,
    /// and an error once it has passed.
    fn send_deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        self.write_blocked = r.is_pending();
        if r.is_ready() {
            self.send_armed = false;
            return r;
        }
        let Some(limit) = self.send_timeout else {
            return r;
        };
        let deadline = Instant::now() + limit;
        let sleep = self
            .send_sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.send_armed {
            self.send_armed = true;
            sleep.as_mut().reset(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took nothing of its response for {limit:?} (send timeout)"),
            ))),
        }
    }

    pub fn handle(&self) -> Arming {
        Arming(self.state.clone())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadTimeoutIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.fired {
            return Poll::Ready(Ok(()));
        }
        this.state.reader.register(cx.waker());
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.read_since_arm = true;
        }
        if r.is_ready() || !this.state.armed.load(Ordering::Acquire) {
            return r;
        }
        let generation = this.state.generation.load(Ordering::Relaxed);
        if generation != this.seen_generation {
            this.seen_generation = generation;
            this.read_since_arm = false;
            let deadline = Instant::now() + this.timeout;
            this.sleep.as_mut().reset(deadline);
        }
        if this.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.fired = true;
        if this.read_since_arm && !this.write_blocked {
            // Best effort: a socket that cannot take 150 bytes now is not worth waiting for.
            let _ = Pin::new(&mut this.inner).poll_write(cx, RESPONSE_408);
            let _ = Pin::new(&mut this.inner).poll_flush(cx);
        }
        // End of input: hyper closes the connection.
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadTimeoutIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        self.send_deadline(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.send_deadline(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.write_blocked = r.is_pending();
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that arms the head deadline once hyper has taken all of it (and dropped it).
pub struct ArmOnDrop<B> {
    pub inner: B,
    pub arming: Arming,
}

impl<B> Drop for ArmOnDrop<B> {
    fn drop(&mut self) {
        self.arming.arm();
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for ArmOnDrop<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
