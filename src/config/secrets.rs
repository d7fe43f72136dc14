//! Where each secret comes from. A service gets its secrets from systemd's
//! credentials (a file per secret, readable by the service alone, not
//! inherited by children, absent from `/proc/<pid>/environ`); a container
//! from a file named by `<NAME>_FILE`; a shell from the environment. Looked
//! up in that order, so a stray variable cannot override what the unit
//! loads.

use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::{invalid, ConfigError};

/// The secrets a run can need, by the original script's variable names.
pub const NAMES: &[&str] = &["NEON_PASSWORD", "B2_KEY_ID", "B2_APPLICATION_KEY"];

/// The ID the shipped unit loads its credential folder under: systemd names
/// each file of a folder `<ID>_<file name>`.
pub const UNIT_PREFIX: &str = "ow_";

/// The folder beside the config file that holds one file per secret
/// (root's, 0700): the unit loads it, and root's shell commands read it.
pub const FOLDER: &str = "credentials";

/// Where a secret was found; shown by `check`, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `$CREDENTIALS_DIRECTORY/<file>`, from systemd.
    Credential(PathBuf),
    /// The file `<NAME>_FILE` names.
    File(PathBuf),
    /// The variable itself.
    Environment(String),
    /// `<config dir>/credentials/<NAME>`, read directly (root's shell).
    Folder(PathBuf),
    /// The TOML file (refused by `check`; the daemon warns).
    ConfigFile,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Credential(p) => write!(f, "systemd credential {}", p.display()),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Environment(var) => write!(f, "environment variable {var}"),
            Origin::Folder(p) => write!(f, "file {}", p.display()),
            Origin::ConfigFile => f.write_str("the config file"),
        }
    }
}

/// `name`'s value and where it came from, or `None` when no place has it.
/// A file that is named but cannot be read is an error naming it; an empty
/// one counts as not set (a secret not filled in yet). One trailing newline
/// is dropped: `echo secret > file` must work.
pub fn lookup(
    name: &str,
    config_dir: Option<&Path>,
) -> Result<Option<(String, Origin)>, ConfigError> {
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let dir = PathBuf::from(dir);
        for file in [name.to_string(), format!("{UNIT_PREFIX}{name}")] {
            let path = dir.join(file);
            if let Some(value) = read(&path, name, true)? {
                return Ok(Some((value, Origin::Credential(path))));
            }
        }
    }
    let file_var = format!("{name}_FILE");
    if let Some(path) = std::env::var_os(&file_var) {
        let path = PathBuf::from(path);
        return match read(&path, &file_var, false)? {
            Some(value) => Ok(Some((value, Origin::File(path)))),
            None => Err(invalid(
                &file_var,
                format!("{} does not exist or is empty", path.display()),
            )),
        };
    }
    if let Ok(value) = std::env::var(name) {
        if !value.is_empty() {
            return Ok(Some((value, Origin::Environment(name.to_string()))));
        }
    }
    if let Some(dir) = config_dir {
        let path = dir.join(FOLDER).join(name);
        // Root's: anyone else is expected not to read it, and goes on.
        if let Ok(Some(value)) = read(&path, name, true) {
            return Ok(Some((value, Origin::Folder(path))));
        }
    }
    Ok(None)
}

/// The file's text without one trailing newline; `None` when it is empty or
/// (with `missing_ok`) absent.
fn read(path: &Path, key: &str, missing_ok: bool) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let value = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text);
            Ok((!value.is_empty()).then(|| value.to_string()))
        }
        Err(e) if missing_ok && e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(invalid(key, format!("cannot read {}: {e}", path.display()))),
    }
}
