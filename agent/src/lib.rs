//! ferry-agent: the daemon that runs on every host.
//!
//! Layers (each module imports only its own layer or lower; features never
//! import each other; `scripts/check-layers.sh` enforces it):
//! - 0: `api` (wire types), `clock`, `datadir`, `facts`, `token`,
//!   `client`, `transfer`, `driver` and `container` (host drivers), and
//!   the pure decisions `migration::plan`, `migration::compat`,
//!   `membership::plan`, `instances::reconcile`, `gossip::{codec,
//!   identity, news, suspicion, handle}`;
//! - 1: `node` (the handle, the write path, peer calls);
//! - 2: features: `identity`, `membership`, `gossip`, `instances`,
//!   `migration`;
//! - top: `service` (who may ask what) and `run` (the only place that
//!   spawns loops).

pub mod api;
pub mod client;
mod clock;
mod container;
pub mod datadir;
pub mod driver;
mod exporter;
pub mod facts;
mod gossip;
pub mod hooks;
mod hosts;
mod identity;
mod image;
mod instances;
mod kinds;
mod membership;
mod metrics;
mod migration;
mod monitor;
mod netdev;
mod network;
mod node;
mod placement;
mod run;
mod service;
pub mod token;
pub mod transfer;
pub mod vm;

pub use container::shim::{run_shim, ShimArgs};
pub use gossip::GossipConfig;
pub use run::{run, AgentError, AgentOptions};
#[cfg(test)]
mod sim;
