//! `lamcr check`: will checkpointing work here? Each line says what was checked and the verdict.

use std::process::Command;

use crate::engine::criu::{REQUIRED_VERSION, criu_path};

pub fn main() -> i32 {
    let mut ok = true;
    let mut line = |good: bool, what: &str, detail: String| {
        ok &= good;
        println!("{} {what}: {detail}", if good { "ok  " } else { "FAIL" });
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
    let Some(criu) = criu_path() else {
        line(
            false,
            "criu",
            "not found in PATH or /usr/local/sbin (run scripts/setup.sh)".into(),
        );
        println!("checkpointing will not work: see the FAIL lines");
        return 1;
    };
    let version = Command::new(&criu).arg("--version").output();
    match version {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix("Version: "))
                .unwrap_or("unknown")
                .to_string();
            let good = v.starts_with(REQUIRED_VERSION);
            line(
                good,
                "criu version",
                format!("{v} at {} (needs {REQUIRED_VERSION}.x)", criu.display()),
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
    if ok {
        println!("checkpointing will work on this machine");
        0
    } else {
        println!("checkpointing will not work: see the FAIL lines");
        1
    }
}
