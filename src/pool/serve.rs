//! The serve loop of a ready worker, and what each way a request can fail means for the request, the
//! worker and the quarantine.
//!
//! Between requests the worker may be replaced on purpose (so that it never fails one). A request's
//! attempt ends in one of these ways, each handled by one function below: answered; the client left; it
//! never reached the worker (sent to another, first in line); anteroom is stopping (503); the request
//! timeout (504, worker stopped); the worker closed the connection before the first byte of its answer
//! while staying alive (a close event: retried once if idempotent, the worker kept, no death counted);
//! the worker answered wrongly but lives (502, worker kept); the worker died holding it (a death:
//! quarantine, then retried once if idempotent, else 502).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::StatusCode;

use super::life::Worker;
use super::scoreboard::rss_bytes;
use super::slot::Event;
use super::slowlog;
use super::{transition, update, Cause, HeldRequest, Shared};
use crate::quarantine::{fingerprint, Verdict};
use crate::request::{error_response, Job};
use crate::worker::{Link, Progress, WorkerError};

/// How long a worker whose connection failed is given to show that it exited.
const EXIT_GRACE: Duration = Duration::from_millis(500);
/// How often a worker past its --max-worker-lifetime looks again whether it may go (another slot is
/// replacing its own for age meanwhile).
const AGING_RETRY: Duration = Duration::from_millis(250);

/// Why a worker is replaced on purpose, between requests; `reason` in its log line.
enum Retire {
    Requests(u64),
    Rss(u64),
    Reload,
    Lifetime(Duration),
}

impl Retire {
    fn reason(&self) -> &'static str {
        match self {
            Retire::Requests(_) => "max_requests",
            Retire::Rss(_) => "max_rss",
            Retire::Reload => "reload",
            Retire::Lifetime(_) => "lifetime",
        }
    }
}

impl std::fmt::Display for Retire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Retire::Requests(n) => write!(f, "served {n} requests"),
            Retire::Rss(rss) => write!(f, "resident memory {} MiB over --max-rss", rss >> 20),
            Retire::Reload => f.write_str("reload: a new worker took over"),
            Retire::Lifetime(lived) => {
                write!(f, "lived {lived:.1?}, past its --max-worker-lifetime")
            }
        }
    }
}

/// What to do after one request.
enum After {
    /// Take the next one.
    Next,
    /// The worker exited: explain it.
    Exited(io::Result<ExitStatus>),
    /// End the worker, for this cause.
    Stop(Cause),
}

/// What waiting for a request came to.
enum Next {
    Job(Box<Job>),
    /// Look again (a hand-off permit may have appeared; the idle time passed at the minimum).
    Again,
    Exited(io::Result<ExitStatus>),
    /// The pool stops, or this idle worker leaves it.
    Stop,
}

/// One request's attempt on this worker.
struct Attempt {
    result: Result<(), WorkerError>,
    progress: Progress,
    begun: Instant,
    /// The worker exited meanwhile.
    exited: Option<io::Result<ExitStatus>>,
    timed_out: bool,
}

/// Takes requests from the queue and serves them until the worker must end (replaced on purpose, timed
/// out, stopping) or dies; returns its exit status.
pub(super) async fn serve<E: Future<Output = io::Result<ExitStatus>>>(
    sh: &Shared,
    w: &mut Worker,
    link: &mut Link,
    exit: &mut Pin<&mut E>,
) -> io::Result<ExitStatus> {
    let max_requests = match sh.cfg.max_requests {
        0 => u64::MAX,
        n => n + fastrand::u64(0..=sh.cfg.max_requests_jitter),
    };
    // Its own lifetime, 1 to 1.1 times the option's, so that workers started together do not all come
    // due together; when several do, they go one after another all the same (`sh.aging`).
    let mut age_check = sh
        .cfg
        .max_worker_lifetime
        .map(|l| w.started + l.mul_f64(1.0 + fastrand::f64() / 10.0));
    loop {
        // Replacement on purpose happens here, between requests, so that it never fails one.
        if let Some((why, slot_ends)) = retire_reason(sh, w, max_requests, &mut age_check) {
            w.end.retire_slot = slot_ends;
            tracing::info!(
                slot = w.slot(),
                pid = w.pid,
                reason = why.reason(),
                "retiring worker: {why}"
            );
            return w.stop(sh, Cause::Retired, link, exit).await;
        }
        let job = match next_job(sh, w, exit, age_check).await {
            Next::Job(job) => job,
            Next::Again => continue,
            Next::Exited(st) => return st,
            Next::Stop => return w.stop(sh, Cause::Retired, link, exit).await,
        };
        match serve_one(sh, w, link, exit, *job).await {
            After::Next => {}
            After::Exited(st) => return st,
            After::Stop(cause) => return w.stop(sh, cause, link, exit).await,
        }
    }
}

/// Why a ready worker is replaced on purpose now, between requests, if it is; true if its slot ends too
/// (a reload handed its place to a new generation). `age_check`: when its lifetime is over, or when to look
/// again whether it may go.
fn retire_reason(
    sh: &Shared,
    w: &mut Worker,
    max_requests: u64,
    age_check: &mut Option<Instant>,
) -> Option<(Retire, bool)> {
    let served = w.end.served;
    if served >= max_requests {
        return Some((Retire::Requests(served), false));
    }
    if let Some(rss) = sh
        .cfg
        .max_rss
        // Only once it has served: a worker over the limit at birth would never serve at all.
        .filter(|_| served > 0)
        .and_then(|max| rss_bytes(w.pid).filter(|r| *r > max))
    {
        return Some((Retire::Rss(rss), false));
    }
    if sh.gens.replaced(w.key.0) && sh.gens.take_handoff() {
        return Some((Retire::Reload, true));
    }
    let now = Instant::now();
    if age_check.is_some_and(|at| at <= now) {
        // One slot at a time: the token is given back when this slot's next worker is ready.
        if sh
            .aging
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            w.end.holds_aging = true;
            return Some((Retire::Lifetime(w.started.elapsed()), false));
        }
        *age_check = Some(now + AGING_RETRY);
    }
    None
}

/// Waits for a request, or for a reason not to.
async fn next_job<E: Future<Output = io::Result<ExitStatus>>>(
    sh: &Shared,
    w: &mut Worker,
    exit: &mut Pin<&mut E>,
    age_check: Option<Instant>,
) -> Next {
    let dynamic = sh.cfg.workers_max > sh.cfg.workers;
    let aged = age_check.unwrap_or_else(Instant::now);
    tokio::select! {
        biased;
        st = exit.as_mut() => Next::Exited(st),
        () = sh.stop.cancelled() => Next::Stop,
        () = sh.gens.handoff_ready.notified(), if sh.gens.replaced(w.key.0) => Next::Again,
        // An idle worker past its lifetime goes too, without waiting for a request.
        () = tokio::time::sleep_until(aged.into()), if age_check.is_some() => Next::Again,
        () = tokio::time::sleep(sh.cfg.idle_timeout), if dynamic => {
            if !sh.gens.leave_if_above_min(sh.cfg.workers) {
                return Next::Again;
            }
            w.end.left_pool = true;
            w.end.retire_slot = true;
            tracing::info!(slot = w.slot(), pid = w.pid, "idle for {:?}: leaving the pool", sh.cfg.idle_timeout);
            Next::Stop
        }
        job = sh.queue.pop() => Next::Job(Box::new(job)),
    }
}

/// Serves one request and decides what its outcome means.
async fn serve_one<E: Future<Output = io::Result<ExitStatus>>>(
    sh: &Shared,
    w: &mut Worker,
    link: &mut Link,
    exit: &mut Pin<&mut E>,
    mut job: Job,
) -> After {
    sh.quarantine.record_request(&job);
    sh.busy.fetch_add(1, Ordering::Relaxed);
    let begun = Instant::now();
    job.dispatched = Some(begun);
    sh.metrics.queue_waited(begun.duration_since(job.enqueued));
    transition(sh, w.key, Event::Take, |r| {
        r.request = Some((job.id.clone(), job.summary()))
    });
    // The worker's CPU time now, for the slow-request event's "CPU used by this request".
    let cpu_at_start = sh
        .cfg
        .slowlog_timeout
        .and_then(|_| slowlog::cpu_ticks(w.pid));
    let mut a = attempt(sh, w, link, exit, &mut job, (begun, cpu_at_start)).await;
    sh.busy.fetch_sub(1, Ordering::Relaxed);
    // Served means answered: a request the worker died on is not counted.
    let answered = u64::from(a.result.is_ok());
    w.end.served += answered;
    update(sh, w.key, |r| {
        r.request = None;
        r.served += answered;
    });
    sh.queue.record_service_time(begun.elapsed());
    let e = match std::mem::replace(&mut a.result, Ok(())) {
        Ok(()) => return answered_ok(sh, w, &job, a),
        Err(e) => e,
    };
    if a.exited.is_none()
        && (e.delivered_nothing() || matches!(e, WorkerError::Io(_) | WorkerError::Closed))
    {
        // A reset connection is most often a worker that has just died: its exit comes a moment later.
        if let Ok(st) = tokio::time::timeout(EXIT_GRACE, exit.as_mut()).await {
            a.exited = Some(st);
        }
    }
    link.reset();
    failed(sh, w, job, e, a)
}

/// Runs the request on the worker, watching for its exit, the request timeout and a fast stop; at
/// --slowlog-timeout, hands the slow-request event to a task of its own and goes on waiting.
async fn attempt<E: Future<Output = io::Result<ExitStatus>>>(
    sh: &Shared,
    w: &Worker,
    link: &mut Link,
    exit: &mut Pin<&mut E>,
    job: &mut Job,
    (begun, cpu_at_start): (Instant, Option<u64>),
) -> Attempt {
    let mut progress = Progress::default();
    let mut exited = None;
    let mut timed_out = false;
    let limit = sh.cfg.request_timeout;
    let timeout_at = tokio::time::Instant::from(begun + limit.unwrap_or(Duration::ZERO));
    // Made before the request is lent to the link, and only with the slow-request log on.
    let mut slow = sh.cfg.slowlog_timeout.map(|d| {
        let req = slowlog::SlowRequest {
            id: job.id.clone(),
            method: job.head.method.to_string(),
            target: job.target().to_string(),
            slot: w.slot(),
            pid: w.pid,
            begun,
            cpu_at_start,
        };
        (tokio::time::Instant::from(begun + d), req)
    });
    let result = {
        let serve = link.serve(job, &sh.cfg, &mut progress);
        tokio::pin!(serve);
        loop {
            let slow_at = slow.as_ref().map_or(timeout_at, |(at, _)| *at);
            break tokio::select! {
                r = &mut serve => r,
                st = exit.as_mut() => {
                    exited = Some(st);
                    // What the worker wrote before exiting is still in the socket: read it out.
                    match tokio::time::timeout(Duration::from_secs(1), &mut serve).await {
                        Ok(r) => r,
                        Err(_) => Err(WorkerError::Exited),
                    }
                }
                () = tokio::time::sleep_until(timeout_at), if limit.is_some() => {
                    timed_out = true;
                    Err(WorkerError::Timeout(limit.unwrap_or_default()))
                }
                // A fast stop (or the end of a graceful one) does not wait for requests.
                () = sh.stop.cancelled() => Err(WorkerError::Stopping),
                // Once per attempt; the request goes on.
                () = tokio::time::sleep_until(slow_at), if slow.is_some() => {
                    if let Some((_, req)) = slow.take() {
                        slowlog::report(&sh.slow_budget, sh.cfg.slowlog_command.as_deref(), req);
                    }
                    continue;
                }
            };
        }
    };
    Attempt {
        result,
        progress,
        begun,
        exited,
        timed_out,
    }
}

/// Answered. A first attempt on a kept-alive connection that the worker closed before any byte of the
/// answer, sent again on a new connection, is a close event all the same.
fn answered_ok(sh: &Shared, w: &Worker, job: &Job, a: Attempt) -> After {
    if a.progress.retried_after_close {
        close_event(
            w,
            job,
            "worker alive but closed",
            "sent again on a new connection, which answered",
        );
    }
    match a.exited {
        // Answered, then exited: the slot records the exit.
        Some(st) => After::Exited(st),
        None => {
            transition(sh, w.key, Event::Done, |_| {});
            After::Next
        }
    }
}

/// The request failed on this worker: what that means, case by case (see the module doc).
fn failed(sh: &Shared, w: &mut Worker, mut job: Job, e: WorkerError, mut a: Attempt) -> After {
    let (slot, pid) = (w.slot(), w.pid);
    if matches!(e, WorkerError::ClientGone) {
        tracing::debug!(slot, pid, request_id = %job.id, "{e}; the worker's connection was closed");
        return done_unless_exited(sh, w, a.exited);
    }
    if e.delivered_nothing() && !job.client_gone() {
        // The worker never saw it (most often: it had just died, idle): another worker takes it, first
        // in line, whatever the method; it is not this request's death.
        tracing::warn!(slot, pid, request_id = %job.id, request = %job.summary(), "{e}; sending it to another worker");
        sh.queue.requeue(job);
        if let Some(st) = a.exited {
            return After::Exited(st);
        }
        // Alive but unreachable even on a new connection: replace it rather than hand it the next
        // request too.
        tracing::error!(
            slot,
            pid,
            "the worker does not take connections: replacing it"
        );
        return After::Stop(Cause::Retired);
    }
    if matches!(e, WorkerError::Stopping) {
        if !a.progress.head_sent {
            job.respond(crate::request::unavailable(
                &job.id,
                "The server is stopping.",
                1,
            ));
        }
        return match a.exited {
            Some(st) => After::Exited(st),
            None => After::Stop(Cause::Retired),
        };
    }
    if a.timed_out {
        tracing::error!(slot, pid, request_id = %job.id, request = %job.summary(), "{e}; stopping the worker");
        if !a.progress.head_sent {
            let why = format!(
                "The worker took longer than {:?}.",
                sh.cfg.request_timeout.unwrap_or_default()
            );
            job.respond(worker_failed(StatusCode::GATEWAY_TIMEOUT, &job.id, &why));
        }
        w.fate.held = Some(held(&job, &a));
        return After::Stop(Cause::Timeout);
    }
    let closed_early = matches!(e, WorkerError::Closed | WorkerError::Io(_))
        && a.progress.received_bytes == 0
        && !a.progress.head_sent;
    if let Some(status) = a.exited.take() {
        return died(sh, w, job, &e, &a, closed_early, status);
    }
    if closed_early {
        close_event(w, &job, "worker alive but closed", &e.to_string());
        closed_alive(sh, w, job, &a.progress);
        transition(sh, w.key, Event::Done, |_| {});
        return After::Next;
    }
    // The worker is alive but its answer was wrong: the client gets a 502, the worker stays.
    tracing::error!(
        slot, pid, request_id = %job.id, request = %job.summary(),
        sent = a.progress.sent_bytes, received = a.progress.received_bytes,
        "{e}"
    );
    if !a.progress.head_sent {
        let why = format!("The worker failed: {e}.");
        job.respond(worker_failed(StatusCode::BAD_GATEWAY, &job.id, &why));
    }
    transition(sh, w.key, Event::Done, |_| {});
    After::Next
}

/// The worker died holding this request: a close event if it had answered nothing, then the death's
/// consequences for the request; its death event follows from the slot.
fn died(
    sh: &Shared,
    w: &mut Worker,
    job: Job,
    e: &WorkerError,
    a: &Attempt,
    closed_early: bool,
    status: io::Result<ExitStatus>,
) -> After {
    if closed_early {
        let case = match &status {
            Ok(st) => format!("worker process died ({})", super::describe(*st)),
            Err(_) => "worker process died".into(),
        };
        close_event(w, &job, &case, &e.to_string());
    }
    let request = held(&job, a);
    died_holding(sh, w, job, &a.progress, &status);
    w.fate.held = Some(request);
    After::Exited(status)
}

fn done_unless_exited(sh: &Shared, w: &Worker, exited: Option<io::Result<ExitStatus>>) -> After {
    match exited {
        Some(st) => After::Exited(st),
        None => {
            transition(sh, w.key, Event::Done, |_| {});
            After::Next
        }
    }
}

/// The request as its worker's death event shows it.
fn held(job: &Job, a: &Attempt) -> HeldRequest {
    HeldRequest {
        id: job.id.clone(),
        method: job.head.method.to_string(),
        target: job.target().to_string(),
        sent_bytes: a.progress.sent_bytes,
        received_bytes: a.progress.received_bytes,
        elapsed: a.begun.elapsed(),
    }
}

/// The close event: the worker closed the connection before the first byte of its response. `case` says
/// whether its process died (a death event follows) or lives (most often a process of its own that anteroom
/// did not start died: see `hidden`; or its keep-alive timeout crossed the request).
fn close_event(w: &Worker, job: &Job, case: &str, detail: &str) {
    tracing::warn!(
        slot = w.slot(),
        pid = w.pid,
        request_id = %job.id,
        request = %job.summary(),
        case,
        "the worker closed the connection before the first byte of the response: {detail}"
    );
}

/// The worker lives but closed the connection before answering: no death, nothing for the quarantine;
/// an idempotent request is retried once, first in line, as when a worker dies; another gets a 502.
fn closed_alive(sh: &Shared, w: &Worker, mut job: Job, progress: &Progress) {
    let blocked = sh.quarantine.blocked(&fingerprint(&job)).is_some();
    // One retry in all, whether the first attempt was lost to a death or to a close.
    let first = job.deaths == 0 && job.closes == 0 && !progress.retried_after_close;
    job.closes = job.closes.saturating_add(1);
    if first && job.idempotent() && !job.client_gone() && !blocked {
        tracing::warn!(slot = w.slot(), pid = w.pid, request_id = %job.id, request = %job.summary(), "retrying it on another worker");
        sh.queue.requeue(job);
    } else {
        let why = if first {
            "The worker closed the connection before answering."
        } else {
            "The worker closed the connection before answering; this request was already retried."
        };
        job.respond(worker_failed(StatusCode::BAD_GATEWAY, &job.id, why));
    }
}

/// A worker died holding `job`: feed the quarantine, then retry the request once or answer 502.
fn died_holding(
    sh: &Shared,
    w: &mut Worker,
    mut job: Job,
    progress: &Progress,
    status: &io::Result<ExitStatus>,
) {
    let (slot, pid) = (w.slot(), w.pid);
    job.deaths += 1;
    let oom = w.fate.attribute(sh, status);
    let fp = fingerprint(&job);
    let verdict = sh.quarantine.record_death(&fp, oom);
    if let Verdict::Quarantined { deaths, requests } = verdict {
        let p = sh.quarantine.policy();
        tracing::error!(
            fingerprint = %fp,
            "{fp} killed {deaths} workers in {requests} requests within {:?}: refusing it with 503 for {:?}",
            p.window, p.cooldown
        );
    }
    if verdict != Verdict::Off {
        w.fate.quarantine = Some(verdict.to_string());
    }
    if progress.head_sent {
        return;
    }
    // A fingerprint in quarantine now gets no retry: that would only kill one more worker.
    let quarantined =
        matches!(verdict, Verdict::Quarantined { .. }) || sh.quarantine.blocked(&fp).is_some();
    // (A new connection tried after the first one failed, but to a worker that was dying, killed nobody:
    // unlike a close, it does not use up the retry.)
    if job.deaths == 1 && job.closes == 0 && job.idempotent() && !job.client_gone() && !quarantined
    {
        tracing::warn!(slot, pid, request_id = %job.id, request = %job.summary(), "the worker died holding this request; retrying it on another worker");
        sh.queue.requeue(job);
    } else {
        let why = if quarantined {
            format!("Requests for {fp} keep killing workers; this one is not retried.")
        } else if job.closes > 0 && job.deaths == 1 {
            "The worker died while serving this request, which was already retried once."
                .to_string()
        } else if job.deaths > 1 {
            tracing::error!(request_id = %job.id, request = %job.summary(), deaths = job.deaths, "poison request: it killed a second worker; not retried");
            "This request killed two workers; it is not retried.".to_string()
        } else {
            "The worker died while serving this request.".to_string()
        };
        job.respond(worker_failed(StatusCode::BAD_GATEWAY, &job.id, &why));
    }
}

fn worker_failed(status: StatusCode, id: &str, why: &str) -> crate::request::Reply {
    let mut r = error_response(status, id, why);
    r.extensions_mut().insert(crate::request::WorkerFailed);
    r
}
