//! Admission: the bounded, first-in first-out queue where complete requests wait for an idle worker.
//!
//! This is the room that replaces the kernel's listen backlog. A request enters only once its head and body
//! have been read, so a slow client never holds a worker. The queue has a hard bound (a full queue refuses
//! at once, on purpose, with 503) and a deadline per request (the front answers 503 when it passes). A
//! request whose client goes away leaves the queue at that moment: its [`Ticket`] is dropped with the
//! client's task, and a worker never sees it.
//!
//! Workers take requests with [`Queue::pop`]; the entries are keyed by arrival order, so removal from the
//! middle (a disconnect, a timeout) costs a log-time lookup rather than a scan.
//!
//! The queue is shared by every client, so it is fair between them: each client (its IP address; behind
//! nginx's `fastcgi_pass`, the `REMOTE_ADDR` nginx passes) has its own line, and workers take from the lines
//! in turn, oldest first within each. A client with 1,000 requests waiting then delays a client with one by
//! at most one request per worker, not by 1,000; with one client it is plain first-in first-out.
//! `--max-queue-per-client` bounds one client's line, so that one client cannot fill the queue for all.
//!
//! Controlled delay ([`delay`], `--queue-target`, `--queue-interval`): when the queue keeps growing all
//! through an interval while new requests face more than the target (sustained overload, not a burst whose
//! clients are all in), it enters overload mode
//! and refuses at once a new request that would wait longer than the target, judged by its place in the turns
//! of its client's line: so a client with one request still gets in while a client with hundreds waiting is
//! refused. With `--queue-target 0` the queue is the plain bounded one.

pub mod delay;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::request::{Job, Reply};
use delay::{Controller, DelaySettings, Mode, Sample};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the queue is full")]
    Full,
    #[error("anteroom is shutting down")]
    ShuttingDown,
    #[error("no worker can start")]
    NoWorkers,
    #[error("this client has --max-queue-per-client requests waiting")]
    ClientLimit,
    #[error("the queue is overloaded and this request would wait longer than --queue-target")]
    Overload,
}

/// Whose line a request waits in: the client's IP address, or None for clients on a unix socket (one line).
type Client = Option<IpAddr>;

fn client_of(job: &Job) -> Client {
    job.origin.peer.map(|p| p.ip())
}

/// One client's waiting requests, by arrival. Sequence numbers of requests that left the queue some other
/// way (their client hung up, a timeout) stay here until their turn and are skipped then; `waiting` is the
/// exact count.
struct Line {
    /// Tells this line's turn from one of an earlier line of the same client, left in `turns` when that
    /// line emptied.
    id: u64,
    seqs: VecDeque<u64>,
    waiting: usize,
}

#[derive(Default)]
struct State {
    /// Boxed: a B-tree's nodes are half empty after inserts in order, and a 432-byte job in each slot made
    /// that half cost 3 MB at 10,000 waiting.
    entries: BTreeMap<u64, Box<Job>>,
    next_seq: u64,
    /// Retries go before everything else: they have waited their turn once already.
    next_retry_seq: u64,
    closed: bool,
    /// Every worker slot is failing to start: waiting would be forever, so refuse.
    no_workers: bool,
    /// Each client with requests waiting (retries aside), and the order in which their turns come.
    lines: HashMap<Client, Line>,
    turns: VecDeque<(Client, u64)>,
    next_line: u64,
    /// The controlled delay; None when off (`--queue-target 0`).
    delay: Option<Controller>,
    /// Requests dropped in overload after waiting twice the target, until their tickets ask.
    shed: HashSet<u64>,
}

impl State {
    /// Takes `seq` out, keeping its client's count exact.
    fn take(&mut self, seq: u64) -> Option<Box<Job>> {
        let job = self.entries.remove(&seq)?;
        if seq >= FIRST_SEQ {
            let client = client_of(&job);
            if let Some(line) = self.lines.get_mut(&client) {
                line.waiting -= 1;
                if line.waiting == 0 {
                    // Its stale sequence numbers go with it; its turn is skipped when it comes.
                    self.lines.remove(&client);
                }
            }
        }
        Some(job)
    }

    /// The next request in turn: a retry first, else the oldest of the client whose turn it is.
    fn next(&mut self) -> Option<(u64, Box<Job>)> {
        if let Some((&seq, _)) = self.entries.first_key_value() {
            if seq < FIRST_SEQ {
                return self.take(seq).map(|j| (seq, j));
            }
        }
        while let Some((client, id)) = self.turns.pop_front() {
            let Some(line) = self.lines.get_mut(&client).filter(|l| l.id == id) else {
                continue; // that line has emptied since
            };
            while let Some(seq) = line.seqs.pop_front() {
                if self.entries.contains_key(&seq) {
                    let job = self.take(seq);
                    if self.lines.get(&client).is_some_and(|l| l.id == id) {
                        self.turns.push_back((client, id));
                    }
                    return job.map(|j| (seq, j));
                }
            }
        }
        None
    }

    /// Requests served before one that `client` pushes now, by the turns: the retries, all of its own line,
    /// and from each other line as many as its own line will then hold.
    fn ahead_of_new(&self, client: Client) -> usize {
        let retries = self.entries.range(..FIRST_SEQ).count();
        let own = self.lines.get(&client).map_or(0, |l| l.waiting);
        let others: usize = self
            .lines
            .iter()
            .filter(|(c, _)| **c != client)
            .map(|(_, l)| l.waiting.min(own + 1))
            .sum();
        retries + own + others
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.lines.clear();
        self.turns.clear();
    }
}

/// Ordinary requests are keyed from here up, retries from here down.
const FIRST_SEQ: u64 = 1 << 62;

pub struct Queue {
    state: Mutex<State>,
    /// Wakes one idle worker per queued request.
    available: Notify,
    max: usize,
    /// Most requests one client may have waiting; 0 for no limit.
    per_client: usize,
    timeout: Duration,
    /// Smoothed time a worker takes per request, for an honest Retry-After.
    service_micros: AtomicU64,
    workers: AtomicUsize,
}

/// The client's hold on its queued request; dropping it (the client left, or gave up) removes the request.
pub struct Ticket {
    queue: Arc<Queue>,
    seq: u64,
    pub reply: oneshot::Receiver<Reply>,
}

impl Ticket {
    /// Whether the queue dropped this request in overload (it had waited twice `--queue-target`).
    pub fn was_shed(&self) -> bool {
        self.queue.lock().shed.remove(&self.seq)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.queue.lock();
        st.take(self.seq);
        st.shed.remove(&self.seq);
    }
}

impl Queue {
    pub fn new(max: usize, per_client: usize, timeout: Duration, workers: usize) -> Arc<Queue> {
        Arc::new(Queue {
            state: Mutex::new(State {
                next_seq: FIRST_SEQ,
                next_retry_seq: FIRST_SEQ - 1,
                ..State::default()
            }),
            available: Notify::new(),
            max,
            per_client,
            timeout,
            service_micros: AtomicU64::new(100_000),
            workers: AtomicUsize::new(workers.max(1)),
        })
    }

    /// The queue `--max-queue`, `--max-queue-per-client`, `--queue-timeout`, `--queue-target` and
    /// `--queue-interval` ask for, its expiry task started ([`Queue::expire_in_background`]): call it
    /// inside the runtime.
    pub fn from_config(cfg: &crate::config::Config) -> Arc<Queue> {
        let q = Queue::new(
            cfg.max_queue,
            cfg.max_queue_per_client,
            cfg.queue_timeout,
            cfg.workers,
        );
        if let Some(d) = cfg.queue_delay {
            q.control_delay(d);
        }
        q.expire_in_background();
        q
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Distinct clients with requests waiting (retries aside): with the depth, it shows whether one client
    /// fills the queue or many share it.
    pub fn clients(&self) -> usize {
        self.lock().lines.len()
    }

    /// `--max-queue-per-client`; 0 for no limit.
    pub fn per_client(&self) -> usize {
        self.per_client
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock would be a bug in a few lines below; the data stays consistent.
        crate::sync::lock(&self.state)
    }

    /// Queues `job`, or refuses it at once if the queue is full.
    pub fn push(self: &Arc<Self>, mut job: Job) -> Result<Ticket, Rejected> {
        let (tx, rx) = oneshot::channel();
        job.reply = Some(tx);
        let seq = {
            let mut st = self.lock();
            if st.closed {
                return Err(Rejected::ShuttingDown);
            }
            if st.no_workers {
                return Err(Rejected::NoWorkers);
            }
            if st.entries.len() >= self.max {
                return Err(Rejected::Full);
            }
            let client = client_of(&job);
            if st.delay.is_some() {
                let now = Instant::now();
                let sample = self.sample(&st, now);
                let ahead = st.ahead_of_new(client);
                let wait = self.wait_for(ahead);
                if let Some(ctl) = st.delay.as_mut() {
                    ctl.observe(sample);
                    if !ctl.admit(wait) {
                        return Err(Rejected::Overload);
                    }
                }
            }
            let seq = st.next_seq;
            let line_id = st.next_line;
            let line = st.lines.entry(client).or_insert_with(|| Line {
                id: line_id,
                seqs: VecDeque::new(),
                waiting: 0,
            });
            if self.per_client > 0 && line.waiting >= self.per_client {
                return Err(Rejected::ClientLimit);
            }
            line.seqs.push_back(seq);
            line.waiting += 1;
            if line.id == line_id {
                // A new line: its first turn, after those already waiting.
                st.next_line += 1;
                st.turns.push_back((client, line_id));
            }
            st.next_seq += 1;
            st.entries.insert(seq, Box::new(job));
            seq
        };
        self.available.notify_one();
        Ok(Ticket {
            queue: self.clone(),
            seq,
            reply: rx,
        })
    }

    /// Turns the controlled delay on (see [`delay`]).
    pub fn control_delay(&self, settings: DelaySettings) {
        self.lock().delay = Some(Controller::new(settings));
    }

    /// How long `ahead` requests take the workers, by the measured service time.
    fn wait_for(&self, ahead: usize) -> Duration {
        let per = Duration::from_micros(self.service_micros.load(Ordering::Relaxed));
        let workers = self.workers.load(Ordering::Relaxed).max(1);
        per.saturating_mul(u32::try_from(ahead).unwrap_or(u32::MAX)) / workers as u32
    }

    fn sample(&self, st: &State, now: Instant) -> Sample {
        let per = self.service_micros.load(Ordering::Relaxed).max(1) as f64 / 1e6;
        let interval = st
            .delay
            .as_ref()
            .map_or(0.0, |c| c.settings().interval.as_secs_f64());
        Sample {
            now,
            len: st.entries.len(),
            expected_wait: self.wait_for(st.entries.len()),
            drained_per_interval: interval * self.workers.load(Ordering::Relaxed) as f64 / per,
        }
    }

    /// The controlled delay's mode now (normal when it is off), its settings, and its transitions into and
    /// out of overload.
    pub fn delay_status(&self) -> Option<(Mode, DelaySettings, u64, u64)> {
        let mut st = self.lock();
        let sample = self.sample(&st, Instant::now());
        let ctl = st.delay.as_mut()?;
        let mode = ctl.observe(sample);
        Some((mode, ctl.settings(), ctl.entered, ctl.left))
    }

    /// Removes a request that is still waiting; false if a worker already took it.
    pub fn remove(&self, seq: u64) -> bool {
        self.lock().take(seq).is_some()
    }

    /// Fails, from now on and for as long as the queue lives, each request still waiting when its
    /// `--queue-timeout` passes (its front answers 503). One timer for the whole queue, not one in each
    /// waiting request's future: at 10,000 waiting those cost 1.3 MB and as many timer-wheel entries. The
    /// oldest first try is always the first to expire (the queue timeout is the same for all, and retries,
    /// keyed below, never do), so the task sleeps until that one's deadline; with none waiting, for a whole
    /// timeout, since nothing queued from now on expires sooner. It is never woken by a push: with one
    /// request at a time, that was a wake-up and a context switch per request (+20 us on a kept-alive hop).
    pub fn expire_in_background(self: &Arc<Self>) {
        let queue = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                // The runtime's clock, which a test may have paused, not the system's.
                let now = tokio::time::Instant::now();
                let next = match queue.upgrade() {
                    Some(q) => q
                        .expire(now.into_std())
                        .unwrap_or(now.into_std() + q.timeout),
                    None => return,
                };
                tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
            }
        });
    }

    /// Drops the requests whose deadline has passed at `now`; the next deadline, if any request waits.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let mut expired = Vec::new();
        let next = {
            let mut st = self.lock();
            loop {
                let Some((&seq, job)) = st.entries.range(FIRST_SEQ..).next() else {
                    break None;
                };
                let deadline = job.enqueued + self.timeout;
                if deadline > now {
                    break Some(deadline);
                }
                expired.extend(st.take(seq));
            }
        };
        if !expired.is_empty() {
            tracing::debug!(
                n = expired.len(),
                "waited {:?} in the queue: refused with 503",
                self.timeout
            );
        }
        // Dropped without the lock: each drops its reply sender, and its front answers 503.
        drop(expired);
        next
    }

    /// The next request in turn (see the module doc) whose client still waits and whose deadline has not
    /// passed.
    pub fn try_pop(&self) -> Option<Job> {
        let mut st = self.lock();
        let now = Instant::now();
        // In overload, a request that has waited twice the target is dropped rather than served: at ten
        // times the capacity the queue that formed before overload was recognised holds seconds of work, and
        // serving it would answer requests nobody waits for while fresh ones are refused.
        let mut shed_after = None;
        if st.delay.is_some() {
            let sample = self.sample(&st, now);
            if let Some(ctl) = st.delay.as_mut() {
                if ctl.observe(sample) == Mode::Overload {
                    shed_after = Some(ctl.settings().target * 2);
                }
            }
        }
        while let Some((seq, job)) = st.next() {
            let first_try = job.deaths == 0 && job.closes == 0;
            let waited = now.duration_since(job.enqueued);
            let expired = first_try && waited >= self.timeout;
            if first_try && shed_after.is_some_and(|limit| waited > limit) && !job.client_gone() {
                st.shed.insert(seq);
                continue;
            }
            if job.client_gone() || expired {
                // Dropping the job drops its reply sender; the front answers 503 for an expired one.
                continue;
            }
            return Some(*job);
        }
        None
    }

    /// Waits for the next request for an idle worker.
    pub async fn pop(&self) -> Job {
        loop {
            let notified = self.available.notified();
            tokio::pin!(notified);
            // Registered before looking, so a push between the look and the wait still wakes us.
            notified.as_mut().enable();
            if let Some(job) = self.try_pop() {
                if !self.is_empty() {
                    // We may have consumed a wake-up meant for another queued request: pass it on.
                    self.available.notify_one();
                }
                return job;
            }
            notified.await;
        }
    }

    /// Puts a request whose worker died back at the head of the line, for another worker.
    pub fn requeue(&self, job: Job) {
        {
            let mut st = self.lock();
            let seq = st.next_retry_seq;
            st.next_retry_seq -= 1;
            st.entries.insert(seq, Box::new(job));
        }
        self.available.notify_one();
    }

    /// While no worker can start, new requests are refused and waiting ones are failed (503).
    pub fn set_no_workers(&self, none: bool) {
        let mut st = self.lock();
        if st.no_workers != none {
            st.no_workers = none;
            if none {
                st.clear();
            }
        }
    }

    /// Stops admitting; requests already queued stay to be served.
    pub fn close(&self) {
        self.lock().closed = true;
    }

    /// Fails every waiting request (their clients get 503): used when anteroom must stop now.
    pub fn drain(&self) {
        self.lock().clear();
    }

    /// Feeds the service-time estimate behind Retry-After.
    pub fn record_service_time(&self, d: Duration) {
        let new = d.as_micros().min(u64::MAX as u128) as u64;
        let old = self.service_micros.load(Ordering::Relaxed);
        // An exponential moving average over roughly the last 16 requests.
        self.service_micros
            .store(old - old / 16 + new / 16, Ordering::Relaxed);
    }

    /// The measured time a worker takes per request (a moving average), for the agent's weight.
    pub fn service_time(&self) -> Duration {
        Duration::from_micros(self.service_micros.load(Ordering::Relaxed))
    }

    /// Seconds after which a refused client may reasonably try again: the time to work off the queue.
    pub fn retry_after_secs(&self) -> u64 {
        let per = self.service_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let secs = self.len() as f64 * per / self.workers.load(Ordering::Relaxed) as f64;
        secs.ceil().clamp(1.0, 60.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::tests::job;

    #[tokio::test(start_paused = true)]
    async fn a_request_past_its_deadline_is_failed_by_the_queue_alone() {
        let q = Queue::new(8, 0, Duration::from_secs(30), 1);
        q.expire_in_background();
        let mut a = q.push(job("/a")).unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        // Arrived 20 s later by the paused clock (the job's own clock is the system's, which did not move).
        let mut later = job("/b");
        later.enqueued = tokio::time::Instant::now().into_std();
        let mut b = q.push(later).unwrap();
        assert!(a
            .reply
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Empty));
        // /a's deadline passes: it is failed (its sender dropped) while /b still waits.
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(a
            .reply
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Closed));
        assert_eq!(q.len(), 1);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(b
            .reply
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Closed));
        assert!(q.is_empty());
        // The task sleeps on the empty queue and wakes for the next request.
        let mut later = job("/c");
        later.enqueued = tokio::time::Instant::now().into_std();
        let mut c = q.push(later).unwrap();
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert!(c
            .reply
            .try_recv()
            .is_err_and(|e| e == oneshot::error::TryRecvError::Closed));
    }

    #[tokio::test]
    async fn fifo_bound_and_removal() {
        let q = Queue::new(2, 0, Duration::from_secs(10), 1);
        let a = q.push(job("/a")).unwrap();
        let b = q.push(job("/b")).unwrap();
        assert!(matches!(q.push(job("/c")), Err(Rejected::Full)));
        drop(a); // the client of /a hung up
        assert_eq!(q.len(), 1);
        let j = q.pop().await;
        assert_eq!(j.head.uri.path(), "/b");
        // Taken by a worker: the ticket no longer removes anything.
        assert!(!q.remove(b.seq));
    }

    #[tokio::test]
    async fn expired_requests_are_not_served() {
        let q = Queue::new(8, 0, Duration::from_millis(20), 1);
        let mut t = q.push(job("/old")).unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(q.try_pop().is_none());
        // The front sees its reply channel closed without a reply.
        assert!((&mut t.reply).await.is_err());
    }

    #[tokio::test]
    async fn an_idle_worker_is_woken() {
        let q = Queue::new(8, 0, Duration::from_secs(10), 1);
        let q2 = q.clone();
        let worker = tokio::spawn(async move { q2.pop().await.head.uri.path().to_string() });
        tokio::task::yield_now().await;
        let _t = q.push(job("/x")).unwrap();
        assert_eq!(worker.await.unwrap(), "/x");
    }

    #[tokio::test]
    async fn closed_queue_refuses() {
        let q = Queue::new(8, 0, Duration::from_secs(10), 1);
        q.close();
        assert!(matches!(q.push(job("/x")), Err(Rejected::ShuttingDown)));
    }

    fn from(ip: &str, path: &str) -> Job {
        let mut j = job(path);
        j.origin.peer = Some(format!("{ip}:1000").parse().unwrap());
        j
    }

    fn paths(q: &Queue) -> Vec<String> {
        std::iter::from_fn(|| q.try_pop())
            .map(|j| j.head.uri.path().to_string())
            .collect()
    }

    #[test]
    fn clients_take_turns_oldest_first_within_each() {
        let q = Queue::new(100, 0, Duration::from_secs(10), 1);
        let mut tickets = Vec::new();
        for i in 0..4 {
            tickets.push(q.push(from("10.0.0.1", &format!("/big{i}"))).unwrap());
        }
        tickets.push(q.push(from("10.0.0.2", "/small")).unwrap());
        tickets.push(q.push(from("10.0.0.3", "/other0")).unwrap());
        tickets.push(q.push(from("10.0.0.3", "/other1")).unwrap());
        assert_eq!(
            paths(&q),
            ["/big0", "/small", "/other0", "/big1", "/other1", "/big2", "/big3"]
        );
    }

    #[test]
    fn a_client_that_comes_back_waits_for_its_turn_once() {
        let q = Queue::new(100, 0, Duration::from_secs(10), 1);
        let a = q.push(from("10.0.0.1", "/a0")).unwrap();
        let _b = q.push(from("10.0.0.2", "/b0")).unwrap();
        // a's line empties (its client left) and a comes back: one turn, not two.
        drop(a);
        let _a1 = q.push(from("10.0.0.1", "/a1")).unwrap();
        let _a2 = q.push(from("10.0.0.1", "/a2")).unwrap();
        let _b1 = q.push(from("10.0.0.2", "/b1")).unwrap();
        assert_eq!(paths(&q), ["/b0", "/a1", "/b1", "/a2"]);
        assert!(q.lock().lines.is_empty() && q.lock().turns.is_empty());
    }

    #[test]
    fn one_client_cannot_fill_the_queue() {
        let q = Queue::new(100, 2, Duration::from_secs(10), 1);
        let _a: Vec<_> = (0..2)
            .map(|i| q.push(from("10.0.0.1", &format!("/a{i}"))).unwrap())
            .collect();
        assert!(matches!(
            q.push(from("10.0.0.1", "/a2")),
            Err(Rejected::ClientLimit)
        ));
        let _b = q.push(from("10.0.0.2", "/b")).unwrap();
        assert_eq!((q.len(), q.clients()), (3, 2));
        // Served: room again for that client.
        assert_eq!(q.try_pop().unwrap().head.uri.path(), "/a0");
        assert!(q.push(from("10.0.0.1", "/a3")).is_ok());
    }

    #[test]
    fn retries_go_first() {
        let q = Queue::new(100, 0, Duration::from_secs(10), 1);
        let _a = q.push(from("10.0.0.1", "/a")).unwrap();
        // A request a worker took, whose worker died: its client still waits on the same ticket.
        let _r = q.push(from("10.0.0.2", "/retry")).unwrap();
        let _b = q.push(from("10.0.0.2", "/b")).unwrap();
        let mut taken = q.try_pop().unwrap();
        assert_eq!(taken.head.uri.path(), "/a");
        taken = q.try_pop().unwrap();
        assert_eq!(taken.head.uri.path(), "/retry");
        q.requeue(taken);
        assert_eq!(paths(&q), ["/retry", "/b"]);
    }

    #[test]
    fn overload_refuses_the_long_line_and_admits_a_new_client_then_ends() {
        // One worker at the default 100 ms a request: each request waiting is 100 ms of expected wait.
        let q = Queue::new(100, 0, Duration::from_secs(10), 1);
        let ms = Duration::from_millis;
        // Growth is judged in twelfths of the interval: 10 ms.
        q.control_delay(DelaySettings {
            target: ms(150),
            interval: ms(120),
        });
        let mut held = Vec::new();
        let mut push = |path: &str| q.push(from("10.0.0.1", path)).map(|t| held.push(t));
        for i in 0..3 {
            push(&format!("/a{i}")).unwrap(); // the third faces 200 ms: above the target
        }
        // Each round of five closes one part (the sleeps may be longer, never shorter): the first has
        // nothing to compare with, the second grew from 0 to 3 only (not by more than 3), then the queue
        // grows by 5 a part; at the eleventh growth in a row, judged at the first push after the last
        // round, it has grown through twelve parts.
        for round in 0..12 {
            std::thread::sleep(ms(12));
            for i in 0..5 {
                push(&format!("/a{}", 3 + round * 5 + i)).unwrap();
            }
        }
        std::thread::sleep(ms(12));
        // Overload now, and this one would wait 6.3 s.
        assert_eq!(push("/a63"), Err(Rejected::Overload));
        assert_eq!(
            q.delay_status().map(|d| (d.0, d.2)),
            Some((Mode::Overload, 1))
        );
        // Another client's first request is next but one in the turns: 100 ms, admitted.
        let b = q.push(from("10.0.0.2", "/b")).unwrap();
        // In overload, what has waited more than twice the target is dropped, not served.
        std::thread::sleep(ms(310));
        assert!(q.try_pop().is_none());
        assert!(held.iter().all(Ticket::was_shed) && b.was_shed());
        // The queue is empty, below half the target: normal again, and a long line is admitted.
        assert_eq!(
            q.delay_status().map(|d| (d.0, d.3)),
            Some((Mode::Normal, 1))
        );
        for i in 0..5 {
            q.push(from("10.0.0.1", &format!("/c{i}"))).unwrap();
        }
    }
}
