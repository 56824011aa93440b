//! SWIM membership (foca) carried as QUIC datagrams on the agent's own
//! endpoint, between certified members only. Every member, voter or
//! learner, takes part; the member list comes from the Raft member table.
//! Gossip tells who is alive within seconds and carries fast-changing load
//! facts; it never changes the replicated state by itself.
//!
//! Layers: `codec`, `identity`, `news`, `suspicion` and `handle` are
//! layer 0 (pure or plain shared state); `runner` is the feature.

mod codec;
pub(crate) mod handle;
mod identity;
pub(crate) mod news;
mod runner;
mod suspicion;

pub use handle::GossipConfig;
pub(crate) use runner::run;
