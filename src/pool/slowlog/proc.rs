//! What the kernel says a worker process is doing, read from `/proc/PID`: pure parsers over the files'
//! text (unit-tested on samples), and one function that reads them all.
//!
//! Every file may be missing or unreadable (the process just exited; `stack` needs CAP_SYS_ADMIN, `syscall`
//! ptrace access): each part is then `None`, and the event says less rather than nothing.

use std::fmt;

/// What `/proc/PID/stat` says that the event uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// The state letter (R, S, D, T, t, Z, X, I...).
    pub(crate) state: char,
    /// utime + stime, in clock ticks.
    pub(crate) cpu_ticks: u64,
}

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses and may hold spaces and
/// parentheses itself, so the fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (proc(5)), so indexes 0, 11 and 12.
    let state = fields.first()?.chars().next()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Stat {
        state,
        cpu_ticks: utime.saturating_add(stime),
    })
}

/// The name proc(5) gives a state letter.
pub(crate) fn state_name(state: char) -> &'static str {
    match state {
        'R' => "running",
        'S' => "sleeping",
        'D' => "disk sleep",
        'T' => "stopped",
        't' => "tracing stop",
        'Z' => "zombie",
        'X' => "dead",
        'I' => "idle",
        'P' => "parked",
        'W' => "waking",
        'K' => "wakekill",
        _ => "unknown",
    }
}

/// What `/proc/PID/syscall` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Syscall {
    /// On a CPU in user space: no system call to show.
    Running,
    /// Blocked, but not in a system call (in a page fault, for one).
    Outside,
    /// Blocked in system call `nr` with these six arguments.
    In { nr: u64, args: [u64; 6] },
}

impl Syscall {
    /// The system call's number, if it is in one.
    pub(crate) fn number(&self) -> Option<u64> {
        match self {
            Syscall::In { nr, .. } => Some(*nr),
            _ => None,
        }
    }
}

/// `clock_nanosleep(0x1, 0x1, 0x7ffe3b3ce7a0, 0x0, 0x0, 0x0)`; the number when its name is unknown here.
impl fmt::Display for Syscall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Syscall::Running => f.write_str("running (in user space)"),
            Syscall::Outside => f.write_str("blocked outside a system call"),
            Syscall::In { nr, args } => {
                match syscall_name(*nr) {
                    Some(name) => f.write_str(name)?,
                    None => write!(f, "syscall_{nr}")?,
                }
                let args: Vec<String> = args.iter().map(|a| format!("{a:#x}")).collect();
                write!(f, "({})", args.join(", "))
            }
        }
    }
}

/// Parses `/proc/PID/syscall`: `running`, `-1 SP PC`, or `NR ARG1..ARG6 SP PC` (the number in decimal,
/// the rest in hex).
pub(crate) fn parse_syscall(text: &str) -> Option<Syscall> {
    let mut fields = text.split_whitespace();
    let first = fields.next()?;
    if first == "running" {
        return Some(Syscall::Running);
    }
    if first == "-1" {
        return Some(Syscall::Outside);
    }
    let nr: u64 = first.parse().ok()?;
    let mut args = [0u64; 6];
    for a in &mut args {
        let f = fields.next()?;
        *a = u64::from_str_radix(f.trim_start_matches("0x"), 16).ok()?;
    }
    Some(Syscall::In { nr, args })
}

/// The system call's name for this machine's architecture, from the kernel's tables (`syscall-numbers`).
pub(crate) fn syscall_name(nr: u64) -> Option<&'static str> {
    syscall_numbers::native::sys_call_name(std::ffi::c_long::try_from(nr).ok()?)
}

/// The kernel stack from `/proc/PID/stack` without the `[<0>] ` address column (zero without
/// CAP_SYSLOG anyway): `hrtimer_nanosleep+0x74/0xf0 <- common_nsleep_timens+0x3d/0xa0 <- ...`.
pub(crate) fn parse_stack(text: &str) -> Option<String> {
    let frames: Vec<&str> = text
        .lines()
        .map(|l| match l.find("] ") {
            Some(i) if l.starts_with('[') => &l[i + 2..],
            _ => l,
        })
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    (!frames.is_empty()).then(|| frames.join(" <- "))
}

/// The resident set from `/proc/PID/status`, in bytes.
pub(crate) fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Threads beyond the first shown in the event, at the most.
const MAX_THREADS: usize = 32;

/// One look at a process: its main thread (the pid's own files), its CPU time and RSS (the whole
/// process), and what each of its other threads is doing, since many workers serve a request on a thread
/// that is not the main one (flup's thread pool, even with `multithreaded=False`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Sample {
    pub(crate) stat: Option<Stat>,
    pub(crate) wchan: Option<String>,
    pub(crate) syscall: Option<Syscall>,
    pub(crate) stack: Option<String>,
    pub(crate) rss_bytes: Option<u64>,
    /// The other threads, by thread id (empty for a single-threaded worker).
    pub(crate) threads: Vec<ThreadSample>,
}

/// What one thread is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ThreadSample {
    pub(crate) tid: u32,
    pub(crate) state: Option<char>,
    pub(crate) wchan: Option<String>,
    pub(crate) syscall: Option<Syscall>,
}

/// `31914 S hrtimer_nanosleep clock_nanosleep(0x1, ...)`, `-` for what could not be read.
impl fmt::Display for ThreadSample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} ",
            self.tid,
            self.state.unwrap_or('-'),
            self.wchan.as_deref().unwrap_or("-")
        )?;
        match &self.syscall {
            Some(s) => write!(f, "{s}"),
            None => f.write_str("-"),
        }
    }
}

/// The event's `threads` field: one thread a line.
pub(crate) fn threads_text(threads: &[ThreadSample]) -> Option<String> {
    (!threads.is_empty()).then(|| {
        threads
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    })
}

fn read_wchan(path: &str) -> Option<String> {
    // "0" is what the kernel says for a task on a CPU (or when it hides the symbol).
    std::fs::read_to_string(path)
        .ok()
        .filter(|w| !w.is_empty() && w != "0")
}

/// The threads of `pid` other than the main one, lowest id first, at most [`MAX_THREADS`].
fn other_threads(pid: u32) -> Vec<ThreadSample> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut tids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|t| *t != pid)
        .collect();
    tids.sort_unstable();
    tids.truncate(MAX_THREADS);
    tids.into_iter()
        .map(|tid| {
            let base = format!("/proc/{pid}/task/{tid}");
            let text = |f: &str| std::fs::read_to_string(format!("{base}/{f}")).ok();
            ThreadSample {
                tid,
                state: text("stat")
                    .as_deref()
                    .and_then(parse_stat)
                    .map(|s| s.state),
                wchan: read_wchan(&format!("{base}/wchan")),
                syscall: text("syscall").as_deref().and_then(parse_syscall),
            }
        })
        .collect()
}

fn read(pid: u32, file: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()
}

/// Just the CPU time so far, in clock ticks: read when a request starts, to tell what it used.
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    parse_stat(&read(pid, "stat")?).map(|s| s.cpu_ticks)
}

/// Reads everything the event shows (blocking: a few small files in /proc).
pub(crate) fn sample(pid: u32) -> Sample {
    Sample {
        stat: read(pid, "stat").as_deref().and_then(parse_stat),
        wchan: read_wchan(&format!("/proc/{pid}/wchan")),
        syscall: read(pid, "syscall").as_deref().and_then(parse_syscall),
        stack: read(pid, "stack").as_deref().and_then(parse_stack),
        rss_bytes: read(pid, "status").as_deref().and_then(parse_rss),
        threads: other_threads(pid),
    }
}

/// Clock ticks per second, the unit of `/proc/PID/stat`'s times (USER_HZ, 100 almost everywhere).
pub(crate) fn ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_a_name_holding_spaces_and_parentheses() {
        let text = "4242 (python3 (x) y) S 1 4242 4242 0 -1 4194560 1200 0 0 0 37 5 0 0 20 0 1 0 \
                    123456 20000000 2500 18446744073709551615 1 1 0 0 0 0 0 16781312 2 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                state: 'S',
                cpu_ticks: 42
            })
        );
        assert_eq!(parse_stat("4242 (x) R 1"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
        assert_eq!(state_name('D'), "disk sleep");
    }

    #[test]
    fn syscall_in_a_call_running_and_outside() {
        let text = "230 0x1 0x1 0x7ffe3b3ce7a0 0x0 0x0 0x0 0x7ffe3b3ce788 0x7fda0c6ed503\n";
        let s = parse_syscall(text).unwrap();
        assert_eq!(s.number(), Some(230));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                s.to_string(),
                "clock_nanosleep(0x1, 0x1, 0x7ffe3b3ce7a0, 0x0, 0x0, 0x0)"
            );
        }
        assert_eq!(parse_syscall("running\n"), Some(Syscall::Running));
        assert_eq!(
            parse_syscall("-1 0x7ffe3b3ce788 0x7fda0c6ed503"),
            Some(Syscall::Outside)
        );
        assert_eq!(parse_syscall("230 0x1"), None);
        assert_eq!(parse_syscall(""), None);
        assert_eq!(
            Syscall::In {
                nr: 99_999,
                args: [0; 6]
            }
            .to_string(),
            "syscall_99999(0x0, 0x0, 0x0, 0x0, 0x0, 0x0)"
        );
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn common_x86_64_names() {
        for (nr, name) in [
            (0, "read"),
            (1, "write"),
            (7, "poll"),
            (43, "accept"),
            (45, "recvfrom"),
            (61, "wait4"),
            (202, "futex"),
            (232, "epoll_wait"),
            (288, "accept4"),
        ] {
            assert_eq!(syscall_name(nr), Some(name));
        }
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn kernel_stack_and_rss() {
        let stack = "[<0>] hrtimer_nanosleep+0x74/0xf0\n[<0>] common_nsleep_timens+0x3d/0xa0\n\
                     [<0>] do_syscall_64+0x71/0x280\n";
        assert_eq!(
            parse_stack(stack).as_deref(),
            Some("hrtimer_nanosleep+0x74/0xf0 <- common_nsleep_timens+0x3d/0xa0 <- do_syscall_64+0x71/0x280")
        );
        assert_eq!(parse_stack(""), None);
        assert_eq!(parse_rss("Name:\tx\nVmRSS:\t   10240 kB\n"), Some(10 << 20));
        assert_eq!(parse_rss("Name:\tx\n"), None);
    }

    #[test]
    fn threads_one_a_line() {
        let t = [
            ThreadSample {
                tid: 7,
                state: Some('S'),
                wchan: Some("hrtimer_nanosleep".into()),
                syscall: parse_syscall("230 0x1 0x1 0x2 0x0 0x0 0x0 0x0 0x0"),
            },
            ThreadSample {
                tid: 8,
                state: None,
                wchan: None,
                syscall: None,
            },
        ];
        let text = threads_text(&t).unwrap();
        assert!(text.starts_with("7 S hrtimer_nanosleep "), "{text}");
        assert!(text.ends_with("\n8 - - -"), "{text}");
        assert_eq!(threads_text(&[]), None);
    }

    #[test]
    fn sample_of_this_process() {
        // A second thread, asleep, to be found among the others.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::spawn(move || rx.recv());
        std::thread::sleep(std::time::Duration::from_millis(50));
        let s = sample(std::process::id());
        assert!(s.threads.iter().any(|t| t.state == Some('S')), "{s:?}");
        drop(tx);
        let _ = sleeper.join();
        assert!(s.stat.is_some());
        assert!(s.rss_bytes.unwrap_or(0) > 0);
        assert!(cpu_ticks(std::process::id()).is_some());
        assert!(ticks_per_second() >= 1);
    }
}
