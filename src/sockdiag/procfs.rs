//! What `/proc` adds to the kernel's dump: who owns each socket, somaxconn, and the listen counters.
//!
//! Every function takes the `/proc` root so the tests can hand it a fake one. Nothing here fails: a file
//! we may not read (another user's `/proc/PID/fd`, a process that exits mid-scan) only leaves a blank.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;

pub(crate) const PROC: &str = "/proc";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub pid: u32,
    pub name: Option<String>,
}

pub(crate) fn somaxconn(proc_root: &str) -> Option<u32> {
    let text = fs::read_to_string(Path::new(proc_root).join("sys/net/core/somaxconn")).ok()?;
    text.trim().parse().ok()
}

pub(crate) fn listen_counters(proc_root: &str) -> Option<(u64, u64)> {
    parse_netstat(&fs::read_to_string(Path::new(proc_root).join("net/netstat")).ok()?)
}

/// `/proc/net/netstat` comes in pairs of lines, names then values, each starting with its group; the
/// columns differ between kernels, so they are found by name.
pub(crate) fn parse_netstat(text: &str) -> Option<(u64, u64)> {
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.windows(2) {
        let (Some(names), Some(values)) = (
            pair[0].strip_prefix("TcpExt:"),
            pair[1].strip_prefix("TcpExt:"),
        ) else {
            continue;
        };
        let row: HashMap<&str, &str> = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .collect();
        let get = |name: &str| row.get(name)?.parse::<u64>().ok();
        if let (Some(overflows), Some(drops)) = (get("ListenOverflows"), get("ListenDrops")) {
            return Some((overflows, drops));
        }
    }
    None
}

/// The inode in a `/proc/PID/fd/N` link target, `socket:[12345]`.
fn socket_inode(target: &Path) -> Option<u64> {
    let s = target.to_str()?;
    s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// The parent pid from `/proc/PID/stat`, read after the last `)` since the command name may hold any
/// character, spaces and parentheses included.
fn parent_of(proc_root: &Path, pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

fn process_name(proc_root: &Path, pid: u32) -> Option<String> {
    let comm = fs::read_to_string(proc_root.join(pid.to_string()).join("comm")).ok()?;
    let comm = comm.trim_end_matches('\n');
    (!comm.is_empty()).then(|| comm.to_string())
}

/// The owner of each wanted socket inode that some readable `/proc/PID/fd` holds.
///
/// A pre-forking server (Apache, gunicorn, php-fpm, Starman) shares one listening socket among its master
/// and every worker; the master is the one to name, so among the holders we pick one whose parent does
/// not hold it too (the lowest pid if several do), rather than whichever worker the scan met first.
pub(crate) fn owners(proc_root: &str, wanted: &HashSet<u64>) -> HashMap<u64, Owner> {
    let proc_root = Path::new(proc_root);
    let mut holders: HashMap<u64, Vec<u32>> = HashMap::new();
    if wanted.is_empty() {
        return HashMap::new();
    }
    let Ok(procs) = fs::read_dir(proc_root) else {
        return HashMap::new();
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Some(inode) = fs::read_link(fd.path()).ok().and_then(|t| socket_inode(&t)) {
                if wanted.contains(&inode) {
                    let pids = holders.entry(inode).or_default();
                    // Two descriptors of one process on the same socket (dup) count once.
                    if pids.last() != Some(&pid) {
                        pids.push(pid);
                    }
                }
            }
        }
    }
    let mut parents: HashMap<u32, Option<u32>> = HashMap::new();
    holders
        .into_iter()
        .map(|(inode, mut pids)| {
            pids.sort_unstable();
            let holds = |p: Option<u32>| p.is_some_and(|p| pids.binary_search(&p).is_ok());
            let root = pids
                .iter()
                .copied()
                .find(|&pid| {
                    let parent = *parents
                        .entry(pid)
                        .or_insert_with(|| parent_of(proc_root, pid));
                    !holds(parent)
                })
                .unwrap_or(pids[0]);
            let owner = Owner {
                pid: root,
                name: process_name(proc_root, root),
            };
            (inode, owner)
        })
        .collect()
}

/// The processes in the tree under `root` (itself included) that hold socket `inode`, by pid, with their
/// names: who may accept on a socket handed to `root`. Costs a read of every process's `stat` and a
/// readlink per descriptor of the tree's processes.
pub(crate) fn tree_holders(proc_root: &str, root: u32, inode: u64) -> Vec<Owner> {
    let proc_root = Path::new(proc_root);
    let Ok(procs) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(parent) = parent_of(proc_root, pid) {
            children.entry(parent).or_default().push(pid);
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while let Some(&pid) = tree.get(i) {
        tree.extend(children.get(&pid).into_iter().flatten().copied());
        i += 1;
    }
    let holds = |pid: u32| {
        fs::read_dir(proc_root.join(pid.to_string()).join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| fs::read_link(fd.path()).ok().and_then(|t| socket_inode(&t)) == Some(inode))
    };
    let mut found: Vec<Owner> = tree
        .into_iter()
        .filter(|&pid| holds(pid))
        .map(|pid| Owner {
            pid,
            name: process_name(proc_root, pid),
        })
        .collect();
    found.sort_by_key(|o| o.pid);
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const NETSTAT: &str = "\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPHPHits
TcpExt: 0 0 17 23 5
IpExt: InNoRoutes ListenOverflows
IpExt: 0 99
MPTcpExt: MPCapableSYNRX
MPTcpExt: 0
";

    #[test]
    fn netstat_counters_are_found_by_name() {
        assert_eq!(parse_netstat(NETSTAT), Some((17, 23)));
        assert_eq!(parse_netstat(""), None);
        assert_eq!(parse_netstat("TcpExt: ListenOverflows ListenDrops\n"), None);
        assert_eq!(
            parse_netstat("TcpExt: ListenOverflows ListenDrops\nTcpExt: 1 x\n"),
            None
        );
        // Values first (a torn read) must not be taken for names.
        assert_eq!(
            parse_netstat("TcpExt: 1 2\nTcpExt: ListenOverflows ListenDrops\nTcpExt: 3 4\n"),
            Some((3, 4))
        );
        assert_eq!(
            parse_netstat("TcpExt: ListenDrops\nTcpExt: 18446744073709551615\n"),
            None
        );
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode(Path::new("socket:[12345]")), Some(12345));
        assert_eq!(socket_inode(Path::new("socket:[]")), None);
        assert_eq!(socket_inode(Path::new("pipe:[12345]")), None);
        assert_eq!(socket_inode(Path::new("/dev/null")), None);
    }

    fn fake_process(root: &Path, pid: u32, ppid: u32, comm: &str, sockets: &[u64]) {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).unwrap();
        fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        fs::write(
            dir.join("stat"),
            format!("{pid} ({comm}) S {ppid} 1 1 0 -1 4194560"),
        )
        .unwrap();
        symlink("/dev/null", dir.join("fd/0")).unwrap();
        symlink("pipe:[7]", dir.join("fd/1")).unwrap();
        for (i, inode) in sockets.iter().enumerate() {
            symlink(
                format!("socket:[{inode}]"),
                dir.join(format!("fd/{}", i + 3)),
            )
            .unwrap();
        }
    }

    #[test]
    fn tree_holders_are_the_root_and_its_descendants_only() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // A manager (600) whose child (601) and grandchild (602) share its socket 30; an unrelated
        // process (700) holds 30 too, and a child (603) holds nothing.
        fake_process(root, 600, 1, "perl-fcgi-pm", &[30]);
        fake_process(root, 601, 600, "perl-fcgi", &[30]);
        fake_process(root, 602, 601, "perl-fcgi", &[30, 31]);
        fake_process(root, 603, 600, "sh", &[]);
        fake_process(root, 700, 1, "other", &[30]);
        let r = root.to_str().unwrap();
        let pids: Vec<u32> = tree_holders(r, 600, 30).iter().map(|o| o.pid).collect();
        assert_eq!(pids, [600, 601, 602]);
        assert_eq!(
            tree_holders(r, 600, 30)[1].name.as_deref(),
            Some("perl-fcgi")
        );
        assert!(tree_holders(r, 603, 30).is_empty());
        assert!(tree_holders("/nonexistent", 1, 30).is_empty());
    }

    #[test]
    fn owners_name_the_master_of_a_preforking_server() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // A master (pid 500) and its workers share socket 10; an unrelated process holds 20 twice.
        fake_process(root, 500, 1, "gunicorn", &[10]);
        fake_process(root, 501, 500, "gunicorn: work", &[10]);
        fake_process(root, 300, 500, "gunicorn: work", &[10]);
        fake_process(root, 42, 1, "we (odd) name)", &[20, 20]);
        fake_process(root, 43, 1, "other", &[30]);
        fs::create_dir_all(root.join("self")).unwrap();
        fs::write(root.join("uptime"), "1 1").unwrap();
        let wanted: HashSet<u64> = [10, 20, 99].into();
        let got = owners(root.to_str().unwrap(), &wanted);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[&10],
            Owner {
                pid: 500,
                name: Some("gunicorn".into())
            }
        );
        assert_eq!(got[&20].pid, 42);
        assert_eq!(got[&20].name.as_deref(), Some("we (odd) name)"));
        assert_eq!(parent_of(root, 42), Some(1));
    }

    #[test]
    fn unreadable_or_missing_proc_leaves_blanks() {
        let wanted: HashSet<u64> = [1].into();
        assert!(owners("/nonexistent/proc", &wanted).is_empty());
        assert_eq!(somaxconn("/nonexistent/proc"), None);
        assert_eq!(listen_counters("/nonexistent/proc"), None);
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // No comm (the process exited mid-scan): the pid is still worth showing.
        fake_process(root, 7, 1, "x", &[1]);
        fs::remove_file(root.join("7/comm")).unwrap();
        fs::remove_file(root.join("7/stat")).unwrap();
        let got = owners(root.to_str().unwrap(), &wanted);
        assert_eq!(got[&1], Owner { pid: 7, name: None });
    }

    #[test]
    fn the_real_proc_has_somaxconn() {
        assert!(somaxconn(PROC).is_some_and(|n| n > 0));
    }
}
