//! The container driver (layer 0): instances as OCI bundles run by runc,
//! memory state through CRIU. `host::Host` implements `driver::Driver`.

mod bundle;
mod confine;
pub mod console;
mod criu_probe;
pub(crate) mod host;
mod net;
mod runc;
pub mod shim;
