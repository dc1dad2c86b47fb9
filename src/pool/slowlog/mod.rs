//! The slow-request log (`--slowlog-timeout`): when a worker has held one request that long, one event
//! says where the worker is stuck, while the request goes on (`--request-timeout` still ends it).
//!
//! anteroom used to say nothing between a request's start and its timeout, whereas php-fpm's
//! `request_slowlog_timeout` and uWSGI's harakiri-verbose tell the operator what the worker was doing. The
//! kernel's view costs nothing to read and needs no help from the app: the process state, `wchan`, the
//! system call with its arguments, the kernel stack when readable, the CPU time the request has used (from
//! a reading taken when the worker took it) and the RSS. A language-specific dumper (`--slowlog-command`,
//! such as `py-spy dump --pid {pid}`) adds the app's own stack.
//!
//! Everything is done off the slot's path: the serve loop only notices the time and spawns [`report`],
//! which reads `/proc` on a blocking thread, then runs the dumper (bounded to [`DUMP_MAX_BYTES`] and
//! [`DUMP_TIMEOUT`], its whole process group killed at the limit) and logs ONE event with all of it. One
//! event rather than a second one for the dump, because the event is already off the serve loop: waiting
//! delays only the log line (py-spy takes about 0.2 s, gdb about 1 s), and one line per slow request is what an operator
//! greps and alerts on. The kernel's view is read before the dumper runs, since a ptrace-based dumper stops
//! the process (state `t`) while it looks.
//!
//! At most `--slowlog-rate` events a minute across all workers ([`Budget`]); the next event let through says
//! how many were held back. The status page marks the requests running longer than the threshold whether
//! or not their event was logged (`scoreboard`).

mod proc;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};

pub(super) use proc::cpu_ticks;
use proc::{state_name, Sample};

use crate::sync::lock;

/// Most of the dumper's output kept (stdout and stderr together); the rest is read and dropped.
pub(super) const DUMP_MAX_BYTES: usize = 64 * 1024;
/// The dumper's time: then its process group is killed and what it wrote so far is kept.
pub(super) const DUMP_TIMEOUT: Duration = Duration::from_secs(10);

/// At most N events a minute: a window that restarts a minute after its first event.
pub(super) struct Budget {
    per_minute: u32,
    window: Mutex<Window>,
}

struct Window {
    start: Option<Instant>,
    used: u32,
    /// Events held back since the last one let through.
    held_back: u64,
}

impl Budget {
    pub(super) fn new(per_minute: u32) -> Budget {
        Budget {
            per_minute,
            window: Mutex::new(Window {
                start: None,
                used: 0,
                held_back: 0,
            }),
        }
    }

    /// `Some(n)` if an event may be logged at `now`, `n` being how many were held back before it.
    fn take(&self, now: Instant) -> Option<u64> {
        let mut w = lock(&self.window);
        if w.start
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(60))
        {
            w.start = Some(now);
            w.used = 0;
        }
        if w.used >= self.per_minute {
            w.held_back += 1;
            return None;
        }
        w.used += 1;
        Some(std::mem::take(&mut w.held_back))
    }
}

/// The slow request and its worker, as the serve loop hands them over.
pub(super) struct SlowRequest {
    pub(super) id: String,
    pub(super) method: String,
    pub(super) target: String,
    pub(super) slot: usize,
    pub(super) pid: u32,
    pub(super) begun: Instant,
    /// The worker's CPU time when it took the request, in clock ticks.
    pub(super) cpu_at_start: Option<u64>,
}

/// Logs the event for `req` from a task of its own, if the budget allows; never waits.
pub(super) fn report(budget: &Budget, command: Option<&str>, req: SlowRequest) {
    let Some(held_back) = budget.take(Instant::now()) else {
        return;
    };
    let command = command.map(str::to_owned);
    tokio::spawn(async move {
        let pid = req.pid;
        let sample = tokio::task::spawn_blocking(move || proc::sample(pid))
            .await
            .unwrap_or_default();
        let running = req.begun.elapsed();
        let dump = match command {
            Some(cmd) => Some(run_dumper(&cmd, pid, DUMP_MAX_BYTES, DUMP_TIMEOUT).await),
            None => None,
        };
        log_event(&req, &sample, running, dump.as_ref(), held_back);
    });
}

fn log_event(
    req: &SlowRequest,
    s: &Sample,
    running: Duration,
    dump: Option<&Dump>,
    held_back: u64,
) {
    let cpu_ms = match (s.stat, req.cpu_at_start) {
        (Some(now), Some(then)) => {
            Some(now.cpu_ticks.saturating_sub(then) * 1000 / proc::ticks_per_second())
        }
        _ => None,
    };
    let span = tracing::info_span!("request", request_id = %req.id);
    let _in = span.enter();
    tracing::warn!(
        slot = req.slot,
        pid = req.pid,
        method = %req.method,
        target = %req.target,
        running_ms = running.as_millis() as u64,
        state = s.stat.map(|st| format!("{} ({})", st.state, state_name(st.state))),
        wchan = s.wchan.as_deref(),
        syscall = s.syscall.as_ref().map(tracing::field::display),
        syscall_nr = s.syscall.as_ref().and_then(proc::Syscall::number),
        kernel_stack = s.stack.as_deref(),
        threads = proc::threads_text(&s.threads),
        cpu_ms,
        rss_bytes = s.rss_bytes,
        dump_command = dump.map(|d| d.command.as_str()),
        dump_end = dump.map(|d| tracing::field::display(&d.end)),
        dump_truncated = dump.map(|d| d.truncated),
        dump = dump.map(|d| d.output.as_str()),
        held_back,
        "slow request: the worker has held it for {running:.1?}"
    );
}

/// How the dumper ended.
#[derive(Debug)]
enum DumpEnd {
    Exited(std::process::ExitStatus),
    TimedOut(Duration),
    Failed(std::io::Error),
}

impl std::fmt::Display for DumpEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DumpEnd::Exited(st) => write!(f, "{}", super::describe(*st)),
            DumpEnd::TimedOut(limit) => write!(f, "killed after {limit:?}"),
            DumpEnd::Failed(e) => write!(f, "cannot run it: {e}"),
        }
    }
}

/// The dumper's run: its output (stdout, then stderr), bounded.
struct Dump {
    command: String,
    output: String,
    truncated: bool,
    end: DumpEnd,
}

/// `cmd` with `{pid}` replaced by the pid: a number, so nothing in it can be read by the shell as more
/// than a word.
fn substitute(cmd: &str, pid: u32) -> String {
    cmd.replace("{pid}", &pid.to_string())
}

/// Runs the dumper through `sh -c` (so that a recipe may use a pipe or `2>&1`) in a process group of its
/// own, keeps at most `max_bytes` of its output, and kills the group after `limit`, keeping what it wrote.
async fn run_dumper(cmd: &str, pid: u32, max_bytes: usize, limit: Duration) -> Dump {
    let command = substitute(cmd, pid);
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(&command)
        .env("ANTEROOM_SLOW_PID", pid.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match c.spawn() {
        Ok(ch) => ch,
        Err(e) => {
            return Dump {
                command,
                output: String::new(),
                truncated: false,
                end: DumpEnd::Failed(e),
            }
        }
    };
    let group = child.id().unwrap_or(0);
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let (mut out_buf, mut err_buf) = (Vec::new(), Vec::new());
    let run = async {
        let (a, b) = tokio::join!(
            bounded(out, &mut out_buf, max_bytes),
            bounded(err, &mut err_buf, max_bytes)
        );
        (a || b, child.wait().await)
    };
    let (dropped, end) = match tokio::time::timeout(limit, run).await {
        Ok((dropped, Ok(st))) => (dropped, DumpEnd::Exited(st)),
        Ok((dropped, Err(e))) => (dropped, DumpEnd::Failed(e)),
        Err(_) => {
            // The shell and whatever it started (gdb, py-spy): the whole group, then reap the shell.
            let _ = crate::sys::process::kill_group(group, crate::sys::process::Signal::KILL);
            let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            (false, DumpEnd::TimedOut(limit))
        }
    };
    let (output, truncated) = join_output(&out_buf, &err_buf, max_bytes);
    Dump {
        command,
        output,
        truncated: truncated || dropped,
        end,
    }
}

/// Reads a pipe into `kept`, up to `max` bytes; the rest is read and dropped so that the writer is never
/// blocked on it. True if something was dropped.
async fn bounded(pipe: Option<impl AsyncRead + Unpin>, kept: &mut Vec<u8>, max: usize) -> bool {
    let Some(mut pipe) = pipe else {
        return false;
    };
    let mut buf = [0u8; 8192];
    let mut dropped = false;
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return dropped,
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                dropped |= n > room;
            }
        }
    }
}

/// stdout then stderr, within `max` bytes together; true if cut.
fn join_output(out: &[u8], err: &[u8], max: usize) -> (String, bool) {
    let mut text = String::from_utf8_lossy(out).into_owned();
    if !err.is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str("[stderr]\n");
        text.push_str(&String::from_utf8_lossy(err));
    }
    if text.len() <= max {
        return (text, false);
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    (text, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_lets_n_a_minute_through_and_counts_the_rest() {
        let b = Budget::new(2);
        let t = Instant::now();
        assert_eq!(b.take(t), Some(0));
        assert_eq!(b.take(t + Duration::from_secs(1)), Some(0));
        assert_eq!(b.take(t + Duration::from_secs(2)), None);
        assert_eq!(b.take(t + Duration::from_secs(59)), None);
        assert_eq!(b.take(t + Duration::from_secs(60)), Some(2));
        assert_eq!(b.take(t + Duration::from_secs(61)), Some(0));
        assert_eq!(b.take(t + Duration::from_secs(62)), None);
    }

    #[test]
    fn the_pid_is_substituted_as_a_number() {
        assert_eq!(
            substitute("py-spy dump --pid {pid} && echo {pid}", 42),
            "py-spy dump --pid 42 && echo 42"
        );
    }

    #[tokio::test]
    async fn the_dumper_is_bounded_in_size_and_time() {
        let run = |cmd: &'static str| run_dumper(cmd, 7, DUMP_MAX_BYTES, DUMP_TIMEOUT);
        let d = run("echo pid={pid} $ANTEROOM_SLOW_PID; echo oops >&2").await;
        assert_eq!(d.output, "pid=7 7\n[stderr]\noops\n");
        assert!(!d.truncated);
        assert!(matches!(d.end, DumpEnd::Exited(st) if st.success()));

        let d = run("head -c 200000 /dev/zero | tr '\\0' x").await;
        assert_eq!(d.output.len(), DUMP_MAX_BYTES);
        assert!(d.truncated);

        let d = run("exit 3").await;
        assert!(d.end.to_string().contains('3'), "{}", d.end);
    }

    #[tokio::test]
    async fn a_hanging_dumper_is_killed_with_its_children_and_its_output_kept() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child");
        let cmd = format!(
            "echo started; sleep 30 & echo $! > {}; wait",
            pid_file.display()
        );
        let t = Instant::now();
        let d = run_dumper(&cmd, 1, DUMP_MAX_BYTES, Duration::from_millis(300)).await;
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(matches!(d.end, DumpEnd::TimedOut(_)), "{}", d.end);
        assert_eq!(d.output, "started\n");
        let child: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed, and reaped by init or a subreaper: gone within a moment.
        let gone = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            std::fs::read_to_string(format!("/proc/{child}/stat")).map_or(true, |s| {
                proc::parse_stat(&s).is_some_and(|st| st.state == 'Z')
            })
        });
        assert!(gone, "the dumper's child {child} survived");
    }
}
