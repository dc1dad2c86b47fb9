//! The client connection table: every connection counted from accept to close, a bound on how many may be
//! open, and which ones to close first when the bound is reached.
//!
//! Every client connection holds a file descriptor, and so do the things anteroom cannot do without: a new
//! worker's socket and pipes, the admin listener's clients, the temp files that hold large request and
//! response bodies. Without a bound, a few thousand silent connections take every descriptor up to
//! `RLIMIT_NOFILE`; then `accept` fails, workers cannot be respawned, the admin listener cannot answer, and
//! the kernel's accept queue overflows. So client connections (across all public listeners) are bounded by
//! `--max-connections`, with descriptors kept back for the rest (planned with the configuration:
//! [`crate::config::limits`]).
//!
//! ## At the limit
//! A new connection is still accepted (the kernel's queue stays empty) and the oldest *idle* connection is
//! closed to make room, as nginx reuses connections. Idle means: it has not sent a complete request head yet
//! (a client that opened ahead of need, a silent or slowloris one), or it is a keep-alive connection between
//! requests. A connection whose request is being read, is queued, is at a worker or is being answered is
//! never closed for this. When nothing can be closed, the new connection is refused: an HTTP client gets a
//! 503 with `Retry-After` and a close (never a hang), a FastCGI peer a closed connection.
//!
//! ## Descriptors
//! A request in progress may hold two temp files besides its connection (a spilled request body and a
//! spilled response), so it weighs three descriptors: the table keeps
//! `open connections + 2 x requests in progress <= fd budget`, closing idle connections as requests start if
//! it must. Idle connections, the ones a flood is made of, weigh one.
//!
//! The order of idle connections is a `BTreeMap` keyed by a sequence number taken when the connection
//! became idle: the first key is the oldest. Closing a connection sets its flag and wakes its task (an
//! `AtomicWaker` in the entry, not a token of its own: 10,000 idle connections are 10,000 entries), which
//! then drops the socket.
//!
//! ## Silent connections
//! An HTTP connection that stays silent for `--header-timeout` (a new one, or a kept-alive one between
//! requests) is closed by one sweep over this order ([`Table::expire_idle_in_background`]), oldest first,
//! rather than by a timer in each connection's task: an idle task then holds nothing but its socket.
//! FastCGI peers (nginx's kept-alive upstream connections) are never closed for being idle.
//!
//! ## Handing over
//! When an upgrade's new process is ready, the table is given the way to it ([`Table::hand_over`]): every
//! idle connection is told to go there rather than close, and so is each busy one the moment its last
//! request ends (see `upgrade` for why closing would lose requests). The task does it at a point where it
//! has read nothing of a next request; a connection partway through a head only hears a close.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::limits::TEMP_FILES_PER_REQUEST;
pub use crate::config::limits::{Limits, ADMIN_CONNS};
use crate::ratelog::LogLimit;
use crate::sync::lock;
use crate::upgrade::Handover;

/// Counters the table records into (the registry's, or unregistered ones for the admin listener).
#[derive(Clone, Default)]
pub struct TableMetrics {
    /// Open connections: from accept to close.
    pub open: Gauge,
    /// Idle connections closed to make room.
    pub closed_idle: Counter,
    /// New connections refused because nothing could be closed.
    pub refused: Counter,
    /// Connections closed for a missing or malformed PROXY protocol header (`--proxy-protocol`).
    pub bad_proxy_header: Counter,
}

/// Every open client connection of a group of listeners.
pub struct Table {
    limits: Limits,
    m: TableMetrics,
    /// Requests in progress (head received, response not yet fully handed over).
    in_progress: AtomicUsize,
    /// Connections told to close that have not closed yet: their descriptors are about to come back.
    closing: AtomicUsize,
    /// Connections counted by the acceptor and not yet admitted (on their way to the runtime): each will
    /// close an idle one if the table is full.
    pending: AtomicUsize,
    idle: Mutex<Idle>,
    /// What the log says about this table ("client", "admin").
    name: &'static str,
    /// Stopping or handing over: every response from now on closes its connection (`Connection: close`), so
    /// that clients take their next request elsewhere rather than race a close.
    draining: AtomicBool,
    /// Temp files open now, which take descriptors from the same budget (`spill::temp_files_open`).
    temp_files: fn() -> usize,
    /// Where `Entry::idle_since` counts from.
    epoch: tokio::time::Instant,
    /// Whether the idle sweep runs (started once, by the first HTTP listener).
    sweeping: AtomicBool,
    /// Set once an upgrade's new process is ready: where idle connections go instead of closing.
    handover: OnceLock<Handover>,
}

#[derive(Default)]
struct Idle {
    next: u64,
    /// Idle connections, oldest first.
    order: BTreeMap<u64, Weak<Entry>>,
}

impl Idle {
    /// Puts `entry` last in the order, idle since `now` (milliseconds since the table's epoch).
    fn push(&mut self, entry: &Arc<Entry>, now: u64) {
        self.next += 1;
        self.order.insert(self.next, Arc::downgrade(entry));
        entry.idle_since.store(now, Ordering::Relaxed);
        entry.key.store(self.next, Ordering::Relaxed);
    }
}

/// A snapshot for the status page.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct TableView {
    pub open: usize,
    pub limit: usize,
    pub idle: usize,
    pub requests_in_progress: usize,
    pub fd_budget: usize,
    pub nofile: u64,
    pub closed_idle: u64,
    pub refused: u64,
}

impl Table {
    pub fn new(name: &'static str, limits: Limits, m: TableMetrics) -> Arc<Table> {
        Arc::new(Table {
            limits,
            m,
            in_progress: AtomicUsize::new(0),
            closing: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            idle: Mutex::default(),
            name,
            draining: AtomicBool::new(false),
            temp_files: crate::spill::temp_files_open,
            epoch: tokio::time::Instant::now(),
            sweeping: AtomicBool::new(false),
            handover: OnceLock::new(),
        })
    }

    /// From now on every connection goes to the new process through `to` as soon as it is idle: those idle
    /// now at once, the others when their last request ends. Later calls do nothing.
    pub fn hand_over(&self, to: Handover) {
        if self.handover.set(to).is_err() {
            return;
        }
        let mut idle = lock(&self.idle);
        let order = std::mem::take(&mut idle.order);
        drop(idle);
        // Outside the lock: a last reference dropped here takes it in `Entry::drop` (and finds key 0).
        for e in order.into_values().filter_map(|w| w.upgrade()) {
            e.key.store(0, Ordering::Relaxed);
            e.hand_over(self);
        }
    }

    /// A connection with nothing in progress: in the idle order, or on its way to the new process.
    fn became_idle(&self, idle: &mut Idle, e: &Arc<Entry>) {
        if self.handover.get().is_some() {
            e.hand_over(self);
        } else {
            idle.push(e, self.now());
        }
    }

    /// Milliseconds since the table's epoch, by the runtime's clock.
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Closes, from now on, every connection marked [`ConnHandle::expire_when_idle`] that has been idle
    /// for `after`. Started by the HTTP front with `--header-timeout`; later calls do nothing.
    pub fn expire_idle_in_background(self: &Arc<Self>, after: Duration) {
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let table = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let next = match table.upgrade() {
                    Some(t) => t.expire_idle(after),
                    None => return,
                };
                tokio::time::sleep(next).await;
            }
        });
    }

    /// Closes the connections idle for `after`, oldest first; how long until the next one would be.
    fn expire_idle(&self, after: Duration) -> Duration {
        let limit = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        let now = self.now();
        // Upgraded entries are dropped after the lock is let go: a last reference dropped under it would
        // take the lock again in `Entry::drop`.
        let mut held = Vec::new();
        let mut next = after;
        let mut idle = lock(&self.idle);
        let mut due = Vec::new();
        for (&key, weak) in &idle.order {
            let Some(e) = weak.upgrade() else { continue };
            if e.expires.load(Ordering::Relaxed) {
                let at = e.idle_since.load(Ordering::Relaxed).saturating_add(limit);
                if at > now {
                    next = Duration::from_millis(at - now);
                    held.push(e);
                    break;
                }
                due.push(key);
            }
            held.push(e);
        }
        for key in due {
            if let Some(e) = idle.order.remove(&key).and_then(|w| w.upgrade()) {
                e.key.store(0, Ordering::Relaxed);
                e.close(self);
                held.push(e);
            }
        }
        drop(idle);
        drop(held);
        next.max(Duration::from_millis(10))
    }

    /// From now on, each connection closes after its current or next response (see `ConnHandle::draining`).
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn open(&self) -> usize {
        self.m.open.get().max(0) as usize
    }

    pub fn view(&self) -> TableView {
        TableView {
            open: self.open(),
            limit: self.limits.max,
            idle: lock(&self.idle).order.len(),
            requests_in_progress: self.in_progress.load(Ordering::Relaxed),
            fd_budget: self.limits.fd_budget,
            nofile: self.limits.nofile,
            closed_idle: self.m.closed_idle.get(),
            refused: self.m.refused.get(),
        }
    }

    /// Counts a connection just accepted, on the acceptor thread: lock-free, so the thread never waits on
    /// the runtime. `None` when the hard cap is reached: the caller refuses the connection at once.
    pub fn count(self: &Arc<Self>) -> Option<Counted> {
        let before = self.m.open.inc();
        if before.max(0) as usize >= self.limits.hard_cap {
            self.m.open.dec();
            self.refused();
            return None;
        }
        self.pending.fetch_add(1, Ordering::Relaxed);
        Some(Counted {
            table: self.clone(),
            pending: true,
        })
    }

    fn refused(&self) {
        self.m.refused.inc();
        static LOG: LogLimit = LogLimit::new(std::time::Duration::from_secs(10));
        if let Some(suppressed) = LOG.check() {
            tracing::warn!(
                table = self.name,
                open = self.open(),
                limit = self.limits.max,
                suppressed,
                "at the connection limit with no idle connection to close: new connections are refused"
            );
        }
    }

    /// At the hard cap, with connections told to close still open, or accepted ones not yet admitted (each
    /// will close an idle one): descriptors are about to come back, so the acceptor waits for them rather
    /// than refuse. Lock-free.
    pub fn closing_at_cap(&self) -> bool {
        self.open() >= self.limits.hard_cap
            && (self.closing.load(Ordering::Relaxed) > 0
                || self.pending.load(Ordering::Relaxed) > 0)
    }

    /// Open connections that stay open: those told to close are on their way out.
    fn live(&self) -> usize {
        self.open()
            .saturating_sub(self.closing.load(Ordering::Relaxed))
    }

    /// Over the connection limit, or over the descriptor budget with `temp_files` temp files open.
    ///
    /// Temp files count as they are opened, not ahead of need: reserving two for every request in progress
    /// closed a third of 10,000 keep-alive connections, each with a small GET unread in its socket, on a host
    /// with 20,000 descriptors (the scale benchmark).
    fn over(&self, temp_files: usize) -> bool {
        let live = self.live();
        live > self.limits.max || live.saturating_add(temp_files) > self.limits.fd_budget
    }

    /// Whether one more temp file fits in the descriptor budget, with `temp_files` open counting it: if not,
    /// the oldest idle connection is closed to make room; false when none is idle (the request that wanted
    /// the file is refused with 503, and the descriptors kept for workers stay theirs).
    pub fn room_for_temp_file(&self, temp_files: usize) -> bool {
        let mut idle = lock(&self.idle);
        !self.over(temp_files) || self.close_oldest(&mut idle)
    }

    /// Closes the oldest idle connection; false when there is none.
    fn close_oldest(&self, idle: &mut Idle) -> bool {
        let entry = loop {
            let Some((_, weak)) = idle.order.pop_first() else {
                return false;
            };
            // Gone already when the upgrade fails: its own drop is about to look for it.
            if let Some(e) = weak.upgrade() {
                break e;
            }
        };
        entry.key.store(0, Ordering::Relaxed);
        entry.close(self);
        // Should the task have ended meanwhile, this is the last reference: `Entry::drop` then finds key 0
        // and leaves the lock, which is held here, alone.
        drop(entry);
        self.m.closed_idle.inc();
        static LOG: LogLimit = LogLimit::new(std::time::Duration::from_secs(10));
        if let Some(suppressed) = LOG.check() {
            tracing::info!(
                table = self.name,
                limit = self.limits.max,
                suppressed,
                "at the connection limit: closing the oldest idle connection for a new one"
            );
        }
        true
    }

    /// Takes a counted connection into the table as idle (it has sent nothing yet), closing the oldest idle
    /// one if the table is over its limit. `Err` gives the connection back to be refused: nothing could be
    /// closed.
    pub fn admit(self: &Arc<Self>, mut counted: Counted) -> Result<ConnHandle, Counted> {
        counted.admitted();
        let mut idle = lock(&self.idle);
        if self.over((self.temp_files)()) && !self.close_oldest(&mut idle) {
            drop(idle);
            self.refused();
            return Err(counted);
        }
        let entry = Arc::new(Entry {
            counted,
            told: AtomicU8::new(Told::Nothing as u8),
            waker: AtomicWaker::new(),
            expires: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            key: AtomicU64::new(0),
            requests: AtomicUsize::new(0),
        });
        self.became_idle(&mut idle, &entry);
        Ok(ConnHandle(entry))
    }
}

/// One open connection, counted in the gauge until dropped.
pub struct Counted {
    table: Arc<Table>,
    /// Not admitted yet.
    pending: bool,
}

impl Counted {
    fn admitted(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.table.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.admitted();
        self.table.m.open.dec();
    }
}

/// What the table has told a connection's task, through its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Told {
    Nothing = 0,
    /// Close (to make room, or silent too long); also overrides `HandOver`.
    Close = 1,
    /// Go to the upgrade's new process at the next point where nothing of a request has been read.
    HandOver = 2,
}

impl Told {
    fn from_u8(v: u8) -> Told {
        match v {
            1 => Told::Close,
            2 => Told::HandOver,
            _ => Told::Nothing,
        }
    }
}

/// How the table asks a connection to leave.
pub enum Leave {
    Close,
    HandOver(Handover),
}

struct Entry {
    counted: Counted,
    /// A [`Told`], set by the table; the task is woken through `waker`.
    told: AtomicU8,
    waker: AtomicWaker,
    /// Closed once idle for `--header-timeout` (an HTTP client; FastCGI peers keep their connections).
    expires: AtomicBool,
    /// When it last became idle, in milliseconds since the table's epoch.
    idle_since: AtomicU64,
    /// The key in the idle order while idle, 0 otherwise. Changed only under the table's lock.
    key: AtomicU64,
    /// Requests in progress on this connection (FastCGI multiplexes; HTTP/1 has at most one).
    requests: AtomicUsize,
}

impl Entry {
    fn told(&self) -> Told {
        Told::from_u8(self.told.load(Ordering::Acquire))
    }

    /// Tells the connection's task to close.
    fn close(&self, table: &Table) {
        let before = Told::from_u8(self.told.swap(Told::Close as u8, Ordering::AcqRel));
        if before == Told::Nothing {
            table.closing.fetch_add(1, Ordering::Relaxed);
        }
        if before != Told::Close {
            self.waker.wake();
        }
    }

    /// Tells the connection's task to go to the new process, unless it was told something already.
    fn hand_over(&self, table: &Table) {
        let (from, to) = (Told::Nothing as u8, Told::HandOver as u8);
        if (self
            .told
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire))
        .is_ok()
        {
            table.closing.fetch_add(1, Ordering::Relaxed);
            self.waker.wake();
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let table = &self.counted.table;
        let key = self.key.load(Ordering::Relaxed);
        if key != 0 {
            lock(&table.idle).order.remove(&key);
        }
        if self.told() != Told::Nothing {
            table.closing.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A connection in the table; the connection's task and its requests hold clones.
#[derive(Clone)]
pub struct ConnHandle(Arc<Entry>);

impl ConnHandle {
    /// Resolves when the table closes this connection (to make room, or silent too long): the task then
    /// drops its socket.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(|cx| self.poll_closed(cx))
    }

    /// Polls for what the table has told this connection, once it is one of `wanted`.
    fn poll_told(&self, cx: &mut Context<'_>, wanted: fn(Told) -> bool) -> Poll<Told> {
        let e = &self.0;
        let told = e.told();
        if wanted(told) {
            return Poll::Ready(told);
        }
        e.waker.register(cx.waker());
        let told = e.told();
        if wanted(told) {
            Poll::Ready(told)
        } else {
            Poll::Pending
        }
    }

    /// [`ConnHandle::closed`] for a hand-written future: one task waits on a connection.
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.poll_told(cx, |t| t == Told::Close).map(drop)
    }

    /// Resolves when the table asks this connection to leave: to close, or to go to an upgrade's new
    /// process. Only a task that has read nothing of a next request may follow the second.
    pub fn poll_leave(&self, cx: &mut Context<'_>) -> Poll<Leave> {
        self.poll_told(cx, |t| t != Told::Nothing).map(|t| {
            match (t, self.0.counted.table.handover.get()) {
                (Told::HandOver, Some(h)) => Leave::HandOver(h.clone()),
                _ => Leave::Close,
            }
        })
    }

    /// Resolves when the table asks this connection to go to an upgrade's new process.
    pub fn handed_over(&self) -> impl Future<Output = Handover> + Send + '_ {
        std::future::poll_fn(|cx| {
            let told = std::task::ready!(self.poll_told(cx, |t| t == Told::HandOver));
            match (told, self.0.counted.table.handover.get()) {
                (Told::HandOver, Some(h)) => Poll::Ready(h.clone()),
                _ => Poll::Pending,
            }
        })
    }

    /// While `on`, the table closes this connection once it has been idle for `--header-timeout`. An HTTP
    /// connection turns it on while it waits for a request's first byte, and off once a head is arriving,
    /// which then has its own deadline (408 when late), not a silent close.
    pub fn expire_when_idle(&self, on: bool) {
        self.0.expires.store(on, Ordering::Relaxed);
    }

    #[cfg(test)]
    fn is_closing(&self) -> bool {
        self.0.told() == Told::Close
    }

    /// Counts this connection as closed for its PROXY protocol header.
    pub fn bad_proxy_header(&self) {
        self.0.counted.table.m.bad_proxy_header.inc();
    }

    /// Whether this connection should close once its response is sent: anteroom is stopping (an upgrade's
    /// hand-over passes it on instead).
    pub fn closes_after_response(&self) -> bool {
        let table = &self.0.counted.table;
        table.draining.load(Ordering::Acquire) && table.handover.get().is_none()
    }

    /// Requests in progress on this connection: started and not yet ended.
    pub fn requests(&self) -> usize {
        self.0.requests.load(Ordering::Relaxed)
    }

    pub fn max_connections(&self) -> usize {
        self.0.counted.table.limits.max
    }

    /// A request has started on this connection (its head is in): the connection is not idle until every
    /// request it carries has ended, that is until the returned guards are dropped.
    pub fn request_started(&self) -> InProgress {
        let e = &self.0;
        let table = &e.counted.table;
        let mut idle = lock(&table.idle);
        if e.requests.fetch_add(1, Ordering::Relaxed) == 0 {
            let key = e.key.swap(0, Ordering::Relaxed);
            if key != 0 {
                idle.order.remove(&key);
            }
        }
        table.in_progress.fetch_add(1, Ordering::Relaxed);
        // Temp files opened while every connection was busy went over the budget: idle connections give it
        // back, a few at a time.
        let temp_files = (table.temp_files)();
        for _ in 0..TEMP_FILES_PER_REQUEST {
            if !table.over(temp_files) || !table.close_oldest(&mut idle) {
                break;
            }
        }
        InProgress(self.clone())
    }

    fn request_ended(&self) {
        let e = &self.0;
        let table = &e.counted.table;
        let mut idle = lock(&table.idle);
        table.in_progress.fetch_sub(1, Ordering::Relaxed);
        if e.requests.fetch_sub(1, Ordering::Relaxed) == 1 && e.told() == Told::Nothing {
            table.became_idle(&mut idle, e);
        }
    }
}

/// A request in progress; dropping it ends it (the connection may become idle).
pub struct InProgress(ConnHandle);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At most `max` connections, and descriptors for `budget` (connections and temp files).
    fn table_with(max: usize, budget: usize) -> Arc<Table> {
        let t = Table::new(
            "test",
            Limits {
                max,
                fd_budget: budget,
                hard_cap: max + 2,
                nofile: 0,
                reserve: 0,
            },
            TableMetrics::default(),
        );
        // Not the process's temp files, which other tests open meanwhile.
        let mut t = Arc::into_inner(t).unwrap();
        t.temp_files = || 0;
        Arc::new(t)
    }

    fn table(max: usize) -> Arc<Table> {
        table_with(max, 1000)
    }

    fn connect(t: &Arc<Table>) -> Result<ConnHandle, ()> {
        let c = t.count().ok_or(())?;
        t.admit(c).map_err(drop)
    }

    #[test]
    fn oldest_idle_is_closed_first_and_busy_never() {
        let t = table(3);
        let a = connect(&t).unwrap();
        let b = connect(&t).unwrap();
        let c = connect(&t).unwrap();
        let busy_a = a.request_started();
        // Full: the oldest idle one (b; a is busy) makes room.
        let d = connect(&t).unwrap();
        assert!(b.is_closing());
        assert!(!a.is_closing() && !c.is_closing());
        assert_eq!(t.view().closed_idle, 1);
        drop(b);
        // a ends its request: it is idle again, and now the newest idle one.
        drop(busy_a);
        let _e = connect(&t).unwrap();
        assert!(c.is_closing(), "c had been idle longest");
        assert!(!a.is_closing() && !d.is_closing());
        drop(c);
        assert_eq!(t.open(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_closes_silent_http_connections_only() {
        let t = table(10);
        t.expire_idle_in_background(Duration::from_secs(10));
        let http = connect(&t).unwrap();
        http.expire_when_idle(true);
        let peer = connect(&t).unwrap(); // a FastCGI peer: never closed for being idle
        let busy = connect(&t).unwrap();
        busy.expire_when_idle(true);
        let _request = busy.request_started();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let later = connect(&t).unwrap();
        later.expire_when_idle(true);
        tokio::time::sleep(Duration::from_millis(5_100)).await;
        assert!(http.is_closing(), "silent for 10 s");
        assert!(!later.is_closing(), "silent for 5 s");
        assert!(!peer.is_closing() && !busy.is_closing());
        assert_eq!(
            t.view().closed_idle,
            0,
            "not counted as closed to make room"
        );
        // Its request over, the busy one is idle from now: closed 10 s later, with the other.
        drop(_request);
        tokio::time::sleep(Duration::from_millis(5_000)).await;
        assert!(later.is_closing() && !busy.is_closing());
        tokio::time::sleep(Duration::from_millis(5_100)).await;
        assert!(busy.is_closing() && !peer.is_closing());
        assert_eq!(t.view().idle, 1);
    }

    #[test]
    fn refused_when_nothing_is_idle_and_gauge_follows() {
        let t = table(2);
        let a = connect(&t).unwrap();
        let b = connect(&t).unwrap();
        let _ra = a.request_started();
        let _rb = b.request_started();
        assert!(connect(&t).is_err());
        assert_eq!(t.view().refused, 1);
        assert_eq!(t.open(), 2, "the refused connection is no longer counted");
        drop(_ra);
        drop(a);
        assert_eq!(t.open(), 1);
        assert!(connect(&t).is_ok());
    }

    #[test]
    fn temp_files_take_descriptors_from_idle_connections_only_when_opened() {
        // 10 descriptors, 10 connections at most.
        let t = table_with(10, 10);
        let conns: Vec<_> = (0..10).map(|_| connect(&t).unwrap()).collect();
        let _requests: Vec<_> = conns[5..].iter().map(|c| c.request_started()).collect();
        let closed = || conns.iter().filter(|c| c.is_closing()).count();
        assert_eq!(closed(), 0, "requests that open no file close nothing");
        assert!(t.room_for_temp_file(1));
        assert!(t.room_for_temp_file(2));
        assert_eq!(closed(), 2, "two idle connections made room for two files");
        assert!(conns[0].is_closing() && conns[1].is_closing());
        for files in 3..=5 {
            assert!(t.room_for_temp_file(files));
        }
        assert!(
            !t.room_for_temp_file(6),
            "no idle connection is left to close"
        );
        assert_eq!(closed(), 5, "busy connections are never closed");
    }

    #[tokio::test]
    async fn handing_over_tells_idle_connections_at_once_and_busy_ones_when_done() {
        let t = table(10);
        let idle = connect(&t).unwrap();
        let busy = connect(&t).unwrap();
        let request = busy.request_started();
        let (to, _new) = Handover::pair();
        t.hand_over(to);
        assert_eq!(idle.0.told(), Told::HandOver);
        assert_eq!(busy.0.told(), Told::Nothing, "its request goes on here");
        assert_eq!(t.view().idle, 0, "nothing left to close to make room");
        let late = connect(&t).unwrap();
        assert_eq!(
            late.0.told(),
            Told::HandOver,
            "admitted after: told at once"
        );
        drop(request);
        assert_eq!(
            busy.0.told(),
            Told::HandOver,
            "told when its last request ended"
        );
        assert!(!busy.closes_after_response(), "not stopping");
        t.drain();
        assert!(
            !busy.closes_after_response(),
            "it goes on to the new process"
        );
        // A close overrides; the descriptor is counted as coming back once.
        idle.0.close(&t);
        assert_eq!(idle.0.told(), Told::Close);
        assert_eq!(t.closing.load(Ordering::Relaxed), 3);
        drop((idle, busy, late));
        assert_eq!(t.closing.load(Ordering::Relaxed), 0);
        assert_eq!(t.open(), 0);
    }

    #[test]
    fn hard_cap_refuses_on_the_acceptor() {
        let t = table(1);
        let held: Vec<_> = (0..3).map(|_| t.count().unwrap()).collect();
        // Accepted, not yet admitted: the acceptor waits for them before it refuses anyone.
        assert!(t.closing_at_cap());
        assert!(t.count().is_none());
        assert_eq!(t.open(), 3);
        drop(held);
        assert_eq!(t.open(), 0);
    }
}
