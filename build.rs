//! Where the binaries find the prebuilt libduckdb.so at run time.
//!
//! libduckdb-sys links the library from DUCKDB_LIB_DIR but leaves finding it
//! at run time to the system. The binaries and tests record that folder as
//! their RUNPATH, so that they run without LD_LIBRARY_PATH; the Debian package
//! sets OW_DUCKDB_RUNPATH to where it installs the library instead.
//! Shared by both crates of the workspace (crates/ow-duckdb names this file).

fn main() {
    println!("cargo:rerun-if-env-changed=DUCKDB_LIB_DIR");
    println!("cargo:rerun-if-env-changed=OW_DUCKDB_RUNPATH");
    let runpath = std::env::var("OW_DUCKDB_RUNPATH")
        .or_else(|_| std::env::var("DUCKDB_LIB_DIR"))
        .ok()
        .filter(|d| !d.is_empty());
    let bundled = std::env::var_os("CARGO_FEATURE_BUNDLED_DUCKDB").is_some();
    match runpath {
        Some(dir) if !bundled => println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}"),
        Some(_) => {}
        None if bundled
            || std::env::var("CARGO_PKG_NAME").as_deref() != Ok("outreach-workbench") => {}
        None => {
            eprintln!(
                "outreach-workbench links a prebuilt DuckDB, and DUCKDB_LIB_DIR is not set.\n\
                 The project's scripts fetch the pinned library and set it:\n  \
                 scripts/test.sh, scripts/demo.sh, or by hand:\n  \
                 source scripts/lib/services.sh && ow_ensure_duckdb && cargo build --release\n\
                 Or compile DuckDB from source (~35 minutes): --features bundled-duckdb"
            );
            std::process::exit(1);
        }
    }
}
