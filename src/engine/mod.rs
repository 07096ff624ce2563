//! Checkpoint engines. [`criu`] dumps and restores whole process trees (root only);
//! [`self_state`] keeps what each rank's callbacks saved (no privilege). lamd's `dump` and
//! `restore` verbs drive either; ranks that use the library take part through [`crate::cr`].
pub mod criu;
pub mod self_state;

use crate::schema::Engine;

/// `--engine auto`: CRIU where it can work (root, criu installed), else `self`, with the reason.
pub fn auto() -> (Engine, Option<String>) {
    if !nix::unistd::geteuid().is_root() {
        return (
            Engine::SelfState,
            Some("CRIU needs root (see lamcr check)".into()),
        );
    }
    if criu::criu_path().is_none() {
        return (
            Engine::SelfState,
            Some("criu is not installed (see lamcr check)".into()),
        );
    }
    (Engine::Criu, None)
}
