//! Turning what the user typed into a [`JobSpec`]: application contexts (MPMD `A : B` and LAM
//! appschema files), placement (`--hostfile`, `--host`), per-rank environment.

use std::path::{Path, PathBuf};

use crate::schema::{IoOptions, JobId, NodeId, NodeSpec, Rank, RankSpec, StdinTarget};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("{file}:{line}: {what}")]
    AtLine {
        file: String,
        line: usize,
        what: String,
    },
    #[error("cannot read {file}: {reason}")]
    Read { file: String, reason: String },
    #[error("no program given")]
    NoProgram,
    #[error("-n must be at least 1")]
    ZeroRanks,
    #[error("{0}")]
    Bad(String),
    #[error("{program}: command not found")]
    NotFound { program: String },
    #[error("{program}: not an executable file")]
    NotExecutable { program: String },
    #[error("{ranks} ranks requested but only {slots} slots available (use --oversubscribe)")]
    Slots { ranks: usize, slots: u32 },
    #[error("host {0}: remote nodes are not supported yet; lamcr starts lamd on this machine only")]
    Remote(String),
}

/// One application context: a program, its arguments and its per-context settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppContext {
    pub nprocs: Option<u32>,
    pub argv: Vec<String>,
    pub env: Vec<(String, Option<String>)>,
    pub wdir: Option<String>,
}

/// Parses `-x VAR[=VAL]` into a name and an optional value.
pub fn parse_export(s: &str) -> (String, Option<String>) {
    match s.split_once('=') {
        Some((k, v)) => (k.to_string(), Some(v.to_string())),
        None => (s.to_string(), None),
    }
}

/// Splits a command line after the global options into contexts at `:` tokens. Each context may
/// start with its own `-n/-np N`, `-x VAR[=VAL]`, `-wd/--wdir DIR` before the program.
pub fn split_contexts(args: &[String]) -> Result<Vec<AppContext>, ParseError> {
    let mut contexts = Vec::new();
    for part in args.split(|a| a == ":") {
        contexts.push(parse_context(part, None)?);
    }
    Ok(contexts)
}

fn parse_context(words: &[String], at: Option<(&str, usize)>) -> Result<AppContext, ParseError> {
    let err = |what: String| match at {
        Some((file, line)) => ParseError::AtLine {
            file: file.to_string(),
            line,
            what,
        },
        None => ParseError::Bad(what),
    };
    let mut ctx = AppContext::default();
    let mut i = 0;
    while i < words.len() {
        let w = words[i].as_str();
        let value = |i: usize| {
            words
                .get(i + 1)
                .cloned()
                .ok_or_else(|| err(format!("{w} needs a value")))
        };
        match w {
            "-n" | "-np" | "--np" | "-c" => {
                let v = value(i)?;
                let n: u32 = v
                    .parse()
                    .map_err(|_| err(format!("{w}: not a number: {v}")))?;
                if n == 0 {
                    return Err(match at {
                        Some(_) => err("-np must be at least 1".into()),
                        None => ParseError::ZeroRanks,
                    });
                }
                ctx.nprocs = Some(n);
                i += 2;
            }
            "-x" => {
                ctx.env.push(parse_export(&value(i)?));
                i += 2;
            }
            "-wd" | "--wd" | "--wdir" | "-wdir" => {
                ctx.wdir = Some(value(i)?);
                i += 2;
            }
            _ if w.starts_with('-') && ctx.argv.is_empty() && at.is_some() => {
                return Err(err(format!("unknown option {w}")));
            }
            _ => {
                ctx.argv = words[i..].to_vec();
                break;
            }
        }
    }
    if ctx.argv.is_empty() {
        return Err(match at {
            Some(_) => err("no program on this line".into()),
            None => ParseError::NoProgram,
        });
    }
    Ok(ctx)
}

/// Splits a line into words, honouring simple double and single quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut in_word = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

fn strip_comment(line: &str) -> &str {
    line.split('#').next().unwrap_or("")
}

/// Parses a LAM appschema: one context per line, `[-np N] [-wd DIR] [-x VAR[=VAL]] program args`.
pub fn parse_appschema(text: &str, file: &str) -> Result<Vec<AppContext>, ParseError> {
    let mut contexts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let w = words(strip_comment(line));
        if w.is_empty() {
            continue;
        }
        contexts.push(parse_context(&w, Some((file, i + 1)))?);
    }
    if contexts.is_empty() {
        return Err(ParseError::AtLine {
            file: file.to_string(),
            line: 0,
            what: "no application lines".into(),
        });
    }
    Ok(contexts)
}

/// Parses a hostfile: `host [slots=N]` per line, `#` comments.
pub fn parse_hostfile(text: &str, file: &str) -> Result<Vec<(String, u32)>, ParseError> {
    let mut hosts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |what: String| ParseError::AtLine {
            file: file.to_string(),
            line: i + 1,
            what,
        };
        let w = words(strip_comment(line));
        let Some(host) = w.first() else { continue };
        let mut slots = 1;
        for kv in &w[1..] {
            match kv.split_once('=') {
                Some(("slots", v)) | Some(("cpu", v)) | Some(("max_slots", v)) => {
                    slots = v
                        .parse()
                        .map_err(|_| err(format!("slots must be a positive number, not {v:?}")))?;
                    if slots == 0 {
                        return Err(err("slots must be at least 1".into()));
                    }
                }
                _ => return Err(err(format!("unexpected {kv:?} (expected slots=N)"))),
            }
        }
        if !valid_host(host) {
            return Err(err(format!("invalid host name {host:?}")));
        }
        hosts.push((host.clone(), slots));
    }
    if hosts.is_empty() {
        return Err(ParseError::AtLine {
            file: file.to_string(),
            line: 0,
            what: "no hosts".into(),
        });
    }
    Ok(hosts)
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
}

/// Parses `--host h1:2,h2`.
pub fn parse_host_list(list: &str) -> Result<Vec<(String, u32)>, ParseError> {
    let mut hosts = Vec::new();
    for item in list.split(',') {
        let (host, slots) = match item.rsplit_once(':') {
            Some((h, n)) => {
                let n: u32 = n.parse().map_err(|_| {
                    ParseError::Bad(format!("--host {item}: slot count must be a number"))
                })?;
                if n == 0 {
                    return Err(ParseError::Bad(format!(
                        "--host {item}: slot count must be at least 1"
                    )));
                }
                (h, n)
            }
            None => (item, 1),
        };
        if !valid_host(host) {
            return Err(ParseError::Bad(format!(
                "--host: invalid host name {host:?}"
            )));
        }
        hosts.push((host.to_string(), slots));
    }
    Ok(hosts)
}

/// Whether `host` names this machine (remote hosts come with TCP transport later).
pub fn is_local(host: &str) -> bool {
    if host == "localhost" || host.starts_with("127.") || host == "::1" {
        return true;
    }
    let me = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    !me.is_empty() && (host == me || host.split('.').next() == Some(me.as_str()))
}

/// Finds `program` as a shell would: a path with a slash relative to `wdir`, else in PATH.
pub fn resolve_program(program: &str, wdir: &Path, path_var: &str) -> Result<PathBuf, ParseError> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.is_file()
            && p.metadata()
                .map(|m| m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
    };
    if program.contains('/') {
        let p = wdir.join(program);
        if !p.exists() {
            return Err(ParseError::NotFound {
                program: program.into(),
            });
        }
        if !executable(&p) {
            return Err(ParseError::NotExecutable {
                program: program.into(),
            });
        }
        return Ok(p);
    }
    let mut found_non_exec = false;
    for dir in std::env::split_paths(path_var) {
        let p = dir.join(program);
        if executable(&p) {
            return Ok(p);
        }
        found_non_exec |= p.exists();
    }
    Err(if found_non_exec {
        ParseError::NotExecutable {
            program: program.into(),
        }
    } else {
        ParseError::NotFound {
            program: program.into(),
        }
    })
}

/// What `lamcr run` needs besides the contexts.
pub struct Placement {
    /// `(host, slots)`; empty means one local node with unlimited slots.
    pub hosts: Vec<(String, u32)>,
    pub oversubscribe: bool,
    pub default_np: Option<u32>,
    pub global_env: Vec<(String, Option<String>)>,
    pub global_wdir: Option<String>,
}

/// Builds the job: one [`RankSpec`] per rank, mapped by slot onto the nodes.
pub fn build_job(
    job_id: JobId,
    contexts: &[AppContext],
    place: &Placement,
    io: IoOptions,
) -> Result<crate::schema::JobSpec, ParseError> {
    let (hosts, unlimited) = if place.hosts.is_empty() {
        (vec![("localhost".to_string(), 1)], true)
    } else {
        (place.hosts.clone(), false)
    };
    for (h, _) in &hosts {
        if !is_local(h) {
            return Err(ParseError::Remote(h.clone()));
        }
    }
    let total_slots: u32 = hosts.iter().map(|h| h.1).sum();
    let counts: Vec<u32> = contexts
        .iter()
        .map(|c| {
            c.nprocs
                .or(place.default_np)
                .unwrap_or(if contexts.len() == 1 && !unlimited {
                    total_slots
                } else {
                    1
                })
        })
        .collect();
    let nranks: usize = counts.iter().map(|&c| c as usize).sum();
    if !unlimited && !place.oversubscribe && nranks > total_slots as usize {
        return Err(ParseError::Slots {
            ranks: nranks,
            slots: total_slots,
        });
    }
    // Fill nodes slot by slot; past the slots (oversubscribed) continue round-robin.
    let mut node_of = Vec::with_capacity(nranks);
    for (i, (_, slots)) in hosts.iter().enumerate() {
        for _ in 0..*slots {
            if node_of.len() < nranks && !unlimited {
                node_of.push(i as u32);
            }
        }
    }
    let mut rr = 0;
    while node_of.len() < nranks {
        node_of.push((rr % hosts.len()) as u32);
        rr += 1;
    }
    let mut node_order: Vec<(u32, usize)> =
        node_of.iter().enumerate().map(|(r, &n)| (n, r)).collect();
    node_order.sort();
    let nodes: Vec<NodeSpec> = hosts
        .iter()
        .enumerate()
        .map(|(i, (h, s))| NodeSpec {
            id: NodeId(i as u32),
            host: h.clone(),
            slots: *s,
        })
        .collect();

    let cwd = std::env::current_dir()
        .map_err(|e| ParseError::Bad(format!("cannot read the current directory: {e}")))?;
    let base_env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| !k.starts_with("LAMCR_") || k == "LAMCR_RUN_DIR")
        .collect();
    let path_var = std::env::var("PATH").unwrap_or_default();
    let mut ranks = Vec::with_capacity(nranks);
    let mut rank = 0u32;
    for (app, (ctx, &count)) in contexts.iter().zip(&counts).enumerate() {
        let wdir = ctx
            .wdir
            .as_ref()
            .or(place.global_wdir.as_ref())
            .map(|w| cwd.join(w))
            .unwrap_or_else(|| cwd.clone());
        if !wdir.is_dir() {
            return Err(ParseError::Bad(format!(
                "working directory {} does not exist",
                wdir.display()
            )));
        }
        let mut env = base_env.clone();
        for (k, v) in place.global_env.iter().chain(&ctx.env) {
            let v = v
                .clone()
                .or_else(|| std::env::var(k).ok())
                .unwrap_or_default();
            set_env(&mut env, k, &v);
        }
        let ctx_path = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .unwrap_or(path_var.clone());
        let program = resolve_program(&ctx.argv[0], &wdir, &ctx_path)?;
        for _ in 0..count {
            let node = node_of[rank as usize];
            ranks.push(RankSpec {
                rank: Rank(rank),
                node: NodeId(node),
                app: app as u32,
                program: program.display().to_string(),
                argv: ctx.argv.clone(),
                env: env.clone(),
                cwd: wdir.display().to_string(),
                stdin: io.stdin.includes(Rank(rank)),
            });
            rank += 1;
        }
    }
    // Per-rank variables, now that every rank knows its node.
    let size = ranks.len();
    for r in ranks.iter_mut() {
        let local: Vec<usize> = node_order
            .iter()
            .filter(|(n, _)| *n == r.node.0)
            .map(|(_, i)| *i)
            .collect();
        let local_rank = local
            .iter()
            .position(|&i| i == r.rank.0 as usize)
            .unwrap_or(0);
        for (k, v) in [
            ("LAMCR_RANK", r.rank.0.to_string()),
            ("LAMCR_SIZE", size.to_string()),
            ("LAMCR_LOCAL_RANK", local_rank.to_string()),
            ("LAMCR_LOCAL_SIZE", local.len().to_string()),
            ("LAMCR_NODE", r.node.0.to_string()),
            ("LAMCR_JOBID", job_id.0.clone()),
            ("OMPI_COMM_WORLD_RANK", r.rank.0.to_string()),
            ("OMPI_COMM_WORLD_SIZE", size.to_string()),
            ("OMPI_COMM_WORLD_LOCAL_RANK", local_rank.to_string()),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", local.len().to_string()),
        ] {
            set_env(&mut r.env, k, &v);
        }
    }
    if let StdinTarget::Rank(r) = io.stdin {
        if r.0 as usize >= size {
            return Err(ParseError::Bad(format!(
                "--stdin {r}: there is no rank {r} (the job has {size} ranks)"
            )));
        }
    }
    Ok(crate::schema::JobSpec {
        job_id,
        nodes,
        ranks,
        io,
        engine: crate::schema::Engine::Criu,
        callback_timeout_ms: 30_000,
    })
}

fn set_env(env: &mut Vec<(String, String)>, k: &str, v: &str) {
    match env.iter_mut().find(|(key, _)| key == k) {
        Some(slot) => slot.1 = v.to_string(),
        None => env.push((k.to_string(), v.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn mpmd_contexts_split_at_colons() {
        let c =
            split_contexts(&s(&["a", "-x", ":", "-n", "3", "-x", "FOO=1", "b", "arg"])).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].argv, s(&["a", "-x"]));
        assert_eq!(c[1].nprocs, Some(3));
        assert_eq!(c[1].env, vec![("FOO".into(), Some("1".into()))]);
        assert_eq!(c[1].argv, s(&["b", "arg"]));
        assert_eq!(
            split_contexts(&s(&["-n", "0", "a"])),
            Err(ParseError::ZeroRanks)
        );
        assert_eq!(split_contexts(&s(&["a", ":"])), Err(ParseError::NoProgram));
    }

    #[test]
    fn appschema_lines_and_errors() {
        let c = parse_appschema(
            "# comment\n-np 2 -wd /tmp -x A=1 prog 'x y'\n\nother # trailing\n",
            "app",
        )
        .unwrap();
        assert_eq!(c[0].nprocs, Some(2));
        assert_eq!(c[0].wdir.as_deref(), Some("/tmp"));
        assert_eq!(c[0].argv, s(&["prog", "x y"]));
        assert_eq!(c[1].argv, s(&["other"]));
        let e = parse_appschema("prog\n-np x prog\n", "app").unwrap_err();
        assert_eq!(e.to_string(), "app:2: -np: not a number: x");
        assert!(
            parse_appschema("-bogus prog", "f")
                .unwrap_err()
                .to_string()
                .starts_with("f:1: unknown option")
        );
    }

    #[test]
    fn hostfile_lines_and_errors() {
        let h = parse_hostfile("a slots=2 # two\n\n# none\nb\n", "hf").unwrap();
        assert_eq!(h, vec![("a".into(), 2), ("b".into(), 1)]);
        assert_eq!(
            parse_hostfile("a slots=x\n", "hf").unwrap_err().to_string(),
            "hf:1: slots must be a positive number, not \"x\""
        );
        assert_eq!(
            parse_hostfile("a\nb cores=2\n", "hf")
                .unwrap_err()
                .to_string(),
            "hf:2: unexpected \"cores=2\" (expected slots=N)"
        );
        assert!(parse_hostfile("a slots=0", "hf").is_err());
    }

    #[test]
    fn host_lists() {
        assert_eq!(
            parse_host_list("h1:2,h2").unwrap(),
            vec![("h1".into(), 2), ("h2".into(), 1)]
        );
        assert!(parse_host_list("h1:0").is_err());
        assert!(parse_host_list("h1:x").is_err());
    }
}
