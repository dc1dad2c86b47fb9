//! Starting worker processes, all from one long-lived thread.
//!
//! Workers must die with anteroom, even when it is SIGKILLed. `PR_SET_PDEATHSIG` does that, but Linux sends
//! the signal when the *thread* that forked exits, not the process: fork from a tokio worker thread that
//! the runtime later retires and the workers die at random. So every fork happens on this one thread, which
//! lives as long as the process.
//!
//! A FastCGI worker gets its listening socket as fd 0 (FCGI_LISTENSOCK_FILENO), as spawn-fcgi and mod_fcgid
//! do. An HTTP worker gets it as fd 3 with `LISTEN_FDS=1`; `LISTEN_PID` must be the worker's own pid, which
//! is only known after fork, so the child first runs `anteroom exec-worker`, which sets it and execs the app.
//!
//! Least privilege: with `--user`, the child takes that account's ids and groups before exec (so the
//! exec-worker shim runs as the user too), after its `--worker-rlimit`s, and gets the environment
//! [`worker_env`] chose. All of it is resolved before fork (`sys::privilege`). With `--drop-privileges`,
//! anteroom becomes the user itself once it no longer needs root ([`drop_privileges`]); its children then
//! already have the right ids.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc as std_mpsc;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::config::{Account, Config, WorkerLimit, WorkerProtocol};
use crate::sys;

pub struct SpawnSpec {
    pub argv: Vec<String>,
    /// The worker's whole environment (see [`worker_env`]).
    pub env: Vec<(OsString, OsString)>,
    pub protocol: WorkerProtocol,
    /// The worker's listening socket (blocking mode, as apps expect).
    pub listener: OwnedFd,
    /// `--user`: the account the worker runs as.
    pub user: Option<Account>,
    pub rlimits: Vec<WorkerLimit>,
}

type Request = (SpawnSpec, oneshot::Sender<io::Result<Child>>);

#[derive(Clone)]
pub struct Spawner {
    tx: std_mpsc::Sender<Request>,
}

impl Spawner {
    /// Starts the spawner thread; `handle` lets it register children with the runtime's reaper.
    pub fn start(handle: tokio::runtime::Handle) -> io::Result<Spawner> {
        let (tx, rx) = std_mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("anteroom-spawner".into())
            .spawn(move || {
                let _rt = handle.enter();
                // Ends when every Spawner is dropped, which is at process exit.
                for (spec, reply) in rx {
                    let _ = reply.send(spawn(spec));
                }
            })?;
        Ok(Spawner { tx })
    }

    pub async fn spawn(&self, spec: SpawnSpec) -> io::Result<Child> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((spec, tx))
            .map_err(|_| io::Error::other("the spawner thread has stopped"))?;
        rx.await
            .map_err(|_| io::Error::other("the spawner thread has stopped"))?
    }
}

fn spawn(spec: SpawnSpec) -> io::Result<Child> {
    let mut cmd = match spec.protocol {
        WorkerProtocol::Fastcgi => {
            let mut cmd = Command::new(&spec.argv[0]);
            cmd.args(&spec.argv[1..]);
            cmd
        }
        WorkerProtocol::Http => {
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.arg("exec-worker").arg("--").args(&spec.argv);
            cmd
        }
    };
    cmd.env_clear();
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    match spec.protocol {
        WorkerProtocol::Fastcgi => {
            cmd.stdin(Stdio::from(spec.listener));
        }
        WorkerProtocol::Http => {
            cmd.stdin(Stdio::null());
            cmd.env("LISTEN_FDS", "1");
            cmd.env_remove("LISTEN_FDNAMES");
            // Between fork and exec, with async-signal-safe calls only (see `sys::process`).
            sys::process::inherit_as_fd3(&mut cmd, spec.listener);
        }
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // Between fork and exec: the resource limits, then the user's groups and ids (see `sys::privilege`).
    // Before the death signal, which a change of ids would clear.
    sys::privilege::confine(&mut cmd, spec.user.as_ref(), &spec.rlimits);
    // Between fork and exec, with async-signal-safe calls only: PR_SET_PDEATHSIG (SIGKILL), exit if
    // anteroom is already gone, and a process group of its own (see `sys::process`).
    sys::process::die_with_parent_in_own_group(&mut cmd, std::process::id());
    // For HTTP workers the pre-exec step holds the socket; the parent's copy closes on return either way.
    cmd.spawn()
}

/// Variables that are anteroom's own and never the app's, passed on only when `--pass-env` or `--env` names
/// them: `ANTEROOM_*` (its options and log filter: a worker has no use for them, and `ANTEROOM_CONFIG` or a
/// listen address tells it about anteroom, not itself), and socket activation's `LISTEN_*`, which describe
/// anteroom's descriptors, not the worker's.
fn internal(name: &str) -> bool {
    name.starts_with("ANTEROOM_") || matches!(name, "LISTEN_FDS" | "LISTEN_PID" | "LISTEN_FDNAMES")
}

/// What a cleared environment keeps of anteroom's, as php-fpm's `clear_env` does (it keeps nothing, and
/// php-cgi then finds no PATH for `exec`).
const KEPT_WHEN_CLEARED: [&str; 2] = ["PATH", "LANG"];

/// The environment a worker starts with: anteroom's, less its own variables (`internal`), or with
/// `--clear-env` only `PATH`, `LANG` and the `--pass-env` names; with `--user`, that user's `HOME`, `USER`
/// and `LOGNAME` (as su and runuser set them); then the `--env` values over all.
pub fn worker_env(cfg: &Config) -> Vec<(OsString, OsString)> {
    worker_env_from(std::env::vars_os(), cfg)
}

fn worker_env_from(
    vars: impl Iterator<Item = (OsString, OsString)>,
    cfg: &Config,
) -> Vec<(OsString, OsString)> {
    let mut out: Vec<(OsString, OsString)> = vars.filter(|(k, _)| passes(k, cfg)).collect();
    let mut set = |k: &str, v: OsString| {
        out.retain(|(o, _)| o != k);
        out.push((k.into(), v));
    };
    if let Some(a) = &cfg.user {
        set("HOME", a.home.clone().into_os_string());
        set("USER", a.name.clone().into());
        set("LOGNAME", a.name.clone().into());
    }
    for (k, v) in &cfg.env {
        set(k, v.into());
    }
    out
}

fn passes(name: &std::ffi::OsStr, cfg: &Config) -> bool {
    let Some(name) = name.to_str() else {
        // Not a name anyone can give to --pass-env, nor one of ours.
        return !cfg.clear_env;
    };
    if cfg.pass_env.iter().any(|p| p == name) {
        return true;
    }
    !internal(name) && (!cfg.clear_env || KEPT_WHEN_CLEARED.contains(&name))
}

/// At start, before any worker: hands the worker socket directory to `--user` when anteroom is root (after
/// `--drop-privileges` anteroom makes the sockets there as that user), and says which of anteroom's
/// variables the workers will not get, so that a missing `DATABASE_URL` is explained in the log.
pub fn prepare(cfg: &Config, dir: &Path) -> io::Result<()> {
    if let Some(a) = &cfg.user {
        if sys::process::effective_uid() == 0 {
            std::os::unix::fs::chown(dir, Some(a.uid), Some(a.gid))?;
        }
    }
    let withheld: Vec<String> = std::env::vars_os()
        .filter(|(k, _)| !passes(k, cfg) && !k.to_string_lossy().starts_with("ANTEROOM_"))
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    if cfg.clear_env && !withheld.is_empty() {
        tracing::info!(
            "workers get a cleared environment (--clear-env); not passed: {} (name them with --pass-env)",
            withheld.join(", ")
        );
    }
    Ok(())
}

/// `--drop-privileges`: anteroom becomes `--user` for good. Called once everything that needs root is done:
/// the listeners bound (and their sockets' owners and modes set), the open-files limit raised, the worker
/// socket directory made and handed over.
pub fn drop_privileges(cfg: &Config) -> io::Result<()> {
    let Some(a) = cfg.user.as_ref().filter(|_| cfg.drop_privileges) else {
        return Ok(());
    };
    if sys::privilege::uid() == a.uid {
        return Ok(());
    }
    sys::privilege::become_account(a)?;
    tracing::info!(user = %a.name, uid = a.uid, gid = a.gid, "dropped privileges");
    Ok(())
}

/// `anteroom exec-worker -- CMD ARGS`: runs in the child, after fork and before the app.
pub fn exec_worker(argv: &[String]) -> io::Error {
    use std::os::unix::process::CommandExt;
    std::env::set_var("LISTEN_PID", std::process::id().to_string());
    std::process::Command::new(&argv[0]).args(&argv[1..]).exec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command as Sub};
    use clap::Parser;

    fn cfg(args: &[&str]) -> Config {
        let cli =
            Cli::try_parse_from(std::iter::once("anteroom").chain(args.iter().copied())).unwrap();
        assert!(matches!(cli.command, None | Some(Sub::Serve(_))));
        Config::from_args(cli.serve).unwrap()
    }

    fn env_of(cfg: &Config) -> Vec<String> {
        let vars = [
            ("PATH", "/bin"),
            ("LANG", "C.UTF-8"),
            ("DATABASE_URL", "postgres://secret"),
            ("ANTEROOM_WORKERS", "3"),
            ("LISTEN_FDS", "2"),
            ("HOME", "/root"),
        ];
        let mut out: Vec<String> =
            worker_env_from(vars.iter().map(|(k, v)| (k.into(), v.into())), cfg)
                .into_iter()
                .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
                .collect();
        out.sort();
        out
    }

    #[test]
    fn environment() {
        // Passed, less anteroom's own variables.
        assert_eq!(
            env_of(&cfg(&["--env", "X=1"])),
            [
                "DATABASE_URL=postgres://secret",
                "HOME=/root",
                "LANG=C.UTF-8",
                "PATH=/bin",
                "X=1"
            ]
        );
        // Cleared: PATH, LANG, what is named and --env.
        assert_eq!(
            env_of(&cfg(&[
                "--clear-env",
                "--pass-env",
                "DATABASE_URL",
                "--env",
                "PATH=/usr/bin"
            ])),
            [
                "DATABASE_URL=postgres://secret",
                "LANG=C.UTF-8",
                "PATH=/usr/bin"
            ]
        );
        // --user: cleared by default, with the user's HOME, USER and LOGNAME.
        assert_eq!(
            env_of(&cfg(&["--user", "root", "--pass-env", "ANTEROOM_WORKERS"])),
            [
                "ANTEROOM_WORKERS=3",
                "HOME=/root",
                "LANG=C.UTF-8",
                "LOGNAME=root",
                "PATH=/bin",
                "USER=root"
            ]
        );
    }
}
