//! The worker pool: one supervised slot per worker process.
//!
//! Each slot is a task that owns one worker at a time: it makes the worker's private listening socket, has
//! the spawner start the process, then loops taking a request from the queue, serving it, and watching for
//! the process to exit. Because a worker has a socket of its own and serves one request at a time, anteroom
//! always knows which worker holds which request, and so which request a dead worker was holding.
//!
//! What the slot does about a death: it logs one event that explains it (status, signal, lifetime, requests
//! served, the request held and how far it got, the worker's last output), keeps it in the list of recent
//! deaths, retries an idempotent request once on another worker (a second death makes it a poison request:
//! 502), feeds the quarantine (saying whether the kernel's OOM killer explains the death: `oom`), and
//! replaces the worker. A worker that fails to start, or dies young, is replaced after an exponential,
//! jittered backoff, and such crash loops are logged as a summary rather than a line per death.
//!
//! Each slot's life is an explicit state machine (`slot`): the slot task reports every step to the board,
//! which derives from all slots at once whether the queue refuses (503, only while every slot is failing
//! to start: no ready worker and a failed last start) and what `/health/ready` says. A replacement that
//! becomes ready clears its slot's failure at once.
//!
//! Workers are also replaced on purpose: after `--max-requests` (plus jitter) or above `--max-rss`, always
//! between requests; and on reload (SIGHUP), when a new generation of slots starts and each old worker
//! retires, after its current request, as soon as a new one is ready.

mod death;
mod oom;
mod process;
mod scoreboard;
pub mod slot;
pub mod spawn;

pub use death::{describe, signal_name, Cause, Death, HeldRequest};
use death::{loop_event, record_death, LoopLog};
use oom::OomWatch;
use process::{
    log_lines, signal_group, socket_inode, terminate, worker_socket, Backoff, TAIL_LINES,
};
use scoreboard::rss_bytes;
pub use scoreboard::{PoolView, WorkerInfo};
pub use slot::SlotState;
use slot::{Board, Event, Key, Record};

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::quarantine::{fingerprint, Quarantine, Verdict};
use crate::queue::Queue;
use crate::request::{error_response, Job};
use crate::sync::lock;
use crate::worker::{Link, Progress, WorkerError};
use spawn::{SpawnSpec, Spawner};

/// A worker that exits sooner than this after starting, having served nothing, counts as a failed start.
pub(super) const YOUNG: Duration = Duration::from_secs(5);
/// How often the dynamic pool considers adding a worker (so at most this often).
const SCALE_EVERY: Duration = Duration::from_millis(100);
/// How often a starting worker's socket is looked at to see whether it has accepted.
const READY_POLL: Duration = Duration::from_millis(10);

pub struct Pool {
    shared: Arc<Shared>,
}

pub(super) struct Shared {
    cfg: Arc<Config>,
    queue: Arc<Queue>,
    quarantine: Arc<Quarantine>,
    spawner: Spawner,
    dir: PathBuf,
    argv: Vec<String>,
    stop: CancellationToken,
    /// Cancelled when --crash-exit's limit is reached.
    fatal: CancellationToken,
    busy: AtomicUsize,
    /// The current generation; slots of older ones retire as new workers become ready.
    generation: AtomicU64,
    /// One permit per new-generation worker that became ready and may replace an old one.
    handoff: Semaphore,
    handoff_ready: Notify,
    slots_alive: AtomicUsize,
    deaths: Mutex<VecDeque<Death>>,
    /// Every slot's state machine; locked before the queue when both are.
    board: Mutex<Board>,
    oom: OomWatch,
    metrics: Arc<Metrics>,
    crash_times: Mutex<VecDeque<Instant>>,
    loop_log: Mutex<LoopLog>,
    /// Every slot task, so that stopping can wait for them all.
    tasks: TaskTracker,
}

impl Pool {
    /// Starts one slot per configured worker. `dir` must be a private directory for the worker sockets.
    pub fn start(
        cfg: Arc<Config>,
        queue: Arc<Queue>,
        quarantine: Arc<Quarantine>,
        metrics: Arc<Metrics>,
        dir: PathBuf,
    ) -> std::io::Result<Pool> {
        let spawner = Spawner::start(tokio::runtime::Handle::current())?;
        let argv = if cfg.command.is_empty() {
            let exe = std::env::current_exe()?;
            vec![exe.to_string_lossy().into_owned(), "demo-worker".into()]
        } else {
            cfg.command.clone()
        };
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            queue,
            quarantine,
            spawner,
            dir,
            argv,
            stop: CancellationToken::new(),
            fatal: CancellationToken::new(),
            busy: AtomicUsize::new(0),
            generation: AtomicU64::new(1),
            handoff: Semaphore::new(0),
            handoff_ready: Notify::new(),
            slots_alive: AtomicUsize::new(0),
            deaths: Mutex::new(VecDeque::new()),
            board: Mutex::new(Board::new()),
            oom: OomWatch::new(),
            metrics,
            crash_times: Mutex::new(VecDeque::new()),
            loop_log: Mutex::new(LoopLog::default()),
            tasks: TaskTracker::new(),
        });
        for _ in 0..cfg.workers {
            spawn_slot(&shared, 1);
        }
        if cfg.workers_max > cfg.workers {
            tokio::spawn(scale(shared.clone()));
        }
        Ok(Pool { shared })
    }

    /// Starts a new generation of workers; each old worker retires once a new one is ready.
    pub fn reload(&mut self) {
        let sh = &self.shared;
        let old = sh.generation.fetch_add(1, Ordering::AcqRel);
        let generation = old + 1;
        // As many as serve now (a dynamic pool may have grown), and at least the minimum.
        let current = lock(&sh.board)
            .rows()
            .filter(|((g, _), _)| *g == old)
            .count();
        let n = current.max(sh.cfg.workers);
        tracing::info!(
            generation,
            workers = n,
            "reload: starting a new generation of workers"
        );
        for _ in 0..n {
            spawn_slot(sh, generation);
        }
    }

    /// Workers holding a request right now.
    pub fn busy(&self) -> usize {
        self.shared.busy.load(Ordering::Relaxed)
    }

    /// A cheap handle for the admin listener to look at the pool with.
    pub fn view(&self) -> PoolView {
        PoolView(self.shared.clone())
    }

    /// Resolves when --crash-exit's limit has been reached.
    pub fn fatal(&self) -> CancellationToken {
        self.shared.fatal.clone()
    }

    /// Stops every worker (SIGTERM, then SIGKILL after the grace period) and waits for them.
    pub async fn stop(self) {
        self.shared.stop.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

/// Starts a slot task in the lowest free slot number of `generation`.
fn spawn_slot(sh: &Arc<Shared>, generation: u64) {
    // Taken now, before the task runs, so that two spawns never pick the same number.
    let (slot, change) = lock(&sh.board).add(generation, &sh.queue);
    announce(sh, change);
    sh.slots_alive.fetch_add(1, Ordering::Relaxed);
    sh.tasks.spawn(run_slot(sh.clone(), slot, generation));
}

/// Moves a slot's state machine and updates its scoreboard row; the board tells the queue whether to
/// refuse, in the same critical section.
fn transition(sh: &Shared, key: Key, event: Event, f: impl FnOnce(&mut Record)) {
    let change = {
        let mut board = lock(&sh.board);
        let change = board.apply(key, event, &sh.queue);
        if let Some(r) = board.get_mut(key) {
            f(r);
        }
        change
    };
    match change {
        Ok(change) => announce(sh, change),
        // A slot task asked for a step its state does not allow: a bug here, not in the worker.
        Err(e) => tracing::error!("bug: {e}"),
    }
}

/// Updates a slot's scoreboard row without changing its state.
fn update(sh: &Shared, key: Key, f: impl FnOnce(&mut Record)) {
    if let Some(r) = lock(&sh.board).get_mut(key) {
        f(r);
    }
}

/// Logs a change of the queue's refusal (Some(true): every slot is failing now).
fn announce(sh: &Shared, change: Option<bool>) {
    match change {
        Some(true) => tracing::error!(
            "every worker slot is failing to start; requests are refused with 503 until one starts"
        ),
        Some(false) if !sh.stop.is_cancelled() => {
            tracing::warn!("not every worker slot is failing any more; requests are accepted again")
        }
        _ => {}
    }
}

/// The dynamic pool's grower (--workers MIN:MAX): one more worker while requests wait and every worker
/// is busy, at most one every SCALE_EVERY and never more than one starting at a time. Shrinking is the
/// slots' own business: an idle worker leaves after --idle-timeout.
async fn scale(sh: Arc<Shared>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(SCALE_EVERY) => {}
            () = sh.stop.cancelled() => return,
        }
        let generation = sh.generation.load(Ordering::Acquire);
        let (alive, starting) = {
            let board = lock(&sh.board);
            let current = board.rows().filter(|((g, _), _)| *g == generation);
            let (mut alive, mut starting) = (0, 0);
            for (_, r) in current {
                alive += 1;
                if matches!(r.state(), SlotState::Starting | SlotState::Backoff) {
                    starting += 1;
                }
            }
            (alive, starting)
        };
        let waiting = sh.queue.len();
        if waiting > 0 && starting == 0 && alive < sh.cfg.workers_max {
            tracing::info!(
                workers = alive + 1,
                waiting,
                "requests are waiting: adding a worker"
            );
            spawn_slot(&sh, generation);
        }
    }
}

/// Leaves the pool if it is above its minimum; true if this slot may go.
fn leave_if_above_min(sh: &Shared) -> bool {
    sh.slots_alive
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n > sh.cfg.workers).then(|| n - 1)
        })
        .is_ok()
}

async fn run_slot(sh: Arc<Shared>, slot: usize, generation: u64) {
    let key = (generation, slot);
    let mut backoff = Backoff::new();
    // The slot's last start failed: its next start is logged quietly (crash loops are summarised).
    let mut quiet = false;
    let mut handed_off = false;
    let mut n = 0u64;
    let mut left_pool = false;
    while !sh.stop.is_cancelled() {
        n += 1;
        let path = sh.dir.join(format!("w{slot}.g{generation}.{n}.sock"));
        let started = Instant::now();
        let end = run_worker(&sh, key, &path, quiet, &mut handed_off, backoff.upcoming()).await;
        let _ = std::fs::remove_file(&path);
        left_pool = end.left_pool;
        if sh.stop.is_cancelled() || end.retire_slot || end.left_pool {
            break;
        }
        quiet = end.failed_start;
        // A failed start, or a death soon after starting with nothing answered: the next start waits, so
        // that a crash loop costs no CPU. Only a failed start makes the slot failing (see `slot`).
        let young = end.failed_start || (end.served == 0 && started.elapsed() < YOUNG);
        if young {
            let delay = backoff.next();
            transition(&sh, key, Event::Backoff, |r| r.pid = 0);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = sh.stop.cancelled() => break,
            }
        } else {
            backoff.reset();
        }
    }
    let change = lock(&sh.board).remove(key, &sh.queue);
    announce(&sh, change);
    if !left_pool {
        sh.slots_alive.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct WorkerEnd {
    served: u64,
    /// The slot itself ends: its generation was replaced.
    retire_slot: bool,
    /// It never became ready.
    failed_start: bool,
    /// It idled out of a dynamic pool (already taken off `slots_alive`).
    left_pool: bool,
}

/// How a worker ended, as far as its death event goes.
struct Fate {
    cause: Cause,
    /// The request it held when it died.
    held: Option<HeldRequest>,
    /// Why it never became ready.
    start_failure: Option<String>,
    /// What its death did to the request's standing with the quarantine.
    quarantine: Option<String>,
    /// Whether the OOM killer was asked about this death already (each kill explains one death).
    oom_checked: bool,
    /// anteroom ended it (SIGTERM, then SIGKILL after the grace period): not the OOM killer.
    terminated: bool,
    /// The OOM kill counter when it started.
    oom_at_start: Option<u64>,
}

impl Fate {
    /// Crashed, or Oom when the process was SIGKILLed and an OOM kill since its start explains it.
    fn attribute(&mut self, sh: &Shared, status: &std::io::Result<ExitStatus>) -> bool {
        use std::os::unix::process::ExitStatusExt;
        if self.oom_checked || self.terminated {
            return self.cause == Cause::Oom;
        }
        self.oom_checked = true;
        let killed = matches!(status, Ok(st) if st.signal() == Some(libc::SIGKILL));
        let oom = killed && sh.oom.explains(self.oom_at_start);
        if oom {
            self.cause = Cause::Oom;
        }
        oom
    }
}

/// Makes the worker's socket and starts its process; a failure is logged (summarised in a crash loop).
async fn spawn_worker(
    sh: &Shared,
    slot: usize,
    path: &Path,
) -> Option<(tokio::process::Child, Option<u64>)> {
    let listener = match worker_socket(path) {
        Ok(l) => l,
        Err(e) => {
            loop_event(
                sh,
                || tracing::error!(slot, path = %path.display(), "cannot make the worker's socket: {e}"),
            );
            return None;
        }
    };
    let inode = socket_inode(&listener);
    let spec = SpawnSpec {
        argv: sh.argv.clone(),
        env: sh.cfg.env.clone(),
        protocol: sh.cfg.worker_protocol,
        listener,
    };
    match sh.spawner.spawn(spec).await {
        Ok(c) => Some((c, inode)),
        Err(e) => {
            loop_event(
                sh,
                || tracing::error!(slot, command = %sh.argv[0], "cannot start the worker: {e}"),
            );
            None
        }
    }
}

/// One worker's whole life in its slot: start it, wait until it is ready, serve requests until it must
/// end or dies, then explain its end.
async fn run_worker(
    sh: &Shared,
    key: Key,
    path: &Path,
    quiet: bool,
    handed_off: &mut bool,
    // The delay before the next start, should this worker fail young: for its death event.
    restart_in: Duration,
) -> WorkerEnd {
    let (generation, slot) = key;
    let mut end = WorkerEnd::default();
    transition(sh, key, Event::Start, |r| {
        r.pid = 0;
        r.served = 0;
        r.request = None;
    });
    // Read before the fork, so that an OOM kill of this worker at any moment of its life is seen.
    let oom_at_start = sh.oom.count();
    let Some((mut child, inode)) = spawn_worker(sh, slot, path).await else {
        end.failed_start = true;
        transition(sh, key, Event::StartFailed, |_| {});
        return end;
    };
    let pid = child.id().unwrap_or(0);
    let started = Instant::now();
    let mut fate = Fate {
        cause: Cause::Crashed,
        held: None,
        start_failure: None,
        quarantine: None,
        oom_checked: false,
        terminated: false,
        oom_at_start,
    };
    sh.metrics.spawns.inc();
    update(sh, key, |r| r.pid = pid);
    if quiet {
        tracing::debug!(slot, pid, generation, "worker started");
    } else {
        tracing::info!(slot, pid, generation, "worker started");
    }
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
    if let Some(out) = child.stdout.take() {
        tokio::spawn(log_lines(out, slot, pid, "stdout", tail.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(log_lines(err, slot, pid, "stderr", tail.clone()));
    }

    let exit = child.wait();
    tokio::pin!(exit);
    let mut link = Link::new(path, sh.cfg.worker_protocol);

    // No request before the worker is ready: it has accepted a connection, or answered the probe.
    let spawn_timeout = sh.cfg.spawn_timeout;
    let mut early: Option<std::io::Result<ExitStatus>> = None;
    let readiness = tokio::select! {
        biased;
        st = &mut exit => {
            early = Some(st);
            Err("it exited before it was ready".to_string())
        }
        () = sh.stop.cancelled() => Ok(false),
        r = tokio::time::timeout(spawn_timeout, wait_ready(sh, &mut link, inode)) => match r {
            Ok(Ok(())) => Ok(true),
            Ok(Err(why)) => Err(why),
            Err(_) => Err(format!("not ready within --spawn-timeout ({spawn_timeout:?})")),
        },
    };
    let status: std::io::Result<ExitStatus> = match readiness {
        Ok(false) => {
            transition(sh, key, Event::Stop, |_| {});
            fate.cause = Cause::Retired;
            fate.terminated = true;
            terminate(pid, sh.cfg.kill_grace, &mut link, &mut exit).await
        }
        Err(why) => {
            // Failing from this moment, whatever the process does next: it will not serve.
            end.failed_start = true;
            transition(sh, key, Event::StartFailed, |_| {});
            fate.start_failure = Some(why);
            match early {
                Some(st) => st,
                None => {
                    fate.terminated = true;
                    terminate(pid, sh.cfg.kill_grace, &mut link, &mut exit).await
                }
            }
        }
        Ok(true) => {
            // Ready: the slot is not failing any more, and a request waiting now goes to this worker.
            transition(sh, key, Event::Ready, |_| {});
            if !*handed_off {
                *handed_off = true;
                became_ready(sh, generation);
            }
            serve(sh, key, pid, &mut link, &mut exit, &mut end, &mut fate).await
        }
    };
    if !end.failed_start {
        transition(sh, key, Event::Exited, |r| r.request = None);
    }
    let lived = started.elapsed();
    // Children the worker left behind would keep its socket and memory: sweep its group.
    signal_group(pid, libc::SIGKILL);
    if sh.stop.is_cancelled() {
        match &status {
            Ok(st) => {
                tracing::info!(slot, pid, status = %describe(*st), served = end.served, "worker stopped")
            }
            Err(e) => tracing::error!(slot, pid, "cannot wait for the worker: {e}"),
        }
        return end;
    }
    if fate.cause == Cause::Crashed {
        fate.attribute(sh, &status);
    }
    let status = match status {
        Ok(st) => st,
        Err(e) => {
            tracing::error!(slot, pid, "cannot wait for the worker: {e}");
            return end;
        }
    };
    let death = Death {
        at: SystemTime::now(),
        slot,
        pid,
        status: describe(status),
        cause: fate.cause,
        lived,
        served: end.served,
        request: fate.held,
        last_output: lock(&tail).iter().cloned().collect(),
        start_failure: fate.start_failure,
        restart_in,
        quarantine: fate.quarantine,
    };
    record_death(sh, &death);
    end
}

/// Why a ready worker is replaced on purpose now, between requests, if it is; true if its slot ends too
/// (a reload handed its place to a new generation).
fn retire_reason(
    sh: &Shared,
    key: Key,
    pid: u32,
    served: u64,
    max_requests: u64,
) -> Option<(String, bool)> {
    if served >= max_requests {
        return Some((format!("served {served} requests"), false));
    }
    if let Some(rss) = sh
        .cfg
        .max_rss
        // Only once it has served: a worker over the limit at birth would never serve at all.
        .filter(|_| served > 0)
        .and_then(|max| rss_bytes(pid).filter(|r| *r > max))
    {
        return Some((
            format!("resident memory {} MiB over --max-rss", rss >> 20),
            false,
        ));
    }
    if key.0 < sh.generation.load(Ordering::Acquire)
        && sh.handoff.try_acquire().map(|p| p.forget()).is_ok()
    {
        return Some(("reload: a new worker took over".into(), true));
    }
    None
}

/// Takes requests from the queue and serves them until the worker must end (replaced on purpose, timed
/// out, stopping) or dies; returns its exit status.
async fn serve(
    sh: &Shared,
    key: Key,
    pid: u32,
    link: &mut Link,
    exit: &mut std::pin::Pin<&mut impl std::future::Future<Output = std::io::Result<ExitStatus>>>,
    end: &mut WorkerEnd,
    fate: &mut Fate,
) -> std::io::Result<ExitStatus> {
    let (generation, slot) = key;
    let max_requests = match sh.cfg.max_requests {
        0 => u64::MAX,
        n => n + fastrand::u64(0..=sh.cfg.max_requests_jitter),
    };
    loop {
        // Replacement on purpose happens here, between requests, so that it never fails one.
        if let Some((why, slot_ends)) = retire_reason(sh, key, pid, end.served, max_requests) {
            end.retire_slot = slot_ends;
            transition(sh, key, Event::Stop, |_| {});
            tracing::info!(slot, pid, "retiring worker: {why}");
            fate.cause = Cause::Retired;
            fate.terminated = true;
            return terminate(pid, sh.cfg.kill_grace, link, exit).await;
        }
        let mut job = tokio::select! {
            biased;
            st = exit.as_mut() => return st,
            () = sh.stop.cancelled() => {
                transition(sh, key, Event::Stop, |_| {});
                fate.cause = Cause::Retired;
                fate.terminated = true;
                return terminate(pid, sh.cfg.kill_grace, link, exit).await;
            }
            () = sh.handoff_ready.notified(), if generation < sh.generation.load(Ordering::Acquire) => continue,
            () = tokio::time::sleep(sh.cfg.idle_timeout), if sh.cfg.workers_max > sh.cfg.workers => {
                if leave_if_above_min(sh) {
                    end.left_pool = true;
                    end.retire_slot = true;
                    transition(sh, key, Event::Stop, |_| {});
                    tracing::info!(slot, pid, "idle for {:?}: leaving the pool", sh.cfg.idle_timeout);
                    fate.cause = Cause::Retired;
                    fate.terminated = true;
                    return terminate(pid, sh.cfg.kill_grace, link, exit).await;
                }
                continue;
            }
            job = sh.queue.pop() => job,
        };
        sh.quarantine.record_request(&job);
        sh.busy.fetch_add(1, Ordering::Relaxed);
        let begun = Instant::now();
        job.dispatched = Some(begun);
        sh.metrics.queue_waited(begun.duration_since(job.enqueued));
        transition(sh, key, Event::Take, |r| {
            r.request = Some((job.id.clone(), job.summary()))
        });
        let mut progress = Progress::default();
        let mut exited = None;
        let mut timed_out = false;
        let result = {
            let serve = link.serve(&mut job, &sh.cfg, &mut progress);
            tokio::pin!(serve);
            let limit = sh.cfg.request_timeout;
            tokio::select! {
                r = &mut serve => r,
                st = exit.as_mut() => {
                    exited = Some(st);
                    // What the worker wrote before exiting is still in the socket: read it out.
                    match tokio::time::timeout(Duration::from_secs(1), &mut serve).await {
                        Ok(r) => r,
                        Err(_) => Err(WorkerError::Exited),
                    }
                }
                () = tokio::time::sleep(limit.unwrap_or(Duration::MAX)), if limit.is_some() => {
                    timed_out = true;
                    Err(WorkerError::Timeout(limit.unwrap_or_default()))
                }
                // A fast stop (or the end of a graceful one) does not wait for requests.
                () = sh.stop.cancelled() => Err(WorkerError::Stopping),
            }
        };
        sh.busy.fetch_sub(1, Ordering::Relaxed);
        // Served means answered: a request the worker died on is not counted.
        let answered = u64::from(result.is_ok());
        end.served += answered;
        update(sh, key, |r| {
            r.request = None;
            r.served += answered;
        });
        sh.queue.record_service_time(begun.elapsed());
        let e = match result {
            Ok(()) => match exited {
                // Answered, then exited: the slot records the exit.
                Some(st) => return st,
                None => {
                    transition(sh, key, Event::Done, |_| {});
                    continue;
                }
            },
            Err(e) => e,
        };
        if exited.is_none()
            && (e.delivered_nothing() || matches!(e, WorkerError::Io(_) | WorkerError::Closed))
        {
            // A reset connection is most often a worker that has just died: its exit comes a moment later.
            if let Ok(st) = tokio::time::timeout(Duration::from_millis(500), exit.as_mut()).await {
                exited = Some(st);
            }
        }
        link.reset();
        if matches!(e, WorkerError::ClientGone) {
            tracing::debug!(slot, pid, id = %job.id, "{e}; the worker's connection was closed");
            if let Some(st) = exited {
                return st;
            }
            transition(sh, key, Event::Done, |_| {});
            continue;
        }
        if e.delivered_nothing() && !job.client_gone() {
            // The worker never saw it (most often: it had just died, idle): another worker takes it, first
            // in line, whatever the method; it is not this request's death.
            tracing::warn!(slot, pid, id = %job.id, request = %job.summary(), "{e}; sending it to another worker");
            sh.queue.requeue(job);
            if let Some(st) = exited {
                return st;
            }
            // Alive but unreachable even on a new connection: replace it rather than hand it the next
            // request too.
            tracing::error!(
                slot,
                pid,
                "the worker does not take connections: replacing it"
            );
            transition(sh, key, Event::Stop, |_| {});
            fate.cause = Cause::Retired;
            fate.terminated = true;
            return terminate(pid, sh.cfg.kill_grace, link, exit).await;
        }
        let request = HeldRequest {
            id: job.id.clone(),
            method: job.head.method.to_string(),
            target: job
                .summary()
                .split_once(' ')
                .map_or(String::new(), |x| x.1.to_string()),
            sent_bytes: progress.sent_bytes,
            received_bytes: progress.received_bytes,
            elapsed: begun.elapsed(),
        };
        if matches!(e, WorkerError::Stopping) {
            if !progress.head_sent {
                job.respond(crate::request::unavailable(
                    &job.id,
                    "The server is stopping.",
                    1,
                ));
            }
            if let Some(st) = exited {
                return st;
            }
            transition(sh, key, Event::Stop, |_| {});
            fate.cause = Cause::Retired;
            fate.terminated = true;
            return terminate(pid, sh.cfg.kill_grace, link, exit).await;
        }
        if timed_out {
            tracing::error!(slot, pid, id = %job.id, request = %job.summary(), "{e}; stopping the worker");
            if !progress.head_sent {
                let why = format!(
                    "The worker took longer than {:?}.",
                    sh.cfg.request_timeout.unwrap_or_default()
                );
                job.respond(failed(StatusCode::GATEWAY_TIMEOUT, &job.id, &why));
            }
            transition(sh, key, Event::Stop, |_| {});
            fate.cause = Cause::Timeout;
            fate.terminated = true;
            fate.held = Some(request);
            return terminate(pid, sh.cfg.kill_grace, link, exit).await;
        }
        let Some(status) = exited else {
            // The worker is alive but its answer was wrong: the client gets a 502, the worker stays.
            tracing::error!(
                slot, pid, id = %job.id, request = %job.summary(),
                sent = progress.sent_bytes, received = progress.received_bytes,
                "{e}"
            );
            if !progress.head_sent {
                let why = format!("The worker failed: {e}.");
                job.respond(failed(StatusCode::BAD_GATEWAY, &job.id, &why));
            }
            transition(sh, key, Event::Done, |_| {});
            continue;
        };
        // The worker died holding this request.
        died_holding(sh, key, pid, job, &progress, &status, fate);
        fate.held = Some(request);
        return status;
    }
}

/// A worker died holding `job`: feed the quarantine, then retry the request once or answer 502.
fn died_holding(
    sh: &Shared,
    key: Key,
    pid: u32,
    mut job: Job,
    progress: &Progress,
    status: &std::io::Result<ExitStatus>,
    fate: &mut Fate,
) {
    let slot = key.1;
    job.deaths += 1;
    let oom = fate.attribute(sh, status);
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
        fate.quarantine = Some(verdict.to_string());
    }
    if progress.head_sent {
        return;
    }
    // A fingerprint in quarantine now gets no retry: that would only kill one more worker.
    let quarantined =
        matches!(verdict, Verdict::Quarantined { .. }) || sh.quarantine.blocked(&fp).is_some();
    if job.deaths == 1 && job.idempotent() && !job.client_gone() && !quarantined {
        tracing::warn!(slot, pid, id = %job.id, request = %job.summary(), "the worker died holding this request; retrying it on another worker");
        sh.queue.requeue(job);
    } else {
        let why = if quarantined {
            format!("Requests for {fp} keep killing workers; this one is not retried.")
        } else if job.deaths > 1 {
            tracing::error!(id = %job.id, request = %job.summary(), deaths = job.deaths, "poison request: it killed a second worker; not retried");
            "This request killed two workers; it is not retried.".to_string()
        } else {
            "The worker died while serving this request.".to_string()
        };
        job.respond(failed(StatusCode::BAD_GATEWAY, &job.id, &why));
    }
}

fn failed(status: StatusCode, id: &str, why: &str) -> crate::request::Reply {
    let mut r = error_response(status, id, why);
    r.extensions_mut().insert(crate::request::WorkerFailed);
    r
}

/// Connects to the new worker and waits until it is ready: with `--ready-probe`, until it answers the
/// probe with a 2xx; otherwise until it has accepted our connection (its socket's accept queue is empty).
async fn wait_ready(sh: &Shared, link: &mut Link, inode: Option<u64>) -> Result<(), String> {
    link.warm().await.map_err(|e| e.to_string())?;
    if let Some(path) = &sh.cfg.ready_probe {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut job = Job::probe(path, tx).map_err(|e| format!("--ready-probe {path:?}: {e}"))?;
        let mut progress = Progress::default();
        link.serve(&mut job, &sh.cfg, &mut progress)
            .await
            .map_err(|e| format!("ready probe {path}: {e}"))?;
        let status = rx
            .await
            .map(|r| r.status())
            .map_err(|_| format!("ready probe {path}: no answer"))?;
        return if status.is_success() {
            Ok(())
        } else {
            Err(format!("ready probe {path} answered {status}"))
        };
    }
    let Some(inode) = inode else {
        return Ok(()); // cannot tell; the connection is made, requests will wait in its socket
    };
    loop {
        match crate::sockdiag::unix_listener_queue(inode) {
            Ok(Some(0)) => return Ok(()),
            Ok(_) => tokio::time::sleep(READY_POLL).await,
            Err(e) => {
                tracing::debug!("cannot read the worker's accept queue ({e}); taking it as ready");
                return Ok(());
            }
        }
    }
}

fn became_ready(sh: &Shared, generation: u64) {
    if generation > 1 && generation == sh.generation.load(Ordering::Acquire) {
        sh.handoff.add_permits(1);
        sh.handoff_ready.notify_waiters();
    }
}
