//! Integration tests against real PostgreSQL and S3 servers (started by
//! `scripts/test.sh`). One test binary: DuckDB is linked statically and each
//! extra binary costs a long link.

mod cli;
mod common;
mod daemon;
mod gates;
mod packaging;
mod pipeline;
mod pooled;
mod publish;
mod s3proxy;
mod serve;
mod systemd_boot;
mod types;
