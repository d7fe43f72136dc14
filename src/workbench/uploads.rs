//! What was last uploaded to each object key, and the multipart uploads
//! a run could not abort.

use super::{Workbench, WorkbenchError};

impl Workbench {
    pub fn record_upload(
        &self,
        key: &str,
        sha256: &str,
        bytes: u64,
        run_id: &str,
    ) -> Result<(), WorkbenchError> {
        self.write(|conn| {
            conn.execute(
                "INSERT OR REPLACE INTO main.upload_manifest
                 VALUES (?, ?, ?, make_timestamp(?), ?)",
                duckdb::params![
                    key,
                    sha256,
                    bytes as i64,
                    chrono::Utc::now().timestamp_micros(),
                    run_id
                ],
            )
        })
        .map(drop)
    }

    /// Multipart uploads left unfinished by earlier runs, oldest first.
    pub fn unfinished_uploads(&self) -> Result<Vec<(String, String)>, WorkbenchError> {
        let mut stmt = self
            .conn()
            .prepare("SELECT object_key, upload_id FROM main.unfinished_uploads ORDER BY left_at")
            .map_err(|e| self.sql_err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.sql_err(e))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.sql_err(e))
    }

    /// Remembers (`left`) or forgets an unfinished multipart upload.
    pub fn set_unfinished_upload(
        &self,
        key: &str,
        upload_id: &str,
        left: bool,
    ) -> Result<(), WorkbenchError> {
        self.write(|conn| match left {
            true => conn.execute(
                "INSERT OR REPLACE INTO main.unfinished_uploads VALUES (?, ?, make_timestamp(?))",
                duckdb::params![upload_id, key, chrono::Utc::now().timestamp_micros()],
            ),
            false => conn.execute(
                "DELETE FROM main.unfinished_uploads WHERE upload_id = ? AND object_key = ?",
                duckdb::params![upload_id, key],
            ),
        })
        .map(drop)
    }
}
