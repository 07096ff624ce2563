//! The C ABI: libcr's names and meanings over [`crate::cr`], so BLCR-era C code builds against
//! `include/libcr.h` and links `-llamcr` with few or no changes. `lamcr_*` functions are the
//! extensions the `self` engine needs.
//!
//! Return conventions follow libcr: `cr_checkpoint` gives 0 (continue), a positive value
//! (restarted) or a negated `CR_E*` code; `cr_init` gives a client id or -1 with `errno` set.

use std::ffi::{c_int, c_void};
use std::sync::{Arc, OnceLock};

use crate::cr::{self, Context, CrError, Flags, Outcome, Status};

pub const CR_SIGNAL_CONTEXT: c_int = 0;
pub const CR_THREAD_CONTEXT: c_int = 1;
pub const CR_ETEMPFAIL: c_int = 1001;
pub const CR_EPERMFAIL: c_int = 1002;
pub const CR_EOMITTED: c_int = 1003;
pub const CR_ENOTCB: c_int = 1004;
pub const CR_ENOINIT: c_int = 1005;

/// A C callback and its argument.
struct CCallback {
    func: extern "C" fn(*mut c_void) -> c_int,
    arg: *mut c_void,
}

// SAFETY: libcr's contract: the argument given with a callback is the application's to share
// with the thread the callback runs in; the library only passes it back to `func`.
unsafe impl Send for CCallback {}
// SAFETY: as above; the library never dereferences `arg`.
unsafe impl Sync for CCallback {}

fn set_errno(e: c_int) {
    nix::errno::Errno::set_raw(e);
}

/// `cr_client_id_t cr_init(void)`.
#[unsafe(no_mangle)]
pub extern "C" fn cr_init() -> c_int {
    match cr::init() {
        Ok(_) => 0,
        Err(CrError::NotUnderLamcr) => {
            set_errno(libc::ENOSYS);
            -1
        }
        Err(_) => {
            set_errno(libc::EIO);
            -1
        }
    }
}

/// `cr_callback_id_t cr_register_callback(cr_callback_t func, void *arg, int flags)`.
#[unsafe(no_mangle)]
pub extern "C" fn cr_register_callback(
    func: Option<extern "C" fn(*mut c_void) -> c_int>,
    arg: *mut c_void,
    flags: c_int,
) -> c_int {
    let Some(func) = func else {
        set_errno(libc::EINVAL);
        return -1;
    };
    let cb = CCallback { func, arg };
    let f: cr::CallbackFn = Arc::new(move || {
        let cb = &cb;
        (cb.func)(cb.arg)
    });
    let context = if flags & CR_THREAD_CONTEXT != 0 {
        Context::Thread
    } else {
        Context::Signal
    };
    cr::register_any(context, f).0 as c_int
}

/// `int cr_checkpoint(int flags)`.
#[unsafe(no_mangle)]
pub extern "C" fn cr_checkpoint(flags: c_int) -> c_int {
    match cr::checkpoint(Flags(flags as u32)) {
        Ok(Outcome::Continue) => 0,
        Ok(Outcome::Restarted) => 1,
        Err(CrError::NotInCallback) => -CR_ENOTCB,
        Err(CrError::TempFailure) => -CR_ETEMPFAIL,
        Err(CrError::PermFailure) => -CR_EPERMFAIL,
        Err(CrError::Omitted) => -CR_EOMITTED,
        Err(_) => -CR_ENOINIT,
    }
}

/// `void cr_enter_cs(cr_client_id_t)`.
#[unsafe(no_mangle)]
pub extern "C" fn cr_enter_cs(_id: c_int) {
    cr::enter_cs_raw();
}

/// `int cr_tryenter_cs(cr_client_id_t)`: 0 entered, -1 with `EAGAIN` if a checkpoint is pending.
#[unsafe(no_mangle)]
pub extern "C" fn cr_tryenter_cs(_id: c_int) -> c_int {
    if cr::try_enter_cs_raw() {
        0
    } else {
        set_errno(libc::EAGAIN);
        -1
    }
}

/// `void cr_leave_cs(cr_client_id_t)`.
#[unsafe(no_mangle)]
pub extern "C" fn cr_leave_cs(_id: c_int) {
    cr::leave_cs_raw();
}

/// `int cr_status(void)`: CR_STATE_IDLE (0), CR_STATE_PENDING (1), CR_STATE_ACTIVE (2).
#[unsafe(no_mangle)]
pub extern "C" fn cr_status() -> c_int {
    match cr::status() {
        Status::Idle => 0,
        Status::Pending => 1,
        Status::Active => 2,
    }
}

/// `int cr_initialize_checkpoint_args_t(cr_checkpoint_args_t *)`: zeroes the (opaque) args.
///
/// # Safety
/// `args` is null or points to a `cr_checkpoint_args_t` of the header's size.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cr_initialize_checkpoint_args_t(args: *mut c_void) -> c_int {
    if !args.is_null() {
        // SAFETY: the caller passes a writable cr_checkpoint_args_t (64 bytes in libcr.h).
        unsafe { std::ptr::write_bytes(args.cast::<u8>(), 0, 64) };
    }
    0
}

/// `int cr_request_checkpoint(cr_checkpoint_args_t *, cr_checkpoint_handle_t *)`: asks for a
/// checkpoint of the whole job (lamcr always checkpoints the job; the args are ignored).
///
/// # Safety
/// `handle` is null or points to a writable `cr_checkpoint_handle_t` (an int).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cr_request_checkpoint(_args: *mut c_void, handle: *mut c_int) -> c_int {
    match cr::request_checkpoint() {
        Ok(()) => {
            if !handle.is_null() {
                // SAFETY: non-null, and the caller's contract says it is writable.
                unsafe { handle.write(1) };
            }
            0
        }
        Err(_) => {
            set_errno(libc::ENOSYS);
            -1
        }
    }
}

/// `int lamcr_restarted(void)`: 1 if a `self`-engine restart started this process.
#[unsafe(no_mangle)]
pub extern "C" fn lamcr_restarted() -> c_int {
    c_int::from(cr::start() == Some(cr::Start::Restarted))
}

/// `int lamcr_save_state(const void *data, size_t len)`: inside a thread-context callback, the
/// state the `self` engine saves for this rank.
///
/// # Safety
/// `data` points to `len` readable bytes (or `len` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lamcr_save_state(data: *const c_void, len: usize) -> c_int {
    if len == 0 {
        cr::save_state(&[]);
        return 0;
    }
    if data.is_null() {
        return -1;
    }
    // SAFETY: the caller guarantees `len` readable bytes at `data`.
    let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
    cr::save_state(bytes);
    0
}

/// `const void *lamcr_restored_state(size_t *len)`: the state saved at the checkpoint this
/// process was restarted from, or NULL. The memory stays valid for the life of the process.
///
/// # Safety
/// `len` is null or points to a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn lamcr_restored_state(len: *mut usize) -> *const c_void {
    static STATE: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    let state = STATE.get_or_init(cr::restored_state);
    let (p, n) = match state {
        Some(s) => (s.as_ptr().cast::<c_void>(), s.len()),
        None => (std::ptr::null(), 0),
    };
    if !len.is_null() {
        // SAFETY: non-null, and the caller's contract says it is writable.
        unsafe { len.write(n) };
    }
    p
}
