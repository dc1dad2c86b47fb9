//! The admin listener: metrics, status and health, never on the public listeners.
//! (Being written: see issue 5.)

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ListenAddr};
use crate::front::listen::Listener;
use crate::metrics::Metrics;
use crate::pool::PoolView;
use crate::queue::Queue;

/// Everything the admin listener reads; all of it is shared with the serving path, read-only here.
pub struct AdminState {
    pub cfg: Arc<Config>,
    pub queue: Arc<Queue>,
    pub pool: PoolView,
    pub metrics: Arc<Metrics>,
    /// The public listeners, whose kernel accept queues are reported.
    pub listeners: Vec<ListenAddr>,
    pub started: Instant,
}

/// Serves the admin endpoints on `listener` until `stop`.
pub async fn serve(listener: Listener, state: Arc<AdminState>, stop: CancellationToken) {
    let _ = (listener, state);
    stop.cancelled().await;
}
