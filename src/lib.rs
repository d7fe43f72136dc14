//! outreach-workbench: pull a US state's companies and people from
//! PostgreSQL, validate them in a DuckDB workbench, export good/bad Parquet
//! files, publish the changed ones to an S3-compatible bucket, and audit
//! every run.
//!
//! Where to start reading: [`pipeline::run`] is one run from start to end,
//! its stages in `pipeline/stages.rs` in the order they happen; [`config`]
//! is everything a user can set.
//!
//! The rooms, from the bottom up; each imports only from rooms above it in
//! this list (its `mod.rs` says what it owns and what it may call):
//! - leaves: [`config`], [`names`], [`ident`], [`state`], [`schedule`]
//! - [`workbench`]: the DuckDB file and its history tables
//! - [`error`] and [`retry`]: a run's errors, retried with backoff
//! - [`source`]: PostgreSQL — connecting, types, the pull
//! - [`quality`]: rules, validation, gates
//! - [`files`]: the Parquet files
//! - [`bucket`]: the S3 requests, publishing, the manifest
//! - [`ledger`]: fire claims, leases and the audit, in PostgreSQL
//! - [`pipeline`]: one run, through the stages above, its report and the
//!   run history
//! - on top: [`check`], [`metrics`], [`notify`], [`systemd`],
//!   [`logging`], [`service_user`], [`manpages`], [`daemon`]

// Every unsafe block is in the ow-duckdb crate, behind its safe API.
#![forbid(unsafe_code)]

pub mod config;
pub mod ident;
pub mod names;
pub mod schedule;
pub mod state;

pub mod workbench;

pub mod error;
pub mod retry;

pub mod bucket;
pub mod files;
pub mod ledger;
pub mod quality;
pub mod source;

pub mod pipeline;

pub mod check;
pub mod daemon;
pub mod logging;
pub mod manpages;
pub mod metrics;
pub mod notify;
pub mod service_user;
pub mod systemd;
