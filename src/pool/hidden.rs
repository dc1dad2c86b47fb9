//! Workers that hide their processes: said once per slot, with the likely cause and its fix.
//!
//! anteroom hands each worker one request at a time and learns of a death from the exit of the process it
//! spawned. A worker that is itself a process manager (FCGI::ProcManager, which `plackup -s FCGI` starts
//! unless given `--manager=`; php-cgi with `PHP_FCGI_CHILDREN`; gunicorn with `-w N`, N > 1) accepts in
//! processes of its own: when one of them dies the manager replaces it and nobody tells anteroom, so the
//! request it held shows only as a connection closed before the first byte of the response (which the
//! serve loop treats as a close event and retries once), and the extra processes cost memory for nothing,
//! since anteroom sends one request at a time anyway.
//!
//! Who accepts is read from `/proc` (`sockdiag::tree_holders`): the processes under the spawned one that
//! hold its listening socket. gunicorn's arbiter with one worker (`-w 1`) is its normal shape and is what
//! the README recommends, so that alone is not reported.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Managers fork their children right after starting; the look waits this long after readiness so that
/// they all exist.
const SETTLE: Duration = Duration::from_millis(200);

/// A likely cause and its fix.
#[derive(Debug, PartialEq, Eq)]
struct Diagnosis {
    cause: &'static str,
    fix: &'static str,
}

/// Looks, once the worker is ready and in the background, at who accepts on its socket; warns at most once
/// per slot (`warned` is the slot's).
pub(super) fn check(slot: usize, pid: u32, inode: u64, argv: &[String], warned: Arc<AtomicBool>) {
    if warned.load(Ordering::Relaxed) || pid == 0 {
        return;
    }
    let argv = argv.to_vec();
    tokio::spawn(async move {
        tokio::time::sleep(SETTLE).await;
        let holders =
            match tokio::task::spawn_blocking(move || crate::sockdiag::tree_holders(pid, inode))
                .await
            {
                Ok(h) => h,
                Err(_) => return,
            };
        let others: Vec<_> = holders.iter().filter(|h| h.pid != pid).collect();
        let names: Vec<&str> = others.iter().filter_map(|h| h.name.as_deref()).collect();
        let Some(d) = diagnose(&argv, others.len(), &names) else {
            return;
        };
        if warned.swap(true, Ordering::Relaxed) {
            return;
        }
        let pids: Vec<u32> = others.iter().map(|h| h.pid).collect();
        tracing::warn!(
            slot,
            pid,
            accepting = ?pids,
            "the worker hides its processes: {} process(es) of its own accept on its socket, not the one anteroom started, so anteroom cannot see them die and they only cost memory (it sends one request at a time); likely cause: {}; fix: {}",
            pids.len(),
            d.cause,
            d.fix
        );
    });
}

/// Why `others` processes besides the spawned one hold its socket, if that is a problem.
fn diagnose(argv: &[String], others: usize, names: &[&str]) -> Option<Diagnosis> {
    if others == 0 {
        return None;
    }
    let base = |a: &String| {
        Path::new(a)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string()
    };
    let words: Vec<String> = argv.iter().map(base).collect();
    let any = |f: &dyn Fn(&str) -> bool| words.iter().any(|w| f(w)) || names.iter().any(|n| f(n));
    if any(&|w| w.contains("gunicorn")) {
        // The arbiter and one worker: gunicorn's shape with -w 1.
        return (others > 1).then_some(Diagnosis {
            cause: "gunicorn runs several workers (-w N with N > 1)",
            fix: "give gunicorn one worker (-w 1) and set anteroom's --workers instead",
        });
    }
    if any(&|w| w == "plackup" || w.starts_with("perl-fcgi")) {
        return Some(Diagnosis {
            cause: "plackup -s FCGI starts an FCGI::ProcManager",
            fix: "run plackup with --manager= (empty), so that it serves in one process",
        });
    }
    if any(&|w| w.starts_with("php")) {
        return Some(Diagnosis {
            cause: "PHP_FCGI_CHILDREN is set, so php-cgi forks children of its own",
            fix: "unset PHP_FCGI_CHILDREN (anteroom is the process manager)",
        });
    }
    Some(Diagnosis {
        cause: "the worker is a process manager of its own (pre-forking)",
        fix: "make it serve in one process and set anteroom's --workers instead",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn causes_are_named() {
        let plack = diagnose(&argv("plackup -s FCGI app.psgi"), 1, &["perl-fcgi"]).unwrap();
        assert!(plack.fix.contains("--manager="), "{plack:?}");
        let php = diagnose(&argv("/usr/bin/php-cgi"), 4, &["php-cgi"]).unwrap();
        assert!(php.fix.contains("PHP_FCGI_CHILDREN"), "{php:?}");
        let guni = diagnose(&argv("gunicorn -w 4 app:app"), 4, &["gunicorn"]).unwrap();
        assert!(guni.fix.contains("-w 1"), "{guni:?}");
        let other = diagnose(&argv("./server"), 2, &[]).unwrap();
        assert!(other.cause.contains("process manager"), "{other:?}");
    }

    #[test]
    fn one_process_or_gunicorn_with_one_worker_is_fine() {
        assert_eq!(
            diagnose(&argv("plackup -s FCGI --manager= app.psgi"), 0, &[]),
            None
        );
        assert_eq!(
            diagnose(&argv("gunicorn -w 1 app:app"), 1, &["gunicorn"]),
            None
        );
    }
}
