//! Who holds a lease, precisely enough to tell a dead local holder from a
//! live one without waiting for its TTL: the kernel's boot id and pid
//! namespace (the same pid means the same process only within both), and
//! the process's start time in clock ticks since boot (a pid alone is
//! reused). A leaf: reads `/proc` and nothing of the crate.

use std::fs;
use std::sync::OnceLock;

/// This process, as written into the lease row's `process` column:
/// `boot=<id> pidns=<inode> start=<ticks>`; `None` off Linux.
pub fn this_process() -> Option<String> {
    // None of it changes while the process lives: read once.
    static ME: OnceLock<Option<String>> = OnceLock::new();
    ME.get_or_init(|| {
        let (boot, pidns) = machine().as_ref()?;
        let start = start_ticks("self")?;
        Some(format!("boot={boot} pidns={pidns} start={start}"))
    })
    .clone()
}

/// Whether the holder `pid`, described by `process` (what
/// [`this_process`] wrote for it), is known to be dead: it ran in this boot
/// and pid namespace, and no process has that pid now, or the one that has
/// it started at another time (the pid was reused). Anything unknown
/// (another machine, an older row without `process`, a process this one
/// may not look at) is not dead: its lease waits for the TTL.
pub fn is_dead_here(process: Option<&str>, pid: i32) -> bool {
    let Some(process) = process else { return false };
    let field = |name: &str| {
        process
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    let (Some((boot, pidns)), Some(their_boot), Some(their_ns), Some(their_start)) = (
        machine().as_ref(),
        field("boot"),
        field("pidns"),
        field("start"),
    ) else {
        return false;
    };
    if boot != their_boot || pidns != their_ns || pid <= 0 {
        return false;
    }
    match start_ticks(&pid.to_string()) {
        Some(now) => now.to_string() != their_start,
        // Gone from /proc, or hidden from us (hidepid): ask the kernel,
        // which answers "no such process" only for the first.
        None => match rustix::process::Pid::from_raw(pid) {
            Some(p) => rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH),
            None => false,
        },
    }
}

/// The boot id and the pid namespace of this process, read once.
fn machine() -> &'static Option<(String, String)> {
    static MACHINE: OnceLock<Option<(String, String)>> = OnceLock::new();
    MACHINE.get_or_init(|| {
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let ns = fs::read_link("/proc/self/ns/pid").ok()?;
        Some((boot.trim().to_string(), ns.to_string_lossy().into_owned()))
    })
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock
/// ticks since boot. The command name (field 2) may hold spaces and
/// parentheses, so the fields are counted after its last `)`.
fn start_ticks(pid: &str) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_an_exited_one_is_dead() {
        let me = this_process().expect("on Linux");
        assert!(!is_dead_here(Some(&me), std::process::id() as i32));
        // Another start time under this pid: the pid was reused.
        let reused = me.replace("start=", "start=1");
        assert!(is_dead_here(Some(&reused), std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(is_dead_here(Some(&me), pid), "exited pid {pid}");
        // Another boot or pid namespace, or no description: not ours to judge.
        let elsewhere = me.replacen("boot=", "boot=x", 1);
        assert!(!is_dead_here(Some(&elsewhere), pid));
        let other_ns = me.replacen("pidns=", "pidns=x", 1);
        assert!(!is_dead_here(Some(&other_ns), pid));
        assert!(!is_dead_here(None, pid));
    }
}
