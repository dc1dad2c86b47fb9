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
//! A worker that hides its processes (a process manager of its own: FCGI::ProcManager, PHP_FCGI_CHILDREN,
//! gunicorn -w N) is named once per slot (`hidden`), and a connection it closes before the first byte of
//! the response is a close event: an idempotent request is retried once, as when a worker dies, but the
//! worker is not counted as dead unless it did die.
//!
//! The parts: `slot` (each slot's state machine), `life` (one worker's life: start, wait until ready,
//! explain its end), `serve` (the serve loop and what each failure of a request means), `death` (the
//! death event), `supervisor` (generations and reload, the dynamic pool, crash-loop accounting).
//!
//! Workers are also replaced on purpose: after `--max-requests` (plus jitter) or above `--max-rss`, always
//! between requests; and on reload (SIGHUP), when a new generation of slots starts and each old worker
//! retires, after its current request, as soon as a new one is ready.

mod death;
mod hidden;
mod life;
mod oom;
mod process;
mod scoreboard;
mod serve;
pub(crate) mod slot;
mod slowlog;
pub mod spawn;
mod supervisor;

pub use death::{describe, signal_name, Cause, Death, HeldRequest};
pub use scoreboard::{PoolView, WorkerInfo};
pub use slot::SlotState;

use death::Deaths;
use oom::OomWatch;
use process::Backoff;
use slot::{Board, Event, Key, Record};
use supervisor::{CrashLoop, Generations};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::quarantine::Quarantine;
use crate::queue::Queue;
use crate::sync::lock;
use spawn::Spawner;

/// A worker that exits sooner than this after starting, having served nothing, counts as a failed start.
pub(super) const YOUNG: Duration = Duration::from_secs(5);

pub struct Pool {
    shared: Arc<Shared>,
}

/// What every slot task shares, one part per concern.
pub(super) struct Shared {
    cfg: Arc<Config>,
    queue: Arc<Queue>,
    quarantine: Arc<Quarantine>,
    metrics: Arc<Metrics>,
    /// What starting a worker takes.
    launch: Launch,
    /// Generations (reload), the hand-off between them, and the dynamic pool's count.
    gens: Generations,
    /// Every slot's state machine; locked before the queue when both are.
    board: Mutex<Board>,
    /// The recent deaths, for the status page.
    deaths: Deaths,
    /// Crash loops across all slots: the log limiter and --crash-exit.
    crashes: CrashLoop,
    /// The kernel's OOM kill counter, to explain SIGKILLs.
    oom: OomWatch,
    /// Workers holding a request now.
    busy: AtomicUsize,
    /// The slow-request log's events-per-minute budget.
    slow_budget: slowlog::Budget,
    /// Held by the one slot replacing its worker for age (`--max-worker-lifetime`) until the replacement
    /// is ready, so that aging never takes more than one worker out of service at a time.
    aging: AtomicBool,
    stop: CancellationToken,
    /// Every slot task, so that stopping can wait for them all.
    tasks: TaskTracker,
}

/// What starting a worker takes: the spawner thread, the private socket directory, the command.
struct Launch {
    spawner: Spawner,
    dir: PathBuf,
    argv: Vec<String>,
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
            metrics,
            launch: Launch { spawner, dir, argv },
            gens: Generations::new(),
            board: Mutex::new(Board::new()),
            deaths: Deaths::default(),
            crashes: CrashLoop::new(),
            oom: OomWatch::new(),
            busy: AtomicUsize::new(0),
            slow_budget: slowlog::Budget::new(cfg.slowlog_rate),
            aging: AtomicBool::new(false),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        for _ in 0..cfg.workers {
            spawn_slot(&shared, 1);
        }
        if cfg.workers_max > cfg.workers {
            tokio::spawn(supervisor::scale(shared.clone()));
        }
        Ok(Pool { shared })
    }

    /// Starts a new generation of workers; each old worker retires once a new one is ready.
    pub fn reload(&mut self) {
        supervisor::reload(&self.shared);
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
        self.shared.crashes.fatal.clone()
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
    sh.gens.slot_started();
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

/// What a slot keeps from one worker to the next.
pub(super) struct SlotLife {
    key: Key,
    backoff: Backoff,
    /// The slot's last start failed: its next start is logged quietly (crash loops are summarised).
    quiet: bool,
    /// A worker of this slot became ready once: a reload's hand-off was given.
    handed_off: bool,
    /// The slot's worker was found hiding its processes: said once per slot.
    hidden_warned: Arc<AtomicBool>,
    /// Workers started in this slot, for their socket names.
    started: u64,
    /// Its last worker was replaced for age: the pool's aging token is this slot's until a new worker
    /// is ready.
    holds_aging: bool,
}

/// A slot: one worker after another, with a backoff after a failed start, until the pool stops, the
/// slot's generation is replaced, or it leaves a dynamic pool.
async fn run_slot(sh: Arc<Shared>, slot: usize, generation: u64) {
    let mut life = SlotLife {
        key: (generation, slot),
        backoff: Backoff::new(),
        quiet: false,
        handed_off: false,
        hidden_warned: Arc::new(AtomicBool::new(false)),
        started: 0,
        holds_aging: false,
    };
    let mut left_pool = false;
    while !sh.stop.is_cancelled() {
        life.started += 1;
        let path = sh
            .launch
            .dir
            .join(format!("w{slot}.g{generation}.{}.sock", life.started));
        let started = Instant::now();
        let end = life::run_worker(&sh, &mut life, &path).await;
        let _ = std::fs::remove_file(&path);
        left_pool = end.left_pool;
        life.holds_aging |= end.holds_aging;
        if sh.stop.is_cancelled() || end.retire_slot || end.left_pool {
            break;
        }
        life.quiet = end.failed_start;
        // A failed start, or a death soon after starting with nothing answered: the next start waits, so
        // that a crash loop costs no CPU. Only a failed start makes the slot failing (see `slot`).
        // (A worker replaced for age did not die: it may have had no request in a short lifetime.)
        let young =
            end.failed_start || (end.served == 0 && !end.holds_aging && started.elapsed() < YOUNG);
        if !young {
            life.backoff.reset();
        } else if !back_off(&sh, &mut life).await {
            break;
        }
    }
    if life.holds_aging {
        sh.aging.store(false, Ordering::Release);
    }
    let change = lock(&sh.board).remove(life.key, &sh.queue);
    announce(&sh, change);
    sh.gens.slot_ended(left_pool);
}

/// Waits before the slot's next start; false if the pool stopped meanwhile.
async fn back_off(sh: &Shared, life: &mut SlotLife) -> bool {
    let delay = life.backoff.next();
    transition(sh, life.key, Event::Backoff, |r| r.pid = 0);
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = sh.stop.cancelled() => false,
    }
}
