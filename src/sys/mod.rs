//! The only home of `unsafe` in lamcr: process creation, exec and signal-handler installation.
//!
//! Invariants:
//! - Everything a child needs (paths, argv, envp, fd map) is built *before* the clone; between
//!   clone and exec the child makes only raw system calls that never touch `errno` ([`raw`]:
//!   rt_sigaction, rt_sigprocmask, setsid, prctl, fcntl, dup3, close_range, chdir, write,
//!   execve, exit_group). It never returns into the caller.
//! - A child that shares our memory (`Spawner`) reads it only until the kernel has cleared its
//!   `CLONE_CHILD_CLEARTID` word, and nothing it reads is freed before that.
//! - Exec failures come back to the parent as an errno: in a shared word (spawned children) or
//!   over a close-on-exec pipe (forked ones).
//! - Signal handlers installed here only `write` one byte to a pipe.
//! - File mappings ([`FileMap`]) are read-only and only of checkpoint images, which nothing
//!   modifies once written.
#![allow(unsafe_code)]

pub mod capi;
pub mod cr;
mod raw;

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use nix::unistd::Pid;

/// How a child is to be started. Built by the caller; turned into C strings before the fork.
#[derive(Debug, Default, Clone)]
pub struct SpawnSpec {
    /// Path of the program to exec (no PATH search happens here).
    pub program: std::path::PathBuf,
    /// argv, including argv[0].
    pub argv: Vec<std::ffi::OsString>,
    /// The complete environment of the child.
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// `(source fd in the parent, fd number in the child)`. Every other fd above 2 that is not a
    /// target is closed in the child; stdio fds that are not targets are left as inherited.
    pub fds: Vec<(RawFd, RawFd)>,
    /// Working directory of the child.
    pub cwd: Option<std::path::PathBuf>,
    /// Call `setsid()` in the child.
    pub setsid: bool,
    /// Signal the child receives when its parent dies.
    pub parent_death_signal: Option<i32>,
    /// Close every inherited fd that is not in `fds`, stdio included (stdio then points to /dev/null
    /// only if mapped).
    pub close_stdio: bool,
}

struct Prepared {
    program: CString,
    /// Owns the strings `argv_ptrs` points into.
    #[allow(dead_code)]
    argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    /// Owns the strings `env_ptrs` points into.
    #[allow(dead_code)]
    env: Vec<CString>,
    env_ptrs: Vec<*const libc::c_char>,
    cwd: Option<CString>,
    fds: Vec<(RawFd, RawFd)>,
    /// Scratch space for the child: where each source fd was moved to.
    moved: Vec<RawFd>,
    keep: Vec<RawFd>,
    /// Signals whose disposition the child must set back to the default before it execs.
    reset: Vec<libc::c_int>,
    setsid: bool,
    parent_death_signal: Option<i32>,
    close_stdio: bool,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in argument"))
}

impl Prepared {
    fn new(spec: &SpawnSpec) -> io::Result<Self> {
        Self::new_with(spec, altered_signals())
    }

    fn new_with(spec: &SpawnSpec, reset: Vec<libc::c_int>) -> io::Result<Self> {
        let program = cstring(spec.program.as_os_str().as_bytes())?;
        let argv = spec
            .argv
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<io::Result<Vec<_>>>()?;
        let env = spec
            .env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                cstring(&kv)
            })
            .collect::<io::Result<Vec<_>>>()?;
        let mut argv_ptrs: Vec<_> = argv.iter().map(|c| c.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut env_ptrs: Vec<_> = env.iter().map(|c| c.as_ptr()).collect();
        env_ptrs.push(std::ptr::null());
        let cwd = spec
            .cwd
            .as_ref()
            .map(|c| cstring(c.as_os_str().as_bytes()))
            .transpose()?;
        let mut keep: Vec<RawFd> = spec.fds.iter().map(|&(_, dst)| dst).collect();
        if !spec.close_stdio {
            keep.extend([0, 1, 2]);
        }
        keep.sort_unstable();
        keep.dedup();
        Ok(Self {
            program,
            argv,
            argv_ptrs,
            env,
            env_ptrs,
            cwd,
            fds: spec.fds.clone(),
            moved: vec![0; spec.fds.len()],
            keep,
            reset,
            setsid: spec.setsid,
            parent_death_signal: spec.parent_death_signal,
            close_stdio: spec.close_stdio,
        })
    }

    /// The highest fd number the child keeps.
    fn highest(&self) -> RawFd {
        self.keep.iter().copied().max().unwrap_or(2)
    }
}

/// Starts a child as described by `spec` and returns its pid once it has exec'd.
///
/// An exec failure is returned as the child's errno (the child has then already exited with 127
/// and has been reaped).
pub fn spawn(spec: &SpawnSpec) -> io::Result<Pid> {
    let mut spawner = Spawner::new();
    let pid = spawner.start(spec)?;
    match spawner.settle().pop() {
        Some((_, err)) => Err(err),
        None => Ok(pid),
    }
}

/// Starts children the way `posix_spawn` does, without waiting for each to exec.
///
/// A child shares our memory until it execs (`CLONE_VM`, on a stack of its own), so no page
/// table is copied for it. Unlike `posix_spawn` we do not wait (`CLONE_VFORK`) for it to reach
/// `execve`: [`start`](Self::start) returns at once, and the next child can be made while this
/// one execs on the other core. The kernel clears a word of ours when the child's exec has let
/// go of our memory, or when it exits (`CLONE_CHILD_CLEARTID`); until then its stack and
/// everything it reads stay alive here, and [`settle`](Self::settle) (or drop) waits for it.
/// The child makes only errno-free system calls ([`raw`]), so it never writes to our memory
/// but its stack, its scratch and its failure word. Where there are none, children are made
/// with `CLONE_VFORK` as before.
///
/// Signal dispositions are read once for all children.
pub struct Spawner {
    reset: Vec<libc::c_int>,
    /// Children not yet known to have exec'd or exited.
    flight: Vec<(Pid, *mut Flight)>,
}

/// What one child reads, and writes, until it has exec'd; freed only after that.
struct Flight {
    prepared: Prepared,
    /// Never initialised: only the child writes it, below its top.
    stack: Box<[std::mem::MaybeUninit<u8>]>,
    /// Non-zero until the kernel clears it (`CLONE_CHILD_CLEARTID`): the child has exec'd or
    /// exited, and uses nothing here any more.
    tid: AtomicU32,
    /// The child's errno if it could not exec.
    errno: AtomicI32,
}

impl Spawner {
    pub fn new() -> Self {
        Spawner {
            reset: altered_signals(),
            flight: Vec::new(),
        }
    }

    /// Starts a child; its pid is returned at once. Whether it exec'd is known from
    /// [`settle`](Self::settle).
    pub fn start(&mut self, spec: &SpawnSpec) -> io::Result<Pid> {
        let prepared = Prepared::new_with(spec, self.reset.clone())?;
        let flight = Box::into_raw(Box::new(Flight {
            prepared,
            stack: Box::new_uninit_slice(CHILD_STACK),
            tid: AtomicU32::new(u32::MAX),
            errno: AtomicI32::new(0),
        }));
        // The stack grows down from its 16-byte aligned top.
        // SAFETY: `flight` is the live allocation just made; nothing else refers to it yet.
        let (top, tid) = unsafe {
            let end = (*flight).stack.as_mut_ptr_range().end as usize;
            ((end & !15) as *mut libc::c_void, (*flight).tid.as_ptr())
        };
        let flags = libc::CLONE_VM
            | libc::CLONE_CHILD_CLEARTID
            | libc::SIGCHLD
            | if raw::AVAILABLE { 0 } else { libc::CLONE_VFORK };
        let pid = {
            let _blocked = BlockAll::new()?;
            // SAFETY: `spawned_child` runs on the stack inside `flight`, which stays allocated
            // until the kernel has cleared `tid` (see `settle`). The child touches only that
            // stack, `prepared.moved` and `errno` of its own `Flight`, makes only errno-free
            // system calls, and never returns. The varargs are clone's parent-tid, TLS and
            // child-tid pointers.
            unsafe {
                libc::clone(
                    spawned_child,
                    top,
                    flags,
                    flight.cast(),
                    std::ptr::null_mut::<libc::pid_t>(),
                    std::ptr::null_mut::<libc::c_void>(),
                    tid.cast::<libc::pid_t>(),
                )
            }
        };
        if pid < 0 {
            let err = io::Error::last_os_error();
            // SAFETY: no child was made, so nothing else refers to `flight`.
            drop(unsafe { Box::from_raw(flight) });
            return Err(err);
        }
        let pid = Pid::from_raw(pid);
        self.flight.push((pid, flight));
        Ok(pid)
    }

    /// Waits until every started child has exec'd or exited; returns those that could not
    /// exec, with their errno (they have exited with 127 and have been reaped).
    pub fn settle(&mut self) -> Vec<(Pid, io::Error)> {
        let mut failed = Vec::new();
        for (pid, flight) in std::mem::take(&mut self.flight) {
            // SAFETY: `flight` stays allocated until freed below; only its atomics are read
            // while the child may still run.
            let (tid, errno) = unsafe { (&(*flight).tid, &(*flight).errno) };
            loop {
                let seen = tid.load(Ordering::Acquire);
                if seen == 0 {
                    break;
                }
                // SAFETY: FUTEX_WAIT on a live word; it returns when the kernel's wake (a
                // shared futex, hence no FUTEX_PRIVATE_FLAG) comes or the value has changed.
                unsafe {
                    libc::syscall(
                        libc::SYS_futex,
                        tid.as_ptr(),
                        libc::FUTEX_WAIT,
                        seen,
                        std::ptr::null::<libc::timespec>(),
                    );
                }
            }
            let errno = errno.load(Ordering::SeqCst);
            // SAFETY: the child has exec'd or exited: nothing else uses `flight` any more.
            drop(unsafe { Box::from_raw(flight) });
            if errno != 0 {
                let _ = nix::sys::wait::waitpid(pid, None);
                failed.push((pid, io::Error::from_raw_os_error(errno)));
            }
        }
        failed
    }
}

impl Default for Spawner {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        // A child may still be reading its `Flight`.
        let _ = self.settle();
    }
}

/// Every signal blocked, libc's internal ones included (hence the raw system call), until
/// dropped: no handler of ours may run in a child that shares our memory before it has reset
/// its dispositions.
struct BlockAll {
    old: u64,
}

impl BlockAll {
    fn new() -> io::Result<Self> {
        let all = u64::MAX;
        let mut old = 0u64;
        // SAFETY: rt_sigprocmask reads and writes one kernel sigset (8 bytes) through locals.
        let r = unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &all as *const u64,
                &mut old as *mut u64,
                8usize,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(BlockAll { old })
    }
}

impl Drop for BlockAll {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `new`.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &self.old as *const u64,
                std::ptr::null_mut::<u64>(),
                8usize,
            )
        };
    }
}

/// Stack of a spawned child until it execs (it only moves fds and makes system calls).
const CHILD_STACK: usize = 64 << 10;

/// The signals whose disposition is not the default (handled or ignored). An exec resets
/// handled ones itself but keeps ignored ones; a child that shares our memory must not run a
/// handler of ours before it execs. Either way these are what a child resets.
fn altered_signals() -> Vec<libc::c_int> {
    (1..=libc::SIGRTMAX())
        .filter(|&sig| sig != libc::SIGKILL && sig != libc::SIGSTOP)
        .filter(|&sig| {
            // SAFETY: a query (null new action) into a zeroed local; all-zero is a valid sigaction.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction != libc::SIG_DFL
            }
        })
        .collect()
}

/// How a child that cannot exec says why: its errno into a word the parent reads (spawned),
/// or down a close-on-exec pipe (forked).
struct Report {
    pipe: RawFd,
    errno: *const AtomicI32,
}

extern "C" fn spawned_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Flight` that `Spawner::start` made, alive until the kernel clears
    // its `tid`, which happens only once this child has exec'd or exited.
    unsafe {
        let flight = arg.cast::<Flight>();
        let report = Report {
            pipe: -1,
            errno: &raw const (*flight).errno,
        };
        let p = &mut (*flight).prepared;
        let highest = p.highest();
        child_setup(p, &report, highest);
        let e = sys_err(raw::syscall(
            libc::SYS_execve,
            [
                p.program.as_ptr() as usize,
                p.argv_ptrs.as_ptr() as usize,
                p.env_ptrs.as_ptr() as usize,
                0,
                0,
                0,
            ],
        ));
        fail(&report, e)
    }
}

/// The errno of a failed raw system call (a success here is an exec that returned: EIO).
fn sys_err(r: Result<usize, i32>) -> i32 {
    r.err().unwrap_or(libc::EIO)
}

/// Which side of [`fork_in_place`] we are on.
pub enum Forked {
    Parent(Pid),
    /// The child, set up as the spec said. It must never return into its caller's caller: it
    /// runs what it was forked for and exits.
    Child,
}

/// Forks a child that goes on running this program instead of exec'ing one (lamd's holder),
/// as the init of a new PID namespace (`clone(CLONE_NEWPID)`) if `new_pid_namespace`.
/// `spec.program`, `argv` and `env` are unused; everything else applies as for [`spawn`], and the
/// child's fds are exactly those of `spec.fds`. Returns once the child is set up.
///
/// Only a single-threaded process may call this (checked): the child runs ordinary Rust code,
/// allocator included, which is sound only if no other thread could have held a lock at the
/// fork.
pub fn fork_in_place(spec: &SpawnSpec, new_pid_namespace: bool) -> io::Result<Forked> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "cannot fork with {threads} threads running"
        )));
    }
    let mut prepared = Prepared::new(spec)?;
    let (err_r, err_w, highest) = report_pipe(&prepared)?;
    let flags = if new_pid_namespace {
        libc::CLONE_NEWPID | libc::SIGCHLD
    } else {
        libc::SIGCHLD
    };
    // SAFETY: a raw clone without CLONE_VM behaves like fork(): the child gets a copy of the
    // address space. We are single-threaded (checked above), so no lock of the allocator or of
    // std can be held by a thread that the child lacks, and the child may run Rust code.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let report = Report {
            pipe: err_w.as_raw_fd(),
            errno: std::ptr::null(),
        };
        // SAFETY: we are the freshly forked child; everything used was prepared before the fork.
        unsafe { child_setup(&mut prepared, &report, highest) };
        // Set up: the parent's read sees EOF.
        drop(err_w);
        std::mem::forget(err_r);
        return Ok(Forked::Child);
    }
    drop(err_w);
    let pid = Pid::from_raw(pid as i32);
    let mut buf = [0u8; 4];
    let n = read_full(err_r.as_fd_ref(), &mut buf)?;
    if n == 4 {
        let errno = i32::from_ne_bytes(buf);
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok(Forked::Parent(pid))
}

/// The pipe a forked child reports a failed set-up on, its write end numbered above every fd
/// the child is to keep (so no mapping can clobber it); and that number, the highest in use.
fn report_pipe(prepared: &Prepared) -> io::Result<(OwnedFd, OwnedFd, RawFd)> {
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let above = prepared.highest() + 1;
    let err_w = nix::fcntl::fcntl(&err_w, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(above))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    let err_w = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(err_w) };
    let highest = err_w.as_raw_fd();
    Ok((err_r, err_w, highest))
}

trait AsFdRef {
    fn as_fd_ref(&self) -> BorrowedFd<'_>;
}
impl AsFdRef for OwnedFd {
    fn as_fd_ref(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

fn read_full(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match nix::unistd::read(fd, &mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

/// Makes a freshly made child what its spec said: default signal dispositions, nothing
/// blocked, session, parent-death signal, exactly the mapped fds (and the report pipe),
/// working directory. On failure the child reports its errno and exits.
///
/// # Safety
/// Must only be called in a freshly made child. It makes only errno-free system calls
/// ([`raw`]) and writes no memory but `p.moved` and the report word.
unsafe fn child_setup(p: &mut Prepared, report: &Report, highest: RawFd) {
    // SAFETY: every call is a raw system call on memory prepared before the clone.
    unsafe {
        if let Err(e) = reset_signals_raw(&p.reset) {
            fail(report, e);
        }
        if p.setsid {
            let _ = raw::syscall(libc::SYS_setsid, [0; 6]);
        }
        if let Some(sig) = p.parent_death_signal {
            let args = [libc::PR_SET_PDEATHSIG as usize, sig as usize, 0, 0, 0, 0];
            let _ = raw::syscall(libc::SYS_prctl, args);
        }
        // Move every source above all targets first, so that no dup clobbers a later source.
        // `moved` was allocated before the clone; writing into it here is plain memory.
        for (i, &(src, _)) in p.fds.iter().enumerate() {
            let args = [
                src as usize,
                libc::F_DUPFD_CLOEXEC as usize,
                (highest + 1) as usize,
                0,
                0,
                0,
            ];
            match raw::syscall(libc::SYS_fcntl, args) {
                Ok(fd) => {
                    if let Some(slot) = p.moved.get_mut(i) {
                        *slot = fd as RawFd;
                    }
                }
                Err(e) => fail(report, e),
            }
        }
        for (&(_, dst), &moved) in p.fds.iter().zip(p.moved.iter()) {
            // A moved fd is above every target, so never equal to `dst` (dup3's one refusal).
            let args = [moved as usize, dst as usize, 0, 0, 0, 0];
            if let Err(e) = raw::syscall(libc::SYS_dup3, args) {
                fail(report, e);
            }
        }
        // Close every fd that is not kept, except the error pipe (close-on-exec anyway).
        let mut next = if p.close_stdio { 0 } else { 3 };
        for &k in p.keep.iter() {
            if k >= next {
                if k > next {
                    close_range(next, k - 1, report.pipe);
                }
                next = k + 1;
            }
        }
        close_range(next, RawFd::MAX, report.pipe);
        if let Some(cwd) = &p.cwd {
            if let Err(e) = raw::syscall(libc::SYS_chdir, [cwd.as_ptr() as usize, 0, 0, 0, 0, 0]) {
                fail(report, e);
            }
        }
    }
}

/// Closes `[lo, hi]` except `skip`.
///
/// # Safety
/// Only for use in a freshly made child.
unsafe fn close_range(lo: RawFd, hi: RawFd, skip: RawFd) {
    let close = |lo: RawFd, hi: RawFd| {
        if lo <= hi {
            // SAFETY: close_range is a plain system call on fd numbers.
            let _ = unsafe {
                raw::syscall(
                    libc::SYS_close_range,
                    [lo as usize, hi as usize, 0, 0, 0, 0],
                )
            };
        }
    };
    if lo > hi {
        return;
    }
    if (lo..=hi).contains(&skip) {
        if skip > lo {
            close(lo, skip - 1);
        }
        if skip < hi {
            close(skip + 1, hi);
        }
    } else {
        close(lo, hi);
    }
}

/// Reports `errno` (into the parent's word, or down the report pipe) and exits the child.
///
/// # Safety
/// Only for use in a freshly made child.
unsafe fn fail(report: &Report, errno: i32) -> ! {
    // SAFETY: a non-null `errno` points at the parent's word, alive until the child has
    // exited; write and exit_group are raw system calls.
    unsafe {
        let errno = errno.max(1);
        if let Some(word) = report.errno.as_ref() {
            word.store(errno, Ordering::SeqCst);
        }
        if report.pipe >= 0 {
            let bytes = errno.to_ne_bytes();
            let args = [report.pipe as usize, bytes.as_ptr() as usize, 4, 0, 0, 0];
            let _ = raw::syscall(libc::SYS_write, args);
        }
        loop {
            let _ = raw::syscall(libc::SYS_exit_group, [127, 0, 0, 0, 0, 0]);
        }
    }
}

/// Sets the dispositions of `reset` (see [`altered_signals`]) back to the default, then unblocks
/// every signal.
///
/// # Safety
/// Changes process-global state: only for use in a freshly made child.
unsafe fn reset_signals_raw(reset: &[libc::c_int]) -> Result<(), i32> {
    // The kernel's `struct sigaction` all zero: SIG_DFL, no flags, empty mask, whatever the
    // order of its fields. Larger than any architecture's.
    let default = [0usize; 8];
    let none = 0u64;
    // SAFETY: rt_sigaction reads one kernel sigaction from `default` (sigset size 8, as on every
    // architecture lamcr builds for); rt_sigprocmask reads `none`.
    unsafe {
        // Dispositions first: a child sharing its parent's memory must never run a handler.
        for &sig in reset {
            let args = [sig as usize, default.as_ptr() as usize, 0, 8, 0, 0];
            raw::syscall(libc::SYS_rt_sigaction, args)?;
        }
        let args = [
            libc::SIG_SETMASK as usize,
            &none as *const u64 as usize,
            0,
            8,
            0,
            0,
        ];
        raw::syscall(libc::SYS_rt_sigprocmask, args)?;
    }
    Ok(())
}

/// Replaces the current process image with `/proc/self/exe argv...`, keeping the pid.
///
/// The signal mask and dispositions are reset first: both survive `execve`. `keep` lists fds that
/// must survive the exec (their close-on-exec flag is cleared). Returns only on failure.
pub fn exec_self(
    argv: &[&OsStr],
    env: &[(std::ffi::OsString, std::ffi::OsString)],
    keep: &[RawFd],
) -> io::Error {
    let spec = SpawnSpec {
        program: "/proc/self/exe".into(),
        argv: argv.iter().map(|a| a.to_os_string()).collect(),
        env: env.to_vec(),
        ..Default::default()
    };
    let p = match Prepared::new(&spec) {
        Ok(p) => p,
        Err(e) => return e,
    };
    for &fd in keep {
        // SAFETY: fcntl on an fd number; clearing FD_CLOEXEC cannot violate memory safety.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, 0);
        }
    }
    // SAFETY: resetting dispositions is intended here, the image is about to be replaced; execve
    // gets NUL-terminated arrays built above that outlive the call.
    unsafe {
        let _ = reset_signals_raw(&p.reset);
        libc::execve(
            p.program.as_ptr(),
            p.argv_ptrs.as_ptr(),
            p.env_ptrs.as_ptr(),
        );
    }
    io::Error::last_os_error()
}

/// Installs a handler for each of `signals` that writes the signal number as one byte to `fd`.
///
/// This is the *sync handler* of lamcr: the only work it does in signal context is one `write`,
/// which interrupts the main loop's `poll`. Nothing else is async-signal-safe enough to do there.
pub fn install_signal_pipe(signals: &[i32], fd: RawFd) -> io::Result<()> {
    for &sig in signals {
        let byte = sig as u8;
        // SAFETY: the closure only calls write(2) on a non-blocking pipe fd, which is
        // async-signal-safe, and preserves errno as signal-hook requires for raw handlers.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                let saved = *libc::__errno_location();
                libc::write(fd, (&byte as *const u8).cast(), 1);
                *libc::__errno_location() = saved;
            })
        }?;
    }
    Ok(())
}

/// Rewrites this process's command line (what `ps` and `/proc/PID/cmdline` show) in place, as
/// `setproctitle` does: `words`, NUL-separated, cut to the original length and padded with NULs.
/// Used by the holder, a fork of lamd that would otherwise show lamd's arguments. Afterwards
/// `std::env::args` sees the new words (and empty ones).
pub fn set_cmdline(words: &[&str]) -> io::Result<()> {
    let len = std::fs::read("/proc/self/cmdline")?.len();
    let mut text: Vec<u8> = words.iter().flat_map(|w| w.bytes().chain([0])).collect();
    text.resize(len, 0);
    unsafe extern "C" {
        static program_invocation_name: *mut libc::c_char;
    }
    // SAFETY: glibc points `program_invocation_name` at argv[0], the start of the kernel's
    // argument area, whose `len` bytes (all of argv, contiguous) are ours to write; we write
    // exactly that many. Single writer: called once, at start-up.
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), program_invocation_name.cast::<u8>(), len);
    }
    Ok(())
}

/// The inode number of the object behind `fd` (pipes and sockets are named by it in CRIU).
pub fn inode_of(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(nix::sys::stat::fstat(fd)?.st_ino)
}

/// How many bytes a pipe or socket holds unread (`FIONREAD`).
pub fn readable_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at a live local.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// Takes ownership of an fd number this process inherited by contract (e.g. a holder's control
/// pipe on fd 3). The caller must not use the number elsewhere afterwards.
pub fn take_inherited_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: by the documented contract the fd is open, inherited, and owned by nobody else in
    // this process; an invalid fd would only make later syscalls fail with EBADF.
    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
}

/// Ignores SIGPIPE, so a closed reader shows up as EPIPE on write instead of killing us.
pub fn ignore_sigpipe() {
    // SAFETY: SIG_IGN installs no handler code; it cannot break async-signal-safety.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigIgn,
        )
    };
}

/// A read-only mapping of a whole file: checksumming a checkpoint image this way reads the page
/// cache in place instead of copying every byte through a buffer first.
pub struct FileMap {
    ptr: std::ptr::NonNull<std::ffi::c_void>,
    len: usize,
}

impl FileMap {
    /// Maps `file` (its current length). `None` for an empty file, which cannot be mapped.
    pub fn new(file: &std::fs::File) -> io::Result<Option<Self>> {
        let len = file.metadata()?.len();
        Self::range(file, 0, len)
    }

    /// Maps `len` bytes of `file` from `offset`, which must be a multiple of the page size.
    /// `None` when `len` is 0.
    pub fn range(file: &std::fs::File, offset: u64, len: u64) -> io::Result<Option<Self>> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        let Some(nz) = std::num::NonZeroUsize::new(len) else {
            return Ok(None);
        };
        // SAFETY: a fresh private read-only mapping chosen by the kernel (no address hint), so it
        // aliases no Rust object; the fd is valid for the call and the mapping outlives it.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                nz,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_PRIVATE | nix::sys::mman::MapFlags::MAP_POPULATE,
                file,
                offset,
            )
        }?;
        Ok(Some(Self { ptr, len }))
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes until `drop`, and the slice borrows `self`.
        // Checkpoint images are never written after they are committed (their directories are
        // private to their owner); were one truncated meanwhile anyway, reading past its new end
        // would raise SIGBUS in this short-lived verification, not corrupt memory.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no slice of it outlives `self`.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(program: &str, args: &[&str]) -> SpawnSpec {
        SpawnSpec {
            program: program.into(),
            argv: std::iter::once(program)
                .chain(args.iter().copied())
                .map(Into::into)
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_spawner_starts_many_and_settles_only_the_failures() {
        let mut spawner = Spawner::new();
        let mut ok = Vec::new();
        for _ in 0..8 {
            ok.push(spawner.start(&spec("/bin/sh", &["-c", "exit 7"])).unwrap());
        }
        let missing = spawner.start(&spec("/nonexistent/lamcr", &[])).unwrap();
        let failed = spawner.settle();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, missing);
        assert_eq!(failed[0].1.raw_os_error(), Some(libc::ENOENT));
        for pid in ok {
            // Each exec'd the shell, whose exit code is its own.
            let status = nix::sys::wait::waitpid(pid, None).unwrap();
            assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 7));
        }
        // Settling again has nothing left to wait for.
        assert!(spawner.settle().is_empty());
    }

    #[test]
    fn spawn_reports_an_exec_failure_as_its_errno() {
        let err = spawn(&spec("/nonexistent/lamcr", &[])).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        let pid = spawn(&spec("/bin/true", &[])).unwrap();
        let status = nix::sys::wait::waitpid(pid, None).unwrap();
        assert_eq!(status, nix::sys::wait::WaitStatus::Exited(pid, 0));
    }
}
