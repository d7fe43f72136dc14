//! A command typed as root on a host where the service owns the workbench
//! runs as the service's user. A file root made there (a DuckDB WAL, a
//! Parquet file, a report page) would be one the daemon cannot write or
//! replace again; the command's secrets are read first, as root, from
//! the root-only credential folder.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::process::{Gid, Uid};

/// Who the process is after [`become_owner_of`].
#[derive(Debug, PartialEq, Eq)]
pub enum Became {
    /// Not root, or the folder is root's or not there: nothing changed.
    Same,
    /// Root became the folder's owner.
    Owner { uid: u32, gid: u32, name: String },
}

/// When this process is root and `dir` belongs to another user, becomes
/// that user, with `dir`'s group as its only group. Refused when the
/// process has more than one thread: the kernel changes the calling
/// thread's ids only (new threads inherit them), so a thread started
/// before would stay root.
pub fn become_owner_of(dir: &Path) -> Result<Became, String> {
    if !rustix::process::geteuid().is_root() {
        return Ok(Became::Same);
    }
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(Became::Same);
    };
    if meta.uid() == 0 {
        return Ok(Became::Same);
    }
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0);
    if threads != 1 {
        return Err(format!(
            "{} belongs to uid {}: run this command as that user (found {threads} threads, cannot switch safely)",
            dir.display(),
            meta.uid()
        ));
    }
    let (uid, gid) = (meta.uid(), meta.gid());
    let switch = || -> rustix::io::Result<()> {
        // Groups first: after the user id changes, they cannot be.
        rustix::thread::set_thread_groups(&[Gid::from_raw(gid)])?;
        let g = Gid::from_raw(gid);
        rustix::thread::set_thread_res_gid(g, g, g)?;
        let u = Uid::from_raw(uid);
        rustix::thread::set_thread_res_uid(u, u, u)
    };
    switch().map_err(|e| {
        format!(
            "{} belongs to uid {uid}; could not become that user: {e}",
            dir.display()
        )
    })?;
    Ok(Became::Owner {
        uid,
        gid,
        name: user_name(uid).unwrap_or_else(|| format!("uid {uid}")),
    })
}

/// The user's name from /etc/passwd (no NSS for a system user).
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_string())
    })
}
