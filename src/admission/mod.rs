//! Admission: what happens to a complete request between its front and the pool, the same for every front.
//!
//! A front (HTTP or FastCGI) only parses the client's protocol and builds a [`Job`]; from there this room
//! decides: the quarantine check, the push into the queue (refused at once when it is full, when the client's
//! line is full, in overload mode when the request would wait longer than `--queue-target`, when no worker
//! can start or when anteroom is stopping), and the wait for the answer, at most `--queue-timeout`. Every
//! refusal is a response of anteroom's own with the request id and, where coming back later helps, a
//! `Retry-After` ([`refusal`]). Every request, whatever its front and however it ends, has one [`Outcome`]:
//! [`Outcome::respond`] names its request id on the response, and once the front has written it (filling a
//! [`Delivery`]: the body bytes the client took, and why it stopped short if it did), [`Outcome::delivered`]
//! counts it in the metrics and writes its access-log line ([`Outcome::finish`] when nobody is left to take
//! it): so `--access-log` covers every front, says what each client got, and a new front cannot forget any
//! of it.
//!
//! Dependencies point one way: the fronts use this room; this room uses the queue, the quarantine and the
//! metrics, and knows nothing of the fronts.

mod outcome;
pub mod refusal;

use std::sync::Arc;

use futures_util::future::Either;

pub use outcome::{Delivery, Outcome};
use refusal::refused;

use crate::config::Config;
use crate::metrics::{Metrics, Rejection};
use crate::quarantine::Quarantine;
use crate::queue::{Queue, Rejected, Ticket};
use crate::request::{unavailable, Job, Reply};

/// What every front admits requests into: shared by all listeners.
pub struct Admission {
    pub cfg: Arc<Config>,
    queue: Arc<Queue>,
    quarantine: Arc<Quarantine>,
    metrics: Arc<Metrics>,
}

impl Admission {
    pub fn new(
        cfg: Arc<Config>,
        queue: Arc<Queue>,
        quarantine: Arc<Quarantine>,
        metrics: Arc<Metrics>,
    ) -> Admission {
        Admission {
            cfg,
            queue,
            quarantine,
            metrics,
        }
    }

    /// Queues a complete request and waits for its answer, or refuses it on purpose. Run in the request's
    /// span ([`Outcome::span`]): what it logs names the request by that.
    ///
    /// The request is queued (or refused) when this is called, not when the future is first polled, and the
    /// future holds only the ticket and the deadline: while thousands of requests wait, each costs its
    /// job in the queue once, not again in the future that waits for it.
    pub fn dispatch(&self, job: Job) -> impl std::future::Future<Output = Reply> + Send + '_ {
        // Either, not an async block over the match: that would hold the `Enqueued` (a whole reply) for
        // as long as the request waits.
        match self.enqueue(job) {
            Enqueued::Waiting(id, ticket) => Either::Left(self.wait(id, ticket)),
            Enqueued::Refused(refusal) => Either::Right(std::future::ready(refusal)),
        }
    }

    /// The quarantine check and the push into the queue.
    fn enqueue(&self, job: Job) -> Enqueued {
        if let Some((fp, left)) = self.quarantine.blocked_job(&job) {
            let r = unavailable(
                &job.id,
                &format!("Requests for {fp} have been crashing workers; they are refused for now."),
                left,
            );
            return Enqueued::Refused(refused(r, Rejection::Quarantined));
        }
        let id = job.id.clone();
        match self.queue.push(job) {
            Ok(t) => Enqueued::Waiting(id, t),
            Err(why) => Enqueued::Refused(self.not_queued(&id, why)),
        }
    }

    /// Waits for the answer to a queued request. The queue itself fails a request at `--queue-timeout`
    /// ([`Queue::expire_in_background`]), so this holds no timer of its own.
    async fn wait(&self, id: String, mut ticket: Ticket) -> Reply {
        let answer = (&mut ticket.reply).await;
        // Err: the queue dropped it (past its deadline, or in overload after twice --queue-target), or
        // anteroom is stopping.
        answer.unwrap_or_else(|_| {
            if ticket.was_shed() {
                self.not_queued(&id, Rejected::Overload)
            } else {
                self.waited_too_long(&id)
            }
        })
    }

    /// The answer to a request the queue would not take.
    fn not_queued(&self, id: &str, why: Rejected) -> Reply {
        let queue = &self.queue;
        match why {
            Rejected::Full => {
                tracing::debug!(limit = queue.max(), "queue full: refused with 503");
                let r = unavailable(
                    id,
                    "All workers are busy and the queue is full.",
                    queue.retry_after_secs(),
                );
                refused(r, Rejection::QueueFull)
            }
            Rejected::ClientLimit => {
                tracing::debug!("this client's line is full: refused with 503");
                let r = unavailable(
                    id,
                    "Too many of your requests are waiting already.",
                    queue.retry_after_secs(),
                );
                refused(r, Rejection::ClientLimit)
            }
            Rejected::Overload => {
                // Logged by the queue when the mode changes, not per request: in overload there are many.
                let r = unavailable(
                    id,
                    "The server is overloaded: this request would wait too long for a worker.",
                    queue.retry_after_secs(),
                );
                refused(r, Rejection::Overload)
            }
            Rejected::NoWorkers => {
                let r = unavailable(
                    id,
                    "No worker can start at the moment; see the server log.",
                    queue.retry_after_secs().max(5),
                );
                refused(r, Rejection::NoWorkers)
            }
            Rejected::ShuttingDown => {
                let r = unavailable(id, "The server is shutting down.", 1);
                refused(r, Rejection::ShuttingDown)
            }
        }
    }

    fn waited_too_long(&self, id: &str) -> Reply {
        let r = unavailable(
            id,
            "No worker became free in time.",
            self.queue.retry_after_secs(),
        );
        refused(r, Rejection::QueueTimeout)
    }
}

/// A request the queue took (its id and ticket), or the answer that refused it.
enum Enqueued {
    Waiting(String, Ticket),
    Refused(Reply),
}
