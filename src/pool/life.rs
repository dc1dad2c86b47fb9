//! One worker's life in its slot, in phases: start it, wait until it is ready, let [`serve`] run it until
//! it must end or dies, then explain its end in one event.
//!
//! Each phase is a function of its own so that what can happen in it is plain: a start fails (no socket,
//! no process), readiness fails (it exited, timed out, failed the probe) or the pool stops meanwhile; once
//! ready, `serve` decides; whatever happened, `explain` reports it the same way.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::process::ExitStatus;
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;

use super::death::{record_death, Fate, Tail};
use super::process::{log_lines, signal_group, socket_inode, terminate, worker_socket};
use super::slot::{Event, Key};
use super::spawn::{self, SpawnSpec};
use super::{describe, hidden, serve, transition, update, Cause, Death, Shared, SlotLife};
use crate::request::Job;
use crate::sync::lock;
use crate::worker::{Link, Progress, WorkerError};

/// How often a starting worker's socket is looked at to see whether it has accepted.
const READY_POLL: Duration = Duration::from_millis(10);

/// How a worker's life ended, for its slot.
#[derive(Default)]
pub(super) struct WorkerEnd {
    pub(super) served: u64,
    /// The slot itself ends: its generation was replaced.
    pub(super) retire_slot: bool,
    /// It never became ready.
    pub(super) failed_start: bool,
    /// It idled out of a dynamic pool (already taken off the slot count).
    pub(super) left_pool: bool,
    /// It was replaced for age and took the pool's aging token: the slot gives it back once its next
    /// worker is ready (or the slot ends).
    pub(super) holds_aging: bool,
}

/// Why a worker never became ready.
#[derive(Debug, thiserror::Error)]
pub(super) enum StartFailure {
    #[error("it exited before it was ready")]
    Exited,
    #[error("not ready within --spawn-timeout ({0:?})")]
    Timeout(Duration),
    #[error(transparent)]
    Connect(WorkerError),
    #[error("--ready-probe {path:?}: {source}")]
    ProbePath {
        path: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("ready probe {path}: {source}")]
    Probe {
        path: String,
        #[source]
        source: WorkerError,
    },
    #[error("ready probe {0}: no answer")]
    NoAnswer(String),
    #[error("ready probe {path} answered {status}")]
    ProbeStatus { path: String, status: StatusCode },
}

/// What the wait for readiness came to.
enum Readiness {
    Ready,
    /// The pool is stopping: the worker goes without serving.
    Stopping,
    /// It will not serve; `early` is its exit status if it already exited.
    Failed {
        why: StartFailure,
        early: Option<io::Result<ExitStatus>>,
    },
}

/// One running worker process, as its slot follows it.
pub(super) struct Worker {
    pub(super) key: Key,
    pub(super) pid: u32,
    pub(super) started: Instant,
    /// Its last output lines, for its death event.
    tail: Tail,
    /// Its listening socket's inode, to see when it accepts and who does.
    inode: Option<u64>,
    pub(super) fate: Fate,
    pub(super) end: WorkerEnd,
}

impl Worker {
    pub(super) fn slot(&self) -> usize {
        self.key.1
    }

    /// Ends the worker on purpose (SIGTERM, then SIGKILL after the grace period), for `cause`.
    pub(super) async fn stop<E: Future<Output = io::Result<ExitStatus>>>(
        &mut self,
        sh: &Shared,
        cause: Cause,
        link: &mut Link,
        exit: &mut Pin<&mut E>,
    ) -> io::Result<ExitStatus> {
        transition(sh, self.key, Event::Stop, |_| {});
        self.fate.cause = cause;
        self.fate.terminated = true;
        terminate(self.pid, sh.cfg.kill_grace, link, exit).await
    }
}

/// One worker's whole life in its slot: start it, wait until it is ready, serve requests until it must
/// end or dies, then explain its end.
pub(super) async fn run_worker(sh: &Shared, life: &mut SlotLife, path: &Path) -> WorkerEnd {
    let key = life.key;
    transition(sh, key, Event::Start, |r| {
        r.pid = 0;
        r.served = 0;
        r.request = None;
    });
    // Read before the fork, so that an OOM kill of this worker at any moment of its life is seen.
    let oom_at_start = sh.oom.count();
    let Some((mut child, inode)) = spawn_worker(sh, key.1, path).await else {
        transition(sh, key, Event::StartFailed, |_| {});
        return WorkerEnd {
            failed_start: true,
            ..WorkerEnd::default()
        };
    };
    let mut w = started(sh, key, &mut child, inode, oom_at_start, life.quiet);
    let exit = child.wait();
    tokio::pin!(exit);
    let mut link = Link::new(path, sh.cfg.worker_protocol);
    let status = match wait_ready(sh, &mut link, inode, &mut exit).await {
        Readiness::Stopping => w.stop(sh, Cause::Retired, &mut link, &mut exit).await,
        Readiness::Failed { why, early } => {
            // Failing from this moment, whatever the process does next: it will not serve.
            w.end.failed_start = true;
            transition(sh, key, Event::StartFailed, |_| {});
            w.fate.start_failure = Some(why.to_string());
            match early {
                Some(st) => st,
                None => {
                    w.fate.terminated = true;
                    terminate(w.pid, sh.cfg.kill_grace, &mut link, &mut exit).await
                }
            }
        }
        Readiness::Ready => {
            became_ready(sh, life, &w);
            serve::serve(sh, &mut w, &mut link, &mut exit).await
        }
    };
    explain(sh, w, status, life.backoff.upcoming())
}

/// Makes the worker's socket and starts its process; a failure is logged (summarised in a crash loop).
async fn spawn_worker(
    sh: &Shared,
    slot: usize,
    path: &Path,
) -> Option<(tokio::process::Child, Option<u64>)> {
    let listener = match worker_socket(path, sh.cfg.user.as_ref()) {
        Ok(l) => l,
        Err(e) => {
            sh.crashes.loop_event(
                || tracing::error!(slot, path = %path.display(), "cannot make the worker's socket: {e}"),
            );
            return None;
        }
    };
    let inode = socket_inode(&listener);
    let spec = SpawnSpec {
        argv: sh.launch.argv.clone(),
        env: spawn::worker_env(&sh.cfg),
        protocol: sh.cfg.worker_protocol,
        listener,
        user: sh.cfg.user.clone(),
        rlimits: sh.cfg.worker_rlimits.clone(),
    };
    match sh.launch.spawner.spawn(spec).await {
        Ok(c) => Some((c, inode)),
        Err(e) => {
            sh.crashes.loop_event(
                || tracing::error!(slot, command = %sh.launch.argv[0], "cannot start the worker: {e}"),
            );
            None
        }
    }
}

/// The process is running: counted, shown on the scoreboard, its output logged.
fn started(
    sh: &Shared,
    key: Key,
    child: &mut tokio::process::Child,
    inode: Option<u64>,
    oom_at_start: Option<u64>,
    quiet: bool,
) -> Worker {
    let (generation, slot) = key;
    let pid = child.id().unwrap_or(0);
    sh.metrics.spawns.inc();
    update(sh, key, |r| r.pid = pid);
    if quiet {
        tracing::debug!(slot, pid, generation, "worker started");
    } else {
        tracing::info!(slot, pid, generation, "worker started");
    }
    let tail = Tail::default();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(log_lines(out, slot, pid, "stdout", tail.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(log_lines(err, slot, pid, "stderr", tail.clone()));
    }
    Worker {
        key,
        pid,
        started: Instant::now(),
        tail,
        inode,
        fate: Fate::new(oom_at_start),
        end: WorkerEnd::default(),
    }
}

/// No request before the worker is ready: it has accepted a connection, or answered the probe, within
/// --spawn-timeout, unless it exits or the pool stops first.
async fn wait_ready<E: Future<Output = io::Result<ExitStatus>>>(
    sh: &Shared,
    link: &mut Link,
    inode: Option<u64>,
    exit: &mut Pin<&mut E>,
) -> Readiness {
    let spawn_timeout = sh.cfg.spawn_timeout;
    let failed = |why| Readiness::Failed { why, early: None };
    tokio::select! {
        biased;
        st = exit.as_mut() => Readiness::Failed { why: StartFailure::Exited, early: Some(st) },
        () = sh.stop.cancelled() => Readiness::Stopping,
        r = tokio::time::timeout(spawn_timeout, ready(sh, link, inode)) => match r {
            Ok(Ok(())) => Readiness::Ready,
            Ok(Err(why)) => failed(why),
            Err(_) => failed(StartFailure::Timeout(spawn_timeout)),
        },
    }
}

/// Connects to the new worker and waits until it is ready: with `--ready-probe`, until it answers the
/// probe with a 2xx; otherwise until it has accepted our connection (its socket's accept queue is empty).
async fn ready(sh: &Shared, link: &mut Link, inode: Option<u64>) -> Result<(), StartFailure> {
    link.warm().await.map_err(StartFailure::Connect)?;
    if let Some(path) = &sh.cfg.ready_probe {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut job = Job::probe(path, tx).map_err(|source| StartFailure::ProbePath {
            path: path.clone(),
            source,
        })?;
        let mut progress = Progress::default();
        link.serve(&mut job, &sh.cfg, &mut progress)
            .await
            .map_err(|source| StartFailure::Probe {
                path: path.clone(),
                source,
            })?;
        let status = rx
            .await
            .map(|r| r.status())
            .map_err(|_| StartFailure::NoAnswer(path.clone()))?;
        return if status.is_success() {
            Ok(())
        } else {
            Err(StartFailure::ProbeStatus {
                path: path.clone(),
                status,
            })
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

/// Ready: the slot is not failing any more, and a request waiting now goes to this worker. The first
/// worker of a reload's slot lets an old one retire; whether it hides processes is looked at once.
fn became_ready(sh: &Shared, life: &mut SlotLife, w: &Worker) {
    transition(sh, w.key, Event::Ready, |_| {});
    if std::mem::take(&mut life.holds_aging) {
        sh.aging.store(false, std::sync::atomic::Ordering::Release);
    }
    if !life.handed_off {
        life.handed_off = true;
        sh.gens.became_ready(w.key.0);
    }
    if let Some(inode) = w.inode {
        hidden::check(
            w.slot(),
            w.pid,
            inode,
            &sh.launch.argv,
            life.hidden_warned.clone(),
        );
    }
}

/// The worker's end, explained: one event, kept for the status page (see `death`).
fn explain(
    sh: &Shared,
    w: Worker,
    status: io::Result<ExitStatus>,
    // The delay before the next start, should this worker fail young: for its death event.
    restart_in: Duration,
) -> WorkerEnd {
    let Worker {
        key,
        pid,
        started,
        tail,
        mut fate,
        end,
        ..
    } = w;
    let slot = key.1;
    if !end.failed_start {
        transition(sh, key, Event::Exited, |r| r.request = None);
    }
    let lived = started.elapsed();
    // Children the worker left behind would keep its socket and memory: sweep its group.
    signal_group(pid, libc::SIGKILL);
    if sh.stop.is_cancelled() {
        match &status {
            Ok(st) => {
                tracing::info!(slot, pid, status = %describe(*st), served = end.served, "worker stopped")
            }
            Err(e) => tracing::error!(slot, pid, "cannot wait for the worker: {e}"),
        }
        return end;
    }
    if fate.cause == Cause::Crashed {
        fate.attribute(sh, &status);
    }
    let status = match status {
        Ok(st) => st,
        Err(e) => {
            tracing::error!(slot, pid, "cannot wait for the worker: {e}");
            return end;
        }
    };
    let death = Death {
        at: SystemTime::now(),
        slot,
        pid,
        status: describe(status),
        cause: fate.cause,
        lived,
        served: end.served,
        request: fate.held,
        last_output: lock(&tail).iter().cloned().collect(),
        start_failure: fate.start_failure,
        restart_in,
        quarantine: fate.quarantine,
    };
    record_death(sh, &death);
    end
}
