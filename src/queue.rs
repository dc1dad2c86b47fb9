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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::request::{Job, Reply};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the queue is full")]
    Full,
    #[error("anteroom is shutting down")]
    ShuttingDown,
    #[error("no worker can start")]
    NoWorkers,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<u64, Job>,
    next_seq: u64,
    /// Retries go before everything else: they have waited their turn once already.
    next_retry_seq: u64,
    closed: bool,
    /// Every worker slot is failing to start: waiting would be forever, so refuse.
    no_workers: bool,
}

/// Ordinary requests are keyed from here up, retries from here down.
const FIRST_SEQ: u64 = 1 << 62;

pub struct Queue {
    state: Mutex<State>,
    /// Wakes one idle worker per queued request.
    available: Notify,
    max: usize,
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
    /// Takes the request back out of the queue; false if a worker already has it.
    pub fn withdraw(&self) -> bool {
        self.queue.remove(self.seq)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.queue.remove(self.seq);
    }
}

impl Queue {
    pub fn new(max: usize, timeout: Duration, workers: usize) -> Arc<Queue> {
        Arc::new(Queue {
            state: Mutex::new(State {
                next_seq: FIRST_SEQ,
                next_retry_seq: FIRST_SEQ - 1,
                ..State::default()
            }),
            available: Notify::new(),
            max,
            timeout,
            service_micros: AtomicU64::new(100_000),
            workers: AtomicUsize::new(workers.max(1)),
        })
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
            let seq = st.next_seq;
            st.next_seq += 1;
            st.entries.insert(seq, job);
            seq
        };
        self.available.notify_one();
        Ok(Ticket {
            queue: self.clone(),
            seq,
            reply: rx,
        })
    }

    /// Removes a request that is still waiting; false if a worker already took it.
    pub fn remove(&self, seq: u64) -> bool {
        self.lock().entries.remove(&seq).is_some()
    }

    /// The oldest request whose client still waits and whose deadline has not passed.
    pub fn try_pop(&self) -> Option<Job> {
        let mut st = self.lock();
        let now = Instant::now();
        while let Some((_, job)) = st.entries.pop_first() {
            let expired = job.deaths == 0
                && job.closes == 0
                && now.duration_since(job.enqueued) >= self.timeout;
            if job.client_gone() || expired {
                // Dropping the job drops its reply sender; the front answers 503 for an expired one.
                continue;
            }
            return Some(job);
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
            st.entries.insert(seq, job);
        }
        self.available.notify_one();
    }

    /// While no worker can start, new requests are refused and waiting ones are failed (503).
    pub fn set_no_workers(&self, none: bool) {
        let mut st = self.lock();
        if st.no_workers != none {
            st.no_workers = none;
            if none {
                st.entries.clear();
            }
        }
    }

    /// Stops admitting; requests already queued stay to be served.
    pub fn close(&self) {
        self.lock().closed = true;
    }

    /// Fails every waiting request (their clients get 503): used when anteroom must stop now.
    pub fn drain(&self) {
        self.lock().entries.clear();
    }

    /// Feeds the service-time estimate behind Retry-After.
    pub fn record_service_time(&self, d: Duration) {
        let new = d.as_micros().min(u64::MAX as u128) as u64;
        let old = self.service_micros.load(Ordering::Relaxed);
        // An exponential moving average over roughly the last 16 requests.
        self.service_micros
            .store(old - old / 16 + new / 16, Ordering::Relaxed);
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

    #[tokio::test]
    async fn fifo_bound_and_removal() {
        let q = Queue::new(2, Duration::from_secs(10), 1);
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
        let q = Queue::new(8, Duration::from_millis(20), 1);
        let mut t = q.push(job("/old")).unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(q.try_pop().is_none());
        // The front sees its reply channel closed without a reply.
        assert!((&mut t.reply).await.is_err());
    }

    #[tokio::test]
    async fn an_idle_worker_is_woken() {
        let q = Queue::new(8, Duration::from_secs(10), 1);
        let q2 = q.clone();
        let worker = tokio::spawn(async move { q2.pop().await.head.uri.path().to_string() });
        tokio::task::yield_now().await;
        let _t = q.push(job("/x")).unwrap();
        assert_eq!(worker.await.unwrap(), "/x");
    }

    #[tokio::test]
    async fn closed_queue_refuses() {
        let q = Queue::new(8, Duration::from_secs(10), 1);
        q.close();
        assert!(matches!(q.push(job("/x")), Err(Rejected::ShuttingDown)));
    }
}
