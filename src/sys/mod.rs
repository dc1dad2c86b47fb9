//! The only room with `unsafe`: every call to the operating system that is not plain `std`, each behind a
//! small safe function, so that the rest of the crate can `#![deny(unsafe_code)]` (see `lib.rs`) and a
//! reviewer finds all of it here.
//!
//! rustix makes most of these calls safe already: it is in the tree anyway (tempfile uses it), it types
//! signals, pids, rlimits and netlink addresses, and on Linux it makes the system call itself rather than
//! through libc, which also keeps it async-signal-safe between fork and exec. libc is left only where rustix
//! has no call (`sched_setscheduler`, `malloc_trim`, `_exit`) or where using rustix would take more unsafe
//! code than it saves (the child's fd 3 before exec, the demo worker's fd 0, the descriptors passed by
//! systemd or by the anteroom being upgraded: `passfd`).

pub mod alloc;
pub mod exit;
pub mod fd;
pub mod memory;
pub mod netlink;
pub mod passfd;
pub mod privilege;
pub mod process;
pub mod rlimit;
pub mod sched;
