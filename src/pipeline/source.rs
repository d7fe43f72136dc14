//! Step 1 and 2: pull a state's companies and people from PostgreSQL and
//! load them into the workbench's `<state>.companies_raw` / `people_raw`.
//!
//! Rows are streamed: the server filters (the state is a bind parameter),
//! each row is decoded from the binary protocol into Arrow builders, and
//! every `batch_rows` rows the batch goes to DuckDB's appender and is
//! dropped. Memory is one batch, whatever the state's size.
//!
//! Both queries run in one REPEATABLE READ transaction so the people always
//! belong to exactly the companies that were pulled, even while the source
//! is being written to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use duckdb::arrow::datatypes::Schema;
use duckdb::arrow::record_batch::RecordBatch;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{FromSql, Type};
use postgres::{Client, IsolationLevel, Transaction};
use tokio_util::sync::CancellationToken;

use crate::config::{quote_ident, Config, SourceConfig, SslMode};
use crate::pipeline::pgtypes::{ColType, ColumnBuilder};
use crate::pipeline::PipelineError;
use crate::state::StateCode;

/// A raw column value, borrowed from the row buffer; decoding happens in
/// [`ColumnBuilder::append`], which knows the column's type.
struct Raw<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

enum Tls {
    Off,
    Native(postgres_native_tls::MakeTlsConnector),
}

/// The connection settings and TLS connector for `source.sslmode`, spelled
/// as libpq does: `prefer` and `require` encrypt without checking the
/// certificate, `verify-full` checks the chain and the host name. TLS always
/// sends SNI, which Neon uses to route to the right endpoint.
fn settings(cfg: &SourceConfig) -> Result<(postgres::Config, Tls, String), PipelineError> {
    use postgres::config::SslMode as PgSsl;
    let mut pg = postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .dbname(&cfg.database)
        .user(&cfg.user)
        .application_name("outreach-workbench")
        .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs))
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
        let connector = native_tls::TlsConnector::builder()
            .danger_accept_invalid_certs(!verify)
            .danger_accept_invalid_hostnames(!verify)
            .build()
            .map_err(|e| PipelineError::Tls(e.to_string()))?;
        Tls::Native(postgres_native_tls::MakeTlsConnector::new(connector))
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

/// Opens a connection to the source database.
pub fn connect(cfg: &SourceConfig) -> Result<Client, PipelineError> {
    let (pg, tls, target) = settings(cfg)?;
    match tls {
        Tls::Off => pg.connect(postgres::NoTls),
        Tls::Native(t) => pg.connect(t),
    }
    .map_err(|e| PipelineError::Connect { target, source: e })
}

/// Asks the server to cancel whatever `token`'s session is running.
fn cancel_query(cfg: &SourceConfig, token: &postgres::CancelToken) {
    let sent = settings(cfg).and_then(|(_, tls, _)| {
        match tls {
            Tls::Off => token.cancel_query(postgres::NoTls),
            Tls::Native(t) => token.cancel_query(t),
        }
        .map_err(|e| PipelineError::Source {
            what: "cancelling the query".into(),
            source: e,
        })
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, "could not cancel the running query");
    }
}

/// What the pull did, for the run report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PullStats {
    pub companies: u64,
    pub people: u64,
    /// Columns carried as text because their type has no exact mapping.
    pub text_fallbacks: Vec<String>,
}

/// Pulls both entities into `<schema>.companies_raw` and `<schema>.people_raw`.
/// The caller owns the DuckDB transaction.
///
/// Cancellation is checked between batches, and a watcher thread also asks
/// the server to cancel the query: the server buffers output, so a slow
/// query can go a long time without a batch boundary.
pub fn pull(
    client: &mut Client,
    config: &Config,
    state: &StateCode,
    duck: &duckdb::Connection,
    schema: &str,
    cancel: &CancellationToken,
) -> Result<PullStats, PipelineError> {
    let token = client.cancel_token();
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if cancel.is_cancelled() {
                    cancel_query(&config.source, &token);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let result = pull_in_transaction(client, config, state, duck, schema, cancel);
        done.store(true, Ordering::Relaxed);
        result
    });
    match result {
        Err(_) if cancel.is_cancelled() => Err(PipelineError::Cancelled),
        other => other,
    }
}

fn pull_in_transaction(
    client: &mut Client,
    config: &Config,
    state: &StateCode,
    duck: &duckdb::Connection,
    schema: &str,
    cancel: &CancellationToken,
) -> Result<PullStats, PipelineError> {
    let s = &config.source;
    let companies = config.companies_table().quoted();
    let people = config.people_table().quoted();
    let state_col = quote_ident(&s.state_column);
    let mut tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(|e| PipelineError::Source {
            what: "starting the read transaction".into(),
            source: e,
        })?;

    let mut stats = PullStats::default();
    let companies_from = format!("FROM {companies} c WHERE c.{state_col} = $1");
    stats.companies = stream_query(
        &mut tx,
        &companies_from,
        "c",
        state,
        duck,
        (schema, "companies_raw"),
        s.batch_rows,
        cancel,
        &mut stats.text_fallbacks,
    )?;
    let people_from = format!(
        "FROM {people} p WHERE p.{link} IN (SELECT c.{key} {companies_from})",
        link = quote_ident(&s.people_company_column),
        key = quote_ident(&s.company_key),
    );
    stats.people = stream_query(
        &mut tx,
        &people_from,
        "p",
        state,
        duck,
        (schema, "people_raw"),
        s.batch_rows,
        cancel,
        &mut stats.text_fallbacks,
    )?;
    tx.commit().map_err(|e| PipelineError::Source {
        what: "closing the read transaction".into(),
        source: e,
    })?;
    Ok(stats)
}

/// Describes `SELECT alias.* <from>`, creates the DuckDB table with the
/// mapped types, and streams the rows into it. Returns the row count.
#[allow(clippy::too_many_arguments)]
fn stream_query(
    tx: &mut Transaction<'_>,
    from: &str,
    alias: &str,
    state: &StateCode,
    duck: &duckdb::Connection,
    (schema, table): (&str, &str),
    batch_rows: usize,
    cancel: &CancellationToken,
    fallbacks: &mut Vec<String>,
) -> Result<u64, PipelineError> {
    let src_err =
        |what: String| move |e: postgres::Error| PipelineError::Source { what, source: e };
    let describe = format!("SELECT {alias}.* {from}");
    let stmt = tx
        .prepare(&describe)
        .map_err(src_err(format!("preparing the query for {table}")))?;

    let mut types = Vec::new();
    let mut select = Vec::new();
    let mut changed = false;
    for col in stmt.columns() {
        let q = quote_ident(col.name());
        match ColType::from_pg(col.type_(), col.type_modifier()) {
            Some(t) => {
                select.push(format!("{alias}.{q}"));
                types.push((col.name().to_string(), t));
            }
            None => {
                tracing::warn!(
                    table,
                    column = col.name(),
                    pg_type = col.type_().name(),
                    "no exact DuckDB type for this column; carrying it as text"
                );
                fallbacks.push(format!("{table}.{} ({})", col.name(), col.type_().name()));
                select.push(format!("{alias}.{q}::text AS {q}"));
                types.push((col.name().to_string(), ColType::Text));
                changed = true;
            }
        }
    }
    let stmt = if changed {
        let sql = format!("SELECT {} {from}", select.join(", "));
        tx.prepare(&sql)
            .map_err(src_err(format!("preparing the query for {table}")))?
    } else {
        stmt
    };

    let ddl_cols: Vec<String> = types
        .iter()
        .map(|(n, t)| format!("{} {}", quote_ident(n), t.duckdb_sql()))
        .collect();
    duck.execute_batch(&format!(
        "CREATE OR REPLACE TABLE {}.{} ({})",
        quote_ident(schema),
        quote_ident(table),
        ddl_cols.join(", ")
    ))
    .map_err(|e| PipelineError::Workbench(format!("creating {schema}.{table}: {e}")))?;
    let arrow_schema = Arc::new(Schema::new(
        types
            .iter()
            .map(|(n, t)| t.arrow_field(n))
            .collect::<Vec<_>>(),
    ));
    let mut appender = duck.appender_to_db(table, schema).map_err(|e| {
        PipelineError::Workbench(format!("opening an appender on {schema}.{table}: {e}"))
    })?;
    let mut builders: Vec<ColumnBuilder> = types
        .iter()
        .map(|(_, t)| ColumnBuilder::new(t, batch_rows))
        .collect();

    let mut flush = |builders: &mut Vec<ColumnBuilder>| -> Result<(), PipelineError> {
        if builders.first().is_none_or(|b| b.is_empty()) {
            return Ok(());
        }
        let arrays = builders.iter_mut().map(|b| b.finish()).collect();
        let batch = RecordBatch::try_new(arrow_schema.clone(), arrays)
            .map_err(|e| PipelineError::Workbench(format!("building a batch for {table}: {e}")))?;
        appender
            .append_record_batch(batch)
            .map_err(|e| PipelineError::Workbench(format!("appending to {schema}.{table}: {e}")))
    };

    let mut rows = tx
        .query_raw(&stmt, [state.as_str()])
        .map_err(src_err(format!("querying {table}")))?;
    let mut n: u64 = 0;
    let ncols = types.len();
    while let Some(row) = rows.next().map_err(src_err(format!("reading {table}")))? {
        for (i, b) in builders.iter_mut().enumerate().take(ncols) {
            let v: Option<Raw> = row
                .try_get(i)
                .map_err(src_err(format!("reading {table}")))?;
            match v {
                None => b.append_null(),
                Some(raw) => b.append(raw.0).map_err(|e| PipelineError::Decode {
                    table: table.to_string(),
                    column: types[i].0.clone(),
                    message: e.to_string(),
                })?,
            }
        }
        n += 1;
        if n % batch_rows as u64 == 0 {
            flush(&mut builders)?;
            if cancel.is_cancelled() {
                return Err(PipelineError::Cancelled);
            }
            if n % (batch_rows as u64 * 16) == 0 {
                tracing::info!(table, rows = n, "pulling");
            }
        }
    }
    flush(&mut builders)?;
    drop(flush);
    appender
        .flush()
        .map_err(|e| PipelineError::Workbench(format!("appending to {schema}.{table}: {e}")))?;
    Ok(n)
}
