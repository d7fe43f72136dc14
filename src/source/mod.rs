//! The source: PostgreSQL. Owns connecting (TLS as libpq spells it, a
//! session that reconnects, describing a table), the mapping of
//! PostgreSQL's types to Arrow and DuckDB, the pull that streams a
//! state's rows out of it, and the all-states read of every state's rows
//! in one query, handed on state by state.
//!
//! May call: the config, the workbench (the pull feeds it), [`crate::error`]
//! and [`crate::retry`]. Nothing above.

pub mod connect;
pub mod country;
pub mod keymap;
pub mod pgtypes;
pub mod pull;
pub mod rechunk;
pub mod sort;
pub mod spool;
pub mod tuples;
