//! The application: the rooms wired together around listeners it is given, served until it is told to
//! stop, then stopped in order.
//!
//! [`App::build`] takes listeners that are already bound, so that whoever starts anteroom chooses where they
//! come from: bound from the configuration ([`Listeners::bind`]), passed by systemd or by the anteroom being
//! upgraded ([`Listeners::inherit`]), or bound on port 0 by a test. [`App::run`] serves until its shutdown
//! token is cancelled (a graceful stop) or a [`Control`] says otherwise; [`serve`] is what `main` runs:
//! both, with the signals and systemd wired in.
//!
//! Signals: SIGHUP reloads (a new generation of workers takes over as its workers become ready). SIGUSR2
//! upgrades: the binary as it is on disk now is started with our listening sockets, and once one of its
//! workers is ready this process stops gracefully (see `upgrade`). SIGTERM is a graceful stop: listeners
//! close at once, every response from then on closes its connection, requests queued, at a worker, or sent
//! on a connection that was already open are finished (for up to --graceful-timeout), then workers get
//! SIGTERM and, after a grace period, SIGKILL. SIGINT, or a second SIGTERM, is a fast stop: waiting requests
//! get 503 and workers are stopped at once. With `--drain-delay`, a SIGTERM first turns `/health/ready` to 503
//! and the agent (`--agent`) to `drain` while everything goes on serving and accepting for that long, so that
//! balancers stop sending before the listeners close; an upgrade says `drain` on the agent until the new
//! process is ready, then leaves the agent's socket to it.

mod report;
mod setup;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{AdminState, Lifecycle, Phase};
use crate::admission::Admission;
use crate::config::Config;
use crate::front::acceptor::{Acceptor, Adopter};
use crate::front::conns::{Limits, Table, TableMetrics};
use crate::front::listen::{BindError, Listener};
use crate::metrics::Metrics;
use crate::pool::Pool;
use crate::quarantine::Quarantine;
use crate::queue::Queue;
use crate::systemd::{Inherited, Notifier, ADMIN, AGENT, FASTCGI, HTTP};
use crate::upgrade::{Handed, Handover, Pass, Ready, UpgradeError};
use setup::RuntimeDir;

/// The exit code when --crash-exit's limit is reached (defined below the pool and the app, in `sys`).
pub use crate::sys::exit::CRASH_LOOP as EXIT_CRASH_LOOP;

/// How anteroom came to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGTERM or SIGINT (or the shutdown token).
    Signal,
    /// --crash-exit: workers kept dying.
    CrashLoop,
    /// SIGUSR2: a new process serves on our sockets now (exit code 0, as for a signal).
    Upgraded,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot create the worker socket directory {}: {source}", path.display())]
    RuntimeDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the worker pool: {0}")]
    Pool(std::io::Error),
    #[error("cannot start an acceptor thread: {0}")]
    Accept(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("drop-privileges: {0}")]
    DropPrivileges(std::io::Error),
}

/// Longest the listening sockets' clients may stay silent during a graceful stop, with nothing queued or
/// running, before their connections are closed: long enough for a kept-alive client that is between two
/// requests to send its next one (which is served, with `Connection: close`).
const DRAIN_LINGER: Duration = Duration::from_millis(500);
/// How often the graceful stop looks at what is left.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// The client-facing listeners, already bound.
#[derive(Default)]
pub struct Listeners {
    pub http: Vec<Listener>,
    pub fastcgi: Vec<Listener>,
    /// None: no admin listener.
    pub admin: Option<Listener>,
    /// HAProxy's agent-check (`--agent`); None: none.
    pub agent: Option<Listener>,
}

impl Listeners {
    /// Where clients are served (HTTP and FastCGI), for the status page.
    fn public_addrs(&self) -> Vec<crate::config::ListenAddr> {
        (self.http.iter().chain(&self.fastcgi))
            .map(Listener::local_addr)
            .collect()
    }

    /// Binds what the configuration names (`--listen`, `--listen-fastcgi`, `--admin`). Must be called inside
    /// the tokio runtime.
    pub fn bind(cfg: &Config) -> Result<Listeners, StartError> {
        let bind_all = |addrs: &[crate::config::ListenAddr]| {
            addrs
                .iter()
                .map(|a| Listener::bind(a, cfg.backlog))
                .collect::<Result<Vec<_>, _>>()
        };
        // Under a private umask until each socket has the access asked for (--listen-mode...).
        let umask = crate::front::listen::PrivateUmask::hold(&cfg.listen_access);
        let http = bind_all(&cfg.listen)?;
        let fastcgi = bind_all(&cfg.listen_fastcgi)?;
        drop(umask);
        crate::front::listen::set_access(http.iter().chain(&fastcgi), &cfg.listen_access)?;
        Ok(Listeners {
            http,
            fastcgi,
            admin: bind_admin(cfg)?,
            agent: bind_agent(cfg)?,
        })
    }

    /// The listeners passed to this process (systemd's socket activation, or an upgrade), by name: `http`
    /// (or any other name), `fastcgi`, `admin`. They replace --listen and --listen-fastcgi; without an `admin` one,
    /// the admin listener is bound as configured. The unix socket files of those at `own_files` are removed
    /// when they close (an upgrade's, which an anteroom bound); others belong to whoever passed them. Must be
    /// called inside the tokio runtime.
    pub fn inherit(
        cfg: &Config,
        fds: Vec<(String, OwnedFd)>,
        own_files: &[usize],
    ) -> Result<Listeners, StartError> {
        let mut out = Listeners::default();
        let mut admin = None;
        for (index, (name, fd)) in fds.into_iter().enumerate() {
            let l = Listener::inherit(fd).map_err(|source| BindError::Inherit {
                fd: format!("{} ({name})", crate::sys::passfd::FIRST as usize + index),
                source,
            })?;
            if own_files.contains(&index) {
                l.keep_path().inspect(|k| k.store(true, Ordering::Release));
            }
            match name.as_str() {
                FASTCGI => out.fastcgi.push(l),
                ADMIN => admin = Some(l),
                AGENT => out.agent = Some(l),
                // systemd names a socket after its unit unless FileDescriptorName= says otherwise.
                _ => {
                    if name != HTTP {
                        tracing::info!(
                            "passed socket {index} is named {name:?}: serving HTTP on it \
                             (FileDescriptorName=fastcgi, admin or agent for the others)"
                        );
                    }
                    out.http.push(l);
                }
            }
        }
        out.admin = match admin {
            Some(l) => Some(l),
            None => bind_admin(cfg)?,
        };
        if out.agent.is_none() {
            out.agent = bind_agent(cfg)?;
        }
        Ok(out)
    }
}

fn bind_admin(cfg: &Config) -> Result<Option<Listener>, StartError> {
    let Some(addr) = &cfg.admin else {
        return Ok(None);
    };
    match Listener::bind(addr, 128) {
        Ok(l) => Ok(Some(l)),
        Err(e) if cfg.admin_is_default => {
            // Another anteroom on this machine has the default port; serving matters more.
            tracing::warn!("no admin listener: {e} (choose one with --admin)");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

fn bind_agent(cfg: &Config) -> Result<Option<Listener>, StartError> {
    cfg.agent
        .as_ref()
        .map(|a| Listener::bind(a, 128).map_err(StartError::from))
        .transpose()
}

/// What a running [`App`] can be told besides the graceful stop of its shutdown token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    Reload,
    Upgrade,
    StopNow,
}

/// Tells a running [`App`] to reload, upgrade or stop now; cheap to clone.
#[derive(Clone)]
pub struct Control(mpsc::UnboundedSender<Order>);

impl Control {
    /// A new generation of workers (SIGHUP).
    pub fn reload(&self) {
        let _ = self.0.send(Order::Reload);
    }

    /// Hand the listeners to the binary as it is on disk now, then stop (SIGUSR2).
    pub fn upgrade(&self) {
        let _ = self.0.send(Order::Upgrade);
    }

    /// Stop without finishing waiting requests (SIGINT, a second SIGTERM).
    pub fn stop_now(&self) {
        let _ = self.0.send(Order::StopNow);
    }
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Graceful,
    Now,
    CrashLoop,
    /// The new process with this pid is ready on our sockets.
    HandedOver(u32),
}

/// anteroom, built and serving: every room wired, listeners accepting, workers starting.
pub struct App {
    cfg: Arc<Config>,
    queue: Arc<Queue>,
    pool: Pool,
    table: Arc<Table>,
    acceptors: Vec<Acceptor>,
    conns: TaskTracker,
    stop_admin: CancellationToken,
    /// Stops the agent: at the end, or as soon as an upgrade's new process answers on its socket.
    stop_agent: CancellationToken,
    /// What /health/ready and the agent say about the process's life.
    phase: Arc<Lifecycle>,
    dir: RuntimeDir,
    /// A second descriptor of each listening socket, with its name, to pass on at an upgrade.
    sockets: Vec<(&'static str, OwnedFd)>,
    /// Each socket's switch that removes its file when it closes (unix listeners only), in the order of
    /// `sockets`: turned off once handed over.
    keep_paths: Vec<Option<Arc<AtomicBool>>>,
    control: Control,
    orders: mpsc::UnboundedReceiver<Order>,
    systemd: Systemd,
    /// Once an upgrade's new process is ready: the way to pass it our kept-alive connections.
    handover: Option<Handover>,
    /// Where connections passed by the process this one replaces are served.
    adopters: Adopters,
}

/// What the app tells systemd and the process it replaces.
#[derive(Default)]
pub struct Systemd {
    pub notify: Option<Arc<Notifier>>,
    /// How often to send `WATCHDOG=1`.
    pub watchdog: Option<Duration>,
    /// `WATCHDOG_USEC` as given, for an upgrade.
    pub watchdog_usec: Option<String>,
    /// Started by an upgrade: the channel to tell the old process that a worker is ready, and on which it
    /// then passes its kept-alive connections.
    pub upgrade_channel: Option<OwnedFd>,
}

impl App {
    /// Wires everything together and starts serving on `listeners`: acceptors, the admin listener, the
    /// worker pool. Must be called inside a tokio runtime.
    pub fn build(cfg: Config, mut listeners: Listeners) -> Result<App, StartError> {
        let cfg = Arc::new(cfg);
        crate::spill::start(&cfg);
        setup::check_backlog(&cfg);
        let limits = setup::plan_connections(&cfg);
        let dir = RuntimeDir::create()?;
        // Handed to --user, when workers run as one.
        crate::pool::spawn::prepare(&cfg, &dir.0).map_err(|source| StartError::RuntimeDir {
            path: dir.0.clone(),
            source,
        })?;
        let queue = Queue::from_config(&cfg);
        let quarantine = Arc::new(Quarantine::new(cfg.quarantine));
        let metrics = Arc::new(Metrics::new());
        metrics.queue_limit.set(cfg.max_queue as i64);
        metrics.connections_limit.set(limits.max as i64);
        // One table for every public listener: --max-connections bounds them together.
        let table = client_table(limits, &metrics);
        let pool = Pool::start(
            cfg.clone(),
            queue.clone(),
            quarantine.clone(),
            metrics.clone(),
            dir.0.clone(),
        )
        .map_err(StartError::Pool)?;
        let (sockets, keep_paths) = handover_sockets(&listeners);
        let (stop_admin, stop_agent) = (CancellationToken::new(), CancellationToken::new());
        let phase = Arc::new(Lifecycle::default());
        if listeners.admin.is_some() || listeners.agent.is_some() {
            let served = listeners.public_addrs();
            let state = AdminState {
                cfg: cfg.clone(),
                queue: queue.clone(),
                pool: pool.view(),
                metrics: metrics.clone(),
                conns: table.clone(),
                listeners: served,
                started: Instant::now(),
                phase: phase.clone(),
            };
            let (admin, agent) = (listeners.admin.take(), listeners.agent.take());
            start_admin(admin, agent, Arc::new(state), [&stop_admin, &stop_agent]);
        }
        // Every listener is bound: nothing from here on needs root.
        crate::pool::spawn::drop_privileges(&cfg).map_err(StartError::DropPrivileges)?;
        let front = Arc::new(Admission::new(
            cfg.clone(),
            queue.clone(),
            quarantine,
            metrics,
        ));
        let conns = TaskTracker::new();
        let (acceptors, adopters) =
            start_acceptors(listeners.http, listeners.fastcgi, &front, &table, &conns)?;
        tracing::info!(
            workers = cfg.workers,
            protocol = %cfg.worker_protocol,
            command = %if cfg.command.is_empty() { "(built-in demo app)".to_string() } else { cfg.command.join(" ") },
            max_queue = cfg.max_queue,
            "anteroom started"
        );
        let (tx, orders) = mpsc::unbounded_channel();
        Ok(App {
            cfg,
            queue,
            pool,
            table,
            acceptors,
            conns,
            stop_admin,
            stop_agent,
            phase,
            dir,
            sockets,
            keep_paths,
            control: Control(tx),
            orders,
            systemd: Systemd::default(),
            handover: None,
            adopters,
        })
    }

    /// Tells systemd (and the process this one replaces) how things go; see [`Systemd`]. Started by an
    /// upgrade, this process serves from now on the connections the old one passes on its channel.
    pub fn with_systemd(mut self, systemd: Systemd) -> App {
        self.systemd = systemd;
        let channel = self.systemd.upgrade_channel.as_ref();
        if let Some(channel) = channel.and_then(|c| c.try_clone().ok()) {
            let adopters = self.adopters.clone();
            tokio::spawn(crate::upgrade::receive(channel, move |kind, note, conn| {
                let to = match kind {
                    Handed::Http => &adopters.http,
                    Handed::FastCgi => &adopters.fastcgi,
                };
                // What its PROXY header said, read by the old process.
                let known = (!note.is_empty()).then(|| crate::request::Origin::from_note(note));
                match (to, known) {
                    (Some(to), None) => to.adopt(conn, None),
                    (Some(to), Some(Some(origin))) => to.adopt(conn, Some(Box::new(origin))),
                    // No listener of that kind here (the configuration changed), or a note we cannot
                    // read: the connection closes.
                    _ => {}
                }
            }));
        }
        self
    }

    /// A handle to reload, upgrade or stop the app now.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Serves until `shutdown` is cancelled (a graceful stop), a [`Control`] says otherwise, or
    /// --crash-exit's limit is reached; then stops in order.
    pub async fn run(mut self, shutdown: CancellationToken) -> Stopped {
        let reporting = CancellationToken::new();
        report::start(&self.pool, &self.queue, &mut self.systemd, &reporting);
        let end = self.serve(&shutdown).await;
        reporting.cancel();
        self.stop(end).await
    }

    async fn serve(&mut self, shutdown: &CancellationToken) -> End {
        let fatal = self.pool.fatal();
        let mut upgrading = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return End::Graceful,
                () = fatal.cancelled() => return End::CrashLoop,
                Some(order) = self.orders.recv() => match order {
                    Order::StopNow => return End::Now,
                    Order::Reload => self.reload(),
                    Order::Upgrade if upgrading.is_some() => {
                        tracing::info!("upgrade: already in progress");
                    }
                    Order::Upgrade => {
                        self.phase.set(Phase::Upgrading);
                        upgrading = Some(Box::pin(self.upgrade()));
                    }
                },
                r = async {
                    match upgrading.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if upgrading.is_some() => {
                    upgrading = None;
                    match r {
                        Ok(ready) => {
                            self.handover = Some(ready.handover);
                            return End::HandedOver(ready.pid);
                        }
                        Err(e) => {
                            self.phase.set(Phase::Serving);
                            tracing::error!("upgrade failed, this process keeps serving: {e}");
                            self.notify("READY=1\nSTATUS=upgrade failed; the old process keeps serving");
                        }
                    }
                }
            }
        }
    }

    fn notify(&self, state: &str) {
        if let Some(n) = &self.systemd.notify {
            n.send(state);
        }
    }

    /// SIGHUP: a new generation of workers; systemd hears RELOADING=1, then READY=1 once one is ready.
    fn reload(&mut self) {
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::systemd::monotonic_usec()
        ));
        self.pool.reload();
        if let Some(n) = &self.systemd.notify {
            tokio::spawn(report::ready_after_reload(
                self.pool.view(),
                n.clone(),
                self.cfg.spawn_timeout * 2,
            ));
        }
    }

    /// SIGUSR2: the new process, started on our sockets; resolves to its pid once it is ready.
    fn upgrade(
        &self,
    ) -> impl std::future::Future<Output = Result<Ready, UpgradeError>> + Send + 'static {
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=upgrading",
            crate::systemd::monotonic_usec()
        ));
        let sockets: std::io::Result<Vec<Pass>> = self
            .sockets
            .iter()
            .zip(&self.keep_paths)
            .map(|((name, fd), keep)| {
                Ok(Pass {
                    name,
                    fd: fd.try_clone()?,
                    owns_file: keep.as_ref().is_some_and(|k| k.load(Ordering::Acquire)),
                })
            })
            .collect();
        let ctx = crate::upgrade::Context {
            notify_socket: self.systemd.notify.as_ref().map(|n| n.raw.clone()),
            watchdog_usec: self.systemd.watchdog_usec.clone(),
        };
        let timeout = self.cfg.spawn_timeout;
        tracing::info!("SIGUSR2: upgrading to the binary on disk");
        async move {
            let sockets = sockets.map_err(UpgradeError::Pass)?;
            crate::upgrade::start(sockets, ctx, timeout).await
        }
    }

    /// Stops in order: listeners, then the queue and running requests (unless stopping now), then the
    /// connections, the workers and the admin listener.
    async fn stop(mut self, end: End) -> Stopped {
        match end {
            End::HandedOver(pid) => {
                // Before the table drains: no response should announce a close the hand-over makes needless.
                if let Some(h) = self.handover.take() {
                    self.table.hand_over(h);
                }
                // The new process serves on these sockets now: their files stay.
                for k in self.keep_paths.iter().flatten() {
                    k.store(false, Ordering::Release);
                }
                // The new process answers the agent on the same socket from now on; two processes answering
                // by turns (drain, up, drain...) would make the balancer's weight flap.
                self.stop_agent.cancel();
                tracing::info!(
                    new_pid = pid,
                    queued = self.queue.len(),
                    busy = self.pool.busy(),
                    "upgrade: the new process is ready; finishing queued and running requests here"
                );
            }
            _ => {
                self.phase.set(Phase::Stopping);
                self.notify("STOPPING=1");
            }
        }
        let end = if end == End::Graceful {
            self.drain_delay().await
        } else {
            end
        };
        self.table.drain();
        let acceptors = std::mem::take(&mut self.acceptors);
        // Closes the listeners (removing unix socket files we own); each acceptor notices within 100 ms.
        let _ =
            tokio::task::spawn_blocking(move || acceptors.into_iter().for_each(|a| a.stop())).await;
        drop(std::mem::take(&mut self.sockets));
        if matches!(end, End::Now | End::CrashLoop) {
            tracing::info!("stopping now");
        } else {
            if end == End::Graceful {
                tracing::info!(
                    queued = self.queue.len(),
                    busy = self.pool.busy(),
                    "SIGTERM: finishing queued and running requests (SIGINT or SIGTERM again to stop now)"
                );
            }
            self.finish_requests().await;
        }
        self.queue.close();
        self.queue.drain();
        // Let the last responses reach their clients before the workers' sockets go.
        self.conns.close();
        let _ = tokio::time::timeout(Duration::from_millis(200), self.conns.wait()).await;
        self.pool.stop().await;
        self.stop_admin.cancel();
        self.stop_agent.cancel();
        drop(self.dir);
        tracing::info!("stopped");
        match end {
            End::CrashLoop => Stopped::CrashLoop,
            End::HandedOver(_) => Stopped::Upgraded,
            End::Graceful | End::Now => Stopped::Signal,
        }
    }

    /// `--drain-delay`: /health/ready and the agent already say so; everything goes on serving and accepting
    /// while balancers notice. A second SIGTERM or a SIGINT cuts it short and stops now.
    async fn drain_delay(&mut self) -> End {
        let delay = self.cfg.drain_delay;
        if delay.is_zero() {
            return End::Graceful;
        }
        tracing::info!(
            drain_delay_s = delay.as_secs_f64(),
            "SIGTERM: draining (health and agent say so), still serving and accepting"
        );
        let stop_now = stop_now(&mut self.orders);
        tokio::select! {
            () = tokio::time::sleep(delay) => End::Graceful,
            () = stop_now => {
                tracing::info!("second signal: stopping now");
                End::Now
            }
        }
    }

    /// The graceful part of a stop: waits until nothing is queued or running and the clients' connections
    /// have closed or stayed silent for DRAIN_LINGER, at most --graceful-timeout or until told to stop now.
    async fn finish_requests(&mut self) {
        let (queue, pool, table) = (&self.queue, &self.pool, &self.table);
        let drained = async {
            let mut quiet_since = Instant::now();
            loop {
                let busy =
                    !queue.is_empty() || pool.busy() > 0 || table.view().requests_in_progress > 0;
                if busy {
                    quiet_since = Instant::now();
                } else if table.open() == 0 || quiet_since.elapsed() >= DRAIN_LINGER {
                    return;
                }
                tokio::time::sleep(DRAIN_POLL).await;
            }
        };
        let stop_now = stop_now(&mut self.orders);
        tokio::select! {
            () = drained => {}
            () = tokio::time::sleep(self.cfg.graceful_timeout) => tracing::warn!("graceful stop timed out"),
            () = stop_now => tracing::info!("second signal: stopping now"),
        }
    }
}

/// A second descriptor and a name for each listening socket (for an upgrade), and the unix listeners'
/// keep-path switches.
#[allow(clippy::type_complexity)]
fn handover_sockets(l: &Listeners) -> (Vec<(&'static str, OwnedFd)>, Vec<Option<Arc<AtomicBool>>>) {
    let named = l
        .http
        .iter()
        .map(|l| (HTTP, l))
        .chain(l.fastcgi.iter().map(|l| (FASTCGI, l)))
        .chain(l.admin.iter().map(|l| (ADMIN, l)))
        .chain(l.agent.iter().map(|l| (AGENT, l)));
    let mut sockets = Vec::new();
    let mut keep = Vec::new();
    for (name, l) in named {
        match l.dup() {
            Ok(fd) => {
                sockets.push((name, fd));
                keep.push(l.keep_path());
            }
            // Only an upgrade needs it; that one would lack this socket.
            Err(e) => {
                tracing::warn!(listener = %l.local_addr(), "cannot keep a descriptor for an upgrade: {e}")
            }
        }
    }
    (sockets, keep)
}

/// The table of client connections across the public listeners; temp files take their descriptors from its
/// budget.
fn client_table(limits: Limits, metrics: &Metrics) -> Arc<Table> {
    let table = Table::new(
        "client",
        limits,
        TableMetrics {
            open: metrics.connections.clone(),
            closed_idle: metrics.connections_idle_closed.clone(),
            refused: metrics.connections_refused.clone(),
            bad_proxy_header: metrics.connections_bad_proxy_header.clone(),
        },
    );
    let room = table.clone();
    crate::spill::set_descriptor_room(move |temp_files| room.room_for_temp_file(temp_files));
    table
}

/// Serves the admin listener until `stop[0]` (up until the very end, so that health and metrics answer
/// during a graceful stop), and the agent until `stop[1]`. `state.listeners` are the bound addresses (a port 0
/// has become a real one), to find them in the kernel's tables.
fn start_admin(
    admin: Option<Listener>,
    agent: Option<Listener>,
    state: Arc<AdminState>,
    stop: [&CancellationToken; 2],
) {
    if let Some(l) = admin {
        tracing::info!(admin = %l.local_addr(), "serving metrics, status and health");
        tokio::spawn(crate::admin::serve(l, state.clone(), stop[0].clone()));
    }
    if let Some(l) = agent {
        tracing::info!(agent = %l.local_addr(), "serving HAProxy's agent-check");
        tokio::spawn(crate::admin::agent::serve(l, state, stop[1].clone()));
    }
}

/// For each front, the way in for connections an upgrade's old process passes (its first listener's).
#[derive(Clone, Default)]
struct Adopters {
    http: Option<Adopter>,
    fastcgi: Option<Adopter>,
}

fn start_acceptors(
    http: Vec<Listener>,
    fastcgi: Vec<Listener>,
    front: &Arc<Admission>,
    table: &Arc<Table>,
    conns: &TaskTracker,
) -> Result<(Vec<Acceptor>, Adopters), StartError> {
    let mut acceptors = Vec::new();
    for l in http {
        tracing::info!(listen = %l.local_addr(), "serving HTTP");
        acceptors.push(
            crate::front::http::start(l, front.clone(), table.clone(), conns.clone())
                .map_err(StartError::Accept)?,
        );
    }
    let http = acceptors.first().and_then(Acceptor::adopter);
    let served_http = acceptors.len();
    for l in fastcgi {
        tracing::info!(listen = %l.local_addr(), "serving FastCGI");
        acceptors.push(
            crate::front::fastcgi::start(l, front.clone(), table.clone(), conns.clone())
                .map_err(StartError::Accept)?,
        );
    }
    let fastcgi = acceptors.get(served_http).and_then(Acceptor::adopter);
    Ok((acceptors, Adopters { http, fastcgi }))
}

/// Resolves at an order to stop now (a second SIGTERM, or SIGINT); other orders are ignored while stopping.
async fn stop_now(orders: &mut mpsc::UnboundedReceiver<Order>) {
    while let Some(order) = orders.recv().await {
        if order == Order::StopNow {
            return;
        }
        tracing::info!("{order:?}: ignored while stopping");
    }
    std::future::pending::<()>().await
}

/// The signals anteroom handles, installed (from then on they no longer kill the process) but not yet
/// turned into orders: installed first thing, so that a SIGTERM during start is not lost.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must be called inside a tokio runtime.
    pub fn install() -> Result<Signals, StartError> {
        let on = |kind| signal(kind).map_err(StartError::Signals);
        Ok(Signals {
            term: on(SignalKind::terminate())?,
            int: on(SignalKind::interrupt())?,
            hup: on(SignalKind::hangup())?,
            usr2: on(SignalKind::user_defined2())?,
        })
    }

    /// Turns signals into orders: SIGTERM cancels `shutdown` (a second one stops now), SIGINT stops now,
    /// SIGHUP reloads, SIGUSR2 upgrades.
    pub fn handle(mut self, control: Control, shutdown: CancellationToken) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = self.term.recv() => if shutdown.is_cancelled() {
                        control.stop_now();
                    } else {
                        shutdown.cancel();
                    },
                    _ = self.int.recv() => control.stop_now(),
                    _ = self.hup.recv() => control.reload(),
                    _ = self.usr2.recv() => control.upgrade(),
                }
            }
        });
    }
}

/// Runs anteroom as `main` does: listeners passed by systemd or an upgrade, else bound from `cfg`;
/// signals; systemd notifications. Must be called inside a tokio runtime.
pub async fn serve(cfg: Config, inherited: Inherited) -> Result<Stopped, StartError> {
    let signals = Signals::install()?;
    let shutdown = CancellationToken::new();
    if let Some(why) = &inherited.ignored {
        tracing::warn!("passed sockets ignored: {why}");
    }
    let listeners = if inherited.listen_fds.is_empty() {
        Listeners::bind(&cfg)?
    } else {
        let from = match &inherited.upgrade {
            Some((pid, _)) => format!("the anteroom being upgraded (pid {pid})"),
            None => "systemd".into(),
        };
        let names: Vec<&str> = inherited
            .listen_fds
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        tracing::info!(
            sockets = %names.join(","),
            "serving on the sockets passed by {from}; --listen and --listen-fastcgi are not used"
        );
        Listeners::inherit(&cfg, inherited.listen_fds, &inherited.own_files)?
    };
    let app = App::build(cfg, listeners)?.with_systemd(Systemd {
        notify: inherited.notify.map(Arc::new),
        watchdog: inherited.watchdog,
        watchdog_usec: inherited.watchdog_usec,
        upgrade_channel: inherited.upgrade.map(|(_, fd)| fd),
    });
    signals.handle(app.control(), shutdown.clone());
    Ok(app.run(shutdown).await)
}
