//! The ledger in PostgreSQL: which host runs which fire time (fire
//! claims), which process runs a state now (leases), and the audit record
//! of every run.
//!
//! May call: the config, [`crate::source::connect`]'s session,
//! [`crate::error`]. Nothing of the run.

pub mod audit;
pub mod claim;
pub mod process;
