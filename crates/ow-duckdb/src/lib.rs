//! The parts of DuckDB's C API that duckdb-rs has no door for, behind a
//! safe API; every `unsafe` block of outreach-workbench is in this crate.
//!
//! - [`Database`]: an in-memory instance with the workbench file attached
//!   (only `ATTACH` takes a row group size), and duckdb-rs connections to it.
//! - [`RawConnection`]: a connection driven with SQL text through the C API,
//!   whose transaction can take rows fed by [`RawConnection::insert_chunks`].
//! - [`ChunkConverter`] and [`Chunk`]: Arrow batches converted by DuckDB's
//!   own C++ into its chunks, which a table function of ours (`ow_feed`)
//!   hands to statements without copying.
//!
//! A panic in Rust code that DuckDB calls back (the feed's `next`) is caught
//! at the C boundary and fails the statement; it never unwinds into C++.

mod ingest;
mod raw;

pub use ingest::{chunk_rows, Chunk, ChunkConverter, NextChunk, Template};
pub use raw::{Database, DuckError, RawConnection, ROW_GROUP_SIZE};
