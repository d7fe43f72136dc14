//! Whether a daemon serves this workbench: it holds a lock on a file in the
//! workbench for as long as it runs, which the kernel drops when the
//! process ends however it ends (a pid file would outlive a kill -9).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

fn lock_path(dir: &Path) -> PathBuf {
    dir.join("daemon.lock")
}

/// Held by the daemon from its start to its end; dropping it releases the
/// lock.
pub struct DaemonLock(#[allow(dead_code)] File);

/// Takes the lock; `None` (said in the log by the caller) when the file
/// cannot be made, which costs `status` its answer, not the daemon its run.
pub fn hold(dir: &Path) -> std::io::Result<DaemonLock> {
    std::fs::create_dir_all(dir)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path(dir))?;
    match file.try_lock() {
        Ok(()) => Ok(DaemonLock(file)),
        Err(TryLockError::WouldBlock) => Err(std::io::Error::other(format!(
            "another daemon already serves {}",
            dir.display()
        ))),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Whether a daemon holds the lock now; `None` when it cannot be told.
pub fn daemon_running(dir: &Path) -> Option<bool> {
    let file = match File::open(lock_path(dir)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(false),
        Err(_) => return None,
    };
    match file.try_lock_shared() {
        Ok(()) => Some(false),
        Err(TryLockError::WouldBlock) => Some(true),
        Err(TryLockError::Error(_)) => None,
    }
}
