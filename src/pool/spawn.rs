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

use std::io;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::mpsc as std_mpsc;

use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::config::WorkerProtocol;
use crate::sys;

pub struct SpawnSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub protocol: WorkerProtocol,
    /// The worker's listening socket (blocking mode, as apps expect).
    pub listener: OwnedFd,
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
    let mut cmd;
    match spec.protocol {
        WorkerProtocol::Fastcgi => {
            cmd = Command::new(&spec.argv[0]);
            cmd.args(&spec.argv[1..]);
            cmd.stdin(Stdio::from(spec.listener));
        }
        WorkerProtocol::Http => {
            cmd = Command::new(std::env::current_exe()?);
            cmd.arg("exec-worker").arg("--").args(&spec.argv);
            cmd.stdin(Stdio::null());
            cmd.env("LISTEN_FDS", "1");
            cmd.env_remove("LISTEN_FDNAMES");
            // Between fork and exec, with async-signal-safe calls only (see `sys::process`).
            sys::process::inherit_as_fd3(&mut cmd, spec.listener);
        }
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // Between fork and exec, with async-signal-safe calls only: PR_SET_PDEATHSIG (SIGKILL), exit if
    // anteroom is already gone, and a process group of its own (see `sys::process`).
    sys::process::die_with_parent_in_own_group(&mut cmd, std::process::id());
    // For HTTP workers the pre-exec step holds the socket; the parent's copy closes on return either way.
    cmd.spawn()
}

/// `anteroom exec-worker -- CMD ARGS`: runs in the child, after fork and before the app.
pub fn exec_worker(argv: &[String]) -> io::Error {
    use std::os::unix::process::CommandExt;
    std::env::set_var("LISTEN_PID", std::process::id().to_string());
    std::process::Command::new(&argv[0]).args(&argv[1..]).exec()
}
