//! lamcr: a checkpoint-aware parallel job runtime. LAM/MPI's checkpoint/restart design (a
//! launcher with sync and async checkpoint handlers, node daemons, a restart schema) rebuilt on
//! CRIU. See `docs/design.md` for the theory of operation.
//!
//! Modules by role: [`launcher`] (mpirun), [`lamd`] (node daemon and the holder of a node's
//! ranks), [`handlers`] (checkpoint handlers and the helper), [`schema`] (job spec, restart schema,
//! manifest, wire protocol; no I/O), [`engine`] (CRIU), [`cr`] (the library ranks link: BLCR-style
//! callbacks, critical sections, the `self` engine's state; its C ABI is in `sys::capi`), [`event`] (what the poll loops share),
//! [`sys`] (the only `unsafe`), [`cli`].
#![deny(unsafe_code)]

pub mod cli;
pub mod cr;
pub mod engine;
pub mod event;
pub mod handlers;
pub mod lamd;
pub mod launcher;
pub mod schema;
pub mod sys;

/// Renders an error and its sources on one line: `outer: inner: innermost`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}
