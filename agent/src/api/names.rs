//! Validated names (see `ferry_raft::names`), re-exported for the wire types.

pub use ferry_raft::names::*;
