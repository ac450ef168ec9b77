//! The README's command blocks run as written, so that README drift fails the tests.
//!
//! Every ```sh block of README.md is run, in order, each in a fresh `bash -eo pipefail`, unless
//! the line before it is `<!-- readme-test: skip: REASON -->` (blocks that need Kubernetes, kind
//! or Docker, and `./test.sh` itself). They run as a new user's would, from a fresh copy of the
//! repository's tracked files (untracked files are not there), with the build directory shared
//! so nothing is rebuilt; and, so that the blocks' fixed ports and paths can never clash with
//! anything else on the machine, in private namespaces: a network namespace of their own (only
//! a loopback), a private /tmp, and the copy mounted at the repository's own path. That needs
//! root (CAP_SYS_ADMIN), as the test bed does; without it the test skips loudly (fails in CI).
//! Every process a block leaves behind is killed after it; each block has 300 s.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{loud, strict, Result};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const SKIP: &str = "<!-- readme-test: skip: ";
const BLOCK_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    code: String,
    skip: Option<String>,
}

fn blocks(readme: &str) -> Vec<Block> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() == "```sh" {
            let skip = lines[..i]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .and_then(|l| l.trim().strip_prefix(SKIP))
                .map(|r| r.trim_end_matches("-->").trim().to_string());
            let start = i;
            let mut code = String::new();
            i += 1;
            while i < lines.len() && lines[i].trim_end() != "```" {
                code.push_str(lines[i]);
                code.push('\n');
                i += 1;
            }
            out.push(Block {
                line: start + 1,
                code,
                skip,
            });
        }
        i += 1;
    }
    out
}

fn readme() -> Result<String> {
    Ok(std::fs::read_to_string(Path::new(REPO).join("README.md"))?)
}

#[test]
fn every_readme_block_runs_or_says_why_not() -> Result {
    let all = blocks(&readme()?);
    assert!(all.len() >= 5, "{all:?}");
    for b in &all {
        if let Some(reason) = &b.skip {
            assert!(
                reason.len() >= 10,
                "README.md:{}: a skipped block needs a reason",
                b.line
            );
        } else {
            for tool in ["kubectl ", "helm ", "kind ", "docker "] {
                assert!(
                    !b.code.lines().any(|l| l.trim_start().starts_with(tool)),
                    "README.md:{}: a block that runs {tool}cannot run here: mark it {SKIP}REASON -->",
                    b.line
                );
            }
        }
    }
    // The two main commands stay, and the first one is run.
    let run: Vec<&Block> = all.iter().filter(|b| b.skip.is_none()).collect();
    assert!(run.iter().any(|b| b.code.trim()
        == "cargo run --release -p kmmr-replica -- local --n 4 --byzantine 1 --byzantine-mode equivocate --workload 1000"));
    assert!(all.iter().any(|b| b.code.trim() == "./test.sh"));
    Ok(())
}

/// Whether this process may make namespaces and mounts.
fn can_isolate() -> bool {
    Command::new("unshare")
        .args(["--mount", "--net", "--fork", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A copy of the repository's tracked files, as a fresh clone has them.
fn copy_tracked(repo: &Path, to: &Path) -> Result {
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(repo)
        .output()?;
    if !out.status.success() {
        return Err(format!("git ls-files: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    for name in out.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let (src, dst) = (repo.join(&name), to.join(&name));
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let meta = match std::fs::symlink_metadata(&src) {
            Ok(m) => m,
            Err(_) => continue, // deleted in the work tree and not committed yet
        };
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if meta.is_file() {
            std::fs::copy(&src, &dst)?;
            // The source's mtime, so that cargo sees nothing changed and rebuilds nothing.
            std::fs::File::options()
                .write(true)
                .open(&dst)?
                .set_modified(meta.modified()?)?;
        }
    }
    std::fs::create_dir_all(to.join("target"))?;
    Ok(())
}

/// Kills every process in the network namespace `ns` (a `net:[inode]` link).
fn kill_namespace(ns: &str) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let link = std::fs::read_link(entry.path().join("ns/net"));
        if link.is_ok_and(|l| l.to_string_lossy() == ns) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

#[test]
fn readme_blocks_run_as_written() -> Result {
    let test = "readme_blocks_run_as_written";
    if !can_isolate() {
        let msg = format!(
            "{test}: needs root to run the README's blocks in private namespaces (unshare --mount --net)"
        );
        assert!(!strict(), "{msg}");
        loud(&format!("SKIPPED {msg}"));
        return Ok(());
    }
    let repo = std::fs::canonicalize(REPO)?;
    let work = std::env::temp_dir().join(format!("kmmr-readme-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let clone = work.join("clone");
    copy_tracked(&repo, &clone)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target"));
    std::fs::create_dir_all(&target)?;
    // The blocks' scripts and the namespace's id, where the blocks still see them (/tmp is
    // private to them).
    let inside = target.join(format!("kmmr-readme-test-{}", std::process::id()));
    std::fs::create_dir_all(&inside)?;

    let all = blocks(&readme()?);
    let mut ran = 0;
    for (i, b) in all.iter().enumerate() {
        if let Some(reason) = &b.skip {
            loud(&format!("README.md:{}: not run: {reason}", b.line));
            continue;
        }
        let script = inside.join(format!("block-{i}.sh"));
        std::fs::write(&script, &b.code)?;
        let ns_file = inside.join(format!("block-{i}.ns"));
        let (out_file, err_file) = (
            work.join(format!("block-{i}.out")),
            work.join(format!("block-{i}.err")),
        );
        // Inside: the copy over the repository's path (the build directory bound into it),
        // a private /tmp, a loopback; then the block, in the repository's root.
        let setup = format!(
            r#"set -e
mount --make-rprivate /
mount --bind "$0" "$1/target"
mount --rbind "$1" "$2"
mount -t tmpfs tmpfs /tmp
ip link set lo up
readlink /proc/self/ns/net > "$4"
cd "$2"
exec timeout -k 5 {secs} bash -eo pipefail "$3""#,
            secs = BLOCK_TIMEOUT.as_secs()
        );
        let start = Instant::now();
        let status = Command::new("unshare")
            .args(["--mount", "--net", "--fork", "bash", "-c", &setup])
            .arg(&target)
            .arg(&clone)
            .arg(&repo)
            .arg(&script)
            .arg(&ns_file)
            // Cargo's variables for this test would steer the blocks' own cargo commands.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_MANIFEST_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("KMMR_CLUSTER")
            .stdin(Stdio::null())
            // Files, not pipes: a process a block leaves running would hold a pipe open.
            .stdout(std::fs::File::create(&out_file)?)
            .stderr(std::fs::File::create(&err_file)?)
            .status()?;
        if let Ok(ns) = std::fs::read_to_string(&ns_file) {
            kill_namespace(ns.trim());
        }
        let stdout = std::fs::read_to_string(&out_file).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err_file).unwrap_or_default();
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        assert!(
            status.success(),
            "README.md:{}: the block failed ({}) after {:.1?}:\n{}\n--- stdout (end) ---\n{}\n--- stderr (end) ---\n{}",
            b.line,
            status,
            start.elapsed(),
            b.code,
            tail(&stdout),
            tail(&stderr)
        );
        loud(&format!(
            "README.md:{}: ran in {:.1?}",
            b.line,
            start.elapsed()
        ));
        ran += 1;
    }
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&inside);
    assert!(ran >= 3, "only {ran} blocks ran");
    Ok(())
}
