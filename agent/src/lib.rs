//! ferry-agent: the daemon that runs on every host: identity and data dir,
//! the request service, Raft membership upkeep and host facts.

pub mod agent;
pub mod client;
pub mod container;
pub mod datadir;
pub mod facts;
pub mod gossip;
pub mod instances;
pub mod membership;
pub mod migration;
pub mod protocol;
pub mod service;
pub mod token;

pub use agent::{Agent, AgentError, AgentOptions};
