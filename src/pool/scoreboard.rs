//! The scoreboard: what every worker slot is doing, for the admin listener.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::slot::SlotState;
use super::{Death, Shared};
use crate::sync::lock;

/// What the admin listener may see of the pool.
#[derive(Clone)]
pub struct PoolView(pub(super) Arc<Shared>);

/// One row of the scoreboard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerInfo {
    pub slot: usize,
    pub generation: u64,
    pub pid: u32,
    /// starting, idle, busy, stopping, exited or backoff.
    pub state: SlotState,
    /// In this state for so long.
    pub state_ms: u64,
    pub request_id: Option<String>,
    pub request: Option<String>,
    pub served: u64,
    pub rss_bytes: Option<u64>,
    /// Busy with one request for longer than --slowlog-timeout (false when that is off).
    pub slow: bool,
}

impl PoolView {
    /// The most recent worker deaths, oldest first.
    pub fn recent_deaths(&self) -> Vec<Death> {
        self.0.deaths.recent()
    }

    /// Every worker slot, with its process and what it is doing.
    pub fn scoreboard(&self) -> Vec<WorkerInfo> {
        let rows: Vec<_> = lock(&self.0.board)
            .rows()
            .map(|(k, r)| (*k, r.clone()))
            .collect();
        let slow_after = self.0.cfg.slowlog_timeout;
        rows.into_iter()
            .map(|((generation, slot), r)| WorkerInfo {
                slot,
                generation,
                pid: r.pid,
                state: r.state(),
                state_ms: r.since.elapsed().as_millis() as u64,
                // Busy since it took the request: the time in this state is the request's.
                slow: r.state() == SlotState::Busy
                    && slow_after.is_some_and(|t| r.since.elapsed() >= t),
                request_id: r.request.as_ref().map(|x| x.0.clone()),
                request: r.request.map(|x| x.1),
                served: r.served,
                rss_bytes: (r.pid > 0).then(|| rss_bytes(r.pid)).flatten(),
            })
            .collect()
    }

    /// Workers that are up (idle or busy).
    pub fn up(&self) -> usize {
        lock(&self.0.board).up()
    }

    pub fn busy(&self) -> usize {
        self.0.busy.load(Ordering::Relaxed)
    }

    /// True while every slot is failing to start.
    pub fn all_failing(&self) -> bool {
        lock(&self.0.board).all_failing()
    }

    /// Why a request sent now would not be served, if it would not: what `/health/ready` reports.
    pub fn not_ready(&self) -> Option<String> {
        let queue = &self.0.queue;
        lock(&self.0.board).not_ready(queue.len(), queue.max())
    }
}

/// The worker's resident memory, from /proc.
pub(super) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
