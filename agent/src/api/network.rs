//! Wire types of `ferry network show`.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkView {
    /// The cluster network's range; `None` when the cluster has none.
    pub subnet: Option<String>,
    /// Every member's bridge address, the instances' gateway.
    pub gateway: Option<String>,
    /// How many addresses can be leased, and how many are.
    pub capacity: u32,
    pub leases: Vec<LeaseView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseView {
    pub address: String,
    pub instance: String,
    /// The member it runs on (its owner).
    pub member: String,
}
