//! Step 6: one row per run in the audit table (`shq.audit_log` by default).
//!
//! The table's layout is checked before a run does any work: finding out
//! after an hour of pulling that the audit cannot be written would lose the
//! run's record. A missing table is created with the known layout; an
//! existing one must have the columns we write.

use postgres::{Client, GenericClient};

use crate::config::QualifiedName;
use crate::pipeline::PipelineError;

pub const EVENT_TYPE: &str = "outreach_validation_run";
pub const EVENT_SOURCE: &str = "outreach-workbench";

/// Columns we write or read back, and the types they may have.
const REQUIRED: &[(&str, &[&str])] = &[
    ("id", &["integer", "bigint"]),
    ("event_type", &["character varying", "text"]),
    ("event_source", &["character varying", "text"]),
    ("details", &["jsonb", "json"]),
];

fn err(table: &QualifiedName, e: postgres::Error) -> PipelineError {
    PipelineError::Audit(format!("{table}: {e}"))
}

/// What is wrong with the table's layout: `None` when the table does not
/// exist, an empty list when it is usable.
pub fn inspect(
    client: &mut impl GenericClient,
    table: &QualifiedName,
) -> Result<Option<Vec<String>>, PipelineError> {
    let rows = client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = $2",
            &[&table.schema, &table.table],
        )
        .map_err(|e| err(table, e))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let mut problems = Vec::new();
    for (name, types) in REQUIRED {
        match rows.iter().find(|r| r.get::<_, String>(0) == *name) {
            None => problems.push(format!("missing column `{name}`")),
            Some(r) => {
                let ty: String = r.get(1);
                if !types.contains(&ty.as_str()) {
                    problems.push(format!(
                        "column `{name}` is {ty}, expected {}",
                        types.join(" or ")
                    ));
                }
            }
        }
    }
    Ok(Some(problems))
}

/// Creates the schema and table when missing; refuses a table of another
/// layout, naming the missing or mistyped columns.
///
/// Concurrent runs (other states, other daemons) may all find the table
/// missing; `CREATE ... IF NOT EXISTS` is not safe against that race in
/// PostgreSQL, so the check-and-create holds a transaction advisory lock.
pub fn ensure_table(client: &mut Client, table: &QualifiedName) -> Result<(), PipelineError> {
    let mut tx = client.transaction().map_err(|e| err(table, e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&AUDIT_LOCK_CLASS])
        .map_err(|e| err(table, e))?;
    ensure_in(&mut tx, table)?;
    tx.commit().map_err(|e| err(table, e))
}

/// Advisory lock key for creating the audit table ("OWAU").
const AUDIT_LOCK_CLASS: i32 = 0x4f57_4155;

fn ensure_in(client: &mut impl GenericClient, table: &QualifiedName) -> Result<(), PipelineError> {
    match inspect(client, table)? {
        Some(problems) if problems.is_empty() => Ok(()),
        Some(problems) => Err(PipelineError::AuditLayout {
            table: table.to_string(),
            problems: problems.join(", "),
        }),
        None => client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE IF NOT EXISTS {t} (
                     id SERIAL PRIMARY KEY,
                     event_type VARCHAR(255) NOT NULL,
                     event_source VARCHAR(255) NOT NULL,
                     details JSONB,
                     created_at TIMESTAMP DEFAULT NOW()
                 );",
                schema = crate::config::quote_ident(&table.schema),
                t = table.quoted()
            ))
            .map_err(|e| err(table, e)),
    }
}

/// Writes one record on a connection of its own (the run's may be what
/// failed), retrying transient connection failures. Returns its `id`.
pub fn write(
    config: &crate::config::Config,
    details: &serde_json::Value,
) -> Result<i64, PipelineError> {
    let never = tokio_util::sync::CancellationToken::new();
    let mut client =
        crate::pipeline::retry::retry(&config.retry, &never, "connecting for the audit", || {
            crate::pipeline::source::connect(&config.source)
        })?;
    let table = config.audit_table();
    ensure_table(&mut client, &table)?;
    insert(&mut client, &table, details)
}

/// Inserts the run's record and returns its `id`.
pub fn insert(
    client: &mut Client,
    table: &QualifiedName,
    details: &serde_json::Value,
) -> Result<i64, PipelineError> {
    let row = client
        .query_one(
            &format!(
                "INSERT INTO {} (event_type, event_source, details)
                 VALUES ($1, $2, $3) RETURNING id::bigint",
                table.quoted()
            ),
            &[&EVENT_TYPE, &EVENT_SOURCE, details],
        )
        .map_err(|e| err(table, e))?;
    Ok(row.get(0))
}

/// The state's last successful run recorded in the audit table, for the
/// `max_row_delta` gate: `None` when there is none. The audit outlives a
/// deleted workbench and is shared by every host writing to it, so it is
/// the reference of record.
pub fn previous_success(
    client: &mut Client,
    table: &QualifiedName,
    state: &str,
) -> Result<Option<crate::pipeline::gates::Previous>, PipelineError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT details->>'run_id',
                        ((details->'companies'->>'raw')::bigint + (details->'people'->>'raw')::bigint)
                 FROM {} WHERE event_type = $1 AND details->>'state' = $2
                     AND details->>'status' = 'success'
                 ORDER BY id DESC LIMIT 1",
                table.quoted()
            ),
            &[&EVENT_TYPE, &state],
        )
        .map_err(|e| err(table, e))?;
    Ok(row.and_then(|r| {
        let run_id: Option<String> = r.get(0);
        let rows: Option<i64> = r.get(1);
        Some(crate::pipeline::gates::Previous {
            run_id: run_id?,
            rows: rows? as u64,
        })
    }))
}
