//! System calls that never touch `errno`, for a child that shares its parent's memory.
//!
//! A child made with `CLONE_VM` and no `CLONE_VFORK` runs while its parent goes on, on the
//! parent's thread-local storage: libc's wrappers, which store a failure's code in the
//! thread-local `errno`, would race with the parent's own reads of it. These wrappers return
//! the kernel's answer instead: `Ok(value)` or `Err(errno)`.
//!
//! Only x86_64 and aarch64 have them ([`AVAILABLE`]); elsewhere a child is spawned with
//! `CLONE_VFORK`, so its parent is suspended and libc's wrappers are safe.

/// Whether this architecture has errno-free system calls (and so concurrent spawning).
pub const AVAILABLE: bool = cfg!(any(target_arch = "x86_64", target_arch = "aarch64"));

/// A system call with up to six word arguments.
///
/// # Safety
/// As for the system call `nr`: every pointer argument must be valid for what the call does
/// with it.
#[inline(always)]
pub unsafe fn syscall(nr: libc::c_long, args: [usize; 6]) -> Result<usize, i32> {
    let ret = imp(nr as usize, args);
    // The kernel returns -4095..=-1 for an error.
    if (-4095..0).contains(&ret) {
        Err(-ret as i32)
    } else {
        Ok(ret as usize)
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn imp(nr: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the `syscall` instruction with the Linux x86_64 convention; it clobbers only rcx
    // and r11 (declared) and the memory the call itself writes, which the caller vouches for.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[cfg(target_arch = "aarch64")]
#[inline(always)]
fn imp(nr: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: `svc 0` with the Linux aarch64 convention (number in x8, result in x0); the
    // memory the call writes is vouched for by the caller.
    unsafe {
        std::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a[0] as isize => ret,
            in("x1") a[1],
            in("x2") a[2],
            in("x3") a[3],
            in("x4") a[4],
            in("x5") a[5],
            options(nostack),
        );
    }
    ret
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[inline(always)]
fn imp(nr: usize, a: [usize; 6]) -> isize {
    // Only reached by children spawned with CLONE_VFORK (see `AVAILABLE`), whose parent is
    // suspended: libc's errno is theirs alone.
    // SAFETY: as for `syscall`.
    unsafe {
        let r = libc::syscall(nr as libc::c_long, a[0], a[1], a[2], a[3], a[4], a[5]);
        if r < 0 {
            -(*libc::__errno_location() as isize)
        } else {
            r as isize
        }
    }
}
