//! Puts the git revision into `anteroom --version` (`anteroom 0.1.0 (git 3f9c26fe2257)`, `-dirty` after it
//! when tracked files differ from that commit), so that a binary on a server says which code it is.
//!
//! Without a revision to tell, the version alone (`anteroom 0.1.0`): no `git` on the machine, or a build from
//! a crate tarball or any copy of the source without its `.git`. A copy unpacked inside some other
//! repository (vendored) must not take that repository's revision, so git is asked only when this crate's
//! directory is the top of its work tree. A packager with no `.git` but a known revision can set
//! `ANTEROOM_GIT_REVISION` (the Dockerfile does, from a build argument).
//!
//! The build script runs again when HEAD moves (a commit, a checkout: `HEAD`, the ref it points to,
//! `packed-refs`), when the index changes, and when the sources change, so that `-dirty` is true of the
//! binary it is compiled into. git is run with `--no-optional-locks`: a `git status` that refreshed the index
//! would otherwise change it during the build and make every later build start over.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ANTEROOM_GIT_REVISION");
    let revision = std::env::var("ANTEROOM_GIT_REVISION")
        .ok()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .or_else(git_revision);
    let full = match revision {
        Some(r) => format!("{version} (git {r})"),
        None => version,
    };
    println!("cargo:rustc-env=ANTEROOM_VERSION={full}");
}

/// The short revision of HEAD, with `-dirty` when tracked files differ from it; `None` when this crate is not
/// the top of a git work tree or git cannot tell.
fn git_revision() -> Option<String> {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let top = git(&dir, &["rev-parse", "--show-toplevel"])?;
    if Path::new(&top).canonicalize().ok()? != dir.canonicalize().ok()? {
        return None;
    }
    // Paths from --git-path are right for a linked worktree too, where `.git` is a file and branch refs
    // live in the main repository's directory.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".into(), "index".into()];
    if let Some(head_ref) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(head_ref);
    }
    for name in watched {
        if let Some(p) = git(&dir, &["rev-parse", "--git-path", &name]) {
            println!("cargo:rerun-if-changed={}", dir.join(p).display());
        }
    }
    for p in ["src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", dir.join(p).display());
    }
    let rev = git(&dir, &["rev-parse", "--short=12", "HEAD"])?;
    let changed = git(&dir, &["status", "--porcelain", "--untracked-files=no"])?;
    Some(if changed.is_empty() {
        rev
    } else {
        format!("{rev}-dirty")
    })
}

/// `git ARGS` in `dir`, its output trimmed; `None` if git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("--no-optional-locks")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8(out.stdout)
        .ok()
        .map(|s| s.trim().to_owned())
}
