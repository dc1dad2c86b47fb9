//! What the app tells the outside while it runs: systemd (`READY=1` once the first worker is ready, `STATUS=`
//! every few seconds, `WATCHDOG=1`) and, when it was started by an upgrade, the old process (ready).
//!
//! Readiness is read off the pool's scoreboard every few milliseconds rather than signalled by the pool:
//! it is asked once per start or reload, and polling keeps the pool unaware of who watches it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Systemd;
use crate::pool::{Pool, PoolView, SlotState};
use crate::queue::Queue;
use crate::systemd::Notifier;

/// How often readiness is looked at.
const READY_POLL: Duration = Duration::from_millis(10);
/// How often systemd gets a `STATUS=` line.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// Starts the reporting tasks; they end when `stop` is cancelled.
pub(super) fn start(pool: &Pool, queue: &Arc<Queue>, sd: &mut Systemd, stop: &CancellationToken) {
    let pipe = sd.upgrade_channel.take();
    let upgraded = pipe.is_some();
    let notify = sd.notify.clone();
    if pipe.is_some() || notify.is_some() {
        let (view, queue, stop) = (pool.view(), queue.clone(), stop.clone());
        tokio::spawn(async move {
            if !first_ready(&view, &stop).await {
                return;
            }
            if let Some(pipe) = &pipe {
                crate::upgrade::report_ready(pipe);
            }
            let Some(n) = notify else {
                return;
            };
            // After an upgrade, this process is the service's main process from now on (NotifyAccess=all).
            let main_pid = if upgraded {
                format!("MAINPID={}\n", std::process::id())
            } else {
                String::new()
            };
            n.send(&format!("{main_pid}READY=1\n{}", status(&view, &queue)));
            loop {
                tokio::select! {
                    () = tokio::time::sleep(STATUS_EVERY) => n.send(&status(&view, &queue)),
                    () = stop.cancelled() => return,
                }
            }
        });
    }
    if let (Some(every), Some(n)) = (sd.watchdog, sd.notify.clone()) {
        let stop = stop.clone();
        // On the runtime like everything else: a runtime that stops running stops the pings.
        tokio::spawn(async move {
            loop {
                n.send("WATCHDOG=1");
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = stop.cancelled() => return,
                }
            }
        });
    }
}

/// Waits until a worker is ready; false if stopped first.
async fn first_ready(view: &PoolView, stop: &CancellationToken) -> bool {
    while view.up() == 0 {
        tokio::select! {
            () = tokio::time::sleep(READY_POLL) => {}
            () = stop.cancelled() => return false,
        }
    }
    true
}

fn status(view: &PoolView, queue: &Queue) -> String {
    let (up, busy) = (view.up(), view.busy());
    format!(
        "STATUS=queue {}/{}; workers {busy} busy, {} idle",
        queue.len(),
        queue.max(),
        up.saturating_sub(busy)
    )
}

/// After a reload: `READY=1` once a worker of the newest generation is ready (or after `limit`, when the
/// old generation keeps serving anyway).
pub(super) async fn ready_after_reload(view: PoolView, n: Arc<Notifier>, limit: Duration) {
    let started = Instant::now();
    let newest = || {
        let rows = view.scoreboard();
        let generation = rows.iter().map(|w| w.generation).max().unwrap_or(0);
        rows.iter().any(|w| {
            w.generation == generation && matches!(w.state, SlotState::Idle | SlotState::Busy)
        })
    };
    while !newest() && started.elapsed() < limit {
        tokio::time::sleep(READY_POLL).await;
    }
    n.send("READY=1");
}
