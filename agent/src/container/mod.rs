//! Container instances on runc + CRIU: the bundle on disk, the runc
//! wrapper, and the reconciler that makes the owner's host match the
//! replicated state.

pub mod bundle;
pub mod reconcile;
pub mod runc;
