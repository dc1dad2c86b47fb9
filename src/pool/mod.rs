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
//! 502), feeds the quarantine, and replaces the worker. A worker that dies young is replaced after an
//! exponential, jittered backoff, and such crash loops are logged as a summary rather than a line per death.
//! When every slot is failing, the queue refuses (503) instead of letting requests wait for nothing.
//!
//! Workers are also replaced on purpose: after `--max-requests` (plus jitter) or above `--max-rss`, always
//! between requests; and on reload (SIGHUP), when a new generation of slots starts and each old worker
//! retires, after its current request, as soon as a new one is ready.

mod death;
mod process;
mod scoreboard;
pub mod spawn;

pub use death::{describe, signal_name, Cause, Death, HeldRequest};
use death::{loop_event, record_death, LoopLog};
use process::{
    log_lines, signal_group, socket_inode, terminate, worker_socket, Backoff, TAIL_LINES,
};
use scoreboard::{rss_bytes, set_state, SlotRecord};
pub use scoreboard::{PoolView, WorkerInfo};

use std::collections::{BTreeMap, VecDeque};
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
use crate::quarantine::{fingerprint, Quarantine};
use crate::queue::Queue;
use crate::request::{error_response, Job};
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
    slots_failing: AtomicUsize,
    deaths: Mutex<VecDeque<Death>>,
    scoreboard: Mutex<BTreeMap<(u64, usize), SlotRecord>>,
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
            slots_failing: AtomicUsize::new(0),
            deaths: Mutex::new(VecDeque::new()),
            scoreboard: Mutex::new(BTreeMap::new()),
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
        let current = lock(&sh.scoreboard)
            .keys()
            .filter(|(g, _)| *g == old)
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
    let slot = {
        let mut board = lock(&sh.scoreboard);
        let slot = (0..)
            .find(|i| !board.contains_key(&(generation, *i)))
            .expect("a free slot number");
        // Taken now, before the task runs, so that two spawns never pick the same number.
        board.insert(
            (generation, slot),
            SlotRecord {
                pid: 0,
                state: "starting",
                since: Instant::now(),
                request: None,
                served: 0,
            },
        );
        slot
    };
    sh.slots_alive.fetch_add(1, Ordering::Relaxed);
    sh.tasks.spawn(run_slot(sh.clone(), slot, generation));
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
            let board = lock(&sh.scoreboard);
            let current = board.iter().filter(|((g, _), _)| *g == generation);
            let (mut alive, mut starting) = (0, 0);
            for (_, r) in current {
                alive += 1;
                if r.state == "starting" || r.state == "backoff" {
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

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn run_slot(sh: Arc<Shared>, slot: usize, generation: u64) {
    let mut backoff = Backoff::new();
    let mut failing = false;
    let mut handed_off = false;
    let mut n = 0u64;
    let mut left_pool = false;
    while !sh.stop.is_cancelled() {
        n += 1;
        let path = sh.dir.join(format!("w{slot}.g{generation}.{n}.sock"));
        let started = Instant::now();
        let end = run_worker(
            &sh,
            slot,
            generation,
            &path,
            failing,
            &mut handed_off,
            backoff.upcoming(),
        )
        .await;
        let _ = std::fs::remove_file(&path);
        left_pool = end.left_pool;
        if sh.stop.is_cancelled() || end.retire_slot || end.left_pool {
            break;
        }
        let young = end.failed_start || (end.served == 0 && started.elapsed() < YOUNG);
        if young != failing {
            failing = young;
            let alive = sh.slots_alive.load(Ordering::Relaxed);
            let f = if young {
                sh.slots_failing.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                sh.slots_failing.fetch_sub(1, Ordering::Relaxed) - 1
            };
            sh.queue.set_no_workers(f >= alive);
            if f >= alive && young {
                tracing::error!(
                    "every worker slot is failing to start; requests are refused with 503 until one starts"
                );
            }
        }
        if young {
            let delay = backoff.next();
            set_state(&sh, (generation, slot), "backoff", |r| r.pid = 0);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = sh.stop.cancelled() => break,
            }
        } else {
            backoff.reset();
        }
    }
    if failing {
        sh.slots_failing.fetch_sub(1, Ordering::Relaxed);
    }
    lock(&sh.scoreboard).remove(&(generation, slot));
    if !left_pool {
        sh.slots_alive.fetch_sub(1, Ordering::Relaxed);
    }
}

struct WorkerEnd {
    served: u64,
    /// The slot itself ends: its generation was replaced.
    retire_slot: bool,
    /// It never became ready.
    failed_start: bool,
    /// It idled out of a dynamic pool (already taken off `slots_alive`).
    left_pool: bool,
}

async fn run_worker(
    sh: &Shared,
    slot: usize,
    generation: u64,
    path: &Path,
    quiet: bool,
    handed_off: &mut bool,
    // The delay before the next start, should this worker fail young: for its death event.
    restart_in: Duration,
) -> WorkerEnd {
    let mut end = WorkerEnd {
        served: 0,
        retire_slot: false,
        failed_start: false,
        left_pool: false,
    };
    let listener = match worker_socket(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(slot, path = %path.display(), "cannot make the worker's socket: {e}");
            return end;
        }
    };
    let inode = socket_inode(&listener);
    let spec = SpawnSpec {
        argv: sh.argv.clone(),
        env: sh.cfg.env.clone(),
        protocol: sh.cfg.worker_protocol,
        listener,
    };
    let mut child = match sh.spawner.spawn(spec).await {
        Ok(c) => c,
        Err(e) => {
            loop_event(
                sh,
                || tracing::error!(slot, command = %sh.argv[0], "cannot start the worker: {e}"),
            );
            return end;
        }
    };
    let pid = child.id().unwrap_or(0);
    let started = Instant::now();
    sh.metrics.spawns.inc();
    let key = (generation, slot);
    set_state(sh, key, "starting", |r| {
        r.pid = pid;
        r.served = 0;
        r.request = None;
    });
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

    let max_requests = match sh.cfg.max_requests {
        0 => u64::MAX,
        n => n + fastrand::u64(0..=sh.cfg.max_requests_jitter),
    };
    let exit = child.wait();
    tokio::pin!(exit);
    let mut link = Link::new(path, sh.cfg.worker_protocol);
    let mut cause = Cause::Crashed;
    let mut held: Option<HeldRequest> = None;
    let mut start_failure: Option<String> = None;

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
            cause = Cause::Retired;
            terminate(pid, sh.cfg.kill_grace, &mut link, &mut exit).await
        }
        Err(why) => {
            end.failed_start = true;
            start_failure = Some(why);
            match early {
                Some(st) => st,
                None => terminate(pid, sh.cfg.kill_grace, &mut link, &mut exit).await,
            }
        }
        Ok(true) => {
            set_state(sh, key, "idle", |_| {});
            if !*handed_off {
                *handed_off = true;
                became_ready(sh, generation);
            }
            loop {
                // Replacement on purpose happens here, between requests, so that it never fails one.
                let retire = if end.served >= max_requests {
                    Some(format!("served {} requests", end.served))
                } else if let Some(rss) = sh
                    .cfg
                    .max_rss
                    // Only once it has served: a worker over the limit at birth would never serve at all.
                    .filter(|_| end.served > 0)
                    .and_then(|max| rss_bytes(pid).filter(|r| *r > max))
                {
                    Some(format!("resident memory {} MiB over --max-rss", rss >> 20))
                } else if generation < sh.generation.load(Ordering::Acquire)
                    && sh.handoff.try_acquire().map(|p| p.forget()).is_ok()
                {
                    end.retire_slot = true;
                    Some("reload: a new worker took over".into())
                } else {
                    None
                };
                if let Some(why) = retire {
                    set_state(sh, key, "stopping", |_| {});
                    tracing::info!(slot, pid, "retiring worker: {why}");
                    cause = Cause::Retired;
                    break terminate(pid, sh.cfg.kill_grace, &mut link, &mut exit).await;
                }
                let mut job = tokio::select! {
                    biased;
                    st = &mut exit => break st,
                    () = sh.stop.cancelled() => {
                        cause = Cause::Retired;
                        break terminate(pid, sh.cfg.kill_grace, &mut link, &mut exit).await;
                    }
                    () = sh.handoff_ready.notified(), if generation < sh.generation.load(Ordering::Acquire) => continue,
                    () = tokio::time::sleep(sh.cfg.idle_timeout), if sh.cfg.workers_max > sh.cfg.workers => {
                        if leave_if_above_min(sh) {
                            end.left_pool = true;
                            end.retire_slot = true;
                            set_state(sh, key, "stopping", |_| {});
                            tracing::info!(slot, pid, "idle for {:?}: leaving the pool", sh.cfg.idle_timeout);
                            cause = Cause::Retired;
                            break terminate(pid, sh.cfg.kill_grace, &mut link, &mut exit).await;
                        }
                        continue;
                    }
                    job = sh.queue.pop() => job,
                };
                sh.busy.fetch_add(1, Ordering::Relaxed);
                let begun = Instant::now();
                job.dispatched = Some(begun);
                sh.metrics
                    .queue_wait
                    .observe(begun.duration_since(job.enqueued).as_secs_f64());
                set_state(sh, key, "busy", |r| {
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
                        st = &mut exit => {
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
                set_state(sh, key, "idle", |r| {
                    r.request = None;
                    r.served += answered;
                });
                sh.queue.record_service_time(begun.elapsed());
                let Err(e) = result else {
                    if let Some(st) = exited {
                        break st;
                    }
                    continue;
                };
                if exited.is_none()
                    && (e.delivered_nothing()
                        || matches!(e, WorkerError::Io(_) | WorkerError::Closed))
                {
                    // A reset connection is most often a worker that has just died: its exit comes a moment later.
                    if let Ok(st) =
                        tokio::time::timeout(Duration::from_millis(500), &mut exit).await
                    {
                        exited = Some(st);
                    }
                }
                link.reset();
                if matches!(e, WorkerError::ClientGone) {
                    tracing::debug!(slot, pid, id = %job.id, "{e}; the worker's connection was closed");
                    continue;
                }
                if e.delivered_nothing() && !job.client_gone() {
                    // The worker never saw it (most often: it had just died, idle): another worker takes it,
                    // first in line, whatever the method; it is not this request's death.
                    tracing::warn!(slot, pid, id = %job.id, request = %job.summary(), "{e}; sending it to another worker");
                    sh.queue.requeue(job);
                    match exited {
                        Some(st) => break st,
                        None => {
                            // Alive but unreachable even on a new connection: replace it rather than
                            // hand it the next request too.
                            tracing::error!(
                                slot,
                                pid,
                                "the worker does not take connections: replacing it"
                            );
                            cause = Cause::Retired;
                            break terminate(pid, sh.cfg.kill_grace, &mut link, &mut exit).await;
                        }
                    }
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
                    cause = Cause::Retired;
                    break terminate(pid, sh.cfg.kill_grace, &mut link, &mut exit).await;
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
                    cause = Cause::Timeout;
                    held = Some(request);
                    break terminate(pid, sh.cfg.kill_grace, &mut link, &mut exit).await;
                }
                if exited.is_none() {
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
                    continue;
                }
                // The worker died holding this request.
                job.deaths += 1;
                let fp = fingerprint(&job);
                if sh.quarantine.record_death(&fp) {
                    let p = sh.quarantine.policy();
                    tracing::error!(
                        fingerprint = %fp,
                        "{fp} killed {} workers within {:?}: refusing it with 503 for {:?}",
                        p.after, p.window, p.cooldown
                    );
                }
                if !progress.head_sent {
                    if job.deaths == 1 && job.idempotent() && !job.client_gone() {
                        tracing::warn!(slot, pid, id = %job.id, request = %job.summary(), "the worker died holding this request; retrying it on another worker");
                        sh.queue.requeue(job);
                    } else {
                        let why = if job.deaths > 1 {
                            tracing::error!(id = %job.id, request = %job.summary(), deaths = job.deaths, "poison request: it killed a second worker; not retried");
                            "This request killed two workers; it is not retried.".to_string()
                        } else {
                            "The worker died while serving this request.".to_string()
                        };
                        job.respond(failed(StatusCode::BAD_GATEWAY, &job.id, &why));
                    }
                }
                held = Some(request);
                break exited.expect("checked above");
            }
        }
    };
    let lived = started.elapsed();
    // Children the worker left behind would keep its socket and memory: sweep its group.
    signal_group(pid, libc::SIGKILL);
    let status = match status {
        Ok(st) => st,
        Err(e) => {
            tracing::error!(slot, pid, "cannot wait for the worker: {e}");
            return end;
        }
    };
    if sh.stop.is_cancelled() {
        tracing::info!(slot, pid, status = %describe(status), served = end.served, "worker stopped");
        return end;
    }
    let death = Death {
        at: SystemTime::now(),
        slot,
        pid,
        status: describe(status),
        cause,
        lived,
        served: end.served,
        request: held,
        last_output: lock(&tail).iter().cloned().collect(),
        start_failure,
        restart_in,
    };
    record_death(sh, &death);
    end
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
