//! Replacing the running binary without losing a request (SIGUSR2).
//!
//! The old process starts the binary as it is on disk now, with the same arguments, and passes it its
//! listening sockets as systemd would (`LISTEN_FDS`, `LISTEN_FDNAMES`, `LISTEN_PID`), so the kernel's
//! accept queues are never closed: connections that arrive meanwhile wait in them for whichever process
//! accepts first. The new process starts its own workers; once one is ready it says so, and the old process
//! stops accepting and finishes its queue and running requests (the graceful stop of SIGTERM) without
//! removing the unix socket files the new process now serves on.
//!
//! The new process says it is ready on a pipe (`ANTEROOM_UPGRADE_FD`) rather than with a signal to the old
//! pid: a pipe cannot reach the wrong process, carries the new pid, and ends (EOF) the moment the new process
//! dies, so a failed start is noticed at once instead of at the timeout. If it is not ready within
//! `--spawn-timeout`, the old process stops it and keeps serving.
//!
//! `LISTEN_PID` must be the new process's own pid, known only after fork: as for HTTP workers, the child
//! first runs `NEW-BINARY exec-worker -- NEW-BINARY ARGS...`, which sets it and execs, keeping the pid.
//!
//! `/proc/self/exe` names the file this process was started from; when that file has since been replaced
//! (a package upgrade renames the new file over it), the link reads `PATH (deleted)`: the path, without the
//! suffix, is the new file, which is what is started.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::sys::passfd;
use crate::systemd::{UPGRADE_FD, UPGRADE_FROM, UPGRADE_OWNED};

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot find this process's binary: {0}")]
    Exe(std::io::Error),
    #[error("the binary {} is not there any more", .0.display())]
    Missing(PathBuf),
    #[error("an argument is not valid UTF-8: {0:?}")]
    Argument(OsString),
    #[error("cannot pass the listening sockets: {0}")]
    Pass(std::io::Error),
    #[error("cannot start {}: {source}", exe.display())]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("the new process (pid {pid}) exited before it was ready ({status}); see its log lines above")]
    Exited { pid: u32, status: String },
    #[error("the new process (pid {pid}) was not ready within {timeout:?} (--spawn-timeout); it is stopped")]
    Timeout { pid: u32, timeout: Duration },
}

/// A listening socket to pass, under its `LISTEN_FDNAMES` name.
pub struct Pass {
    pub name: &'static str,
    pub fd: OwnedFd,
    /// A unix socket whose file this process bound (and would remove at stop): the new process removes it.
    pub owns_file: bool,
}

/// What the old process passes on besides its sockets.
#[derive(Default)]
pub struct Context {
    /// `NOTIFY_SOCKET`, so that the new process can tell systemd it is the main process now.
    pub notify_socket: Option<OsString>,
    pub watchdog_usec: Option<String>,
}

/// The binary to start: what `/proc/self/exe` points at, as the file at that path is now.
pub fn current_exe() -> Result<PathBuf, UpgradeError> {
    let link = std::fs::read_link("/proc/self/exe").map_err(UpgradeError::Exe)?;
    let path = match link.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(p) => PathBuf::from(p),
        None => link,
    };
    if !path.is_file() {
        return Err(UpgradeError::Missing(path));
    }
    Ok(path)
}

/// Starts the new process with `sockets` and waits until it is ready (its pid) or has failed, at most
/// `timeout`. On failure the new process is stopped, and the caller keeps serving.
pub async fn start(
    sockets: Vec<Pass>,
    ctx: Context,
    timeout: Duration,
) -> Result<u32, UpgradeError> {
    let exe = current_exe()?;
    let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| UpgradeError::Pass(e.into()))?;
    let mut cmd = command(&exe, sockets, write, &ctx)?;
    let mut child = cmd.spawn().map_err(|source| UpgradeError::Spawn {
        exe: exe.clone(),
        source,
    })?;
    // Our copy of the pipe's write end goes with `cmd`: EOF then means the new process is gone.
    drop(cmd);
    let pid = child.id().unwrap_or(0);
    // Dropped before the outcome (this process is told to stop meanwhile): the new process stops too.
    let mut unready = StopOnDrop(pid);
    let read = tokio::net::unix::pipe::Receiver::from_owned_fd(read).map_err(UpgradeError::Pass)?;
    let outcome = tokio::time::timeout(timeout, said_ready(read)).await;
    unready.0 = 0;
    match outcome {
        Ok(true) => Ok(pid),
        Ok(false) => Err(UpgradeError::Exited {
            pid,
            status: exit_status(&mut child, pid).await,
        }),
        Err(_) => {
            stop(&mut child, pid).await;
            Err(UpgradeError::Timeout { pid, timeout })
        }
    }
}

/// `EXE exec-worker -- EXE ARGS...` with `sockets` as fds 3.. and the pipe's write end after them, and
/// the variables that say so.
fn command(
    exe: &std::path::Path,
    sockets: Vec<Pass>,
    pipe: OwnedFd,
    ctx: &Context,
) -> Result<Command, UpgradeError> {
    let args = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string().map_err(UpgradeError::Argument))
        .collect::<Result<Vec<_>, _>>()?;
    let names: Vec<&str> = sockets.iter().map(|p| p.name).collect();
    let owned: Vec<String> = (sockets.iter().enumerate())
        .filter(|(_, p)| p.owns_file)
        .map(|(i, _)| i.to_string())
        .collect();
    tracing::info!(exe = %exe.display(), sockets = %names.join(","), "upgrade: starting the new binary");
    let mut cmd = Command::new(exe);
    cmd.arg("exec-worker").arg("--").arg(exe).args(&args);
    cmd.env("LISTEN_FDS", names.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env(UPGRADE_FROM, std::process::id().to_string())
        .env(
            UPGRADE_FD,
            (passfd::FIRST as usize + names.len()).to_string(),
        )
        .env(UPGRADE_OWNED, owned.join(","))
        .env_remove("LISTEN_PID")
        .env_remove("WATCHDOG_PID");
    if let Some(s) = &ctx.notify_socket {
        cmd.env("NOTIFY_SOCKET", s);
    }
    if let Some(u) = &ctx.watchdog_usec {
        cmd.env("WATCHDOG_USEC", u);
    }
    // Its log goes where ours does: one journal, one terminal.
    cmd.stdin(Stdio::null());
    let mut fds: Vec<OwnedFd> = sockets.into_iter().map(|p| p.fd).collect();
    fds.push(pipe);
    passfd::pass_fds(&mut cmd, fds);
    Ok(cmd)
}

/// Whether the new process wrote "READY PID" before closing the pipe. It keeps the pipe open until it
/// exits, so only the first line is read.
async fn said_ready(mut read: tokio::net::unix::pipe::Receiver) -> bool {
    let mut said = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => said.extend_from_slice(&buf[..n]),
        }
        if said.contains(&b'\n') || said.len() > 64 {
            return said.starts_with(b"READY ");
        }
    }
}

/// Sends SIGTERM to a new process that was not reported ready when the upgrade is abandoned (pid 0: none).
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if self.0 != 0 {
            let _ = crate::sys::process::kill(self.0, crate::sys::process::Signal::TERM);
        }
    }
}

/// How a new process that closed its pipe without saying ready ended; one still running is stopped.
async fn exit_status(child: &mut Child, pid: u32) -> String {
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(s)) => s.to_string(),
        _ => {
            stop(child, pid).await;
            "it closed its readiness pipe and was stopped".into()
        }
    }
}

/// Stops a new process that did not become ready: SIGTERM (it stops its workers), then SIGKILL.
async fn stop(child: &mut Child, pid: u32) {
    let _ = crate::sys::process::kill(pid, crate::sys::process::Signal::TERM);
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// In the new process: tells the old one that a worker is ready (`READY PID`). The pipe stays open
/// until this process exits.
pub fn report_ready(pipe: &OwnedFd) {
    let Ok(dup) = pipe.try_clone() else {
        return;
    };
    let mut f = std::fs::File::from(dup);
    if let Err(e) = writeln!(f, "READY {}", std::process::id()) {
        tracing::warn!("upgrade: cannot tell the old process we are ready: {e}");
    }
}
