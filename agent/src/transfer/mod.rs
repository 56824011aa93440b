//! Moving directory trees between members (launch upload, migration parts)
//! and counting what arrives.

pub mod btrfs;
pub(crate) mod progress;
pub mod relay;
pub mod space;
pub mod tree;
