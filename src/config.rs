//! Configuration: one TOML file plus environment overrides, merged by figment.
//!
//! Precedence, lowest first:
//! 1. built-in defaults (the `Default` impls and `#[serde(default)]` below),
//! 2. the TOML file,
//! 3. the original script's variable names (`NEON_HOST`, `B2_KEY_ID`, ...),
//!    so an existing `.env` keeps working unchanged,
//! 4. `OUTREACH_<SECTION>__<KEY>` variables, for one-off overrides.
//!
//! Every struct refuses unknown keys: a typo such as `sslmod = "require"`
//! would otherwise be silently ignored and the service would run with the
//! default. figment's errors already name the key and where it came from
//! (file or variable), so we pass them through instead of rewording them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

pub use crate::ident::{quote_ident, QualifiedName};
use crate::names::Entity;
use crate::state::StateCode;

mod gates;
mod notify;
mod rules;
mod schedule;
pub mod secrets;
mod secs;

pub use gates::GatesConfig;
pub use notify::NotifyConfig;
pub(crate) use rules::rule;
pub use rules::{
    default_company_rules, default_people_rules, Rule, RulesConfig, Severity, LINK_RULE_CODE,
};
pub use schedule::Schedule;
use schedule::ScheduleConfig;

/// The shipped config's bucket: `check` and the daemon refuse it until the
/// admin names theirs.
pub const PLACEHOLDER_BUCKET: &str = "CHANGE-ME";

/// Where the packaged service looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/outreach-workbench/config.toml";

/// The original script's variables and the keys they fill.
const LEGACY_ENV: &[(&str, &str)] = &[
    ("NEON_HOST", "source.host"),
    ("NEON_DATABASE", "source.database"),
    ("NEON_USER", "source.user"),
    ("NEON_PASSWORD", "source.password"),
    ("B2_KEY_ID", "storage.access_key_id"),
    ("B2_APPLICATION_KEY", "storage.secret_access_key"),
    ("B2_BUCKET", "storage.bucket"),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist (pass --config PATH)")]
    NotFound(PathBuf),
    #[error("invalid configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    #[error("invalid configuration: {key}: {message}")]
    Invalid { key: String, message: String },
}

/// Whether loading the config looks its secrets up, and where root's
/// credential folder is (beside the config file).
enum Secrets<'a> {
    Read(Option<&'a Path>),
    Skip,
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub workbench: WorkbenchConfig,
    #[serde(default)]
    pub source: SourceConfig,
    pub storage: StorageConfig,
    #[serde(default)]
    pub export: ExportConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub lease: LeaseConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub rules: RulesConfig,
    #[serde(default)]
    pub gates: GatesConfig,
    #[serde(default)]
    pub report: ReportConfig,
    #[serde(default)]
    pub changes: ChangesConfig,
    /// `[[schedule]]` as written; parsed into `schedules` at load.
    #[serde(default, rename = "schedule")]
    schedule_entries: Vec<ScheduleConfig>,
    /// `[[schedule]]`, parsed, gates merged.
    #[serde(skip)]
    pub schedules: Vec<Schedule>,
    /// Webhooks told about runs that need a person (see `notify.rs`).
    #[serde(default)]
    pub notify: Vec<NotifyConfig>,
    /// Each secret found, by variable name, and where (`check` shows it).
    #[serde(skip)]
    pub secret_origins: Vec<(String, secrets::Origin)>,
}

/// Retries of transient failures (connection refused or reset, timeouts,
/// S3 5xx) within a run, with exponential backoff.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Tries in all, the first included; 1 = no retry.
    pub attempts: u32,
    #[serde(
        rename = "initial_backoff_secs",
        deserialize_with = "secs::deserialize"
    )]
    pub initial_backoff: Duration,
    #[serde(rename = "max_backoff_secs", deserialize_with = "secs::deserialize")]
    pub max_backoff: Duration,
}

impl RetryConfig {
    /// The same settings with one try: for work that must not hold up
    /// what comes next (the daemon's start, `check`), when the database may
    /// simply be down.
    pub fn single_try(&self) -> RetryConfig {
        RetryConfig {
            attempts: 1,
            ..self.clone()
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 4,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Runs of different states at the same time (one state never overlaps).
    pub max_concurrent_runs: usize,
    /// On SIGTERM, how long a running run may take before it is cancelled.
    #[serde(rename = "shutdown_grace_secs", deserialize_with = "secs::deserialize")]
    pub shutdown_grace: Duration,
    /// Daily log files kept.
    pub log_retention_days: usize,
    /// Where the daily log files go; `<workbench>/logs` when unset.
    pub log_dir: Option<PathBuf>,
    /// A run still going after this long is cancelled; 0 = no limit.
    #[serde(rename = "run_timeout_secs", deserialize_with = "secs::deserialize")]
    pub run_timeout: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            max_concurrent_runs: 1,
            shutdown_grace: Duration::from_secs(60),
            log_retention_days: 14,
            log_dir: None,
            run_timeout: Duration::from_secs(4 * 3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkbenchConfig {
    /// Holds `duck/`, `exports/` and `logs/`.
    pub dir: PathBuf,
    /// How long a run waits for another process to release the DuckDB file.
    #[serde(rename = "lock_timeout_secs", deserialize_with = "secs::deserialize")]
    pub lock_timeout: Duration,
    /// DuckDB's `memory_limit`; above it DuckDB spills to `state/tmp`. It
    /// matters for the link rule's runs, which load the rows into the
    /// workbench file: most of what DuckDB holds then is a cache of blocks
    /// already written, which it evicts without spilling (measured on the
    /// benchmark: 128MB peaked at ~235 MiB of RSS and 192MB at ~280 MiB, in
    /// the same time). Other runs write only Parquet (~157 MiB there).
    pub memory_limit: String,
    /// How many Parquet files are written at once after the commit, each on
    /// a core of its own; 0 means one per core. Only runs with the link rule
    /// write their files then; the others write them while the rows load.
    /// (DuckDB itself runs on one thread, see `Workbench::open`.)
    pub threads: u32,
    /// Let DuckDB compress the raw tables of the link rule's runs (the
    /// others' are views over their files). Off by default: compressing
    /// took more CPU than anything else while loading (measured on the
    /// benchmark: ~0.6 s of ~4 s, and ~0.35 s of wall time), in exchange for
    /// a workbench file about 4x smaller.
    pub compress_tables: bool,
}

impl WorkbenchConfig {
    /// Export lanes: `threads`, or one per core when it is 0.
    pub fn export_lanes(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n as usize,
        }
    }
}

impl Default for WorkbenchConfig {
    fn default() -> Self {
        WorkbenchConfig {
            dir: PathBuf::from("/var/lib/outreach-workbench"),
            lock_timeout: Duration::from_secs(30),
            memory_limit: "128MB".into(),
            threads: 0,
            compress_tables: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    #[serde(deserialize_with = "lenient_string")]
    pub host: String,
    pub port: u16,
    #[serde(deserialize_with = "lenient_string")]
    pub database: String,
    #[serde(deserialize_with = "lenient_string")]
    pub user: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    #[serde(
        rename = "connect_timeout_secs",
        deserialize_with = "secs::deserialize"
    )]
    pub connect_timeout: Duration,
    /// `schema.table` of the companies; `state_column` filters it.
    pub companies_table: QualifiedName,
    pub people_table: QualifiedName,
    pub state_column: String,
    /// Primary key of the companies table (orders the Parquet rows).
    pub company_key: String,
    /// Primary key of the people table.
    pub person_key: String,
    /// Column of the people table that references `company_key`.
    pub people_company_column: String,
    /// Rows per Arrow batch handed from the reading to the loading thread.
    pub batch_rows: usize,
}

impl SourceConfig {
    /// Where `entity`'s rows come from.
    pub fn table(&self, entity: Entity) -> &QualifiedName {
        match entity {
            Entity::Companies => &self.companies_table,
            Entity::People => &self.people_table,
        }
    }

    /// `entity`'s primary key column.
    pub fn key(&self, entity: Entity) -> &str {
        match entity {
            Entity::Companies => &self.company_key,
            Entity::People => &self.person_key,
        }
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            host: "localhost".into(),
            port: 5432,
            database: "marketing".into(),
            user: "outreach".into(),
            password: None,
            sslmode: SslMode::Prefer,
            connect_timeout: Duration::from_secs(15),
            companies_table: QualifiedName::new("marketing", "company_master"),
            people_table: QualifiedName::new("marketing", "people_master"),
            state_column: "address_state".into(),
            company_key: "company_unique_id".into(),
            person_key: "unique_id".into(),
            people_company_column: "company_unique_id".into(),
            batch_rows: 16_384,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `https://s3.<region>.backblazeb2.com` for B2.
    pub endpoint: String,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(deserialize_with = "lenient_string")]
    pub bucket: String,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default)]
    pub path_style: bool,
    #[serde(default)]
    pub access_key_id: Option<Secret>,
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    #[serde(
        default = "default_request_timeout",
        rename = "request_timeout_secs",
        deserialize_with = "secs::deserialize"
    )]
    pub request_timeout: Duration,
    /// Files this size or larger go up in parts of this size (MiB); one
    /// part is held in memory at a time. B2 takes parts of 5 MB to 5 GB.
    #[serde(default = "default_part_size")]
    pub part_size_mib: u64,
    /// An all-states run's states that may be past their read at once
    /// (validating, uploading): while one uploads, the next is read. Each
    /// holds at most one part (`part_size_mib`) in memory. Measured at
    /// 200k companies with 50 ms each way to S3: 4 took 32 s, 8 took 22 s,
    /// 16 took 17 s.
    #[serde(default = "default_concurrent_uploads")]
    pub max_concurrent_uploads: usize,
}

impl StorageConfig {
    /// `rel` under `prefix`: the one place object keys are spelled
    /// (`outreach/wv/_manifest.json`; `rel` as it is with no prefix).
    pub fn key(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }
}

fn default_concurrent_uploads() -> usize {
    8
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_prefix() -> String {
    "outreach".into()
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_part_size() -> u64 {
    16
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Snappy,
    Zstd,
    Uncompressed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    pub compression: Compression,
    /// Only used with `compression = "zstd"` (1..=22).
    pub zstd_level: Option<u8>,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            compression: Compression::Snappy,
            zstd_level: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// `schema.table`; created with the known layout when missing.
    pub table: QualifiedName,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            table: QualifiedName::new("shq", "audit_log"),
        }
    }
}

/// `[changes]`: the change sets each publish uploads (docs/changes.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChangesConfig {
    /// Change files older than this are deleted after a successful
    /// publish (never the snapshot, nor the sets its manifest lists).
    pub keep_days: u32,
}

impl Default for ChangesConfig {
    fn default() -> Self {
        ChangesConfig { keep_days: 90 }
    }
}

/// `[report]`: the HTML page every run writes (see `pipeline::page`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    /// Write the page (and publish it beside the manifest).
    pub enabled: bool,
    /// Rows shown per failing rule: their key and the columns the rule
    /// reads. They may hold personal data; 0 shows none and keeps none.
    pub sample_rows: usize,
    /// How many of the state's runs the charts draw.
    pub chart_runs: usize,
    /// Put the failing rows into the page in the bucket too. Off: the
    /// bucket's page has the counts, the host's page the rows.
    pub publish_samples: bool,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig {
            enabled: true,
            sample_rows: 5,
            chart_runs: 30,
            publish_samples: false,
        }
    }
}

/// The per-state lease that keeps runs of one state on several hosts
/// apart (see `ledger::claim`). Its table sits beside the audit table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// A lease not renewed for this long is taken over: how long a crashed
    /// run (kill -9, power loss) keeps its state from running elsewhere.
    /// The heartbeat renews it every third of this.
    #[serde(rename = "ttl_secs", deserialize_with = "secs::deserialize")]
    pub ttl: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl: Duration::from_secs(60),
        }
    }
}

/// The daemon's metrics (see `metrics.rs`); both off unless set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// A node_exporter textfile (`…/textfile_collector/outreach.prom`),
    /// rewritten after every run.
    pub textfile: Option<PathBuf>,
    /// `127.0.0.1:9464`: serve `/metrics` and `/healthz` there.
    pub listen: Option<String>,
}

/// A secret string: never shown by `Debug` or `Display`, so it cannot end up
/// in a log line or an error message by accident.
#[derive(Clone, Deserialize)]
pub struct Secret(#[serde(deserialize_with = "lenient_string")] String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Environment values arrive untyped and figment guesses: `NEON_PASSWORD=1234`
/// would become a number. Strings accept numbers and booleans as written.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Any {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Any::deserialize(d)? {
        Any::S(s) => s,
        Any::I(i) => i.to_string(),
        Any::U(u) => u.to_string(),
        Any::F(f) => f.to_string(),
        Any::B(b) => b.to_string(),
    })
}

impl Config {
    /// Reads `path`, applies the environment, and checks every value.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::NotFound(path.to_path_buf()));
        }
        Self::from_figment(
            Figment::from(Toml::file(path)),
            Secrets::Read(path.parent()),
        )
    }

    /// [`Config::load`] without looking any secret up: for `reload`, which
    /// only judges the file for the daemon (systemd gives the unit's
    /// ExecReload= no access to the service's credentials).
    pub fn load_without_secrets(path: &Path) -> Result<Config, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError::NotFound(path.to_path_buf()));
        }
        Self::from_figment(Figment::from(Toml::file(path)), Secrets::Skip)
    }

    /// Same as [`Config::load`] with the TOML given as a string (tests).
    pub fn from_toml_str(toml: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(toml)), Secrets::Read(None))
    }

    fn from_figment(mut figment: Figment, secrets: Secrets) -> Result<Config, ConfigError> {
        let (read_secrets, config_dir) = match secrets {
            Secrets::Read(dir) => (true, dir),
            Secrets::Skip => (false, None),
        };
        let mut origins = Vec::new();
        for (var, key) in LEGACY_ENV {
            if figment.find_value(key).is_ok() && secrets::NAMES.contains(var) {
                origins.push((var.to_string(), secrets::Origin::ConfigFile));
            }
        }
        for (var, key) in LEGACY_ENV {
            let value = match secrets::NAMES.contains(var) {
                true if !read_secrets => None,
                true => secrets::lookup(var, config_dir)?.map(|(value, origin)| {
                    origins.retain(|(name, _)| name != var);
                    origins.push((var.to_string(), origin));
                    value
                }),
                false => std::env::var(var).ok(),
            };
            if let Some(value) = value {
                figment = figment.merge(Serialized::default(key, value));
            }
        }
        // One-off overrides win over everything (tests, a shell).
        for (var, key) in LEGACY_ENV
            .iter()
            .filter(|(v, _)| secrets::NAMES.contains(v))
        {
            let over = format!("OUTREACH_{}", key.replace('.', "__").to_uppercase());
            if std::env::var_os(&over).is_some() {
                origins.retain(|(name, _)| name != var);
                origins.push((var.to_string(), secrets::Origin::Environment(over)));
            }
        }
        // OUTREACH_CONFIG names the file itself, it is not a key.
        figment = figment.merge(Env::prefixed("OUTREACH_").ignore(&["config"]).split("__"));
        let mut config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        for n in config.notify.iter_mut().filter(|_| read_secrets) {
            if let Some((url, origin)) = secrets::lookup(&n.url_env, config_dir)? {
                n.url = Some(Secret::new(url));
                origins.push((n.url_env.clone(), origin));
            }
        }
        config.secret_origins = origins;
        let gates = config.gates;
        config.schedules = std::mem::take(&mut config.schedule_entries)
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse(i, gates)
                    .map_err(|(k, m)| invalid(&format!("schedule[{i}].{k}"), m))
            })
            .collect::<Result<_, _>>()?;
        Ok(config)
    }

    /// Checks that serde cannot express: names, URLs, cross-field rules.
    fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.source;
        for (key, v) in [
            ("source.host", &s.host),
            ("source.database", &s.database),
            ("source.user", &s.user),
            ("source.state_column", &s.state_column),
            ("source.company_key", &s.company_key),
            ("source.person_key", &s.person_key),
            ("source.people_company_column", &s.people_company_column),
        ] {
            if v.trim().is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if s.batch_rows == 0 {
            return Err(invalid("source.batch_rows", "must be at least 1"));
        }
        let st = &self.storage;
        if !(st.endpoint.starts_with("http://") || st.endpoint.starts_with("https://")) {
            return Err(invalid(
                "storage.endpoint",
                format!(
                    "`{}` must be an http:// or https:// URL, e.g. https://s3.us-east-003.backblazeb2.com",
                    st.endpoint
                ),
            ));
        }
        if st.bucket.trim().is_empty() {
            return Err(invalid(
                "storage.bucket",
                "must not be empty (set it in the file or B2_BUCKET)",
            ));
        }
        if st.prefix.starts_with('/') || st.prefix.ends_with('/') {
            return Err(invalid(
                "storage.prefix",
                format!("`{}` must not start or end with `/`", st.prefix),
            ));
        }
        if !(5..=5120).contains(&st.part_size_mib) {
            return Err(invalid(
                "storage.part_size_mib",
                format!(
                    "{} must be between 5 (the S3 and B2 minimum part) and 5120",
                    st.part_size_mib
                ),
            ));
        }
        if let Some(level) = self.export.zstd_level {
            if !(1..=22).contains(&level) {
                return Err(invalid("export.zstd_level", "must be between 1 and 22"));
            }
        }
        if self.retry.attempts == 0 {
            return Err(invalid("retry.attempts", "must be at least 1"));
        }
        if self.retry.max_backoff < self.retry.initial_backoff {
            return Err(invalid(
                "retry",
                "needs 0 <= initial_backoff_secs <= max_backoff_secs",
            ));
        }
        if let Some(listen) = &self.metrics.listen {
            if listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "metrics.listen",
                    format!("`{listen}` is not an address and port such as 127.0.0.1:9464"),
                ));
            }
        }
        if self.lease.ttl < Duration::from_secs(3) {
            return Err(invalid(
                "lease.ttl_secs",
                "must be at least 3 (the heartbeat renews it every third of it)",
            ));
        }
        if self.storage.max_concurrent_uploads == 0 {
            return Err(invalid(
                "storage.max_concurrent_uploads",
                "must be at least 1",
            ));
        }
        if self.daemon.max_concurrent_runs == 0 {
            return Err(invalid("daemon.max_concurrent_runs", "must be at least 1"));
        }
        if self.workbench.dir.as_os_str().is_empty() {
            return Err(invalid("workbench.dir", "must not be empty"));
        }
        self.gates
            .check()
            .map_err(|(k, m)| invalid(&format!("gates.{k}"), m))?;
        for (i, n) in self.notify.iter().enumerate() {
            n.check()
                .map_err(|(k, m)| invalid(&format!("notify[{i}].{k}"), m))?;
        }
        Ok(())
    }

    /// The first `[[schedule]]` that lists `state`, whose gates and link
    /// rule a one-off `run` of that state uses too.
    pub fn schedule_for(&self, state: &StateCode) -> Option<&Schedule> {
        self.schedules.iter().find(|s| s.states.contains(state))
    }

    pub fn audit_table(&self) -> QualifiedName {
        self.audit.table.clone()
    }
    /// `outreach_leases`, in the audit table's schema.
    pub fn leases_table(&self) -> QualifiedName {
        QualifiedName {
            schema: self.audit_table().schema,
            table: "outreach_leases".into(),
        }
    }
    /// `outreach_fire_claims`, in the audit table's schema.
    pub fn fire_claims_table(&self) -> QualifiedName {
        QualifiedName {
            schema: self.audit_table().schema,
            table: "outreach_fire_claims".into(),
        }
    }
    pub fn log_dir(&self) -> PathBuf {
        self.daemon
            .log_dir
            .clone()
            .unwrap_or_else(|| self.workbench.dir.join("logs"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [storage]
        endpoint = "http://127.0.0.1:9000"
        bucket = "b"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(c.source.port, 5432);
        assert_eq!(c.audit.table.to_string(), "shq.audit_log");
        assert_eq!(c.storage.prefix, "outreach");
        assert_eq!(c.export.compression, Compression::Snappy);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml_str(&format!("{MINIMAL}\n[source]\nsslmod = \"require\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslmod"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err = Config::from_toml_str(&format!("{MINIMAL}\n[source]\nsslmode = \"always\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslmode") && err.contains("always"), "{err}");
        let err = Config::from_toml_str(&format!("{MINIMAL}\n[source]\nport = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn bad_table_name_and_endpoint() {
        let err = Config::from_toml_str(&format!(
            "{MINIMAL}\n[source]\ncompanies_table = \"company_master\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("source.companies_table"), "{err}");
        let err = Config::from_toml_str("[storage]\nendpoint = \"s3.example\"\nbucket = \"b\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("storage.endpoint"), "{err}");
    }

    #[test]
    fn durations_are_seconds_whole_or_not() {
        let c = Config::from_toml_str(&format!(
            "{MINIMAL}\n[workbench]\nlock_timeout_secs = 0.5\n[lease]\nttl_secs = 90\n"
        ))
        .unwrap();
        assert_eq!(c.workbench.lock_timeout, Duration::from_millis(500));
        assert_eq!(c.lease.ttl, Duration::from_secs(90));
        assert_eq!(c.retry.initial_backoff, Duration::from_secs(2));
        let err = Config::from_toml_str(&format!("{MINIMAL}\n[lease]\nttl_secs = -1\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ttl_secs") && err.contains("0 or more"),
            "{err}"
        );
    }

    #[test]
    fn schedule_checks() {
        let bad_state =
            format!("{MINIMAL}\n[[schedule]]\nstates = [\"ZZ\"]\ncadence = \"daily\"\n");
        assert!(Config::from_toml_str(&bad_state)
            .unwrap_err()
            .to_string()
            .contains("schedule[0].states"));
        let bad_tz = format!(
            "{MINIMAL}\n[[schedule]]\nstates = [\"WV\"]\ncadence = \"daily\"\ntimezone = \"Mars/Base\"\n"
        );
        assert!(Config::from_toml_str(&bad_tz)
            .unwrap_err()
            .to_string()
            .contains("timezone"));
    }

    #[test]
    fn rules_and_gates() {
        let c = Config::from_toml_str(MINIMAL).unwrap();
        assert_eq!(c.rules.companies, default_company_rules());
        assert!(c.gates.is_empty());
        let toml = format!(
            "{MINIMAL}
[gates]
max_bad_ratio = 0.15
no_null_ids = true
[rules]
people = [{{ code = \"no_phone\", condition = \"phone IS NULL\" }}]
[[schedule]]
states = [\"wv\"]
cadence = \"daily\"
[schedule.gates]
max_bad_ratio = 0.5
"
        );
        let c = Config::from_toml_str(&toml).unwrap();
        assert_eq!(c.rules.companies, default_company_rules());
        assert_eq!(c.rules.people.len(), 1);
        // A state's gates: its schedule's, merged over [gates] at load.
        let gates = |s| {
            let state = StateCode::parse(s).unwrap();
            c.schedule_for(&state).map_or(c.gates, |s| s.gates)
        };
        let wv = gates("WV");
        assert_eq!((wv.max_bad_ratio, wv.no_null_ids), (Some(0.5), Some(true)));
        assert_eq!(gates("OH").max_bad_ratio, Some(0.15));

        let e = Config::from_toml_str(&format!("{MINIMAL}\n[gates]\nmax_bad_ratio = 2.0\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gates.max_bad_ratio"), "{e}");
        let e = Config::from_toml_str(&format!("{MINIMAL}\n[gates]\nmax_bad_rate = 0.1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_bad_rate"), "{e}");
    }

    /// The README's example config is one the program takes.
    #[test]
    fn the_readmes_example_config_loads() {
        let readme = include_str!("../README.md");
        let start = readme.find("```toml\n").unwrap() + "```toml\n".len();
        let end = start + readme[start..].find("```").unwrap();
        let c = Config::from_toml_str(&readme[start..end]).unwrap();
        assert_eq!(c.schedules.len(), 1);
        assert_eq!(c.schedules[0].states.len(), 3);
    }

    /// The commented `[rules]` block in the shipped config.toml, uncommented,
    /// is exactly the built-in production rules: the example cannot drift.
    #[test]
    fn shipped_rules_example_is_the_defaults() {
        let shipped = include_str!("../config.toml");
        let start = shipped.find("# [rules]").unwrap();
        let end = start + shipped[start..].find("\n\n").unwrap();
        let block: String = shipped[start..end]
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::from_toml_str(&format!("{MINIMAL}\n{block}\n")).unwrap();
        assert_eq!(c.rules.companies, default_company_rules());
        assert_eq!(c.rules.people, default_people_rules());
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        let q: QualifiedName = "shq.audit_log".parse().unwrap();
        assert_eq!(q.quoted(), "\"shq\".\"audit_log\"");
    }
}
