//! Scheduling priority of the calling thread.

use std::io;

/// Asks for the lowest real-time priority (SCHED_FIFO 1) for the calling thread, or failing that (no
/// CAP_SYS_NICE, or a container without a real-time budget) nice -10. The error is the second attempt's.
pub fn raise_thread_priority() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler on the calling thread (0) only reads `param`, which lives across the
    // call. rustix has no sched_setscheduler.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        return Ok(());
    }
    // On Linux a nice value belongs to a thread: PRIO_PROCESS with the thread's id.
    rustix::process::setpriority_process(Some(rustix::thread::gettid()), -10)?;
    Ok(())
}
