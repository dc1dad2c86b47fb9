//! Processes and signals: signalling workers and their groups, telling whether a pid is alive, and what
//! a worker's child does between fork and exec.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use rustix::io::Errno;
use rustix::process::{kill_process, kill_process_group, test_kill_process, Pid};
use tokio::process::Command;

pub use rustix::process::Signal;

fn to_pid(raw: u32) -> Option<Pid> {
    Pid::from_raw(i32::try_from(raw).ok()?)
}

/// Sends `sig` to the process `pid` (nothing for pid 0).
pub fn kill(pid: u32, sig: Signal) -> io::Result<()> {
    match to_pid(pid) {
        Some(p) => kill_process(p, sig).map_err(io::Error::from),
        None => Ok(()),
    }
}

/// Sends `sig` to the process group `pgid`. Groups 0 and 1 are refused: to kill(2) they mean "our own
/// group" and "every process we may signal".
pub fn kill_group(pgid: u32, sig: Signal) -> io::Result<()> {
    match to_pid(pgid) {
        Some(p) if pgid > 1 => kill_process_group(p, sig).map_err(io::Error::from),
        _ => Ok(()),
    }
}

/// Whether a process `pid` exists (also when it belongs to someone else and we may not signal it).
pub fn alive(pid: u32) -> bool {
    let Some(p) = to_pid(pid) else {
        return false;
    };
    // Signal 0 only checks; it sends nothing. EPERM: it exists, as someone else's.
    matches!(test_kill_process(p), Ok(()) | Err(Errno::PERM))
}

/// The effective user id of this process.
pub fn effective_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The parent's pid (0 if there is none, as for init).
#[cfg(test)]
pub fn parent_pid() -> u32 {
    rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get().unsigned_abs())
}

/// The conventional name of a signal number: "SIGKILL", or "?" for one a crash report does not expect.
pub fn signal_name(sig: i32) -> &'static str {
    let Some(sig) = Signal::from_named_raw(sig) else {
        return "?";
    };
    match sig {
        Signal::HUP => "SIGHUP",
        Signal::INT => "SIGINT",
        Signal::QUIT => "SIGQUIT",
        Signal::ILL => "SIGILL",
        Signal::TRAP => "SIGTRAP",
        Signal::ABORT => "SIGABRT",
        Signal::BUS => "SIGBUS",
        Signal::FPE => "SIGFPE",
        Signal::KILL => "SIGKILL",
        Signal::USR1 => "SIGUSR1",
        Signal::SEGV => "SIGSEGV",
        Signal::USR2 => "SIGUSR2",
        Signal::PIPE => "SIGPIPE",
        Signal::ALARM => "SIGALRM",
        Signal::TERM => "SIGTERM",
        Signal::XCPU => "SIGXCPU",
        Signal::XFSZ => "SIGXFSZ",
        Signal::SYS => "SIGSYS",
        _ => "?",
    }
}

/// In the child, before exec: `listener` becomes fd 3 and stays open across exec (`LISTEN_FDS=1`). The
/// parent's copy closes when `cmd` is dropped.
pub fn inherit_as_fd3(cmd: &mut Command, listener: OwnedFd) {
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls (fcntl, dup2) and
    // allocates nothing; `listener` is open for as long as the closure exists. libc rather than rustix:
    // rustix's dup2 wants fd 3 as an OwnedFd, which would take one more unsafe step to make.
    unsafe {
        cmd.pre_exec(move || {
            let fd = listener.as_raw_fd();
            if fd == 3 {
                // Already in place; dup2 would keep close-on-exec set.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// In the child, before exec: it gets SIGKILL when the thread that forked it ends (`PR_SET_PDEATHSIG`),
/// exits at once if `parent` has already gone, and leads a process group of its own.
pub fn die_with_parent_in_own_group(cmd: &mut Command, parent: u32) {
    let parent = to_pid(parent);
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls and allocates nothing:
    // rustix's prctl, getppid and setpgid are single system calls (and an error from them is a plain OS
    // error code), and libc's _exit ends the process without running any handler.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // anteroom died between fork and prctl: nobody would ever stop this worker.
            if rustix::process::getppid() != parent {
                libc::_exit(1);
            }
            // Its own process group: a Ctrl-C in the terminal reaches anteroom, which stops workers in order.
            let _ = rustix::process::setpgid(None, None);
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
        assert_eq!(signal_name(libc::SIGABRT), "SIGABRT");
        assert_eq!(signal_name(libc::SIGALRM), "SIGALRM");
        assert_eq!(signal_name(libc::SIGCHLD), "?");
        assert_eq!(signal_name(0), "?");
        assert_eq!(signal_name(-3), "?");
    }

    #[test]
    fn liveness() {
        assert!(alive(std::process::id()));
        assert!(alive(parent_pid()));
        assert!(!alive(0));
        assert!(!alive(u32::MAX));
    }
}
