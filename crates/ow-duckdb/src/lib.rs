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

/// Hands the heap's free memory back to the system (glibc's `malloc_trim`).
/// glibc keeps what a run freed (DuckDB's buffers, the pull's batches) in
/// its arenas for reuse; a daemon idle until the next fire has no use for it.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim only walks glibc's own arenas; it may be
        // called at any time from any thread.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Gives the pages of this program's code and read-only data back to the
/// system (`madvise(MADV_PAGEOUT)` on the non-writable mappings of the
/// executable and its libraries). DuckDB is most of the binary, and a run
/// touches tens of MiB of it; between fires a daemon needs none of that.
/// Pages another process maps too (libc's) are left where they are. The pages are clean
/// copies of the file, so nothing is lost: the next run reads them in
/// again. Kernels before 5.4 do not know the advice and keep the pages.
pub fn release_code_pages() {
    #[cfg(target_os = "linux")]
    {
        extern "C" {
            fn madvise(
                addr: *mut std::os::raw::c_void,
                len: usize,
                advice: std::os::raw::c_int,
            ) -> std::os::raw::c_int;
        }
        const MADV_PAGEOUT: std::os::raw::c_int = 21;
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return;
        };
        for line in maps.lines() {
            // start-end perms offset dev inode path
            let mut fields = line.split_whitespace();
            let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
                continue;
            };
            // Files only: not the heap, stacks or [vdso].
            if perms.contains('w') || !fields.nth(3).is_some_and(|p| p.starts_with('/')) {
                continue;
            }
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) else {
                continue;
            };
            // SAFETY: a whole file mapping of this process that is not
            // writable: its pages are clean file pages, which the advice
            // only evicts (they fault back in from the file when used).
            // Writable mappings, whose pages may hold changes, are left
            // alone.
            unsafe {
                madvise(start as *mut _, end - start, MADV_PAGEOUT);
            }
        }
    }
}

/// Caps glibc's malloc arenas at `n` (`mallopt(M_ARENA_MAX)`). By default
/// every thread that meets contention gets an arena of its own, up to
/// eight per core, and what a run's threads free stays in them: a daemon
/// that ran once holds it between fires, which [`trim_heap`] does not
/// give back. Call it before threads start.
pub fn limit_heap_arenas(n: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(
                param: std::os::raw::c_int,
                value: std::os::raw::c_int,
            ) -> std::os::raw::c_int;
        }
        const M_ARENA_MAX: std::os::raw::c_int = -8;
        // SAFETY: mallopt only sets glibc's own tunables.
        unsafe {
            mallopt(M_ARENA_MAX, n);
        }
    }
}
