//! A worker slot's life as an explicit state machine, and the board that holds every slot.
//!
//! Whether anteroom refuses requests because "no worker can start", and whether `/health/ready` says
//! ready, must be facts about now, derived from what every slot is doing at this moment. They used to be a
//! mark set when a worker died young and cleared only by a later exit, so a slot whose replacement was up
//! and idle stayed "failing" for ever (issue 9). Here the mark is gone: every slot task reports each step
//! of its worker's life to the [`Board`] as an [`Event`], the board moves the slot's [`SlotState`], and the
//! refusal is recomputed on every step, in the same critical section.
//!
//! The transitions (anything else is a bug, reported as [`BadTransition`]):
//!
//! | event | from | to |
//! | --- | --- | --- |
//! | `Start` (socket made, process being spawned) | starting (the slot's first), exited, backoff | starting |
//! | `Ready` (it accepted, or passed `--ready-probe`) | starting | idle |
//! | `StartFailed` (exited or killed before ready, spawn or socket error, `--spawn-timeout`, probe failed) | starting | exited |
//! | `Take` (a request from the queue) | idle | busy |
//! | `Done` (finished with it, still alive) | busy | idle |
//! | `Stop` (anteroom ends it: recycling, reload, idle, request timeout, shutdown) | starting, idle, busy | stopping |
//! | `Exited` (its process ended after it was ready, or after `Stop`) | idle, busy, stopping | exited |
//! | `Backoff` (the next start waits) | exited | backoff |
//!
//! **Failing** is derived, never latched: a slot is failing while it has no ready worker *and* its last
//! [`FAILING_AFTER`] starts failed (`StartFailed` counts one, `Ready` clears the count at once). A worker that was ready and then died
//! young still makes its slot back off before the next start (CPU protection against crash loops), but
//! that does not make the slot failing. **The queue refuses** ("no worker can start", 503) only while every
//! slot on the board is failing. **Ready** (`/health/ready`) is 200 unless every slot is failing, no worker
//! is up (idle or busy), or the queue is full. So whenever any worker is ready, nothing is refused for want
//! of workers and readiness is OK unless the queue is full; the property test below drives random
//! sequences of events over several slots (with the real [`Queue`]) and checks exactly that.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::queue::Queue;

/// A slot: (generation, slot number).
pub(crate) type Key = (u64, usize);

/// What a worker slot is doing; the scoreboard, the status page and the metrics show [`SlotState::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    /// A worker is being started and is not ready yet.
    Starting,
    /// Ready, waiting for a request.
    Idle,
    /// Holding a request.
    Busy,
    /// Being stopped on purpose; takes no request.
    Stopping,
    /// Its worker has ended; the slot is about to back off or start another.
    Exited,
    /// Waiting before the next start, after a failed start or a young death.
    Backoff,
}

impl SlotState {
    pub const ALL: [SlotState; 6] = [
        SlotState::Idle,
        SlotState::Busy,
        SlotState::Starting,
        SlotState::Backoff,
        SlotState::Stopping,
        SlotState::Exited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Starting => "starting",
            SlotState::Idle => "idle",
            SlotState::Busy => "busy",
            SlotState::Stopping => "stopping",
            SlotState::Exited => "exited",
            SlotState::Backoff => "backoff",
        }
    }

    /// A worker that takes requests (or holds one) now.
    pub fn is_ready(self) -> bool {
        matches!(self, SlotState::Idle | SlotState::Busy)
    }
}

impl std::fmt::Display for SlotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step of a worker's life, as its slot task reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Start,
    Ready,
    StartFailed,
    Take,
    Done,
    Stop,
    Exited,
    Backoff,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadTransition {
    #[error("slot {key:?}: event {event:?} is not valid in state {state}")]
    Invalid {
        key: Key,
        state: SlotState,
        event: Event,
    },
    #[error("slot {key:?}: event {event:?} for a slot that is not on the board")]
    NoSuchSlot { key: Key, event: Event },
}

/// Failed starts in a row after which a slot counts as failing. One is not enough: a worker killed from
/// outside while it starts (an operator, a chaos test, a kill meant for a busy worker) is no sign that the
/// app cannot start, and under such kills every 200 ms a one-strike rule made every slot "failing" at once
/// and refused healthy traffic. A real crash loop fails every start, so three cost it about 0.3 s of backoff
/// (0.1 s, then 0.2 s) before requests are refused; until then they wait for a start that may succeed.
pub const FAILING_AFTER: u8 = 3;

/// The state machine of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    state: SlotState,
    /// Starts that failed in a row, with no worker ready since (saturating).
    failed_starts: u8,
}

impl Default for Slot {
    fn default() -> Self {
        Slot::new()
    }
}

impl Slot {
    /// A new slot, about to start its first worker.
    pub fn new() -> Slot {
        Slot {
            state: SlotState::Starting,
            failed_starts: 0,
        }
    }

    pub fn state(&self) -> SlotState {
        self.state
    }

    /// No ready worker, and its last [`FAILING_AFTER`] starts failed.
    pub fn failing(&self) -> bool {
        self.failed_starts >= FAILING_AFTER && !self.state.is_ready()
    }

    /// The state after `event`, or None if `event` cannot happen now.
    pub fn next(&self, event: Event) -> Option<Slot> {
        use Event as E;
        use SlotState as S;
        let mut s = *self;
        s.state = match (self.state, event) {
            (S::Starting | S::Exited | S::Backoff, E::Start) => S::Starting,
            (S::Starting, E::Ready) => {
                s.failed_starts = 0;
                S::Idle
            }
            (S::Starting, E::StartFailed) => {
                s.failed_starts = s.failed_starts.saturating_add(1);
                S::Exited
            }
            (S::Idle, E::Take) => S::Busy,
            (S::Busy, E::Done) => S::Idle,
            (S::Starting | S::Idle | S::Busy, E::Stop) => S::Stopping,
            (S::Idle | S::Busy | S::Stopping, E::Exited) => S::Exited,
            (S::Exited, E::Backoff) => S::Backoff,
            _ => return None,
        };
        Some(s)
    }
}

/// One row of the board: the slot's state machine and what the scoreboard shows with it.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) slot: Slot,
    pub(crate) pid: u32,
    /// When it entered its current state.
    pub(crate) since: Instant,
    /// The request held: id and summary.
    pub(crate) request: Option<(String, String)>,
    pub(crate) served: u64,
}

impl Record {
    fn new() -> Record {
        Record {
            slot: Slot::new(),
            pid: 0,
            since: Instant::now(),
            request: None,
            served: 0,
        }
    }

    pub(crate) fn state(&self) -> SlotState {
        self.slot.state()
    }
}

/// Every slot of every generation, and what follows from them for the queue and for readiness.
#[derive(Debug, Default)]
pub(crate) struct Board {
    rows: BTreeMap<Key, Record>,
    /// Slots that are failing, kept in step with `rows`.
    failing: usize,
    /// Slots with a ready worker, kept in step with `rows`.
    ready: usize,
    /// What the queue was last told: every slot is failing.
    refusing: bool,
}

impl Board {
    pub(crate) fn new() -> Board {
        Board::default()
    }

    /// Adds a slot in the lowest free number of `generation`; it starts in `Starting`.
    pub(crate) fn add(&mut self, generation: u64, queue: &Queue) -> (usize, Option<bool>) {
        let slot = (0..)
            .find(|i| !self.rows.contains_key(&(generation, *i)))
            .unwrap_or(usize::MAX);
        self.rows.insert((generation, slot), Record::new());
        (slot, self.sync(queue))
    }

    /// Takes a slot off the board (its task has ended).
    pub(crate) fn remove(&mut self, key: Key, queue: &Queue) -> Option<bool> {
        if let Some(r) = self.rows.remove(&key) {
            self.failing -= usize::from(r.slot.failing());
            self.ready -= usize::from(r.state().is_ready());
        }
        self.sync(queue)
    }

    /// Moves a slot by `event`, and tells the queue whether to refuse. Returns whether refusing changed
    /// (Some(true): every slot is failing now; Some(false): not any more).
    pub(crate) fn apply(
        &mut self,
        key: Key,
        event: Event,
        queue: &Queue,
    ) -> Result<Option<bool>, BadTransition> {
        let r = self
            .rows
            .get_mut(&key)
            .ok_or(BadTransition::NoSuchSlot { key, event })?;
        let before = r.slot;
        let after = before.next(event).ok_or(BadTransition::Invalid {
            key,
            state: before.state(),
            event,
        })?;
        r.slot = after;
        if before.state() != after.state() {
            r.since = Instant::now();
        }
        self.failing = self.failing + usize::from(after.failing()) - usize::from(before.failing());
        self.ready = self.ready + usize::from(after.state().is_ready())
            - usize::from(before.state().is_ready());
        Ok(self.sync(queue))
    }

    fn sync(&mut self, queue: &Queue) -> Option<bool> {
        let now = self.all_failing();
        if now == self.refusing {
            return None;
        }
        self.refusing = now;
        queue.set_no_workers(now);
        Some(now)
    }

    pub(crate) fn get_mut(&mut self, key: Key) -> Option<&mut Record> {
        self.rows.get_mut(&key)
    }

    pub(crate) fn rows(&self) -> impl Iterator<Item = (&Key, &Record)> {
        self.rows.iter()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// Every slot is failing to start: nothing would serve a request that waited.
    pub(crate) fn all_failing(&self) -> bool {
        !self.rows.is_empty() && self.failing == self.rows.len()
    }

    /// Slots with a ready worker (idle or busy).
    pub(crate) fn up(&self) -> usize {
        self.ready
    }

    /// Why a request sent now would not be served, if it would not: what `/health/ready` reports.
    pub(crate) fn not_ready(&self, queued: usize, queue_max: usize) -> Option<String> {
        if self.all_failing() {
            return Some("every worker slot is failing to start (crash loop)".into());
        }
        if self.up() == 0 {
            return Some("no worker is up".into());
        }
        if queued >= queue_max {
            return Some(format!("the queue is full ({queued}/{queue_max})"));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Rejected, Ticket};
    use crate::request::tests::job;
    use proptest::prelude::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_ready_replacement_clears_the_failure_at_once() {
        let q = Queue::new(8, 0, Duration::from_secs(10), 1);
        let mut b = Board::new();
        let (s, _) = b.add(1, &q);
        let k = (1, s);
        for _ in 1..FAILING_AFTER {
            b.apply(k, Event::StartFailed, &q).unwrap();
            assert!(!b.all_failing(), "one failed start is not a crash loop");
            b.apply(k, Event::Backoff, &q).unwrap();
            b.apply(k, Event::Start, &q).unwrap();
        }
        b.apply(k, Event::StartFailed, &q).unwrap();
        assert!(b.all_failing());
        assert!(matches!(q.push(job("/")), Err(Rejected::NoWorkers)));
        b.apply(k, Event::Backoff, &q).unwrap();
        b.apply(k, Event::Start, &q).unwrap();
        assert!(b.all_failing(), "still failing until the new one is ready");
        assert_eq!(b.apply(k, Event::Ready, &q).unwrap(), Some(false));
        assert!(q.push(job("/")).is_ok());
        assert_eq!(b.not_ready(0, 8), None);
    }

    #[test]
    fn a_young_death_after_ready_backs_off_but_does_not_refuse() {
        let q = Queue::new(8, 0, Duration::from_secs(10), 1);
        let mut b = Board::new();
        let (s, _) = b.add(1, &q);
        let k = (1, s);
        for e in [Event::Ready, Event::Exited, Event::Backoff, Event::Start] {
            b.apply(k, e, &q).unwrap();
            assert!(!b.all_failing(), "after {e:?}");
        }
        assert!(q.push(job("/")).is_ok());
    }

    #[test]
    fn impossible_events_are_refused() {
        let q = Queue::new(8, 0, Duration::from_secs(10), 1);
        let mut b = Board::new();
        let (s, _) = b.add(1, &q);
        assert!(b.apply((1, s), Event::Take, &q).is_err());
        assert!(b.apply((1, s + 1), Event::Ready, &q).is_err());
        assert_eq!(b.rows().next().unwrap().1.state(), SlotState::Starting);
    }

    /// What happens to one slot, in the terms of the slot task (which turns it into board events).
    #[derive(Debug, Clone, Copy)]
    enum Op {
        /// The slot starts a worker (first start, after a death, or after its backoff).
        Spawn,
        Ready,
        /// The worker dies: before it was ready (a failed start), or after (idle or holding a request).
        Die {
            young: bool,
        },
        /// --spawn-timeout while starting, --request-timeout while busy.
        Timeout,
        /// A request from the queue goes to this worker, or its request finishes.
        Request,
        /// Recycling, idle timeout: the worker is stopped on purpose.
        Retire,
        /// The slot's task ends (reload handoff, dynamic pool shrink).
        Leave,
    }

    #[derive(Debug, Clone, Copy)]
    enum Step {
        Slot(usize, Op),
        /// SIGHUP: a new generation of slots.
        Reload,
        /// A client request arrives.
        Arrive,
        /// A client gives up its waiting request.
        GiveUp,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Spawn),
            3 => Just(Op::Ready),
            3 => any::<bool>().prop_map(|young| Op::Die { young }),
            1 => Just(Op::Timeout),
            4 => Just(Op::Request),
            1 => Just(Op::Retire),
            1 => Just(Op::Leave),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            12 => (0usize..8, op()).prop_map(|(i, o)| Step::Slot(i, o)),
            1 => Just(Step::Reload),
            3 => Just(Step::Arrive),
            1 => Just(Step::GiveUp),
        ]
    }

    /// Drives one op the way the slot task in `pool` does; ops that cannot happen in the slot's state are
    /// skipped (the task would never issue them).
    fn drive(b: &mut Board, q: &Queue, key: Key, op: Op, held: &mut Vec<Key>) {
        let state = b.rows.get(&key).map(|r| r.state()).unwrap();
        let ev = |b: &mut Board, e| b.apply(key, e, q).map(|_| ()).unwrap();
        use SlotState as S;
        match (op, state) {
            (Op::Spawn, S::Starting | S::Exited | S::Backoff) => ev(b, Event::Start),
            (Op::Ready, S::Starting) => ev(b, Event::Ready),
            (Op::Die { .. } | Op::Timeout, S::Starting) => {
                ev(b, Event::StartFailed);
                ev(b, Event::Backoff);
            }
            (Op::Die { young }, S::Idle | S::Busy | S::Stopping) => {
                held.retain(|k| *k != key);
                ev(b, Event::Exited);
                if young {
                    ev(b, Event::Backoff);
                } else {
                    ev(b, Event::Start);
                }
            }
            (Op::Timeout | Op::Retire, S::Busy) => {
                held.retain(|k| *k != key);
                ev(b, Event::Stop);
            }
            (Op::Retire, S::Idle) => ev(b, Event::Stop),
            (Op::Request, S::Idle) => {
                if q.try_pop().is_some() {
                    held.push(key);
                }
                ev(b, Event::Take);
            }
            (Op::Request, S::Busy) => {
                held.retain(|k| *k != key);
                ev(b, Event::Done);
            }
            (Op::Leave, S::Stopping | S::Exited | S::Backoff | S::Idle) => {
                if state == S::Idle {
                    ev(b, Event::Stop);
                }
                if b.rows[&key].state() == S::Stopping {
                    ev(b, Event::Exited);
                }
                b.remove(key, q);
            }
            _ => {}
        }
    }

    fn check(b: &Board, q: &Arc<Queue>) -> Result<(), TestCaseError> {
        // The board's running counts agree with its rows.
        let failing = b.rows().filter(|(_, r)| r.slot.failing()).count();
        let ready = b.rows().filter(|(_, r)| r.state().is_ready()).count();
        prop_assert_eq!(b.failing, failing);
        prop_assert_eq!(b.up(), ready);
        let full = q.len() >= q.max();
        if ready > 0 {
            // The invariant of issue 9: with a worker ready, nothing is refused for want of workers, and
            // readiness is OK unless the queue is full.
            match q.push(job("/probe")) {
                Err(Rejected::NoWorkers) => {
                    return Err(TestCaseError::fail("refused: no worker can start"))
                }
                Err(Rejected::Full) => prop_assert!(full),
                Err(Rejected::ShuttingDown) => {
                    return Err(TestCaseError::fail("refused: shutting down"))
                }
                Err(Rejected::ClientLimit) => {
                    return Err(TestCaseError::fail("refused: no per-client limit was set"))
                }
                Err(Rejected::Overload) => {
                    return Err(TestCaseError::fail("refused: no controlled delay was set"))
                }
                Ok(t) => drop(t),
            }
            let nr = b.not_ready(q.len(), q.max());
            if full {
                prop_assert!(nr.unwrap().contains("queue is full"));
            } else {
                prop_assert_eq!(nr, None);
            }
        }
        if b.len() > 0 && failing == b.len() {
            // And the refusal still works when it should: every slot failing.
            prop_assert!(matches!(q.push(job("/probe")), Err(Rejected::NoWorkers)));
            prop_assert!(b.not_ready(q.len(), q.max()).is_some());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn with_a_worker_ready_nothing_is_refused(
            workers in 1usize..5,
            steps in proptest::collection::vec(step(), 1..200),
        ) {
            let q = Queue::new(4, 0, Duration::from_secs(60), workers);
            let mut b = Board::new();
            let mut generation = 1;
            for _ in 0..workers {
                b.add(generation, &q);
            }
            let mut tickets: Vec<Ticket> = Vec::new();
            let mut held = Vec::new();
            check(&b, &q)?;
            for s in steps {
                match s {
                    Step::Slot(i, op) => {
                        let keys: Vec<Key> = b.rows().map(|(k, _)| *k).collect();
                        if !keys.is_empty() {
                            drive(&mut b, &q, keys[i % keys.len()], op, &mut held);
                        }
                    }
                    Step::Reload => {
                        generation += 1;
                        for _ in 0..workers {
                            b.add(generation, &q);
                        }
                    }
                    Step::Arrive => {
                        if let Ok(t) = q.push(job("/x")) {
                            tickets.push(t);
                        }
                    }
                    Step::GiveUp => {
                        tickets.pop();
                    }
                }
                check(&b, &q)?;
            }
        }
    }
}
