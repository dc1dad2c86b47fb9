//! HAProxy's agent-check (`--agent`): this host tells its balancer how much more work it can take.
//!
//! A balancer sees a host from outside: a health check says whether it answers, not whether its workers are
//! all busy with a queue behind them, whether they are crash-looping, or whether the process is about to
//! stop. HAProxy's `agent-check` asks the host itself: it connects to the agent port every `agent-inter`,
//! reads one line and applies it. On each connection anteroom writes one line and closes:
//!
//! | state | line | HAProxy does |
//! | --- | --- | --- |
//! | leaving (SIGTERM during `--drain-delay` and the graceful stop, or an upgrade under way) | `drain` | weight 0: no new requests, those in flight finish |
//! | the queue in overload (`--queue-target`) or full | `drain` | the same, until the host catches up |
//! | no worker ready yet (starting, or every one replaced at once) | `drain` | the same, until one is ready |
//! | every slot crash-looping | `down#...` | the server is DOWN until the agent says `up` |
//! | otherwise | `up ready N%` | UP, out of DRAIN, weight N% of the configured one |
//!
//! `ready` is in every healthy line because `drain` is an administrative state in HAProxy that stays until it
//! is cancelled; `up` cancels the agent's own `down`.
//!
//! The weight says how soon a new request would start here: `N = 100 × min(1, ready / --workers) × τ / (τ +
//! wait)`, between 1 and 100, with `wait = (busy + queued) / max(ready, workers-max) × service time` (the
//! requests in the host per worker, averaged over the last second, times the measured time per request) and
//! `τ` = 100 ms: the weight halves when a new request would wait about 100 ms. With 50 ms requests, an idle
//! host says 100%, all workers busy 67%, one request queued per worker 50%, ten 15%; a host whose requests
//! take 500 ms says 9% with one queued per worker. It is measured in seconds, not in requests, because hosts
//! differ: a host ten times slower that holds as many requests per worker makes each wait ten times longer,
//! and gets a tenth of the weight, which is what it can serve. It falls as 1 / wait, not faster, so that
//! hosts keep weights in proportion even when they all queue (an overload, a burst): a steeper curve
//! (`10^-load`, tried first) put every host at 1% once each had a queue, and a slow host got its
//! round-robin share again. HAProxy's weighted round-robin sends each host a share of new requests in
//! proportion; a host short of workers (some in backoff) gets less in proportion. The room left in the queue
//! is deliberately not counted as capacity: a queue holds work, it does not do it, and a host with a deep
//! queue must get little, whatever its bound.
//! The load is averaged (ten samples, 100 ms apart) because the busy count of a few workers flips from one
//! instant to the next; the weight a balancer holds for a second should describe that second.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{every, next_conn, AdminState, Phase, Stream};
use crate::front::listen::Listener;
use crate::queue::delay::Mode;
use crate::ratelog::LogLimit;
use crate::sync::lock;

/// How often the load is sampled, and how many samples are averaged.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
const SAMPLES: usize = 10;
/// Agent connections served at once; beyond, a connection is closed unanswered (HAProxy counts a failed
/// check and asks again).
const MAX_CONNS: usize = 32;
/// Longest an agent connection is kept (HAProxy may send `agent-send` text, which is read and ignored).
const CONN_TIMEOUT: Duration = Duration::from_secs(2);

/// What the agent's answer depends on, at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Snapshot {
    pub phase: Phase,
    /// Every slot is failing to start.
    pub all_failing: bool,
    /// Workers ready now (idle or busy).
    pub ready: usize,
    /// `--workers` (the minimum of a dynamic pool) and its maximum.
    pub workers: usize,
    pub workers_max: usize,
    /// Busy workers and queued requests, averaged over the last second.
    pub busy: f64,
    pub queued: f64,
    /// Queued now, and the queue's bound.
    pub queued_now: usize,
    pub queue_max: usize,
    /// The controlled delay is in overload mode.
    pub overload: bool,
    /// The measured time per request, in seconds.
    pub service_s: f64,
}

/// The wait at which the weight halves.
const HALF_WEIGHT_WAIT_S: f64 = 0.1;

/// The agent's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Take new requests, at this percentage (1..=100) of the configured weight.
    Up(u8),
    /// Take no new requests for now.
    Drain(DrainWhy),
    /// Out of service: every worker slot is failing to start.
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DrainWhy {
    Stopping,
    Upgrading,
    Overload,
    QueueFull,
    NoWorkerReady,
}

/// What the agent says in `s`: the table in the module doc.
pub(crate) fn answer(s: &Snapshot) -> Answer {
    match s.phase {
        Phase::Stopping => return Answer::Drain(DrainWhy::Stopping),
        Phase::Upgrading => return Answer::Drain(DrainWhy::Upgrading),
        Phase::Serving => {}
    }
    if s.all_failing {
        return Answer::Down;
    }
    if s.ready == 0 {
        return Answer::Drain(DrainWhy::NoWorkerReady);
    }
    if s.queued_now >= s.queue_max {
        return Answer::Drain(DrainWhy::QueueFull);
    }
    if s.overload {
        return Answer::Drain(DrainWhy::Overload);
    }
    Answer::Up(weight(s))
}

/// Free capacity as a percentage (see the module doc).
fn weight(s: &Snapshot) -> u8 {
    let ready = s.ready as f64;
    let staffed = (ready / s.workers.max(1) as f64).min(1.0);
    let per_worker =
        (s.busy.max(0.0) + s.queued.max(0.0)) / ready.max(s.workers_max as f64).max(1.0);
    let wait = per_worker * s.service_s.max(0.0);
    let w = 100.0 * staffed * HALF_WEIGHT_WAIT_S / (HALF_WEIGHT_WAIT_S + wait);
    // Never 0%: HAProxy reads that as "no traffic", which is drain's job, with a reason.
    w.round().clamp(1.0, 100.0) as u8
}

impl Answer {
    /// The line HAProxy reads.
    pub(crate) fn line(self) -> String {
        match self {
            Answer::Up(w) => format!("up ready {w}%\n"),
            // A description (after '#') is only read with down; drain is logged by HAProxy as it is.
            Answer::Drain(_) => "drain\n".into(),
            Answer::Down => "down#every worker slot is failing to start\n".into(),
        }
    }
}

/// Recent load samples.
#[derive(Default)]
struct Samples(std::sync::Mutex<VecDeque<(usize, usize)>>);

impl Samples {
    fn record(&self, busy: usize, queued: usize) {
        let mut s = lock(&self.0);
        if s.len() == SAMPLES {
            s.pop_front();
        }
        s.push_back((busy, queued));
    }

    /// Average busy workers and queued requests; `now` when there is no sample yet.
    fn average(&self, now: (usize, usize)) -> (f64, f64) {
        let s = lock(&self.0);
        if s.is_empty() {
            return (now.0 as f64, now.1 as f64);
        }
        let n = s.len() as f64;
        let (b, q) = s
            .iter()
            .fold((0usize, 0usize), |(b, q), (x, y)| (b + x, q + y));
        (b as f64 / n, q as f64 / n)
    }
}

fn snapshot(st: &AdminState, samples: &Samples) -> Snapshot {
    let busy_now = st.pool.busy();
    let queued_now = st.queue.len();
    let (busy, queued) = samples.average((busy_now, queued_now));
    Snapshot {
        phase: st.phase.get(),
        all_failing: st.pool.all_failing(),
        ready: st.pool.up(),
        workers: st.cfg.workers,
        workers_max: st.cfg.workers_max,
        busy,
        queued,
        queued_now,
        queue_max: st.queue.max(),
        overload: st
            .queue
            .delay_status()
            .is_some_and(|(mode, ..)| mode == Mode::Overload),
        service_s: st.queue.service_time().as_secs_f64(),
    }
}

/// Answers HAProxy's agent checks on `listener` until `stop`.
pub async fn serve(listener: Listener, state: Arc<AdminState>, stop: CancellationToken) {
    let samples = Arc::new(Samples::default());
    let sampling = {
        let (samples, state) = (samples.clone(), state.clone());
        every(SAMPLE_EVERY, stop.clone(), move || {
            samples.record(state.pool.busy(), state.queue.len());
        })
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    static ACCEPT_FAILED: LogLimit = LogLimit::new(Duration::from_secs(10));
    let mut last = None;
    while let Some(stream) = next_conn(&listener, &stop, "agent", &ACCEPT_FAILED).await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let answer = answer(&snapshot(&state, &samples));
        if last != Some(answer) {
            // Only changes: HAProxy asks every second.
            tracing::info!(?answer, "agent: {}", answer.line().trim_end());
            last = Some(answer);
        }
        let line = answer.line();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONN_TIMEOUT, reply(stream, line)).await;
            drop(permit);
        });
    }
    let _ = sampling.await;
}

async fn reply(stream: Stream, line: String) {
    match stream {
        Stream::Tcp(s) => write_and_close(s, line).await,
        Stream::Unix(s) => write_and_close(s, line).await,
    }
}

/// Writes the line, then reads until the peer closes, so that whatever it sent (`agent-send`) does not
/// turn our close into a reset that could lose the line.
async fn write_and_close<S>(mut s: S, line: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if s.write_all(line.as_bytes()).await.is_err() || s.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 256];
    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Snapshot {
        Snapshot {
            phase: Phase::Serving,
            all_failing: false,
            ready: 4,
            workers: 4,
            workers_max: 4,
            busy: 0.0,
            queued: 0.0,
            queued_now: 0,
            queue_max: 100,
            overload: false,
            service_s: 0.05,
        }
    }

    #[test]
    fn weight_follows_free_capacity() {
        let at = |busy: f64, queued: f64| {
            answer(&Snapshot {
                busy,
                queued,
                ..healthy()
            })
        };
        assert_eq!(at(0.0, 0.0), Answer::Up(100));
        assert_eq!(at(2.0, 0.0), Answer::Up(80));
        assert_eq!(at(4.0, 0.0), Answer::Up(67));
        assert_eq!(at(4.0, 4.0), Answer::Up(50));
        assert_eq!(at(4.0, 40.0), Answer::Up(15));
        // Deep enough, the weight stops at 1%, never 0 (which would be a drain without a reason).
        assert_eq!(at(4.0, 99.0), Answer::Up(7));
        assert_eq!(
            answer(&Snapshot {
                busy: 4.0,
                queued: 5000.0,
                queue_max: 10_000,
                ..healthy()
            }),
            Answer::Up(1)
        );
        // A host ten times slower with as many requests per worker: a tenth of the weight, about.
        assert_eq!(
            answer(&Snapshot {
                busy: 4.0,
                queued: 4.0,
                service_s: 0.5,
                ..healthy()
            }),
            Answer::Up(9)
        );
        // Fewer workers than asked for (some in backoff): less, in proportion.
        assert_eq!(
            answer(&Snapshot {
                ready: 2,
                ..healthy()
            }),
            Answer::Up(50)
        );
        // A dynamic pool counts the workers it may still start as free.
        assert_eq!(
            answer(&Snapshot {
                ready: 2,
                workers: 2,
                workers_max: 8,
                busy: 2.0,
                ..healthy()
            }),
            Answer::Up(89)
        );
    }

    #[test]
    fn leaving_overload_and_crash_loops_win_over_the_weight() {
        let stopping = Snapshot {
            phase: Phase::Stopping,
            all_failing: true,
            ..healthy()
        };
        assert_eq!(answer(&stopping), Answer::Drain(DrainWhy::Stopping));
        let upgrading = Snapshot {
            phase: Phase::Upgrading,
            ..healthy()
        };
        assert_eq!(answer(&upgrading), Answer::Drain(DrainWhy::Upgrading));
        let crash_loop = Snapshot {
            all_failing: true,
            ready: 0,
            ..healthy()
        };
        assert_eq!(answer(&crash_loop), Answer::Down);
        let starting = Snapshot {
            ready: 0,
            ..healthy()
        };
        assert_eq!(answer(&starting), Answer::Drain(DrainWhy::NoWorkerReady));
        let full = Snapshot {
            queued_now: 100,
            ..healthy()
        };
        assert_eq!(answer(&full), Answer::Drain(DrainWhy::QueueFull));
        let overload = Snapshot {
            overload: true,
            ..healthy()
        };
        assert_eq!(answer(&overload), Answer::Drain(DrainWhy::Overload));
    }

    #[test]
    fn lines_are_what_haproxy_parses() {
        assert_eq!(Answer::Up(75).line(), "up ready 75%\n");
        assert_eq!(Answer::Drain(DrainWhy::Overload).line(), "drain\n");
        assert_eq!(
            Answer::Down.line(),
            "down#every worker slot is failing to start\n"
        );
    }

    #[test]
    fn samples_average_the_last_second() {
        let s = Samples::default();
        assert_eq!(s.average((3, 7)), (3.0, 7.0));
        for i in 0..SAMPLES + 5 {
            s.record(i % 2, 10);
        }
        assert_eq!(s.average((0, 0)), (0.5, 10.0));
    }
}
