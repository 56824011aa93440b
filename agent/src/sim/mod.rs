//! Test seams (compiled only for tests): an in-memory Raft network with
//! cut links (`net`), and an in-process cluster of node handles with a
//! fake host driver that runs whole moves (`cluster`, `fake_driver`).

pub mod cluster;
pub mod fake_driver;
mod launches;
mod moves;
pub mod net;
mod removal;
mod trust;
