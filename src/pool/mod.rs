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

pub mod spawn;

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::{CauseLabels, Metrics};
use crate::quarantine::{fingerprint, Quarantine};
use crate::queue::Queue;
use crate::request::{error_response, Job};
use crate::worker::{Link, Progress, WorkerError};
use spawn::{SpawnSpec, Spawner};

/// How many of a worker's last output lines are kept for its crash report.
const TAIL_LINES: usize = 20;
/// A worker that exits sooner than this after starting, having served nothing, counts as a failed start.
const YOUNG: Duration = Duration::from_secs(5);
/// How often the dynamic pool considers adding a worker (so at most this often).
const SCALE_EVERY: Duration = Duration::from_millis(100);
/// How often a starting worker's socket is looked at to see whether it has accepted.
const READY_POLL: Duration = Duration::from_millis(10);
/// Recent deaths kept for the status page.
const RECENT_DEATHS: usize = 50;
/// At most one crash-loop log line per this period; the rest are counted into it.
const LOOP_LOG_EVERY: Duration = Duration::from_secs(60);

/// Why a worker process ended, as attributed by its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// It exited or was killed by something other than anteroom.
    Crashed,
    /// anteroom stopped it: it held a request longer than --request-timeout.
    Timeout,
    /// anteroom replaced it on purpose (max requests, max RSS, reload, shutdown).
    Retired,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Crashed => "crashed",
            Cause::Timeout => "timeout",
            Cause::Retired => "retired",
        }
    }
}

impl serde::Serialize for Cause {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The request a worker was holding when it died.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldRequest {
    pub id: String,
    pub method: String,
    pub target: String,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    #[serde(rename = "elapsed_ms", serialize_with = "ser_ms")]
    pub elapsed: Duration,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

fn ser_unix<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
    )
}

/// One worker death, explained.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Death {
    /// Seconds since the Unix epoch.
    #[serde(serialize_with = "ser_unix")]
    pub at: SystemTime,
    pub slot: usize,
    pub pid: u32,
    pub status: String,
    pub cause: Cause,
    #[serde(rename = "lived_ms", serialize_with = "ser_ms")]
    pub lived: Duration,
    pub served: u64,
    pub request: Option<HeldRequest>,
    pub last_output: Vec<String>,
    /// Why it never became ready, if it did not.
    pub start_failure: Option<String>,
    /// For a failed start: the backoff before the slot's next attempt.
    #[serde(rename = "restart_in_ms", serialize_with = "ser_ms")]
    pub restart_in: Duration,
}

pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
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

#[derive(Default)]
struct LoopLog {
    last: Option<Instant>,
    suppressed: u32,
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

/// What the admin listener may see of the pool.
#[derive(Clone)]
pub struct PoolView(Arc<Shared>);

/// One row of the scoreboard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerInfo {
    pub slot: usize,
    pub generation: u64,
    pub pid: u32,
    /// starting, idle, busy, backoff or stopping.
    pub state: &'static str,
    /// In this state for so long.
    pub state_ms: u64,
    pub request_id: Option<String>,
    pub request: Option<String>,
    pub served: u64,
    pub rss_bytes: Option<u64>,
}

#[derive(Debug, Clone)]
struct SlotRecord {
    pid: u32,
    state: &'static str,
    since: Instant,
    request: Option<(String, String)>,
    served: u64,
}

impl PoolView {
    /// The most recent worker deaths, oldest first.
    pub fn recent_deaths(&self) -> Vec<Death> {
        lock(&self.0.deaths).iter().cloned().collect()
    }

    /// Every worker slot, with its process and what it is doing.
    pub fn scoreboard(&self) -> Vec<WorkerInfo> {
        let board = lock(&self.0.scoreboard).clone();
        board
            .into_iter()
            .map(|((generation, slot), r)| WorkerInfo {
                slot,
                generation,
                pid: r.pid,
                state: r.state,
                state_ms: r.since.elapsed().as_millis() as u64,
                request_id: r.request.as_ref().map(|x| x.0.clone()),
                request: r.request.map(|x| x.1),
                served: r.served,
                rss_bytes: (r.pid > 0).then(|| rss_bytes(r.pid)).flatten(),
            })
            .collect()
    }

    /// Workers that are up (idle or busy).
    pub fn up(&self) -> usize {
        lock(&self.0.scoreboard)
            .values()
            .filter(|r| r.state == "idle" || r.state == "busy")
            .count()
    }

    pub fn busy(&self) -> usize {
        self.0.busy.load(Ordering::Relaxed)
    }

    /// True while every slot is failing to start.
    pub fn all_failing(&self) -> bool {
        let alive = self.0.slots_alive.load(Ordering::Relaxed);
        alive > 0 && self.0.slots_failing.load(Ordering::Relaxed) >= alive
    }
}

fn set_state(sh: &Shared, key: (u64, usize), state: &'static str, f: impl FnOnce(&mut SlotRecord)) {
    let mut board = lock(&sh.scoreboard);
    let r = board.entry(key).or_insert_with(|| SlotRecord {
        pid: 0,
        state,
        since: Instant::now(),
        request: None,
        served: 0,
    });
    if r.state != state {
        r.state = state;
        r.since = Instant::now();
    }
    f(r);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
                if exited.is_none() && matches!(e, WorkerError::Io(_) | WorkerError::Closed) {
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

fn socket_inode(fd: &OwnedFd) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: fstat writes into the zeroed struct we own; the fd is open for the call's duration.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    (r == 0).then_some(st.st_ino)
}

fn became_ready(sh: &Shared, generation: u64) {
    if generation > 1 && generation == sh.generation.load(Ordering::Acquire) {
        sh.handoff.add_permits(1);
        sh.handoff_ready.notify_waiters();
    }
}

/// Logs a death as one event, keeps it for the status page, and counts it towards --crash-exit.
fn record_death(sh: &Shared, d: &Death) {
    sh.metrics
        .deaths
        .get_or_create(&CauseLabels {
            cause: d.cause.as_str(),
        })
        .inc();
    // A failed start: never ready, or gone within seconds without having held a request. A worker that
    // died holding one is explained as such, whenever it died.
    let young =
        d.start_failure.is_some() || (d.served == 0 && d.lived < YOUNG && d.request.is_none());
    let r = d.request.as_ref();
    let log = || {
        let (level_error, what) = match d.cause {
            Cause::Crashed if young => (true, "worker failed at start; restarting after a backoff"),
            Cause::Crashed => (true, "worker died"),
            Cause::Timeout => (true, "worker stopped: request timeout"),
            Cause::Retired => (false, "worker retired"),
        };
        macro_rules! event {
            ($lvl:ident) => {
                tracing::$lvl!(
                    slot = d.slot,
                    pid = d.pid,
                    status = %d.status,
                    lived_ms = d.lived.as_millis() as u64,
                    served = d.served,
                    request_id = r.map(|r| r.id.as_str()),
                    request = r.map(|r| format!("{} {}", r.method, r.target)),
                    request_sent_bytes = r.map(|r| r.sent_bytes),
                    request_received_bytes = r.map(|r| r.received_bytes),
                    request_ms = r.map(|r| r.elapsed.as_millis() as u64),
                    last_output = ?d.last_output,
                    why = d.start_failure.as_deref(),
                    restart_in_ms = young.then(|| d.restart_in.as_millis() as u64),
                    "{what}"
                )
            };
        }
        if level_error {
            event!(error)
        } else {
            event!(info)
        }
    };
    if young && d.cause == Cause::Crashed {
        loop_event(sh, log);
    } else {
        log();
    }
    {
        let mut deaths = lock(&sh.deaths);
        if deaths.len() == RECENT_DEATHS {
            deaths.pop_front();
        }
        deaths.push_back(d.clone());
    }
    if d.cause != Cause::Retired {
        if let Some(limit) = sh.cfg.crash_exit {
            let now = Instant::now();
            let mut times = lock(&sh.crash_times);
            times.push_back(now);
            while times
                .front()
                .is_some_and(|t| now.duration_since(*t) > limit.within)
            {
                times.pop_front();
            }
            if times.len() as u32 >= limit.deaths {
                tracing::error!(
                    "{} unexpected worker deaths within {:?} (--crash-exit): exiting with code {}",
                    times.len(),
                    limit.within,
                    crate::server::EXIT_CRASH_LOOP
                );
                sh.fatal.cancel();
            }
        }
    }
}

/// Crash loops: the first event in a period is logged with how many were left unsaid since the last.
fn loop_event(sh: &Shared, log: impl FnOnce()) {
    let mut ll = lock(&sh.loop_log);
    let now = Instant::now();
    if ll
        .last
        .is_none_or(|t| now.duration_since(t) >= LOOP_LOG_EVERY)
    {
        if ll.suppressed > 0 {
            tracing::warn!(
                "{} more failed worker starts in the last {:?} were not logged one by one; workers restart with growing delays (0.1 s doubling to 30 s)",
                ll.suppressed,
                ll.last.map(|t| now.duration_since(t)).unwrap_or_default()
            );
        }
        ll.last = Some(now);
        ll.suppressed = 0;
        drop(ll);
        log();
    } else {
        ll.suppressed += 1;
    }
}

/// The worker's resident memory, from /proc.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// SIGTERM, then SIGKILL if the worker has not exited within the grace period.
async fn terminate(
    pid: u32,
    grace: Duration,
    link: &mut Link,
    exit: &mut std::pin::Pin<&mut impl std::future::Future<Output = std::io::Result<ExitStatus>>>,
) -> std::io::Result<ExitStatus> {
    // Our connection first: php-cgi, blocked reading a kept-alive connection, restarts the read after
    // SIGTERM and would only stop at SIGKILL; at EOF it returns to accept(), where SIGTERM ends it.
    link.reset();
    // The whole process group: a worker that is itself a small manager (plackup's FCGI::ProcManager,
    // gunicorn's arbiter) must not leave its children behind.
    signal(pid, libc::SIGTERM);
    signal_group(pid, libc::SIGTERM);
    match tokio::time::timeout(grace, exit.as_mut()).await {
        Ok(st) => st,
        Err(_) => {
            signal_group(pid, libc::SIGKILL);
            signal(pid, libc::SIGKILL);
            exit.as_mut().await
        }
    }
}

/// Signals the process group the worker leads (it was made its own group at spawn).
fn signal_group(pid: u32, sig: libc::c_int) {
    if pid > 1 {
        // SAFETY: kill(2) has no memory-safety preconditions. The group id is the worker's pid, which the
        // kernel does not reuse while the group has members.
        unsafe {
            libc::kill(-(pid as libc::pid_t), sig);
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own unreaped child.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

/// "exit code 3", "signal 9 (SIGKILL)", "signal 11 (SIGSEGV), core dumped".
pub fn describe(st: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = st.code() {
        return format!("exit code {code}");
    }
    match st.signal() {
        Some(sig) => {
            let name = signal_name(sig);
            if st.core_dumped() {
                format!("signal {sig} ({name}), core dumped")
            } else {
                format!("signal {sig} ({name})")
            }
        }
        None => "unknown".into(),
    }
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => "?",
    }
}

/// The worker's private listening socket, blocking as apps expect of an inherited listener.
fn worker_socket(path: &Path) -> std::io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let s = crate::front::listen::unix_socket(path, 64)?;
    s.set_nonblocking(false)?;
    Ok(s.into())
}

/// Logs a worker's output line by line and keeps the last lines for its crash report.
async fn log_lines(
    stream: impl AsyncRead + Unpin,
    slot: usize,
    pid: u32,
    name: &'static str,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut reader = BufReader::with_capacity(8192, stream);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        // Lines are capped so that a worker printing without newlines cannot grow our memory.
        match (&mut reader).take(8192).read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        tracing::info!(target: "worker", slot, pid, stream = name, "{line}");
        if let Ok(mut t) = tail.lock() {
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line.to_string());
        }
    }
}

/// Exponential backoff with jitter: 0.1 s doubling to 30 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // +-20%, so that slots failing together do not restart in lockstep.
        d.mul_f64(0.8 + fastrand::f64() * 0.4)
    }

    /// The next delay, before jitter.
    fn upcoming(&self) -> Duration {
        self.next
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new();
        let first = b.next();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        for _ in 0..20 {
            b.next();
        }
        assert!(b.next() <= Duration::from_secs(36));
        b.reset();
        assert!(b.next() <= Duration::from_millis(120));
    }

    #[test]
    fn exit_descriptions() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe(ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert_eq!(describe(ExitStatus::from_raw(9)), "signal 9 (SIGKILL)");
        assert_eq!(
            describe(ExitStatus::from_raw(11 | 0x80)),
            "signal 11 (SIGSEGV), core dumped"
        );
    }
}
