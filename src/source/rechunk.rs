//! Regroups a table's Arrow batches so that every DuckDB chunk the
//! consumers receive is full but the table's last.
//!
//! Why: DuckDB's Parquet writer closes a row group once it holds at least
//! `ROW_GROUP_SIZE` rows, counted in whole chunks, so the chunks' sizes
//! decide where row groups end and so the file's bytes. Measured on the
//! benchmark's WV (50k companies, 150k people): `batch_rows` 10000 and 3000
//! gave other good files than 2048 or 16384 (whose batches are whole
//! chunks), and the views' `COPY` gives the whole-chunk bytes. With every
//! chunk full, a state's files depend on its rows alone, not on
//! `batch_rows` (changing it no longer uploads every file again).

use duckdb::arrow::compute::concat_batches;
use duckdb::arrow::error::ArrowError;
use duckdb::arrow::record_batch::RecordBatch;

/// Holds back the rows that do not fill a chunk until more arrive.
pub struct Rechunker {
    chunk: usize,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
}

impl Rechunker {
    /// For chunks of `chunk` rows (DuckDB's vector size).
    pub fn new(chunk: usize) -> Rechunker {
        Rechunker {
            chunk: chunk.max(1),
            pending: Vec::new(),
            pending_rows: 0,
        }
    }

    /// `batch`'s rows, with those held back before, as batches whose sizes
    /// are whole chunks (none when they do not fill one). Rows are copied
    /// only to fill the one chunk that spans the held-back rows and
    /// `batch`; whole-chunk batches pass as they are.
    pub fn push(&mut self, batch: RecordBatch) -> Result<Vec<RecordBatch>, ArrowError> {
        let n = batch.num_rows();
        let mut out = Vec::new();
        let mut offset = 0;
        if self.pending_rows > 0 {
            let take = (self.chunk - self.pending_rows).min(n);
            self.hold(batch.slice(0, take));
            offset = take;
            if self.pending_rows == self.chunk {
                out.push(self.take_pending()?);
            }
        }
        let whole = (n - offset) / self.chunk * self.chunk;
        if whole > 0 {
            out.push(batch.slice(offset, whole));
            offset += whole;
        }
        if offset < n {
            self.hold(batch.slice(offset, n - offset));
        }
        Ok(out)
    }

    /// The rows held back at the table's end: its last, partial chunk.
    pub fn finish(&mut self) -> Result<Option<RecordBatch>, ArrowError> {
        match self.pending_rows {
            0 => Ok(None),
            _ => self.take_pending().map(Some),
        }
    }

    fn hold(&mut self, part: RecordBatch) {
        if part.num_rows() > 0 {
            self.pending_rows += part.num_rows();
            self.pending.push(part);
        }
    }

    fn take_pending(&mut self) -> Result<RecordBatch, ArrowError> {
        let parts = std::mem::take(&mut self.pending);
        self.pending_rows = 0;
        match parts.len() {
            1 => Ok(parts.into_iter().next().expect("one part")),
            _ => concat_batches(&parts[0].schema(), &parts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duckdb::arrow::array::{Array, Int64Array};
    use duckdb::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn batch(from: i64, n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from_iter_values(from..from + n))],
        )
        .unwrap()
    }

    /// Whatever the batches' sizes, the chunks are full but the last, and
    /// the rows come out once each, in order.
    #[test]
    fn chunks_are_full_but_the_last_whatever_the_batches() {
        for sizes in [
            vec![3, 3, 3, 3],
            vec![1; 9],
            vec![10],
            vec![4, 0, 4, 2],
            vec![2, 9, 1],
        ] {
            let mut r = Rechunker::new(4);
            let mut out = Vec::new();
            let mut from = 0;
            for n in &sizes {
                out.extend(r.push(batch(from, *n)).unwrap());
                from += n;
            }
            out.extend(r.finish().unwrap());
            let mut chunks: Vec<usize> = out
                .iter()
                .flat_map(|b| {
                    let n = b.num_rows();
                    (0..n.div_ceil(4)).map(move |i| 4.min(n - 4 * i))
                })
                .collect();
            let last = chunks.pop();
            assert!(chunks.iter().all(|&c| c == 4), "{sizes:?}: {out:?}");
            assert!(last.is_none_or(|l| l > 0 && l <= 4));
            let values: Vec<i64> = out
                .iter()
                .flat_map(|b| {
                    let a = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                    (0..a.len()).map(|i| a.value(i)).collect::<Vec<_>>()
                })
                .collect();
            assert_eq!(values, (0..from).collect::<Vec<_>>(), "{sizes:?}");
        }
    }
}
