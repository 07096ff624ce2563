//! Checkpoint engines. Today: [`criu`], which dumps and restores whole process trees.
pub mod criu;
