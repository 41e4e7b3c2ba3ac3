//! Records the git commit the binary is built from, for `--version`:
//! `CRED_WATCH_GIT_COMMIT` from the environment if set (a build from a
//! source tarball), else `git rev-parse --short=12 HEAD`, else `unknown`.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CRED_WATCH_GIT_COMMIT");
    let commit = match std::env::var("CRED_WATCH_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into()),
    };
    // Built again when HEAD moves: HEAD itself (a checkout), the branch it
    // points to (a commit) and packed-refs (a gc or a fetch). Only files
    // that exist: a missing one would rebuild every time.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(branch);
    }
    for name in watched {
        let Some(path) = git(&["rev-parse", "--git-path", &name]) else {
            continue;
        };
        let path = Path::new(&path);
        if path.is_file() {
            println!("cargo:rerun-if-changed={}", path.display());
        } else if let Some(dir) = path
            .parent()
            .filter(|d| name != "packed-refs" && d.is_dir())
        {
            // A packed branch: its next commit writes the file there.
            println!("cargo:rerun-if-changed={}", dir.display());
        }
    }
    println!("cargo:rustc-env=CRED_WATCH_GIT_COMMIT={commit}");
}
