//! outreach-workbench: pull a US state's companies and people from
//! PostgreSQL, validate them in a DuckDB workbench, export good/bad Parquet
//! files, publish the changed ones to an S3-compatible bucket, and audit
//! every run.
//!
//! Where to start reading: [`pipeline::run`] is one run from start to end;
//! [`config`] is everything a user can set.

// Every unsafe block is in the ow-duckdb crate, behind its safe API.
#![forbid(unsafe_code)]

pub mod check;
pub mod config;
pub mod daemon;
pub mod history;
pub mod ident;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod notify;
pub mod pg;
pub mod pipeline;
pub mod schedule;
pub mod state;
pub mod systemd;
pub mod workbench;
