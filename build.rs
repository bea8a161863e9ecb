//! Records the source revision for `shoal_build_info{revision}`: the git commit when the build
//! runs in a checkout, else `BUILD_REVISION` (set by image builds that compile without `.git`),
//! else "unknown".

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BUILD_REVISION");
    let revision = git(&["rev-parse", "--short", "HEAD"])
        .or_else(|| {
            std::env::var("BUILD_REVISION")
                .ok()
                .filter(|r| !r.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_string());
    watch_git_head();
    // Not SHOAL_*: cargo also sets this in the environment of `cargo run` and `cargo test`,
    // and the binaries refuse SHOAL_* variables that are no setting.
    println!("cargo:rustc-env=BUILD_INFO_REVISION={revision}");
}

/// Runs git and returns its trimmed output, or None when git or the repository is missing.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Rebuilds when a commit or checkout moves HEAD. Only existing files are named: cargo treats
/// a missing one as always changed, which would rebuild the crate every time.
fn watch_git_head() {
    let mut files = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        files.push(git(&["rev-parse", "--git-path", &branch]));
        files.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    }
    for file in files.into_iter().flatten() {
        if Path::new(&file).exists() {
            println!("cargo:rerun-if-changed={file}");
        }
    }
}
