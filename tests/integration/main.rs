//! Integration tests against real PostgreSQL and S3 servers (started by
//! `scripts/test.sh`; without them, a plain `cargo test` skips those tests and
//! says why). One test binary: each extra binary costs a link.

// First: its needs_services! is used by every module after it.
#[macro_use]
mod common;

mod all_states;
mod changes;
mod cli;
mod daemon;
mod gates;
mod operator;
mod packaging;
mod pipeline;
mod pooled;
mod publish;
mod report_page;
mod s3proxy;
mod serve;
mod systemd_boot;
mod types;
mod workbench;
