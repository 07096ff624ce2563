//! Checkpoint engines. [`criu`] dumps and restores whole process trees (root only);
//! [`self_state`] keeps what each rank's callbacks saved (no privilege). lamd's `dump` and
//! `restore` verbs drive either; ranks that use the library take part through [`crate::cr`].
pub mod criu;
pub mod self_state;

use crate::schema::Engine;

/// One line of `lamcr check`: whether it passed, what was checked, the verdict.
pub struct Check {
    pub ok: bool,
    pub what: &'static str,
    pub detail: String,
}

/// Everything CRIU checkpoints need here: privileges, criu's version, `criu check`, nftables,
/// PID namespaces. Stops early when there is no criu to ask.
pub fn checks() -> Vec<Check> {
    use std::process::Command;
    let mut out = Vec::new();
    let mut line = |ok: bool, what: &'static str, detail: String| {
        out.push(Check { ok, what, detail });
    };
    let root = nix::unistd::geteuid().is_root();
    line(
        root,
        "privileges",
        if root {
            "running as root".into()
        } else {
            "CRIU needs root (CAP_SYS_ADMIN)".into()
        },
    );
    let Some(criu) = criu::criu_path() else {
        line(
            false,
            "criu",
            "not found in PATH or /usr/local/sbin (run scripts/setup.sh)".into(),
        );
        return out;
    };
    match Command::new(&criu).arg("--version").output() {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix("Version: "))
                .unwrap_or("unknown")
                .to_string();
            let good = v.starts_with(criu::REQUIRED_VERSION);
            line(
                good,
                "criu version",
                format!(
                    "{v} at {} (needs {}.x)",
                    criu.display(),
                    criu::REQUIRED_VERSION
                ),
            );
        }
        Err(e) => line(
            false,
            "criu version",
            format!("cannot run {}: {e}", criu.display()),
        ),
    }
    match Command::new(&criu).arg("check").output() {
        Ok(o) if o.status.success() => line(true, "criu check", "looks good".into()),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.contains("RLIMIT_NOFILE"))
                .unwrap_or("failed")
                .to_string();
            line(false, "criu check", last)
        }
        Err(e) => line(false, "criu check", e.to_string()),
    }
    let nft = ["/usr/sbin/nft", "/sbin/nft"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    line(
        nft,
        "network lock",
        if nft {
            "nftables available (TCP connections are kept)".into()
        } else {
            "nft not installed".into()
        },
    );
    let pidns = std::path::Path::new("/proc/self/ns/pid").exists();
    line(
        pidns,
        "pid namespaces",
        if pidns {
            "available (restored pids never collide)".into()
        } else {
            "unavailable".into()
        },
    );
    out
}

/// `--engine auto`: CRIU when every `lamcr check` line passes, else `self`, with the first
/// failing check as the reason.
pub fn auto() -> (Engine, Option<String>) {
    match checks().into_iter().find(|c| !c.ok) {
        None => (Engine::Criu, None),
        Some(c) => (
            Engine::SelfState,
            Some(format!("{}: {} (see lamcr check)", c.what, c.detail)),
        ),
    }
}
