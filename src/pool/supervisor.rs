//! The pool as a whole, above its slots: generations and reload, the dynamic pool's growth and idle
//! shrink, and crash-loop accounting (the log limiter and --crash-exit).
//!
//! A slot only knows its own worker. What involves several slots lives here: a reload starts a new
//! generation of slots and lets each old worker retire (between requests) once a new one is ready, so that
//! the pool never has fewer ready workers than before; the grower adds a slot while requests wait and every
//! worker is busy, and an idle slot may leave only while the pool is above its minimum; and deaths across
//! all slots are counted against --crash-exit, while a crash loop logs a summary rather than a line each.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{spawn_slot, Shared, SlotState};
use crate::config::CrashExit;
use crate::sync::lock;

/// How often the dynamic pool considers adding a worker (so at most this often).
const SCALE_EVERY: Duration = Duration::from_millis(100);
/// At most one crash-loop log line per this period; the rest are counted into it.
const LOOP_LOG_EVERY: Duration = Duration::from_secs(60);

/// Generations of slots, the hand-off from old workers to new ones, and how many slots are alive.
pub(super) struct Generations {
    /// The current generation; slots of older ones retire as new workers become ready.
    current: AtomicU64,
    /// One permit per new-generation worker that became ready and may replace an old one.
    handoff: Semaphore,
    /// Wakes old workers waiting for a request when a permit appears.
    pub(super) handoff_ready: Notify,
    /// Slots alive, for the dynamic pool's minimum.
    slots_alive: AtomicUsize,
}

impl Generations {
    pub(super) fn new() -> Generations {
        Generations {
            current: AtomicU64::new(1),
            handoff: Semaphore::new(0),
            handoff_ready: Notify::new(),
            slots_alive: AtomicUsize::new(0),
        }
    }

    pub(super) fn current(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    /// A newer generation has started: slots of `generation` retire as new workers become ready.
    pub(super) fn replaced(&self, generation: u64) -> bool {
        generation < self.current()
    }

    /// Takes one hand-off permit, if a new worker has one to give: this old worker may retire now.
    pub(super) fn take_handoff(&self) -> bool {
        self.handoff.try_acquire().map(|p| p.forget()).is_ok()
    }

    /// A worker of `generation` became ready for the first time in its slot: if that generation is a
    /// reload's, one old worker may retire.
    pub(super) fn became_ready(&self, generation: u64) {
        if generation > 1 && generation == self.current() {
            self.handoff.add_permits(1);
            self.handoff_ready.notify_waiters();
        }
    }

    pub(super) fn slot_started(&self) {
        self.slots_alive.fetch_add(1, Ordering::Relaxed);
    }

    /// A slot ended; one that left the pool idle was already taken off.
    pub(super) fn slot_ended(&self, left_pool: bool) {
        if !left_pool {
            self.slots_alive.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Leaves the pool if it is above `min` slots; true if this slot may go.
    pub(super) fn leave_if_above_min(&self, min: usize) -> bool {
        self.slots_alive
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > min).then(|| n - 1)
            })
            .is_ok()
    }
}

/// Starts a new generation of workers; each old worker retires once a new one is ready.
pub(super) fn reload(sh: &Arc<Shared>) {
    let old = sh.gens.current.fetch_add(1, Ordering::AcqRel);
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

/// The dynamic pool's grower (--workers MIN:MAX): one more worker while requests wait and every worker
/// is busy, at most one every SCALE_EVERY and never more than one starting at a time. Shrinking is the
/// slots' own business: an idle worker leaves after --idle-timeout.
pub(super) async fn scale(sh: Arc<Shared>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(SCALE_EVERY) => {}
            () = sh.stop.cancelled() => return,
        }
        let generation = sh.gens.current();
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

/// Deaths across all slots: the crash-loop log limiter and --crash-exit's count.
pub(super) struct CrashLoop {
    /// When the unexpected deaths within --crash-exit's window happened.
    times: Mutex<VecDeque<Instant>>,
    log: Mutex<LoopLog>,
    /// Cancelled when --crash-exit's limit is reached.
    pub(super) fatal: CancellationToken,
}

#[derive(Default)]
struct LoopLog {
    last: Option<Instant>,
    suppressed: u32,
}

impl CrashLoop {
    pub(super) fn new() -> CrashLoop {
        CrashLoop {
            times: Mutex::new(VecDeque::new()),
            log: Mutex::new(LoopLog::default()),
            fatal: CancellationToken::new(),
        }
    }

    /// Crash loops: the first event in a period is logged with how many were left unsaid since the last.
    pub(super) fn loop_event(&self, log: impl FnOnce()) {
        let mut ll = lock(&self.log);
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

    /// Counts an unexpected death towards --crash-exit; at its limit, anteroom is to exit.
    pub(super) fn count(&self, limit: Option<&CrashExit>) {
        let Some(limit) = limit else { return };
        let now = Instant::now();
        let mut times = lock(&self.times);
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
                crate::sys::exit::CRASH_LOOP
            );
            self.fatal.cancel();
        }
    }
}
