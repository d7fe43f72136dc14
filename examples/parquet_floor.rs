//! The floor of the states' work: DuckDB's Parquet writer alone, on the
//! files a run just wrote.
//!
//! `cargo run --release --example parquet_floor -- CONFIG` reads every
//! Parquet file under the workbench's `exports/` into an in-memory table,
//! in file order, then writes each table again, one thread, with the
//! run's own writer settings (`files::copy_sql`), and prints the writer's
//! seconds for the companies' files and the people's. Nothing else is
//! timed: no reading, sorting, decoding or validating. Each rewritten file
//! is compared with the run's: equal bytes show the same work was timed.
//! A file past one row group may differ in where its groups end (the run's
//! rows come in chunks, and a group ends with the first chunk that fills
//! it); `OW_FLOOR_KEEP=1` keeps such files to look at.
//!
//! `scripts/bench.sh` runs it after the all-states dry run. The people's
//! files cannot be written before the read of the people ends (every
//! state's people arrive interleaved), so the COPY floor plus the people's
//! writer time over the machine's cores bounds any all-states dry run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use outreach_workbench::config::Config;
use outreach_workbench::files::copy_sql;

fn main() -> Result<()> {
    let Some(config) = std::env::args().nth(1) else {
        bail!("usage: parquet_floor CONFIG (the config of a workbench whose run wrote its files)");
    };
    let config = Config::load(Path::new(&config)).with_context(|| config.clone())?;
    let exports = config.workbench.dir.join("exports");
    let mut files = Vec::new();
    parquet_files(&exports, &mut files).with_context(|| exports.display().to_string())?;
    files.sort();
    if files.is_empty() {
        bail!(
            "no Parquet file under {}: run the workbench first",
            exports.display()
        );
    }
    let duck = duckdb::Connection::open_in_memory()?;
    duck.execute_batch("SET threads = 1")?;
    let out = tempdir()?;
    let mut tables = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let table = format!("t{i}");
        duck.execute_batch(&format!(
            "CREATE TABLE {table} AS SELECT * FROM read_parquet('{}')",
            f.to_string_lossy().replace('\'', "''")
        ))
        .with_context(|| f.display().to_string())?;
        tables.push(table);
    }
    // (rows, seconds) of the companies' files and the people's.
    let (mut companies, mut people) = ((0u64, 0.0f64), (0u64, 0.0f64));
    let mut same = 0;
    for (f, table) in files.iter().zip(&tables) {
        let tmp = out.join(format!("{table}.parquet"));
        let t = Instant::now();
        let rows = duck.execute(
            &copy_sql(&format!("SELECT * FROM {table}"), &tmp, &config.export),
            [],
        )?;
        let secs = t.elapsed().as_secs_f64();
        // By the file's own name (`companies_good.parquet`, …), not its
        // directories: the workbench's path may hold any word.
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        let entity = if name.starts_with("companies_") {
            &mut companies
        } else {
            &mut people
        };
        entity.0 += rows as u64;
        entity.1 += secs;
        if std::fs::read(&tmp)? == std::fs::read(f)? {
            same += 1;
        } else if std::env::var_os("OW_FLOOR_KEEP").is_some() {
            eprintln!("differs: {} (kept as {})", f.display(), tmp.display());
            continue;
        }
        std::fs::remove_file(&tmp)?;
    }
    // Not empty only when files were kept.
    let _ = std::fs::remove_dir(&out);
    println!(
        "Parquet writer alone, one thread, {} files ({same} byte-identical to the run's)",
        files.len()
    );
    for (name, (rows, secs)) in [("companies", companies), ("people", people)] {
        println!(
            "{name:<10} {rows:>10} rows {secs:>8.2} s {:>6.2} us/row",
            secs * 1e6 / rows.max(1) as f64
        );
    }
    Ok(())
}

/// Every `*.parquet` under `dir`.
fn parquet_files(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            parquet_files(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "parquet") {
            files.push(path);
        }
    }
    Ok(())
}

/// A fresh directory for the rewritten files, beside nothing of the run's.
fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ow-parquet-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    Ok(dir)
}
