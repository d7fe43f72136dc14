//! PostgreSQL plumbing for every part that talks to the database: connect
//! (TLS as libpq spells it), the server's own error text, which errors are
//! worth retrying, a session that reconnects, and describing a table.
//!
//! Production goes through Neon's pooled endpoint, PgBouncer in
//! transaction mode: between two transactions the next statement may run
//! on another server connection. So nothing here relies on a session:
//! - no named prepared statement outside a transaction. A single statement
//!   goes through `query_typed` (the unnamed statement, one round trip);
//!   statements inside a transaction are closed before it ends (the driver
//!   sends the Close when a `Statement` is dropped, which is always before
//!   the `COMMIT` in this code);
//! - no `SET`, session advisory lock, temp table or startup `options`;
//! - no column type unknown to the driver ever reaches it: for an enum or
//!   extension type the driver would prepare a type-lookup statement of its
//!   own and keep it for the session's life, which on a pooled server
//!   connection collides with another process's statement of the same name.
//!   [`describe`] reads the types from the catalog instead and casts those.
//!
//! Neon's computes scale to zero: the first connect can take seconds
//! (`connect_timeout_secs`, 15 by default), and an idle session may be ended
//! with `terminating connection due to administrator command`; both are
//! transient here and retried on a new connection.

use postgres::types::Type;
use postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::{QualifiedName, RetryConfig, SourceConfig, SslMode};
use crate::error::PipelineError;
use crate::retry::retry;

enum Tls {
    Off,
    On(postgres_openssl::MakeTlsConnector),
}

/// The connection settings and TLS connector for `source.sslmode`, spelled
/// as libpq does: `prefer` and `require` encrypt without checking the
/// certificate, `verify-full` checks the chain and the host name. TLS always
/// sends SNI, which Neon uses to route to the right endpoint.
fn settings(cfg: &SourceConfig) -> Result<(postgres::Config, Tls, String), PipelineError> {
    use postgres::config::SslMode as PgSsl;
    let mut pg = postgres::Config::new();
    // No `options`: PgBouncer refuses startup parameters it does not know.
    pg.host(&cfg.host)
        .port(cfg.port)
        .dbname(&cfg.database)
        .user(&cfg.user)
        .application_name("outreach-workbench")
        .connect_timeout(cfg.connect_timeout)
        .keepalives(true);
    if let Some(p) = &cfg.password {
        pg.password(p.expose());
    }
    let (mode, verify) = match cfg.sslmode {
        SslMode::Disable => (PgSsl::Disable, false),
        SslMode::Prefer => (PgSsl::Prefer, false),
        SslMode::Require => (PgSsl::Require, false),
        SslMode::VerifyFull => (PgSsl::Require, true),
    };
    pg.ssl_mode(mode);
    let tls = if cfg.sslmode == SslMode::Disable {
        Tls::Off
    } else {
        // OpenSSL directly rather than through native-tls, which parses the
        // system's root certificates a second time (~20 ms of every run).
        use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
        let tls_err = |e: openssl::error::ErrorStack| PipelineError::Tls(e.to_string());
        let mut builder = SslConnector::builder(SslMethod::tls()).map_err(tls_err)?;
        if !verify {
            builder.set_verify(SslVerifyMode::NONE);
        }
        let mut connector = postgres_openssl::MakeTlsConnector::new(builder.build());
        if !verify {
            connector.set_callback(|c, _| {
                c.set_verify_hostname(false);
                Ok(())
            });
        }
        Tls::On(connector)
    };
    let target = format!(
        "PostgreSQL {}@{}:{}/{} (sslmode {})",
        cfg.user,
        cfg.host,
        cfg.port,
        cfg.database,
        match cfg.sslmode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyFull => "verify-full",
        }
    );
    Ok((pg, tls, target))
}

/// Opens one connection, without retrying.
pub fn connect(cfg: &SourceConfig) -> Result<Client, PipelineError> {
    let (pg, tls, target) = settings(cfg)?;
    match tls {
        Tls::Off => pg.connect(postgres::NoTls),
        Tls::On(t) => pg.connect(t),
    }
    .map_err(|e| PipelineError::Connect { target, source: e })
}

/// The server backend running a transaction, named so that another
/// connection can cancel its statement with `pg_cancel_backend`.
///
/// Not the protocol's cancel request: through PgBouncer that names
/// PgBouncer's client, and PgBouncer 1.18 drops a cancel request whose
/// sender closes the socket at once, as rust-postgres's does (measured: a
/// cancelled run went on pulling to the end of its query). SQL goes through
/// any pooler, TLS or not.
pub struct Backend {
    pid: i32,
    /// The transaction's start: a pid the pool has since given to another
    /// transaction is not cancelled.
    xact_start: chrono::DateTime<chrono::Utc>,
}

impl Backend {
    /// The backend of the transaction `tx` is in (`None` if the server
    /// answered no row, which a `SELECT` without `FROM` never does).
    pub fn of(tx: &mut postgres::Transaction<'_>) -> Result<Option<Backend>, PipelineError> {
        let rows = tx
            .query_typed("SELECT pg_backend_pid(), now()", &[])
            .map_err(|e| PipelineError::Source {
                what: "naming the pull's server backend".into(),
                source: e,
            })?;
        Ok(rows.first().map(|row| Backend {
            pid: row.get(0),
            xact_start: row.get(1),
        }))
    }

    /// Cancels the backend's statement if it is still in the same
    /// transaction, from a connection of its own. Failing, it says so in
    /// the log: the run stops at its next batch anyway.
    pub fn cancel(&self, cfg: &SourceConfig) {
        let sent = connect(cfg).and_then(|mut c| {
            c.query_typed(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity
                 WHERE pid = $1 AND xact_start = $2",
                &[
                    (&self.pid, Type::INT4),
                    (&self.xact_start, Type::TIMESTAMPTZ),
                ],
            )
            .map_err(|e| PipelineError::Source {
                what: "cancelling the query".into(),
                source: e,
            })
        });
        if let Err(e) = sent {
            tracing::warn!(error = %e, "could not cancel the running query");
        }
    }
}

/// One connection for the short statements of a run (checks, claims, the
/// audit), made again when the server has closed it. Each use is retried
/// on a new connection while the failure is transient, so every use must
/// be safe to repeat: a single statement, or one transaction.
pub struct Session {
    cfg: SourceConfig,
    retry: RetryConfig,
    client: Option<Client>,
}

impl Session {
    /// Connects, retrying transient failures.
    pub fn open(
        cfg: &SourceConfig,
        retry_cfg: &RetryConfig,
        cancel: &CancellationToken,
    ) -> Result<Session, PipelineError> {
        let mut s = Session::lazy(cfg, retry_cfg);
        s.connected(cancel)?;
        Ok(s)
    }

    /// A session that connects at its first use.
    pub fn lazy(cfg: &SourceConfig, retry_cfg: &RetryConfig) -> Session {
        Session {
            cfg: cfg.clone(),
            retry: retry_cfg.clone(),
            client: None,
        }
    }

    /// Runs `f` once (connecting first if need be); a transient failure
    /// drops the connection so that the next use starts on a new one.
    pub fn once<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, PipelineError>,
    ) -> Result<T, PipelineError> {
        let result = self.connected_once().and_then(f);
        if result.as_ref().is_err_and(|e| e.is_transient()) {
            self.client = None;
        }
        result
    }

    /// The open connection, or a new one made with a single try.
    fn connected_once(&mut self) -> Result<&mut Client, PipelineError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            self.client = Some(connect(&self.cfg)?);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    fn connected(&mut self, cancel: &CancellationToken) -> Result<&mut Client, PipelineError> {
        let retry_cfg = self.retry.clone();
        retry(&retry_cfg, cancel, "connecting to PostgreSQL", || {
            self.connected_once().map(|_| ())
        })?;
        self.connected_once()
    }

    /// The connection itself, for work that is not repeated (the pull).
    pub fn client(&mut self, cancel: &CancellationToken) -> Result<&mut Client, PipelineError> {
        self.connected(cancel)
    }

    /// Runs `f`, again on a new connection while it fails transiently
    /// (connecting included: one retry loop, not one inside another).
    pub fn run<T>(
        &mut self,
        what: &str,
        cancel: &CancellationToken,
        mut f: impl FnMut(&mut Client) -> Result<T, PipelineError>,
    ) -> Result<T, PipelineError> {
        let retry_cfg = self.retry.clone();
        retry(&retry_cfg, cancel, what, || {
            // Whatever state a failed connection is in, the next try
            // starts on a new one.
            self.once(&mut f)
        })
    }
}

/// A column as the pull selects it.
#[derive(Debug, Clone)]
pub struct PgColumn {
    pub name: String,
    /// The type the column arrives as: always one the driver knows.
    pub ty: Type,
    pub typmod: i32,
    /// `::text`, `::text[]`, `::numeric(10,2)[]`: what the select casts the
    /// column to, so that it arrives as `ty`.
    pub cast: Option<String>,
    /// Set when the column has no exact mapping and is carried as text:
    /// its PostgreSQL type's name, for the log line and the report.
    pub fallback_from: Option<String>,
    /// The column's type as SQL spells it (`numeric(10,2)`, `my_domain`).
    pub sql_type: String,
}

/// The columns of `table`, in order, from the catalog: what arrives over
/// the wire for `SELECT t.*`, without preparing that statement (see the
/// module doc for why). Types the driver does not know are cast to what
/// the pull has always made of them: enums to text, arrays of enums to
/// text arrays, domains to their base type, anything else to text.
///
/// The `EXISTS` makes the server check the SELECT privilege on the table,
/// so a missing grant fails here, before any row is pulled.
pub fn describe(
    client: &mut impl postgres::GenericClient,
    table: &QualifiedName,
) -> Result<Vec<PgColumn>, PipelineError> {
    let sql = format!(
        "SELECT a.attname::text, a.atttypid::int8, a.atttypmod, t.typname::text, t.typtype::text,
                t.typbasetype::int8, t.typtypmod,
                e.oid::int8, e.typtype::text, e.typbasetype::int8,
                format_type(e.typbasetype, e.typtypmod),
                format_type(a.atttypid, a.atttypmod)
         FROM pg_attribute a
         JOIN pg_type t ON t.oid = a.atttypid
         LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'
         WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
           AND NOT EXISTS (SELECT FROM {} WHERE false)
         ORDER BY a.attnum",
        table.quoted()
    );
    let rows = client
        .query_typed(&sql, &[(&table.quoted(), Type::TEXT)])
        .map_err(|e| PipelineError::Source {
            what: format!("describing {table}"),
            source: e,
        })?;
    let known = |oid: i64| u32::try_from(oid).ok().and_then(Type::from_oid);
    Ok(rows
        .iter()
        .map(|r| {
            let name: String = r.get(0);
            let typname: String = r.get(3);
            let sql_type: String = r.get(11);
            let as_is = |ty, typmod| PgColumn {
                name: name.clone(),
                ty,
                typmod,
                cast: None,
                fallback_from: None,
                sql_type: sql_type.clone(),
            };
            let cast = |ty, cast: String| PgColumn {
                name: name.clone(),
                ty,
                typmod: -1,
                cast: Some(cast),
                fallback_from: None,
                sql_type: sql_type.clone(),
            };
            if let Some(ty) = known(r.get(1)) {
                return as_is(ty, r.get(2));
            }
            let typtype: String = r.get(4);
            let elem: (Option<i64>, Option<String>) = (r.get(7), r.get(8));
            match (typtype.as_str(), elem) {
                // The server sends a domain as its base type.
                ("d", _) if known(r.get(5)).is_some() => {
                    as_is(known(r.get(5)).expect("checked"), r.get(6))
                }
                ("e", _) => cast(Type::TEXT, "text".into()),
                (_, (Some(_), Some(et))) if et == "e" => cast(Type::TEXT_ARRAY, "text[]".into()),
                (_, (Some(_), Some(et))) if et == "d" => {
                    let base: Option<i64> = r.get(9);
                    let array = base.and_then(known).and_then(|b| array_of(&b));
                    match array {
                        Some(a) => {
                            let spelled: String = r.get(10);
                            cast(a, format!("{spelled}[]"))
                        }
                        None => fallback(&name, &typname),
                    }
                }
                _ => fallback(&name, &typname),
            }
        })
        .collect())
}

fn fallback(name: &str, typname: &str) -> PgColumn {
    PgColumn {
        name: name.to_string(),
        ty: Type::TEXT,
        typmod: -1,
        cast: Some("text".into()),
        fallback_from: Some(typname.to_string()),
        sql_type: "text".into(),
    }
}

/// The array type of a built-in element type.
fn array_of(elem: &Type) -> Option<Type> {
    (1..20_000u32)
        .filter_map(Type::from_oid)
        .find(|t| matches!(t.kind(), postgres::types::Kind::Array(e) if e == elem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_of_builtin_types() {
        assert_eq!(array_of(&Type::NUMERIC), Some(Type::NUMERIC_ARRAY));
        assert_eq!(array_of(&Type::TEXT), Some(Type::TEXT_ARRAY));
    }
}
