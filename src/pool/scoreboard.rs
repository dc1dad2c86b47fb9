//! The scoreboard: what every worker slot is doing, for the admin listener.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{lock, Death, Shared};

/// What the admin listener may see of the pool.
#[derive(Clone)]
pub struct PoolView(pub(super) Arc<Shared>);

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
pub(super) struct SlotRecord {
    pub(super) pid: u32,
    pub(super) state: &'static str,
    pub(super) since: Instant,
    pub(super) request: Option<(String, String)>,
    pub(super) served: u64,
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

pub(super) fn set_state(
    sh: &Shared,
    key: (u64, usize),
    state: &'static str,
    f: impl FnOnce(&mut SlotRecord),
) {
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

/// The worker's resident memory, from /proc.
pub(super) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
