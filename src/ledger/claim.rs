//! Before any work: claim the schedule's fire time, then the state.
//!
//! Several daemons (hosts) may share one database and one schedule. Two
//! rows in PostgreSQL, beside the audit table, keep them apart; both work
//! through a transaction pooler and outlive any session:
//! - `outreach_fire_claims`, one row per (state, fire time): the first host
//!   to insert it runs that fire, every other host skips it with a log
//!   line, however late it gets there.
//! - `outreach_leases`, one row per state: the run holding it is the only
//!   one running the state. It is taken atomically, renewed by a heartbeat
//!   while the run goes, and expires `ttl_secs` after the last renewal, so
//!   a crashed holder (kill -9, power loss) is taken over once the TTL has
//!   passed. Before each upload and before the audit the run checks
//!   ("fences") that it still holds it: a run that lost its lease publishes
//!   nothing more.
//!
//! All times are the database server's `now()`: hosts' clocks never meet.

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use postgres::types::Type;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, QualifiedName};
use crate::error::PipelineError;
use crate::source::connect::Session;
use crate::state::StateCode;

/// Fire claims older than this are deleted as new ones are made.
const FIRE_CLAIMS_KEPT_DAYS: i32 = 35;

/// Who this process is, for the lease and claim rows. The host name comes
/// from uname(2): the unit's ProcSubset=pid hides /proc/sys, where it was
/// read before (the service's rows said "unknown-host").
pub fn holder() -> (String, i32) {
    let name = rustix::system::uname();
    let host = name.nodename().to_string_lossy().trim().to_string();
    let host = if host.is_empty() {
        "unknown-host".into()
    } else {
        host
    };
    (host, std::process::id() as i32)
}

fn sql_err(what: String) -> impl FnOnce(postgres::Error) -> PipelineError {
    move |source| PipelineError::Source { what, source }
}

/// Claims `fire` of `state` for `run_id`, or says who has it
/// ([`PipelineError::FireClaimed`]). Safe to repeat: a retry after a lost
/// answer finds its own claim.
pub fn claim_fire(
    session: &mut Session,
    config: &Config,
    state: &StateCode,
    fire: DateTime<Utc>,
    run_id: &str,
    cancel: &CancellationToken,
) -> Result<(), PipelineError> {
    let table = config.fire_claims_table();
    let (host, pid) = holder();
    let sql = format!(
        "WITH expired AS (
             DELETE FROM {t} WHERE fire_time < now() - make_interval(days => {FIRE_CLAIMS_KEPT_DAYS})
                 AND NOT (state = $1 AND fire_time = $2)
         ), claimed AS (
             INSERT INTO {t} AS f (state, fire_time, run_id, host, pid) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (state, fire_time) DO UPDATE SET run_id = f.run_id
                 WHERE f.run_id = EXCLUDED.run_id
             RETURNING run_id
         )
         SELECT (SELECT count(*) FROM claimed)::int8, h.run_id, h.host, h.pid, h.claimed_at
         FROM (SELECT 1) one LEFT JOIN {t} h ON h.state = $1 AND h.fire_time = $2",
        t = table.quoted()
    );
    let what = format!("claiming fire time {fire} of {state} in {table}");
    let row = session.run(&what, cancel, |c| {
        c.query_typed_one(
            &sql,
            &[
                (&state.as_str(), Type::TEXT),
                (&fire, Type::TIMESTAMPTZ),
                (&run_id, Type::TEXT),
                (&host, Type::TEXT),
                (&pid, Type::INT4),
            ],
        )
        .map_err(sql_err(what.clone()))
    })?;
    if row.get::<_, i64>(0) == 1 {
        return Ok(());
    }
    let by_run: Option<String> = row.get(1);
    let by_host: Option<String> = row.get(2);
    let by_pid: Option<i32> = row.get(3);
    let at: Option<DateTime<Utc>> = row.get(4);
    Err(PipelineError::FireClaimed(format!(
        "fire time {} of state {state} was already claimed by {} pid {} (run {}) at {}; skipped",
        fire.to_rfc3339(),
        by_host.unwrap_or_default(),
        by_pid.unwrap_or_default(),
        by_run.unwrap_or_default(),
        at.map(|t| t.to_rfc3339()).unwrap_or_default(),
    )))
}

/// The lease's own connection and what it knows of the lease.
struct Held {
    session: Session,
    /// When the last renewal that succeeded was sent: the lease is ours
    /// until at least this plus the TTL.
    renewed: Instant,
    lost: Option<String>,
}

/// The state's lease, held by this run until [`Lease::release`] (or drop).
pub struct Lease {
    table: QualifiedName,
    state: String,
    run_id: String,
    ttl: Duration,
    held: Arc<Mutex<Held>>,
    stop_heartbeat: Option<mpsc::Sender<()>>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

impl Lease {
    /// Takes the lease of `state` for `run_id`, or says who holds it
    /// ([`PipelineError::StateBusy`]). An expired lease is taken over, with
    /// a log line naming the holder that let it lapse.
    pub fn acquire(
        session: &mut Session,
        config: &Config,
        state: &StateCode,
        run_id: &str,
        cancel: &CancellationToken,
    ) -> Result<Lease, PipelineError> {
        let table = config.leases_table();
        let ttl = config.lease.ttl;
        let (host, pid) = holder();
        let process = super::process::this_process();
        // The outer SELECT sees the row as it was before this statement:
        // the holder that refused us, or the one whose lapsed lease we took.
        let sql = format!(
            "WITH taken AS (
                 INSERT INTO {t} AS l (state, run_id, host, pid, process, expires_at)
                 VALUES ($1, $2, $3, $4, $6, now() + make_interval(secs => $5))
                 ON CONFLICT (state) DO UPDATE SET run_id = EXCLUDED.run_id, host = EXCLUDED.host,
                     pid = EXCLUDED.pid, process = EXCLUDED.process, acquired_at = now(),
                     renewed_at = now(), expires_at = EXCLUDED.expires_at
                 WHERE l.expires_at < now() OR l.run_id = EXCLUDED.run_id
                 RETURNING run_id
             )
             SELECT (SELECT count(*) FROM taken)::int8, h.run_id, h.host, h.pid, h.acquired_at,
                    h.expires_at, h.expires_at < now(), h.process
             FROM (SELECT 1) one LEFT JOIN {t} h ON h.state = $1",
            t = table.quoted()
        );
        let what = format!("taking the lease of {state} in {table}");
        let started = Instant::now();
        let take = |session: &mut Session| {
            session.run(&what, cancel, |c| {
                c.query_typed_one(
                    &sql,
                    &[
                        (&state.as_str(), Type::TEXT),
                        (&run_id, Type::TEXT),
                        (&host, Type::TEXT),
                        (&pid, Type::INT4),
                        (&ttl.as_secs_f64(), Type::FLOAT8),
                        (&process, Type::TEXT),
                    ],
                )
                .map_err(sql_err(what.clone()))
            })
        };
        let mut row = take(session)?;
        // A holder on this machine whose process is gone (kill -9, an OOM
        // kill of a one-shot run) is not waited for: its lease is deleted,
        // that holder's row and no other, and taken at once.
        if row.get::<_, i64>(0) == 0 {
            let (by_host, by_pid, by_run, by_process): (
                Option<String>,
                Option<i32>,
                Option<String>,
                Option<String>,
            ) = (row.get(2), row.get(3), row.get(1), row.get(7));
            let dead_here = by_host.as_deref() == Some(host.as_str())
                && by_pid.is_some_and(|p| super::process::is_dead_here(by_process.as_deref(), p));
            if let (true, Some(dead_run)) = (dead_here, by_run) {
                release_dead(session, config, std::slice::from_ref(&dead_run), cancel)?;
                tracing::warn!(
                    run_id = %dead_run,
                    pid = by_pid.unwrap_or_default(),
                    "took over the lease of a process of this host that is gone"
                );
                row = take(session)?;
            }
        }
        let by_run: Option<String> = row.get(1);
        let holder = format!(
            "{} pid {} (run {}, since {}, lease until {})",
            row.get::<_, Option<String>>(2).unwrap_or_default(),
            row.get::<_, Option<i32>>(3).unwrap_or_default(),
            by_run.as_deref().unwrap_or_default(),
            row.get::<_, Option<DateTime<Utc>>>(4)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default(),
            row.get::<_, Option<DateTime<Utc>>>(5)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default(),
        );
        if row.get::<_, i64>(0) == 0 {
            return Err(PipelineError::StateBusy(format!(
                "state {state} is being run by {holder}; skipped"
            )));
        }
        if row.get::<_, Option<bool>>(6) == Some(true) && by_run.as_deref() != Some(run_id) {
            tracing::warn!(previous = %holder, "took over an expired lease: its holder stopped renewing it (crashed or cut off)");
        }
        let held = Arc::new(Mutex::new(Held {
            // Its own connection: the run's is busy with the pull while the
            // heartbeat renews. Opened at the first renewal (the fences and
            // the release use the run's, idle by then: a short run opens
            // no second connection).
            session: Session::lazy(&config.source, &config.retry),
            renewed: started,
            lost: None,
        }));
        let mut lease = Lease {
            table,
            state: state.to_string(),
            run_id: run_id.to_string(),
            ttl,
            held,
            stop_heartbeat: None,
            heartbeat: None,
        };
        lease.start_heartbeat();
        Ok(lease)
    }

    fn start_heartbeat(&mut self) {
        let (stop, stopped) = mpsc::channel::<()>();
        let every = (self.ttl / 3).max(Duration::from_millis(500));
        let (held, table, state, run_id, ttl) = (
            self.held.clone(),
            self.table.clone(),
            self.state.clone(),
            self.run_id.clone(),
            self.ttl,
        );
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("lease-heartbeat".into())
            .spawn(move || {
                let _entered = span.enter();
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    let mut guard = held.lock().unwrap_or_else(|p| p.into_inner());
                    let h = &mut *guard;
                    if h.lost.is_some() {
                        return;
                    }
                    let (renewal, session) = ((&mut h.renewed, &mut h.lost), &mut h.session);
                    if let Err(e) = renew(renewal, session, &table, &state, &run_id, ttl) {
                        tracing::warn!(error = %e, "could not renew the state's lease; trying again");
                    }
                }
            });
        match thread {
            Ok(t) => {
                self.stop_heartbeat = Some(stop);
                self.heartbeat = Some(t);
            }
            Err(e) => tracing::warn!(error = %e, "could not start the lease heartbeat"),
        }
    }

    /// Fails unless this run still holds the lease: called before each
    /// upload and before the audit, on the run's own connection (idle
    /// then). A renewal that cannot reach the
    /// database is accepted while the last one is younger than half the
    /// TTL (nobody can have taken it yet); after that the run stops.
    pub fn fence(&self, session: &mut Session, before: &str) -> Result<(), PipelineError> {
        let mut guard = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let h = &mut *guard;
        let renewal = (&mut h.renewed, &mut h.lost);
        match renew(
            renewal,
            session,
            &self.table,
            &self.state,
            &self.run_id,
            self.ttl,
        ) {
            Ok(()) => Ok(()),
            Err(e) if h.lost.is_none() && h.renewed.elapsed() < self.ttl / 2 => {
                tracing::warn!(error = %e, "could not renew the state's lease before {before}; it is still valid");
                Ok(())
            }
            Err(e) => {
                let why = h.lost.clone().unwrap_or_else(|| e.to_string());
                Err(PipelineError::LeaseLost(format!(
                    "this run no longer holds the lease of state {} ({why}); stopped before {before}",
                    self.state
                )))
            }
        }
    }

    /// Stops the heartbeat and deletes the lease row, on the run's
    /// connection when it has one. A row that cannot be deleted now expires
    /// after the TTL.
    pub fn release(mut self, run_session: Option<&mut Session>) {
        self.stop_heartbeat();
        let mut guard = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let h = &mut *guard;
        if h.lost.is_some() {
            return;
        }
        let session = run_session.unwrap_or(&mut h.session);
        let sql = format!(
            "DELETE FROM {} WHERE state = $1 AND run_id = $2",
            self.table.quoted()
        );
        let deleted = session.once(|c| {
            c.execute_typed(
                &sql,
                &[(&self.state, Type::TEXT), (&self.run_id, Type::TEXT)],
            )
            .map_err(sql_err("releasing the lease".into()))
        });
        if let Err(e) = deleted {
            tracing::warn!(error = %e, ttl_secs = self.ttl.as_secs(), "could not release the state's lease; it expires by itself");
        }
    }

    /// The lease's row: its table, state and run id.
    pub fn row(&self) -> (&QualifiedName, &str, &str) {
        (&self.table, &self.state, &self.run_id)
    }

    /// Stops renewing: at the release, when dropped, and before a statement
    /// that deletes the row itself (`audit::record_releasing`), so that no
    /// renewal races the delete. The fence and the release still work
    /// after it.
    pub fn stop_heartbeat(&mut self) {
        self.stop_heartbeat.take();
        if let Some(t) = self.heartbeat.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // `release` has run when the heartbeat is gone; otherwise (a panic
        // unwinding past the run) the heartbeat stops and the row expires.
        self.stop_heartbeat();
    }
}

/// One renewal, on the lease's own connection, with a single try: the
/// heartbeat comes back soon enough. Marks the lease lost when the row is
/// no longer ours.
fn renew(
    (renewed, lost_as): (&mut Instant, &mut Option<String>),
    session: &mut Session,
    table: &QualifiedName,
    state: &str,
    run_id: &str,
    ttl: Duration,
) -> Result<(), PipelineError> {
    if let Some(lost) = lost_as {
        return Err(PipelineError::LeaseLost(lost.clone()));
    }
    let sql = format!(
        "UPDATE {} SET renewed_at = now(), expires_at = now() + make_interval(secs => $3)
         WHERE state = $1 AND run_id = $2 AND expires_at > now()",
        table.quoted()
    );
    let sent = Instant::now();
    let updated = session.once(|c| {
        c.execute_typed(
            &sql,
            &[
                (&state, Type::TEXT),
                (&run_id, Type::TEXT),
                (&ttl.as_secs_f64(), Type::FLOAT8),
            ],
        )
        .map_err(sql_err("renewing the lease".into()))
    })?;
    if updated == 1 {
        *renewed = sent;
        return Ok(());
    }
    let lost = format!(
        "the lease expired or was taken over (TTL {} s)",
        ttl.as_secs()
    );
    tracing::error!(state, "{lost}: this run publishes nothing more");
    *lost_as = Some(lost.clone());
    Err(PipelineError::LeaseLost(lost))
}

/// Deletes the leases of runs known to be dead (abandoned by a process of
/// this host that died), so their states need not wait for the TTL. A
/// missing table means there is nothing to release.
pub fn release_dead(
    session: &mut Session,
    config: &Config,
    run_ids: &[String],
    cancel: &CancellationToken,
) -> Result<u64, PipelineError> {
    let table = config.leases_table();
    let sql = format!("DELETE FROM {} WHERE run_id = ANY($1)", table.quoted());
    let what = format!("releasing abandoned leases in {table}");
    let deleted = session.run(&what, cancel, |c| {
        c.execute_typed(&sql, &[(&run_ids, Type::TEXT_ARRAY)])
            .map_err(sql_err(what.clone()))
    });
    match deleted {
        Err(PipelineError::Source { source, .. })
            if source.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) =>
        {
            Ok(0)
        }
        other => other,
    }
}

/// The live leases, for `check`: one line each.
/// The leases not expired, as (state, `host pid N (run R)`).
pub fn lease_holders(
    session: &mut Session,
    config: &Config,
    cancel: &CancellationToken,
) -> Result<Vec<(String, String)>, PipelineError> {
    let table = config.leases_table();
    let sql = format!(
        "SELECT state, host, pid, run_id FROM {} WHERE expires_at >= now() ORDER BY state",
        table.quoted()
    );
    let what = format!("reading the leases in {table}");
    let rows = session.run(&what, cancel, |c| {
        c.query_typed(&sql, &[]).map_err(sql_err(what.clone()))
    })?;
    Ok(rows
        .iter()
        .map(|r| {
            let state: String = r.get(0);
            let holder = format!(
                "{} pid {} (run {})",
                r.get::<_, String>(1),
                r.get::<_, i32>(2),
                r.get::<_, String>(3)
            );
            (state, holder)
        })
        .collect())
}

pub fn live_leases(
    session: &mut Session,
    config: &Config,
    cancel: &CancellationToken,
) -> Result<Vec<String>, PipelineError> {
    let table = config.leases_table();
    let sql = format!(
        "SELECT state, host, pid, run_id, acquired_at, renewed_at, expires_at, expires_at < now()
         FROM {} ORDER BY state",
        table.quoted()
    );
    let what = format!("reading the leases in {table}");
    let rows = session.run(&what, cancel, |c| {
        c.query_typed(&sql, &[]).map_err(sql_err(what.clone()))
    })?;
    Ok(rows
        .iter()
        .map(|r| {
            let t = |i| r.get::<_, DateTime<Utc>>(i).format("%Y-%m-%d %H:%M:%S UTC");
            format!(
                "{} held by {} pid {} (run {}) since {}, renewed {}, {} {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, i32>(2),
                r.get::<_, String>(3),
                t(4),
                t(5),
                if r.get::<_, bool>(7) {
                    "EXPIRED at"
                } else {
                    "expires"
                },
                t(6),
            )
        })
        .collect())
}
