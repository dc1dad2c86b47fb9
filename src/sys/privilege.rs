//! Least privilege: looking up accounts, what a worker's child does to become `--user` with its resource
//! limits, and anteroom giving up root itself (`--drop-privileges`).
//!
//! Everything that can allocate, read a file or ask NSS (the account and its groups, resource names) is
//! resolved before fork, in the parent; the child only makes single system calls on data it was handed.
//! rustix's `set_thread_*` calls change the credentials of the calling thread only, which after fork is the
//! whole process: exactly right in the child, and async-signal-safe (no lock, unlike glibc's setuid, which
//! signals every thread). anteroom's own drop is the opposite case: by then it runs many threads, so it goes
//! through libc, whose setgroups, setgid and setuid change every thread of the process.

use std::ffi::{CStr, CString};
use std::io;
use std::path::PathBuf;

use rustix::process::{Gid, Resource, Rlimit, Uid};
use tokio::process::Command;

/// An account that workers (and anteroom, with `--drop-privileges`) run as, resolved at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    /// The primary group: `--group`, else the account's own.
    pub gid: u32,
    /// Every group the process gets (initgroups: the account's supplementary groups and `gid`).
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

/// The resources `--worker-rlimit` knows, by the names php-fpm and prlimit(1) use (`rlimit_files` is
/// `nofile` here, as in limits.conf).
const RESOURCES: &[(&str, Resource)] = &[
    ("as", Resource::As),
    ("core", Resource::Core),
    ("cpu", Resource::Cpu),
    ("data", Resource::Data),
    ("fsize", Resource::Fsize),
    ("locks", Resource::Locks),
    ("memlock", Resource::Memlock),
    ("msgqueue", Resource::Msgqueue),
    ("nice", Resource::Nice),
    ("nofile", Resource::Nofile),
    ("nproc", Resource::Nproc),
    ("rss", Resource::Rss),
    ("rtprio", Resource::Rtprio),
    ("rttime", Resource::Rttime),
    ("sigpending", Resource::Sigpending),
    ("stack", Resource::Stack),
];

/// The names `--worker-rlimit` accepts.
pub fn rlimit_names() -> impl Iterator<Item = &'static str> {
    RESOURCES.iter().map(|(n, _)| *n)
}

fn resource(name: &str) -> Option<Resource> {
    RESOURCES.iter().find(|(n, _)| *n == name).map(|(_, r)| *r)
}

/// The hard limit of `name` in this process now (None: unlimited), if `name` is a resource.
pub fn hard_limit(name: &str) -> Option<Option<u64>> {
    resource(name).map(|r| rustix::process::getrlimit(r).maximum)
}

/// Runs `f` with a buffer that grows while the libc call says ERANGE.
fn with_buffer<T>(mut f: impl FnMut(&mut [libc::c_char]) -> Result<T, i32>) -> io::Result<T> {
    let mut len = 1024;
    loop {
        let mut buf = vec![0 as libc::c_char; len];
        match f(&mut buf) {
            Ok(v) => return Ok(v),
            Err(libc::ERANGE) if len < 1 << 20 => len *= 4,
            Err(e) => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The account named `user`, or with that uid when `user` is a number; None if there is none. Asks NSS
/// (getpwnam_r), so LDAP and systemd's dynamic users count, not only /etc/passwd.
pub fn lookup_user(user: &str) -> io::Result<Option<(String, u32, u32, PathBuf)>> {
    let name = CString::new(user).map_err(|_| io::ErrorKind::InvalidInput)?;
    let by_uid = user.parse::<u32>().ok();
    with_buffer(|buf| {
        // SAFETY: `pw`, `buf` and `name` outlive the call, `buf.len()` is its true length, and the strings
        // that `pw` points to live in `buf`, which is read before it is dropped.
        unsafe {
            let mut pw: libc::passwd = std::mem::zeroed();
            let mut found: *mut libc::passwd = std::ptr::null_mut();
            let rc = match by_uid {
                Some(uid) => {
                    libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found)
                }
                None => libc::getpwnam_r(
                    name.as_ptr(),
                    &mut pw,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut found,
                ),
            };
            if rc != 0 {
                return Err(rc);
            }
            if found.is_null() {
                return Ok(None);
            }
            let s = |p: *const libc::c_char| CStr::from_ptr(p).to_string_lossy().into_owned();
            Ok(Some((
                s(pw.pw_name),
                pw.pw_uid,
                pw.pw_gid,
                PathBuf::from(s(pw.pw_dir)),
            )))
        }
    })
}

/// The gid of the group named `group`, or `group` itself when it is a number of an existing group; None if
/// there is none.
pub fn lookup_group(group: &str) -> io::Result<Option<u32>> {
    let name = CString::new(group).map_err(|_| io::ErrorKind::InvalidInput)?;
    let by_gid = group.parse::<u32>().ok();
    with_buffer(|buf| {
        // SAFETY: as in `lookup_user`: every pointer handed over outlives the call, and only the gid is read.
        unsafe {
            let mut gr: libc::group = std::mem::zeroed();
            let mut found: *mut libc::group = std::ptr::null_mut();
            let rc = match by_gid {
                Some(gid) => {
                    libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut found)
                }
                None => libc::getgrnam_r(
                    name.as_ptr(),
                    &mut gr,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut found,
                ),
            };
            if rc != 0 {
                return Err(rc);
            }
            Ok((!found.is_null()).then_some(gr.gr_gid))
        }
    })
}

/// What initgroups(3) would set for `user` with primary group `gid`: its supplementary groups and `gid`.
pub fn group_list(user: &str, gid: u32) -> io::Result<Vec<u32>> {
    let name = CString::new(user).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `groups` has room for `n` entries; getgrouplist writes at most that many and sets `n` to
        // how many there are (more than the room when it returns -1).
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        let n = usize::try_from(n).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        if n <= groups.len() || n > 1 << 16 {
            return Err(io::Error::other("getgrouplist failed"));
        }
        groups.resize(n, 0);
    }
}

/// A resource limit for a worker, as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerLimit {
    pub name: &'static str,
    /// None: unlimited.
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// The resource `name` under its static name, if it is one.
pub fn rlimit_name(name: &str) -> Option<&'static str> {
    RESOURCES.iter().find(|(n, _)| *n == name).map(|(n, _)| *n)
}

/// In the child, before exec: set each of `limits`, then become `account` (supplementary groups, then the
/// gid, then the uid: each later step needs the privilege the earlier ones use). A child that already runs
/// as the account's uid (anteroom dropped its privileges, or was started as that user) keeps its ids.
///
/// Must be added before `die_with_parent_in_own_group`: the kernel clears the parent-death signal when
/// the credentials change.
pub fn confine(cmd: &mut Command, account: Option<&Account>, limits: &[WorkerLimit]) {
    // Everything the child needs, made here, before fork.
    let limits: Vec<(Resource, Rlimit)> = limits
        .iter()
        .filter_map(|l| {
            Some((
                resource(l.name)?,
                Rlimit {
                    current: l.soft,
                    maximum: l.hard,
                },
            ))
        })
        .collect();
    let ids = account.map(|a| {
        (
            Uid::from_raw(a.uid),
            Gid::from_raw(a.gid),
            a.groups
                .iter()
                .map(|g| Gid::from_raw(*g))
                .collect::<Vec<Gid>>(),
        )
    });
    if limits.is_empty() && ids.is_none() {
        return;
    }
    // SAFETY: between fork and exec the closure makes only single system calls through rustix (prlimit64,
    // getuid, setgroups, setresgid, setresuid), on data made before fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Limits first: raising a hard limit needs the privilege that the uid change gives up.
            for (resource, lim) in &limits {
                rustix::process::setrlimit(*resource, *lim)?;
            }
            if let Some((uid, gid, groups)) = &ids {
                if rustix::process::getuid() != *uid {
                    rustix::thread::set_thread_groups(groups)?;
                    rustix::thread::set_thread_res_gid(*gid, *gid, *gid)?;
                    rustix::thread::set_thread_res_uid(*uid, *uid, *uid)?;
                }
            }
            Ok(())
        });
    }
}

/// anteroom itself becomes `account`, for good: every thread, real, effective and saved ids, with the
/// account's groups. Checked afterwards: root can no longer be regained.
pub fn become_account(account: &Account) -> io::Result<()> {
    let groups: Vec<libc::gid_t> = account.groups.clone();
    // SAFETY: plain calls with a pointer to `groups`, which outlives them. glibc applies each to every
    // thread of the process (the runtime's threads exist already), which rustix's thread calls would not.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0
            || libc::setgid(account.gid) != 0
            || libc::setuid(account.uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    let uid = rustix::process::getuid().as_raw();
    let euid = rustix::process::geteuid().as_raw();
    // SAFETY: setuid(0) takes no pointer; it must fail now, and if it does not we say so and stop.
    let regained = account.uid != 0 && unsafe { libc::setuid(0) } == 0;
    if uid != account.uid || euid != account.uid || regained {
        return Err(io::Error::other(
            "the process still has root's ids after dropping them",
        ));
    }
    Ok(())
}

/// The real user id of this process.
pub fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The real group id of this process.
pub fn gid() -> u32 {
    rustix::process::getgid().as_raw()
}

/// Sets the file mode creation mask, returning the old one.
pub fn umask(mask: u32) -> u32 {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask)).as_raw_mode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_missing_accounts() {
        let (name, uid, gid, home) = lookup_user("root").unwrap().unwrap();
        assert_eq!((name.as_str(), uid, gid), ("root", 0, 0));
        assert_eq!(home, PathBuf::from("/root"));
        assert_eq!(lookup_user("0").unwrap().unwrap().0, "root");
        assert_eq!(lookup_user("no-such-user-anteroom").unwrap(), None);
        assert_eq!(lookup_group("root").unwrap(), Some(0));
        assert_eq!(lookup_group("no-such-group-anteroom").unwrap(), None);
        assert!(group_list("root", 0).unwrap().contains(&0));
        assert!(lookup_user("a\0b").is_err());
    }

    #[test]
    fn resources() {
        assert_eq!(rlimit_name("nofile"), Some("nofile"));
        assert_eq!(rlimit_name("files"), None);
        assert!(hard_limit("core").is_some());
        assert_eq!(rlimit_names().count(), RESOURCES.len());
    }
}
