//! The QEMU side of VM instances (layer 0): QEMU's command line and a QMP
//! client. The VM driver (issue #14) is built on these; what was measured
//! of QEMU on this machine kind is in docs/vm-migration-recipe.md.

pub mod qemu;
pub mod qmp;
