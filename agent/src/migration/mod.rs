//! Moving instances between members: the compatibility check, and (with
//! the container driver) the per-phase decisions of source and target.

pub mod api;
pub mod compat;
pub mod engine;
pub mod plan;
pub mod tree;
