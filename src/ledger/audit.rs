//! The last step: one row per run in the audit table (`shq.audit_log` by
//! default), written exactly once.
//!
//! The table's layout is checked before a run does any work: finding out
//! after an hour of pulling that the audit cannot be written would lose the
//! run's record. A missing table is created with the known layout, with the
//! lease and fire-claim tables beside it (see `claim`); an existing one must
//! have the columns we write.
//!
//! "Exactly once": a record is keyed by its run id. Writing it again (a
//! retry after an answer that never came, a pending record sent later) finds
//! the row already there and returns its id. A run whose record cannot be
//! written at all is kept in the workbench as pending and written by a later
//! run (or the daemon's start) once PostgreSQL answers again.

use postgres::types::Type;
use postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::config::{quote_ident, Config, QualifiedName};
use crate::error::PipelineError;
use crate::source::connect::Session;

pub const EVENT_TYPE: &str = "outreach_validation_run";
pub const EVENT_SOURCE: &str = "outreach-workbench";

/// Columns we write or read back, and the types they may have.
const REQUIRED: &[(&str, &[&str])] = &[
    ("id", &["integer", "bigint"]),
    ("event_type", &["character varying", "text"]),
    ("event_source", &["character varying", "text"]),
    ("details", &["jsonb", "json"]),
];

fn err(table: &QualifiedName) -> impl Fn(postgres::Error) -> PipelineError + '_ {
    move |source| PipelineError::Audit {
        table: table.to_string(),
        source,
    }
}

/// What is wrong with the table's layout: `None` when the table does not
/// exist, an empty list when it is usable.
pub fn inspect(
    client: &mut impl GenericClient,
    table: &QualifiedName,
) -> Result<Option<Vec<String>>, PipelineError> {
    let rows = client
        .query_typed(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = $1 AND table_name = $2",
            &[(&table.schema, Type::TEXT), (&table.table, Type::TEXT)],
        )
        .map_err(err(table))?;
    let columns: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(layout_problems(&columns))
}

/// [`inspect`]'s verdict on the table's (column, data type) pairs.
fn layout_problems(columns: &[(String, String)]) -> Option<Vec<String>> {
    if columns.is_empty() {
        return None;
    }
    let mut problems = Vec::new();
    for (name, types) in REQUIRED {
        match columns.iter().find(|(c, _)| c == name) {
            None => problems.push(format!("missing column `{name}`")),
            Some((_, ty)) => {
                if !types.contains(&ty.as_str()) {
                    problems.push(format!(
                        "column `{name}` is {ty}, expected {}",
                        types.join(" or ")
                    ));
                }
            }
        }
    }
    Some(problems)
}

/// Advisory lock key for creating the tables ("OWAU"); transaction-scoped,
/// so it works through a transaction pooler.
const CREATE_LOCK_CLASS: i32 = 0x4f57_4155;

/// Makes sure the audit, lease and fire-claim tables exist; refuses an
/// audit table of another layout, naming the missing or mistyped columns.
/// One round trip when they all exist.
///
/// Concurrent runs (other states, other daemons) may all find a table
/// missing; `CREATE ... IF NOT EXISTS` is not safe against that race in
/// PostgreSQL, so the creation holds a transaction advisory lock. Nothing is
/// created when everything exists: `IF NOT EXISTS` still needs the CREATE
/// privilege, which a production role may lack.
pub fn ensure_tables(
    session: &mut Session,
    config: &Config,
    cancel: &CancellationToken,
) -> Result<(), PipelineError> {
    let table = config.audit_table();
    let leases = config.leases_table();
    let claims = config.fire_claims_table();
    session.run(&format!("checking the audit table {table}"), cancel, |c| {
        // The three tables' columns in one statement (they share a schema):
        // the audit table's layout, and which of the others exist.
        let rows = c
            .query_typed(
                "SELECT table_name::text, column_name::text, data_type::text
                 FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = ANY($2)",
                &[
                    (&table.schema, Type::TEXT),
                    (
                        &vec![&table.table, &leases.table, &claims.table],
                        Type::TEXT_ARRAY,
                    ),
                ],
            )
            .map_err(err(&table))?;
        let present: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let audit_columns: Vec<(String, String)> = rows
            .iter()
            .filter(|r| r.get::<_, String>(0) == table.table)
            .map(|r| (r.get(1), r.get(2)))
            .collect();
        let audit = layout_problems(&audit_columns);
        if let Some(problems) = audit.as_ref().filter(|p| !p.is_empty()) {
            return Err(PipelineError::AuditLayout {
                table: table.to_string(),
                problems: problems.join(", "),
            });
        }
        let mut create = Vec::new();
        if audit.is_none() {
            create.push(format!(
                "CREATE TABLE IF NOT EXISTS {} (
                     id SERIAL PRIMARY KEY,
                     event_type VARCHAR(255) NOT NULL,
                     event_source VARCHAR(255) NOT NULL,
                     details JSONB,
                     created_at TIMESTAMP DEFAULT NOW()
                 )",
                table.quoted()
            ));
        }
        if !present.contains(&leases.table) {
            create.push(format!(
                "CREATE TABLE IF NOT EXISTS {} (
                     state TEXT PRIMARY KEY,
                     run_id TEXT NOT NULL,
                     host TEXT NOT NULL,
                     pid INTEGER NOT NULL,
                     process TEXT,
                     acquired_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                     renewed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                     expires_at TIMESTAMPTZ NOT NULL
                 )",
                leases.quoted()
            ));
        }
        // Leases tables made before the `process` column (which tells a
        // dead local holder from a live one) get it.
        let lease_has_process = rows
            .iter()
            .any(|r| r.get::<_, String>(0) == leases.table && r.get::<_, String>(1) == "process");
        if present.contains(&leases.table) && !lease_has_process {
            create.push(format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS process TEXT",
                leases.quoted()
            ));
        }
        if !present.contains(&claims.table) {
            create.push(format!(
                "CREATE TABLE IF NOT EXISTS {} (
                     state TEXT NOT NULL,
                     fire_time TIMESTAMPTZ NOT NULL,
                     run_id TEXT NOT NULL,
                     host TEXT NOT NULL,
                     pid INTEGER NOT NULL,
                     claimed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                     PRIMARY KEY (state, fire_time)
                 )",
                claims.quoted()
            ));
        }
        if create.is_empty() {
            return Ok(());
        }
        // One simple-protocol batch is one implicit transaction: the lock
        // is held until the last CREATE has committed. `SET LOCAL` ends
        // with it too: the server's "already exists, skipping" NOTICEs for
        // our own `IF NOT EXISTS` were INFO lines in the journal.
        c.batch_execute(&format!(
            "SELECT pg_advisory_xact_lock({CREATE_LOCK_CLASS}, 0);
             SET LOCAL client_min_messages = warning;
             CREATE SCHEMA IF NOT EXISTS {};
             {};",
            quote_ident(&table.schema),
            create.join(";\n")
        ))
        .map_err(err(&table))
    })
}

/// The statement that writes a record unless one with its run id ($4) is
/// there already, and returns the id either way. With `fenced` (the leases
/// table), the same statement deletes the run's lease row of state $5, and
/// the record is written only if that row was still the run's.
fn record_sql(table: &QualifiedName, fenced: Option<&QualifiedName>) -> String {
    let (fence, lease_ok) = match fenced {
        None => (String::new(), ""),
        Some(leases) => (
            format!(
                "fenced AS (
                     DELETE FROM {} WHERE state = $5 AND run_id = $4 RETURNING 1
                 ), ",
                leases.quoted()
            ),
            " AND EXISTS (SELECT FROM fenced)",
        ),
    };
    format!(
        "WITH {fence}existing AS (
             SELECT id FROM {t} WHERE event_type = $1 AND details->>'run_id' = $4
             ORDER BY id LIMIT 1
         ), written AS (
             INSERT INTO {t} (event_type, event_source, details)
             SELECT $1, $2, $3 WHERE NOT EXISTS (SELECT FROM existing){lease_ok}
             RETURNING id
         )
         SELECT id::int8 FROM written UNION ALL SELECT id::int8 FROM existing",
        t = table.quoted()
    )
}

/// Writes the run's record unless one with its run id is there already,
/// and returns the record's `id`. One statement, so a retry on a new
/// connection is safe.
///
/// Two writers of one run id never race: a run writes its own record, and
/// pending records are sent by the process holding the workbench, one
/// sender at a time (see [`send_pending`]).
pub fn record(
    session: &mut Session,
    table: &QualifiedName,
    details: &serde_json::Value,
    cancel: &CancellationToken,
) -> Result<i64, PipelineError> {
    record_event(session, table, EVENT_TYPE, details, cancel)
}

/// The record of an all-states run as a whole (its states each have their
/// own): what it read, its states by outcome, its rows of no state.
pub const ALL_STATES_EVENT_TYPE: &str = "outreach_all_states_run";

/// Writes `details` as an `event_type` record, once per `details.run_id`.
pub fn record_event(
    session: &mut Session,
    table: &QualifiedName,
    event_type: &str,
    details: &serde_json::Value,
    cancel: &CancellationToken,
) -> Result<i64, PipelineError> {
    let run_id = details["run_id"].as_str().unwrap_or_default().to_string();
    let sql = record_sql(table, None);
    session.run(
        &format!("writing the audit record to {table}"),
        cancel,
        |c| {
            c.query_typed_one(
                &sql,
                &[
                    (&event_type, Type::TEXT),
                    (&EVENT_SOURCE, Type::TEXT),
                    (details, Type::JSONB),
                    (&run_id, Type::TEXT),
                ],
            )
            .map(|r| r.get(0))
            .map_err(err(table))
        },
    )
}

/// The fence, the record and the lease's release in one statement, one
/// round trip instead of three (on a far database, each is one): the record
/// is written only while the lease row is still the run's, and the row goes
/// in the same transaction. `None` when the lease is no longer the run's or
/// the statement failed; the caller then goes step by step, whose fence
/// says why. One try: the step-by-step path retries.
pub fn record_releasing(
    session: &mut Session,
    table: &QualifiedName,
    lease: &crate::ledger::claim::Lease,
    details: &serde_json::Value,
) -> Option<i64> {
    let (leases, state, run_id) = lease.row();
    let sql = record_sql(table, Some(leases));
    let written = session.once(|c| {
        c.query_typed(
            &sql,
            &[
                (&EVENT_TYPE, Type::TEXT),
                (&EVENT_SOURCE, Type::TEXT),
                (details, Type::JSONB),
                (&run_id, Type::TEXT),
                (&state, Type::TEXT),
            ],
        )
        .map_err(err(table))
    });
    match written {
        Ok(rows) => rows.first().map(|r| r.get(0)),
        Err(e) => {
            tracing::debug!(error = %e, "the one-statement audit failed; writing it step by step");
            None
        }
    }
}

/// Writes the records the workbench holds as pending (runs that could not
/// reach PostgreSQL, abandoned runs), oldest first, and marks each one
/// written. Stops at the first failure: the rest wait for the next try.
/// Returns how many were written.
pub fn send_pending(
    session: &mut Session,
    config: &Config,
    wb: &crate::workbench::Workbench,
    cancel: &CancellationToken,
) -> Result<usize, PipelineError> {
    // One sender at a time in this process; the workbench file lock keeps
    // other processes out.
    static SENDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = SENDING.lock().unwrap_or_else(|p| p.into_inner());
    let pending = wb.pending_audits().map_err(PipelineError::WorkbenchOpen)?;
    if pending.is_empty() {
        return Ok(0);
    }
    // The first run may never have reached PostgreSQL to create the table.
    ensure_tables(session, config, cancel)?;
    let table = config.audit_table();
    let mut sent = 0;
    for p in pending {
        let id = record(session, &table, &p.details, cancel)?;
        wb.audited(&p.run_id, id)
            .map_err(PipelineError::WorkbenchOpen)?;
        tracing::info!(run_id = %p.run_id, audit_id = id, "wrote the audit record of an earlier run that could not be audited then");
        sent += 1;
    }
    Ok(sent)
}

/// The state's last successful run recorded in the audit table, for the
/// `max_row_delta` gate: `None` when there is none. The audit outlives a
/// deleted workbench and is shared by every host writing to it, so it is
/// the reference of record.
pub fn previous_success(
    session: &mut Session,
    table: &QualifiedName,
    state: &str,
    cancel: &CancellationToken,
) -> Result<Option<crate::quality::gates::Previous>, PipelineError> {
    let sql = format!(
        "SELECT details->>'run_id',
                ((details->'companies'->>'raw')::bigint + (details->'people'->>'raw')::bigint)
         FROM {} WHERE event_type = $1 AND details->>'state' = $2
             AND details->>'status' = 'success'
         ORDER BY id DESC LIMIT 1",
        table.quoted()
    );
    let row = session.run("reading the previous run", cancel, |c| {
        c.query_typed_opt(&sql, &[(&EVENT_TYPE, Type::TEXT), (&state, Type::TEXT)])
            .map_err(err(table))
    })?;
    Ok(row.and_then(|r| {
        let run_id: Option<String> = r.get(0);
        let rows: Option<i64> = r.get(1);
        Some(crate::quality::gates::Previous {
            run_id: run_id?,
            rows: rows? as u64,
        })
    }))
}

/// Which audited runs [`runs`] returns; `None` is no filter.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub state: Option<String>,
    pub host: Option<String>,
    pub status: Option<String>,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub limit: i64,
}

/// Every host's audited runs, newest first, as `(id, details)`.
pub fn runs(
    session: &mut Session,
    table: &QualifiedName,
    filter: &RunFilter,
    cancel: &CancellationToken,
) -> Result<Vec<(i64, serde_json::Value)>, PipelineError> {
    let sql = format!(
        "SELECT id::int8, details FROM {} WHERE event_type = $1
             AND ($2::text IS NULL OR details->>'state' = $2)
             AND ($3::text IS NULL OR details->>'host' = $3)
             AND ($4::text IS NULL OR details->>'status' = $4)
             AND ($5::timestamptz IS NULL OR (details->>'started_at')::timestamptz >= $5)
         ORDER BY id DESC LIMIT $6",
        table.quoted()
    );
    let f = filter;
    let rows = session.run("reading the audited runs", cancel, |c| {
        c.query_typed(
            &sql,
            &[
                (&EVENT_TYPE, Type::TEXT),
                (&f.state, Type::TEXT),
                (&f.host, Type::TEXT),
                (&f.status, Type::TEXT),
                (&f.since, Type::TIMESTAMPTZ),
                (&f.limit, Type::INT8),
            ],
        )
        .map_err(err(table))
    })?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Each state's newest audited run (dry runs are not audited), as
/// `(id, details)`, in state order.
pub fn last_per_state(
    session: &mut Session,
    table: &QualifiedName,
    cancel: &CancellationToken,
) -> Result<Vec<(i64, serde_json::Value)>, PipelineError> {
    let sql = format!(
        "SELECT DISTINCT ON (details->>'state') id::int8, details FROM {}
         WHERE event_type = $1 ORDER BY details->>'state', id DESC",
        table.quoted()
    );
    let rows = session.run("reading each state's last run", cancel, |c| {
        c.query_typed(&sql, &[(&EVENT_TYPE, Type::TEXT)])
            .map_err(err(table))
    })?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The newest `limit` run records in the audit table, newest first, as
/// `(id, details)`: what a new state file's history is seeded from.
pub fn recent_runs(
    session: &mut Session,
    table: &QualifiedName,
    limit: i64,
    cancel: &CancellationToken,
) -> Result<Vec<(i64, serde_json::Value)>, PipelineError> {
    let sql = format!(
        "SELECT id::int8, details FROM {} WHERE event_type = $1 ORDER BY id DESC LIMIT $2",
        table.quoted()
    );
    let rows = session.run("reading the audit's recent runs", cancel, |c| {
        c.query_typed(&sql, &[(&EVENT_TYPE, Type::TEXT), (&limit, Type::INT8)])
            .map_err(err(table))
    })?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
