//! Shared test fixtures: a fresh database, bucket and workbench per test, on
//! the real PostgreSQL and S3 servers that `scripts/test.sh` starts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use outreach_workbench::config::{Config, Secret};
use outreach_workbench::pipeline::{self, RunOptions, RunReport};
use outreach_workbench::state::StateCode;
use tokio_util::sync::CancellationToken;

pub const SCHEMA_SQL: &str = include_str!("../sql/outreach_schema.sql");

/// Returns from the test when the suite's PostgreSQL and S3 server are not
/// running (a plain `cargo test`, outside scripts/test.sh), saying so once.
macro_rules! needs_services {
    () => {
        if !$crate::common::services_running() {
            return;
        }
    };
}

/// Whether scripts/test.sh's services are there; says once, on the
/// terminal (libtest keeps a passing test's own output), when not.
pub fn services_running() -> bool {
    use std::io::Write;
    static SAID: std::sync::Once = std::sync::Once::new();
    if std::env::var_os("OW_PG_PORT").is_some() {
        return true;
    }
    SAID.call_once(|| {
        let _ = writeln!(
            std::io::stderr(),
            "skipping the tests that need PostgreSQL and an S3 server: OW_PG_PORT is not set. \
             scripts/test.sh installs and starts them, then runs the suite"
        );
    });
    false
}

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suite with scripts/test.sh, which starts PostgreSQL and an S3 server")
    })
}

pub struct Services {
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_user: String,
    pub pg_password: String,
    pub s3_endpoint: String,
    pub s3_key: String,
    pub s3_secret: String,
    /// PgBouncer in transaction mode in front of the same PostgreSQL, when
    /// `scripts/test.sh` could start it.
    pub pgb_port: Option<u16>,
    /// Where the runs' `[source]` points: PostgreSQL itself, or PgBouncer
    /// for the suite's pooled pass (`OW_TEST_POOLED=1`).
    pub source_port: u16,
}

pub fn services() -> Services {
    let pg_port: u16 = var("OW_PG_PORT").parse().unwrap();
    let pgb_port: Option<u16> = std::env::var("OW_PGB_PORT")
        .ok()
        .and_then(|p| p.parse().ok());
    let pooled = std::env::var("OW_TEST_POOLED").is_ok_and(|v| v == "1");
    let source_port = match (pooled, pgb_port) {
        (true, Some(p)) => p,
        (true, None) => panic!("OW_TEST_POOLED=1 but OW_PGB_PORT is not set"),
        (false, _) => pg_port,
    };
    Services {
        pgb_port,
        source_port,
        pg_host: var("OW_PG_HOST"),
        pg_port,
        pg_user: var("OW_PG_USER"),
        pg_password: var("OW_PG_PASSWORD"),
        s3_endpoint: var("OW_S3_ENDPOINT"),
        s3_key: var("OW_S3_ACCESS_KEY"),
        s3_secret: var("OW_S3_SECRET_KEY"),
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique lower-case name for this test's database and bucket.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// One test's world: its own database (with the production schema), its own
/// bucket and its own workbench directory.
pub struct World {
    pub db: String,
    pub bucket: String,
    pub dir: tempfile::TempDir,
    pub config: Config,
}

impl World {
    pub fn new(name: &str) -> World {
        let s = services();
        let id = unique(name);
        let db = id.replace('-', "_");
        let mut admin = pg_client(&s, "postgres");
        admin
            .batch_execute(&format!("CREATE DATABASE \"{db}\""))
            .unwrap();
        let mut c = pg_client(&s, &db);
        c.batch_execute(SCHEMA_SQL).unwrap();
        let bucket = id.clone();
        create_bucket(&s, &bucket);
        let dir = tempfile::tempdir().unwrap();
        let config = config_for(&s, &db, &bucket, dir.path());
        World {
            db,
            bucket,
            dir,
            config,
        }
    }

    pub fn pg(&self) -> postgres::Client {
        pg_client(&services(), &self.db)
    }

    pub fn run(&self, state: &str) -> RunReport {
        self.run_with(state, &RunOptions::default())
    }

    pub fn run_with(&self, state: &str, opts: &RunOptions) -> RunReport {
        pipeline::run(
            &self.config,
            &StateCode::parse(state).unwrap(),
            &CancellationToken::new(),
            opts,
        )
    }

    pub fn export_path(&self, state: &str, entity: &str, kind: &str) -> PathBuf {
        self.dir.path().join(format!(
            "exports/{state}/{entity}/{kind}/{entity}_{kind}.parquet"
        ))
    }

    /// The config as a TOML file, for tests that run the binary.
    pub fn write_config_file(&self) -> PathBuf {
        self.write_config_file_with("")
    }

    /// The config file with `extra` TOML appended (rules, gates, schedules).
    pub fn write_config_file_with(&self, extra: &str) -> PathBuf {
        let s = services();
        let path = self.dir.path().join("config.toml");
        let toml = toml_for(&s, &self.db, &self.bucket, self.dir.path());
        std::fs::write(&path, format!("{toml}\n{extra}\n")).unwrap();
        path
    }

    /// Replaces the in-process config with the base one plus `extra` TOML.
    pub fn set_config_extra(&mut self, extra: &str) {
        let s = services();
        let toml = toml_for(&s, &self.db, &self.bucket, self.dir.path());
        let mut c = Config::from_toml_str(&format!("{toml}\n{extra}\n")).unwrap();
        c.source.password = self.config.source.password.clone();
        c.storage.access_key_id = self.config.storage.access_key_id.clone();
        c.storage.secret_access_key = self.config.storage.secret_access_key.clone();
        self.config = c;
    }
}

/// The binary, with the caller's own settings removed from its environment.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outreach-workbench"));
    // Keep the caller's environment from leaking into the test.
    for (k, _) in std::env::vars() {
        if k.starts_with("OUTREACH_")
            || k.starts_with("NEON_")
            || k.starts_with("B2_")
            || k == "CREDENTIALS_DIRECTORY"
        {
            c.env_remove(k);
        }
    }
    c
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The binary with the test services' secrets in its environment, as the
/// service's EnvironmentFile would give them.
pub fn bin_with_secrets() -> Command {
    let s = services();
    let mut c = bin();
    c.env("NEON_PASSWORD", &s.pg_password)
        .env("B2_KEY_ID", &s.s3_key)
        .env("B2_APPLICATION_KEY", &s.s3_secret);
    c
}

/// The `details` of audit row `id`.
pub fn audit_details(w: &World, id: i64) -> serde_json::Value {
    w.pg()
        .query_one(
            "SELECT details FROM shq.audit_log WHERE id = $1",
            &[&(id as i32)],
        )
        .unwrap()
        .get(0)
}

pub fn pg_client(s: &Services, db: &str) -> postgres::Client {
    postgres::Config::new()
        .host(&s.pg_host)
        .port(s.pg_port)
        .user(&s.pg_user)
        .password(&s.pg_password)
        .dbname(db)
        .connect(postgres::NoTls)
        .unwrap()
}

pub fn toml_for(s: &Services, db: &str, bucket: &str, dir: &Path) -> String {
    format!(
        r#"
[workbench]
dir = "{dir}"
lock_timeout_secs = 2

[source]
host = "{host}"
port = {port}
database = "{db}"
user = "{user}"
sslmode = "disable"

[retry]
attempts = 2
initial_backoff_secs = 0.2
max_backoff_secs = 0.5

[storage]
endpoint = "{endpoint}"
region = "us-east-1"
bucket = "{bucket}"
prefix = "outreach"
path_style = true
"#,
        dir = dir.display(),
        host = s.pg_host,
        port = s.source_port,
        user = s.pg_user,
        endpoint = s.s3_endpoint,
    )
}

pub fn config_for(s: &Services, db: &str, bucket: &str, dir: &Path) -> Config {
    let mut c = Config::from_toml_str(&toml_for(s, db, bucket, dir)).unwrap();
    c.source.password = Some(Secret::new(s.pg_password.clone()));
    c.storage.access_key_id = Some(Secret::new(s.s3_key.clone()));
    c.storage.secret_access_key = Some(Secret::new(s.s3_secret.clone()));
    c
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn s3_bucket(s: &Services, name: &str) -> Box<s3::Bucket> {
    let creds =
        s3::creds::Credentials::new(Some(&s.s3_key), Some(&s.s3_secret), None, None, None).unwrap();
    let region = s3::Region::Custom {
        region: "us-east-1".into(),
        endpoint: s.s3_endpoint.clone(),
    };
    s3::Bucket::new(name, region, creds)
        .unwrap()
        .with_path_style()
}

pub fn create_bucket(s: &Services, name: &str) {
    let creds =
        s3::creds::Credentials::new(Some(&s.s3_key), Some(&s.s3_secret), None, None, None).unwrap();
    let region = s3::Region::Custom {
        region: "us-east-1".into(),
        endpoint: s.s3_endpoint.clone(),
    };
    rt().block_on(s3::Bucket::create_with_path_style(
        name,
        region,
        creds,
        s3::BucketConfiguration::default(),
    ))
    .unwrap();
}

/// The object's metadata, or `None` when it does not exist.
pub fn head(bucket: &str, key: &str) -> Option<std::collections::HashMap<String, String>> {
    let s = services();
    let b = s3_bucket(&s, bucket);
    // rust-s3 answers every status (its fail-on-err feature is off).
    match rt().block_on(b.head_object(key)) {
        Ok((_, 404)) => None,
        Ok((h, 200)) => Some(h.metadata.unwrap_or_default()),
        Ok((_, status)) => panic!("HEAD {key}: HTTP {status}"),
        Err(e) => panic!("HEAD {key}: {e}"),
    }
}

/// Every object key in the bucket, in order.
pub fn list_keys(bucket: &str) -> Vec<String> {
    let s = services();
    let b = s3_bucket(&s, bucket);
    let mut keys: Vec<String> = rt()
        .block_on(b.list(String::new(), None))
        .unwrap()
        .into_iter()
        .flat_map(|page| page.contents.into_iter().map(|o| o.key))
        .collect();
    keys.sort();
    keys
}

pub fn get(bucket: &str, key: &str) -> Vec<u8> {
    let s = services();
    let b = s3_bucket(&s, bucket);
    let r = rt().block_on(b.get_object(key)).unwrap();
    assert_eq!(r.status_code(), 200, "GET {key}");
    r.to_vec()
}

/// Reads a Parquet file back with DuckDB: one string per row, columns
/// joined with `|`, NULL as `NULL`, in file order.
pub fn parquet_rows(path: &Path, columns: &str) -> Vec<String> {
    let duck = duckdb::Connection::open_in_memory().unwrap();
    let sql = format!(
        "SELECT concat_ws('|', {}) FROM read_parquet('{}')",
        columns
            .split(',')
            .map(|c| format!("coalesce(CAST({} AS VARCHAR), 'NULL')", c.trim()))
            .collect::<Vec<_>>()
            .join(", "),
        path.display()
    );
    let mut stmt = duck.prepare(&sql).unwrap();
    stmt.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

/// `column -> DuckDB type` as read back from a Parquet file.
pub fn parquet_types(path: &Path) -> Vec<(String, String)> {
    let duck = duckdb::Connection::open_in_memory().unwrap();
    let mut stmt = duck
        .prepare(&format!(
            "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{}'))",
            path.display()
        ))
        .unwrap();
    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

/// Each leaf column's Parquet repetition type (`OPTIONAL`, `REQUIRED`).
pub fn parquet_repetitions(path: &Path) -> Vec<(String, String)> {
    let duck = duckdb::Connection::open_in_memory().unwrap();
    let mut st = duck
        .prepare(&format!(
            "SELECT name, repetition_type FROM parquet_schema('{}') WHERE num_children IS NULL",
            path.display()
        ))
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

pub fn count_rows(path: &Path) -> i64 {
    let duck = duckdb::Connection::open_in_memory().unwrap();
    duck.query_row(
        &format!("SELECT count(*) FROM read_parquet('{}')", path.display()),
        [],
        |r| r.get(0),
    )
    .unwrap()
}

/// Inserts one company; `None` leaves a column NULL.
pub fn add_company(
    c: &mut postgres::Client,
    id: &str,
    name: Option<&str>,
    url: Option<&str>,
    state: &str,
) {
    c.execute(
        "INSERT INTO marketing.company_master
            (company_unique_id, company_name, website_url, address_state, source_system, promoted_from_intake_at)
         VALUES ($1, $2, $3, $4, 'test', '2025-01-01 00:00:00+00')",
        &[&id, &name, &url, &state],
    )
    .unwrap();
}

pub fn add_person(
    c: &mut postgres::Client,
    id: &str,
    company: &str,
    email: Option<&str>,
    title: Option<&str>,
) {
    c.execute(
        "INSERT INTO marketing.people_master
            (unique_id, company_unique_id, company_slot_unique_id, first_name, last_name, email, title,
             source_system, promoted_from_intake_at)
         VALUES ($1, $2, 'slot', 'Ana', 'Smith', $3, $4, 'test', '2025-01-01 00:00:00+00')",
        &[&id, &company, &email, &title],
    )
    .unwrap();
}

/// A free loopback port, with nothing listening on it.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts forwarding `port` to the test PostgreSQL after `delay`: until then
/// connections to `port` are refused, as with a database that is down.
pub fn pg_comes_back_on(port: u16, delay: std::time::Duration) {
    let target = format!("{}:{}", services().pg_host, services().pg_port);
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            forward(client, &target);
        }
    });
}

/// Connects to `target` and copies bytes both ways until either side
/// closes, on threads of their own.
fn forward(client: std::net::TcpStream, target: &str) {
    let Ok(server) = std::net::TcpStream::connect(target) else {
        return;
    };
    for (mut from, mut to) in [
        (client.try_clone().unwrap(), server.try_clone().unwrap()),
        (server, client),
    ] {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Both);
        });
    }
}

/// The PgBouncer port, or `None` after printing why the test is skipped.
pub fn pooler_or_skip(test: &str) -> Option<u16> {
    let port = services().pgb_port;
    if port.is_none() {
        eprintln!("SKIPPED {test}: PgBouncer is not running (scripts/test.sh starts Debian's pgbouncer when it is installed)");
    }
    port
}

/// A loopback TCP proxy to `target` that holds every new connection for
/// `delay` before passing bytes on: a slow network to one server. Returns
/// its port; it lives as long as the test process.
pub fn slow_proxy(target: String, delay: std::time::Duration) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let target = target.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                forward(client, &target);
            });
        }
    });
    port
}

/// Leases left in the test database (an empty list when the table does
/// not exist yet).
pub fn leases(w: &World) -> Vec<(String, String)> {
    w.pg()
        .query(
            "SELECT state, run_id FROM shq.outreach_leases ORDER BY state",
            &[],
        )
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        .unwrap_or_default()
}

/// Advisory locks held in the test's database, by any session (tests
/// running beside it take short ones in their own databases).
pub fn advisory_locks(w: &World) -> i64 {
    w.pg()
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
             WHERE l.locktype = 'advisory' AND d.datname = current_database()",
            &[],
        )
        .unwrap()
        .get(0)
}

/// A companies view that takes `secs` per row, to make runs slow on purpose.
pub fn add_slow_view(w: &World, secs: f64) {
    w.pg()
        .batch_execute(&format!(
            "CREATE VIEW marketing.slow_companies AS
             SELECT c.* FROM marketing.company_master c, LATERAL (SELECT pg_sleep({secs})) s"
        ))
        .unwrap();
}

/// Whether a pull through `add_slow_view`'s view is running now in the
/// test's own database (not a describe of it, not another test's).
pub fn slow_pull_running(w: &World) -> bool {
    let pulling: i64 = w
        .pg()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND state = 'active'
               AND query LIKE 'SELECT %slow_companies% ORDER BY %'
               AND query NOT LIKE '%pg_attribute%'
               AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .get(0);
    pulling > 0
}

/// Polls `check` until it gives a value, for at most `limit`; past that the
/// test fails with `what` and whatever `context` says then (a log, a
/// journal). The one way the suite waits for an event it cannot be told of.
pub fn wait_until<T>(
    what: &str,
    limit: std::time::Duration,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "waited {limit:?} for {what}\n{}",
            context()
        );
        // Short: some waits race a run to a moment it passes quickly.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether `tool` is on the PATH (tests that need one skip without it).
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The analysts' catalog of `w`'s workbench, opened read-only as an
/// analyst would.
pub fn catalog(w: &World) -> duckdb::Connection {
    let flags = duckdb::Config::default()
        .access_mode(duckdb::AccessMode::ReadOnly)
        .unwrap();
    duckdb::Connection::open_with_flags(w.dir.path().join("duck/outreach_workbench.duckdb"), flags)
        .unwrap()
}

/// The service's state file of `w`'s workbench.
pub fn state_file(w: &World) -> PathBuf {
    w.dir.path().join("state/outreach_state.duckdb")
}
