//! Bounded memory for bodies: what anteroom holds of request and response bodies stays within its
//! configuration whatever clients do; the rest waits in unlinked temp files, as nginx's `client_body_temp`
//! and `proxy_temp` do.
//!
//! Three bounds, one budget:
//! - A request body larger than `--body-buffer-size` is written to a temp file as it arrives
//!   ([`BodyWriter`]); the queue holds the file, and the worker reads it from there ([`RequestBody::stream`]),
//!   again on a retry.
//! - A response whose client reads more slowly than its worker writes ([`channel`]) keeps at most
//!   `--response-buffer-size` in memory; the rest goes to a temp file, so the worker is still read at full
//!   speed and freed as soon as it has written its answer. When the client catches up, the response goes back
//!   to memory and the file is reused from its start.
//! - All of these bytes in memory are charged to one [`Budget`], `--max-queue-bytes`. Once it is spent,
//!   bodies go to disk even when they are small, so the total stays bounded however many clients there are.
//!
//! Temp files are created unlinked (`O_TMPFILE`, else create and unlink at once), so a file vanishes with its
//! last descriptor: when the request or the response is dropped, and also when anteroom is killed.
//! File I/O runs on tokio's blocking pool, a chunk at a time, never on the runtime's threads.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::sync::lock;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body anteroom sends to a client.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Bytes read from a temp file at a time, towards a worker or a client.
const CHUNK: u64 = 64 << 10;
/// Bytes of a request body gathered before one write to its temp file.
const WRITE_BATCH: usize = 64 << 10;

/// The process-wide limit on body bytes held in memory (`--max-queue-bytes`).
#[derive(Debug)]
pub struct Budget {
    used: AtomicU64,
    limit: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicU64::new(0),
            limit,
        })
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Bytes charged to a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Charge {
    pub fn new(budget: &Arc<Budget>) -> Charge {
        Charge {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// Charges `n` more bytes; false (and nothing charged) when the budget cannot take them.
    pub fn grow(&mut self, n: u64) -> bool {
        let ok = self.budget.take(n);
        if ok {
            self.bytes += n;
        }
        ok
    }

    /// Charges `n` more bytes even beyond the limit: for the one chunk that must be held to make progress.
    fn force(&mut self, n: u64) {
        self.budget.used.fetch_add(n, Ordering::AcqRel);
        self.bytes += n;
    }

    pub fn shrink(&mut self, n: u64) {
        let n = n.min(self.bytes);
        self.budget.give(n);
        self.bytes -= n;
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

/// Where bodies go and how much of them may stay in memory: from the configuration, set once at start.
#[derive(Debug)]
pub struct Settings {
    pub budget: Arc<Budget>,
    pub dir: PathBuf,
    pub body_buffer: u64,
    pub response_buffer: u64,
}

impl Settings {
    pub fn from_config(cfg: &crate::config::Config) -> Settings {
        Settings {
            budget: Budget::new(cfg.max_queue_bytes),
            dir: cfg.temp_dir.clone(),
            body_buffer: cfg.body_buffer_size,
            response_buffer: cfg.response_buffer_size,
        }
    }
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            budget: Budget::new(256 << 20),
            dir: std::env::temp_dir(),
            body_buffer: 64 << 10,
            response_buffer: 256 << 10,
        }
    }
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets the process's settings (the first call wins: memory is a property of the process, not of a room)
/// and starts giving freed memory back to the kernel. Must be called inside the runtime.
pub fn start(cfg: &crate::config::Config) {
    let _ = SETTINGS.set(Settings::from_config(cfg));
    start_trimmer();
}

/// How often freed memory is given back to the kernel.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Gives memory freed after a peak back to the kernel, every [`TRIM_EVERY`].
///
/// glibc keeps freed heap memory for reuse: after 100 clients left 900 MiB of unread responses, the
/// process stayed at 900 MiB for good. `malloc_trim(0)` returns all of it (to 8 MiB) in one call of about
/// 140 ms, and costs about 0.2 ms when there is nothing to return. jemalloc (decay) returned only part of
/// it, and mimalloc kept most of it and peaked higher; see the README's memory section.
fn start_trimmer() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(async {
        loop {
            tokio::time::sleep(TRIM_EVERY).await;
            let _ = tokio::task::spawn_blocking(|| {
                let t = std::time::Instant::now();
                if crate::sys::memory::trim_heap() {
                    tracing::debug!("returned freed memory to the kernel in {:?}", t.elapsed());
                }
            })
            .await;
        }
    });
}

/// The settings given to [`start`], or the defaults.
pub fn settings() -> &'static Settings {
    SETTINGS.get_or_init(Settings::default)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

/// Temp files open now, across the process: each holds a descriptor.
static TEMP_FILES_OPEN: AtomicUsize = AtomicUsize::new(0);

/// Asked before each new temp file: whether a descriptor may go to it (see [`set_descriptor_room`]).
type Room = Box<dyn Fn(usize) -> bool + Send + Sync>;
static DESCRIPTOR_ROOM: OnceLock<Room> = OnceLock::new();

/// Temp files open now.
pub fn temp_files_open() -> usize {
    TEMP_FILES_OPEN.load(Ordering::Relaxed)
}

/// Sets who decides whether a new temp file may take a descriptor: called with the number of temp files
/// open, it may make room (the connection table closes an idle client connection) and says whether there
/// is room. Without it, every temp file is allowed. The first call wins.
pub fn set_descriptor_room(room: impl Fn(usize) -> bool + Send + Sync + 'static) {
    let _ = DESCRIPTOR_ROOM.set(Box::new(room));
}

/// An unlinked temp file, counted in [`temp_files_open`] while open.
#[derive(Debug)]
pub struct TempFile(File);

impl std::ops::Deref for TempFile {
    type Target = File;
    fn deref(&self) -> &File {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        TEMP_FILES_OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A new unlinked file in `settings.dir`, if a descriptor may go to it: the descriptors kept back for new
/// workers and the admin listener are not given to temp files.
async fn temp_file(settings: &'static Settings) -> io::Result<Arc<TempFile>> {
    let open = TEMP_FILES_OPEN.fetch_add(1, Ordering::Relaxed);
    if !DESCRIPTOR_ROOM.get().is_none_or(|room| room(open + 1)) {
        TEMP_FILES_OPEN.fetch_sub(1, Ordering::Relaxed);
        return Err(io::Error::other(
            "no descriptor for a temp file: every client connection is busy and the open-files limit is reached",
        ));
    }
    let dir = settings.dir.clone();
    match blocking(move || tempfile::tempfile_in(dir)).await {
        Ok(f) => Ok(Arc::new(TempFile(f))),
        Err(e) => {
            TEMP_FILES_OPEN.fetch_sub(1, Ordering::Relaxed);
            Err(e)
        }
    }
}

fn read_chunk(file: Arc<TempFile>, off: u64, len: u64) -> JoinHandle<io::Result<Bytes>> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, off)?;
        Ok(Bytes::from(buf))
    })
}

fn joined<T>(r: Result<io::Result<T>, tokio::task::JoinError>) -> io::Result<T> {
    r.map_err(io::Error::other).and_then(|r| r)
}

/// A complete request body, as the queue holds it until a worker takes it.
#[derive(Debug)]
pub enum RequestBody {
    /// In memory; the charge is given back to the budget when the request is dropped.
    Memory(Bytes, Option<Charge>),
    /// In an unlinked temp file of this many bytes.
    File(Arc<TempFile>, u64),
}

impl Default for RequestBody {
    fn default() -> Self {
        RequestBody::Memory(Bytes::new(), None)
    }
}

impl From<Bytes> for RequestBody {
    fn from(b: Bytes) -> Self {
        RequestBody::Memory(b, None)
    }
}

impl RequestBody {
    /// Its length in bytes (a usize, as for any body in memory; bodies are bounded by --max-body-size).
    pub fn len(&self) -> usize {
        match self {
            RequestBody::Memory(b, _) => b.len(),
            RequestBody::File(_, n) => *n as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn on_disk(&self) -> bool {
        matches!(self, RequestBody::File(..))
    }

    /// The body from its start, in chunks: as many times as a request is tried.
    pub fn stream(&self) -> BodyStream {
        BodyStream {
            source: match self {
                RequestBody::Memory(b, _) => Source::Memory(b.clone()),
                RequestBody::File(f, _) => Source::File(f.clone()),
            },
            pos: 0,
            len: self.len() as u64,
            reading: None,
        }
    }
}

enum Source {
    Memory(Bytes),
    File(Arc<TempFile>),
}

/// A request body read from its start, chunk by chunk; an HTTP body of exact length for hyper.
pub struct BodyStream {
    source: Source,
    pos: u64,
    len: u64,
    reading: Option<JoinHandle<io::Result<Bytes>>>,
}

impl BodyStream {
    /// The next chunk, or None at the end.
    pub async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if self.reading.is_none() {
            if self.pos >= self.len {
                return Poll::Ready(Ok(None));
            }
            let n = CHUNK.min(self.len - self.pos);
            match &self.source {
                Source::Memory(b) => {
                    let start = self.pos as usize;
                    self.pos += n;
                    return Poll::Ready(Ok(Some(b.slice(start..start + n as usize))));
                }
                Source::File(f) => self.reading = Some(read_chunk(f.clone(), self.pos, n)),
            }
        }
        let Some(h) = self.reading.as_mut() else {
            return Poll::Ready(Ok(None));
        };
        let r = joined(ready!(Pin::new(h).poll(cx)));
        self.reading = None;
        let b = r?;
        self.pos += b.len() as u64;
        Poll::Ready(Ok(Some(b)))
    }
}

impl http_body::Body for BodyStream {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.poll_chunk(cx)
            .map(|r| r.transpose().map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.len && self.reading.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len - self.pos.min(self.len))
    }
}

/// Gathers a request body as it arrives: in memory while it is small and the budget allows, else in a
/// temp file. An error is the disk's (no temp file, or a write failed): the request gets a 503.
pub struct BodyWriter {
    settings: &'static Settings,
    mem: BytesMut,
    charge: Charge,
    /// Known to be too large for memory (its Content-Length said so): straight to disk.
    to_disk: bool,
    file: Option<Arc<TempFile>>,
    pending: BytesMut,
    written: u64,
    len: u64,
}

impl BodyWriter {
    /// `expected`: the Content-Length, when the client gave one.
    pub fn new(settings: &'static Settings, expected: Option<u64>) -> BodyWriter {
        let to_disk = expected.is_some_and(|n| n > settings.body_buffer);
        let cap = if to_disk {
            0
        } else {
            expected.unwrap_or(0).min(settings.body_buffer) as usize
        };
        BodyWriter {
            settings,
            mem: BytesMut::with_capacity(cap),
            charge: Charge::new(&settings.budget),
            to_disk,
            file: None,
            pending: BytesMut::new(),
            written: 0,
            len: 0,
        }
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub async fn push(&mut self, data: &[u8]) -> io::Result<()> {
        let n = data.len() as u64;
        self.len += n;
        if self.file.is_none() {
            if !self.to_disk
                && self.mem.len() as u64 + n <= self.settings.body_buffer
                && self.charge.grow(n)
            {
                self.mem.extend_from_slice(data);
                return Ok(());
            }
            self.file = Some(temp_file(self.settings).await?);
            self.pending = std::mem::take(&mut self.mem);
            let held = self.charge.bytes();
            self.charge.shrink(held);
        }
        self.pending.extend_from_slice(data);
        if self.pending.len() >= WRITE_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        let Some(file) = self.file.clone() else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        let buf = self.pending.split().freeze();
        let off = self.written;
        let n = buf.len() as u64;
        blocking(move || file.write_all_at(&buf, off)).await?;
        self.written += n;
        Ok(())
    }

    pub async fn finish(mut self) -> io::Result<RequestBody> {
        self.flush().await?;
        Ok(match self.file.take() {
            Some(f) => RequestBody::File(f, self.len),
            None => RequestBody::Memory(self.mem.freeze(), Some(self.charge)),
        })
    }
}

/// A response body that is already complete and charged to the budget.
struct Whole {
    data: Option<Bytes>,
    _charge: Charge,
}

impl http_body::Body for Whole {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// A complete response body from a worker, sent with its length: in memory when the budget allows, else
/// from a temp file.
pub async fn whole(settings: &'static Settings, data: Bytes) -> Body {
    use http_body_util::BodyExt;
    let n = data.len() as u64;
    let mut charge = Charge::new(&settings.budget);
    if n <= settings.response_buffer && charge.grow(n) {
        return Whole {
            data: Some(data),
            _charge: charge,
        }
        .boxed_unsync();
    }
    let (mut tx, mut body) = channel(settings);
    body.exact = Some(n);
    match tx.spill_whole(&data).await {
        Ok(()) => {
            tx.finish();
            body.boxed_unsync()
        }
        Err(e) => {
            // No disk: this one response is held in memory after all (it is at most 256 KiB).
            tracing::warn!(
                dir = %settings.dir.display(),
                "cannot spill a response to a temp file ({e}); holding it in memory"
            );
            charge.force(n);
            Whole {
                data: Some(data),
                _charge: charge,
            }
            .boxed_unsync()
        }
    }
}

enum End {
    Open,
    Done,
    Failed(Option<BoxError>),
}

struct State {
    /// In memory, in order; all of it comes before what is in the file.
    mem: VecDeque<Bytes>,
    mem_bytes: u64,
    charge: Charge,
    file: Option<Arc<TempFile>>,
    /// The file's unread bytes are `read..written`.
    read: u64,
    written: u64,
    /// New data goes to the file until the reader has caught up with it.
    spilling: bool,
    /// The temp file could not be made or written: the sender waits for the reader instead.
    disk_failed: bool,
    end: End,
    reader: Option<Waker>,
    reader_gone: bool,
}

struct Shared {
    state: Mutex<State>,
    settings: &'static Settings,
    /// The reader took something (or left): a sender waiting for room looks again.
    space: Notify,
    /// The reader left.
    gone: Notify,
}

/// A body fed by the worker's task while the client reads it (see the module docs for the bound).
pub fn channel(settings: &'static Settings) -> (BodySender, ChannelBody) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            mem: VecDeque::new(),
            mem_bytes: 0,
            charge: Charge::new(&settings.budget),
            file: None,
            read: 0,
            written: 0,
            spilling: false,
            disk_failed: false,
            end: End::Open,
            reader: None,
            reader_gone: false,
        }),
        settings,
        space: Notify::new(),
        gone: Notify::new(),
    });
    (
        BodySender {
            shared: shared.clone(),
            ended: false,
        },
        ChannelBody {
            shared,
            reading: None,
            exact: None,
            delivered: 0,
        },
    )
}

/// The worker's end of a [`ChannelBody`]. Dropped without [`BodySender::finish`], the client's response is
/// cut short with an error, so that a client never takes a truncated body for a whole one.
pub struct BodySender {
    shared: Arc<Shared>,
    ended: bool,
}

impl BodySender {
    /// Passes `data` on; returns at once while memory allows, after a write to the temp file otherwise.
    /// Data for a client that has gone is dropped: the worker must still be read to its end.
    pub async fn send(&mut self, mut data: Bytes) {
        // In pieces, so that a large one fills the memory that is left before the rest spills.
        while data.len() as u64 > CHUNK {
            let piece = data.split_to(CHUNK as usize);
            self.send_piece(piece).await;
        }
        self.send_piece(data).await;
    }

    async fn send_piece(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let n = data.len() as u64;
        let limit = self.shared.settings.response_buffer;
        loop {
            let (file, off) = {
                let mut st = lock(&self.shared.state);
                if st.reader_gone {
                    return;
                }
                if st.spilling && st.read == st.written {
                    // The reader has caught up with the file: back to memory; the file is reused from its
                    // start next time (no read is in flight, as one would leave read < written).
                    st.spilling = false;
                    st.read = 0;
                    st.written = 0;
                }
                if !st.spilling {
                    let room = st.mem_bytes + n <= limit;
                    if room && st.charge.grow(n) {
                        return st.push(data);
                    }
                    if st.disk_failed && st.mem_bytes == 0 {
                        // Nothing to wait for: hold this one chunk beyond the bound rather than stall.
                        st.charge.force(n);
                        return st.push(data);
                    }
                    if !st.disk_failed {
                        st.spilling = true;
                    }
                }
                if st.disk_failed {
                    (None, None)
                } else {
                    (st.file.clone(), Some(st.written))
                }
            };
            let Some(off) = off else {
                // Backpressure instead of disk: wait until the reader has taken something.
                self.shared.space.notified().await;
                continue;
            };
            let file = match file {
                Some(f) => f,
                None => match temp_file(self.shared.settings).await {
                    Ok(f) => {
                        lock(&self.shared.state).file = Some(f.clone());
                        f
                    }
                    Err(e) => {
                        self.disk_failed(&e);
                        continue;
                    }
                },
            };
            let d = data.clone();
            match blocking(move || file.write_all_at(&d, off)).await {
                Ok(()) => {
                    let mut st = lock(&self.shared.state);
                    st.written += n;
                    st.wake();
                    return;
                }
                Err(e) => self.disk_failed(&e),
            }
        }
    }

    /// All of a complete body to a new temp file, before the reader has it.
    async fn spill_whole(&mut self, data: &Bytes) -> io::Result<()> {
        let file = temp_file(self.shared.settings).await?;
        let (f, d) = (file.clone(), data.clone());
        blocking(move || f.write_all_at(&d, 0)).await?;
        let mut st = lock(&self.shared.state);
        st.file = Some(file);
        st.written = data.len() as u64;
        st.spilling = true;
        Ok(())
    }

    fn disk_failed(&self, e: &io::Error) {
        let mut st = lock(&self.shared.state);
        if !st.disk_failed {
            tracing::warn!(
                dir = %self.shared.settings.dir.display(),
                "cannot spill a response to a temp file ({e}); holding it in memory for its client instead"
            );
        }
        st.disk_failed = true;
    }

    /// The whole body has been sent.
    pub fn finish(mut self) {
        self.end(End::Done);
    }

    /// The body breaks off with `why` after what was sent.
    pub fn fail(mut self, why: impl Into<BoxError>) {
        self.end(End::Failed(Some(why.into())));
    }

    fn end(&mut self, end: End) {
        self.ended = true;
        let mut st = lock(&self.shared.state);
        st.end = end;
        st.wake();
    }

    /// Resolves when the client no longer reads (its response was dropped).
    pub async fn closed(&self) {
        loop {
            if self.is_closed() {
                return;
            }
            self.shared.gone.notified().await;
        }
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.shared.state).reader_gone
    }
}

impl Drop for BodySender {
    fn drop(&mut self) {
        if !self.ended {
            self.end(End::Failed(Some(
                "the worker's response was cut short".into(),
            )));
        }
    }
}

impl State {
    fn push(&mut self, data: Bytes) {
        self.mem_bytes += data.len() as u64;
        self.mem.push_back(data);
        self.wake();
    }

    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }
}

/// The client's end: what the worker sent, from memory then from the temp file.
pub struct ChannelBody {
    shared: Arc<Shared>,
    reading: Option<JoinHandle<io::Result<Bytes>>>,
    /// The length, when the body was complete before it was handed over.
    exact: Option<u64>,
    delivered: u64,
}

impl ChannelBody {
    fn data(&mut self, b: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.delivered += b.len() as u64;
        self.shared.space.notify_one();
        Poll::Ready(Some(Ok(Frame::data(b))))
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(h) = this.reading.as_mut() {
                let r = joined(ready!(Pin::new(h).poll(cx)));
                this.reading = None;
                return match r {
                    Ok(b) => {
                        lock(&this.shared.state).read += b.len() as u64;
                        this.data(b)
                    }
                    Err(e) => {
                        tracing::warn!("cannot read a response back from its temp file: {e}");
                        Poll::Ready(Some(Err(e.into())))
                    }
                };
            }
            let mut st = lock(&this.shared.state);
            if let Some(b) = st.mem.pop_front() {
                let n = b.len() as u64;
                st.mem_bytes -= n;
                st.charge.shrink(n);
                drop(st);
                return this.data(b);
            }
            if st.read < st.written {
                let Some(f) = st.file.clone() else {
                    return Poll::Ready(Some(Err("a spilled response lost its file".into())));
                };
                let n = CHUNK.min(st.written - st.read);
                this.reading = Some(read_chunk(f, st.read, n));
                continue;
            }
            return match &mut st.end {
                End::Open => {
                    st.reader = Some(cx.waker().clone());
                    Poll::Pending
                }
                End::Done => Poll::Ready(None),
                End::Failed(e) => {
                    let e = e.take();
                    st.end = End::Done;
                    Poll::Ready(e.map(Err))
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        let st = lock(&self.shared.state);
        self.reading.is_none()
            && st.mem.is_empty()
            && st.read == st.written
            && matches!(st.end, End::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(n) => SizeHint::with_exact(n.saturating_sub(self.delivered)),
            None => SizeHint::default(),
        }
    }
}

impl Drop for ChannelBody {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.shared.state);
            st.reader_gone = true;
            st.mem.clear();
            let held = st.mem_bytes;
            st.mem_bytes = 0;
            st.charge.shrink(held);
        }
        self.shared.gone.notify_one();
        self.shared.space.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::BodyExt;

    fn leak(budget: u64, body: u64, response: u64) -> &'static Settings {
        Box::leak(Box::new(Settings {
            budget: Budget::new(budget),
            dir: std::env::temp_dir(),
            body_buffer: body,
            response_buffer: response,
        }))
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    }

    async fn collect(
        b: impl http_body::Body<Data = Bytes, Error = impl std::fmt::Debug>,
    ) -> Vec<u8> {
        b.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn small_body_stays_in_memory_and_is_charged() {
        let s = leak(1 << 20, 1024, 1024);
        let mut w = BodyWriter::new(s, None);
        w.push(b"hello ").await.unwrap();
        w.push(b"world").await.unwrap();
        let body = w.finish().await.unwrap();
        assert!(!body.on_disk());
        assert_eq!(s.budget.used(), 11);
        assert_eq!(collect(body.stream()).await, b"hello world");
        drop(body);
        assert_eq!(s.budget.used(), 0);
    }

    #[tokio::test]
    async fn large_body_goes_to_disk_and_reads_back_twice() {
        let s = leak(1 << 20, 1000, 1024);
        let data = pattern(300_000, 7);
        let mut w = BodyWriter::new(s, None);
        for c in data.chunks(777) {
            w.push(c).await.unwrap();
        }
        let body = w.finish().await.unwrap();
        assert!(body.on_disk());
        assert_eq!(body.len(), data.len());
        assert_eq!(s.budget.used(), 0, "a body on disk holds no budget");
        assert_eq!(collect(body.stream()).await, data);
        // A retry reads it again from the start.
        let mut st = body.stream();
        let mut again = Vec::new();
        while let Some(c) = st.next_chunk().await.unwrap() {
            again.extend_from_slice(&c);
        }
        assert_eq!(again, data);
    }

    #[tokio::test]
    async fn spent_budget_sends_small_bodies_to_disk() {
        let s = leak(100, 64 << 10, 1024);
        let mut a = BodyWriter::new(s, None);
        a.push(&[1; 80]).await.unwrap();
        let a = a.finish().await.unwrap();
        assert!(!a.on_disk());
        let mut b = BodyWriter::new(s, None);
        b.push(&[2; 80]).await.unwrap();
        let b = b.finish().await.unwrap();
        assert!(b.on_disk(), "beyond the budget, a small body goes to disk");
        assert_eq!(collect(b.stream()).await, vec![2; 80]);
        drop(a);
        assert_eq!(s.budget.used(), 0);
    }

    #[tokio::test]
    async fn declared_length_goes_straight_to_disk() {
        let s = leak(1 << 20, 1000, 1024);
        let mut w = BodyWriter::new(s, Some(5000));
        w.push(&[9; 10]).await.unwrap();
        assert_eq!(s.budget.used(), 0);
        assert!(w.finish().await.unwrap().on_disk());
    }

    #[tokio::test]
    async fn unwritable_dir_is_an_error() {
        let s = Box::leak(Box::new(Settings {
            budget: Budget::new(1 << 20),
            dir: "/nonexistent/anteroom".into(),
            body_buffer: 10,
            response_buffer: 10,
        }));
        let mut w = BodyWriter::new(s, None);
        assert!(w.push(&[0; 100]).await.is_err());
    }

    #[tokio::test]
    async fn slow_reader_spills_and_gets_every_byte_in_order() {
        let s = leak(1 << 30, 1024, 10_000);
        let data = pattern(1_000_000, 3);
        let (mut tx, rx) = channel(s);
        // The sender finishes without any reading: memory holds at most the bound.
        for c in data.chunks(4096) {
            tx.send(Bytes::copy_from_slice(c)).await;
            assert!(s.budget.used() <= 10_000, "{}", s.budget.used());
        }
        tx.finish();
        assert_eq!(collect(rx).await, data);
        assert_eq!(s.budget.used(), 0);
    }

    #[tokio::test]
    async fn reader_catching_up_goes_back_to_memory() {
        let s = leak(1 << 30, 1024, 8192);
        let (mut tx, mut rx) = channel(s);
        let data = pattern(200_000, 5);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(f) = rx.frame().await {
                got.extend_from_slice(&f.unwrap().into_data().unwrap());
                tokio::task::yield_now().await;
            }
            got
        });
        for (i, c) in data.chunks(3000).enumerate() {
            tx.send(Bytes::copy_from_slice(c)).await;
            if i % 10 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        tx.finish();
        assert_eq!(reader.await.unwrap(), data);
    }

    #[tokio::test]
    async fn sender_dropped_early_is_an_error_for_the_reader() {
        let s = leak(1 << 20, 1024, 1024);
        let (mut tx, rx) = channel(s);
        tx.send(Bytes::from_static(b"partial")).await;
        drop(tx);
        assert!(rx.collect().await.is_err());
    }

    #[tokio::test]
    async fn reader_gone_is_seen_and_frees_memory() {
        let s = leak(1 << 20, 1024, 1 << 20);
        let (mut tx, rx) = channel(s);
        tx.send(Bytes::from(vec![0; 1000])).await;
        assert_eq!(s.budget.used(), 1000);
        drop(rx);
        tx.closed().await;
        assert_eq!(s.budget.used(), 0);
        tx.send(Bytes::from(vec![0; 1000])).await;
        assert_eq!(s.budget.used(), 0);
    }

    #[tokio::test]
    async fn whole_bodies_over_budget_come_from_disk() {
        let s = leak(100, 1024, 1 << 20);
        let body = whole(s, Bytes::from(vec![4; 5000])).await;
        assert_eq!(body.size_hint().exact(), Some(5000));
        assert_eq!(s.budget.used(), 0);
        assert_eq!(collect(body).await, vec![4; 5000]);
        let small = whole(s, Bytes::from(vec![4; 50])).await;
        assert_eq!(s.budget.used(), 50);
        drop(small);
        assert_eq!(s.budget.used(), 0);
    }

    #[tokio::test]
    async fn whole_body_without_a_disk_stays_in_memory() {
        let s = Box::leak(Box::new(Settings {
            budget: Budget::new(10),
            dir: "/nonexistent/anteroom".into(),
            body_buffer: 10,
            response_buffer: 10,
        }));
        let body = whole(s, Bytes::from(vec![3; 200_000])).await;
        assert_eq!(collect(body).await, vec![3; 200_000]);
        assert_eq!(s.budget.used(), 0);
    }

    #[tokio::test]
    async fn disk_failure_falls_back_to_backpressure() {
        let s = Box::leak(Box::new(Settings {
            budget: Budget::new(1 << 30),
            dir: "/nonexistent/anteroom".into(),
            body_buffer: 10,
            response_buffer: 1000,
        }));
        let (mut tx, mut rx) = channel(s);
        let data = pattern(50_000, 1);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(f) = rx.frame().await {
                got.extend_from_slice(&f.unwrap().into_data().unwrap());
            }
            got
        });
        for c in data.chunks(700) {
            tx.send(Bytes::copy_from_slice(c)).await;
            assert!(s.budget.used() <= 1000);
        }
        tx.finish();
        assert_eq!(reader.await.unwrap(), data);
    }
}
