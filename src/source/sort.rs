//! A spool file's tuples in key order, within a fixed amount of memory:
//! the sort an all-states read leaves to each state's run (see
//! `source::country`), in the order a run of that state alone has
//! PostgreSQL sort its rows by (`ORDER BY key` for integers and UUIDs,
//! `key::text COLLATE "C"` for text: byte order).
//!
//! Up to [`BUDGET`] bytes of tuples are sorted in memory; a larger file is
//! cut into runs of that size, each sorted and written beside it, then
//! merged. The sort is stable: rows with equal keys keep the order they
//! came in.

use std::cmp::Ordering;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::pgtypes::ColType;
use super::tuples::{Tuple, Tuples};

/// Bytes of tuples sorted in memory at once (one per decoding run).
pub const BUDGET: usize = 16 << 20;

/// How a key column's binary values compare as PostgreSQL orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrder {
    /// Byte by byte: text in the "C" collation (UTF-8 bytes), UUIDs.
    Bytes,
    /// Big-endian two's complement integers of one width.
    SignedInt,
}

impl KeyOrder {
    /// The order of a key of type `t`, as the read sends it for sorting
    /// (`pull::order_by`'s expression: text and JSON as `::text`), where
    /// this module can sort it; `None` leaves the sort to the server.
    pub fn of(t: &ColType) -> Option<KeyOrder> {
        match t {
            ColType::Text | ColType::Jsonb | ColType::Uuid => Some(KeyOrder::Bytes),
            ColType::Int2 | ColType::Int4 | ColType::Int8 => Some(KeyOrder::SignedInt),
            _ => None,
        }
    }

    /// NULL last, as PostgreSQL sorts ascending.
    pub fn cmp(self, a: Option<&[u8]>, b: Option<&[u8]>) -> Ordering {
        match (a, b) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(a), Some(b)) => match self {
                KeyOrder::Bytes => a.cmp(b),
                // Same width: the sign bit decides, then the bytes.
                KeyOrder::SignedInt => {
                    let flip = |v: &[u8]| v.first().map(|b| b ^ 0x80);
                    flip(a).cmp(&flip(b)).then_with(|| a.cmp(b))
                }
            },
        }
    }
}

/// Which field of each tuple is the key, and how keys compare.
#[derive(Debug, Clone, Copy)]
pub struct SortBy {
    pub field: usize,
    pub order: KeyOrder,
}

/// Where tuples come from, one at a time.
pub trait TupleSource {
    /// The next tuple into `t`; `false` at the end.
    fn next_into(&mut self, t: &mut Tuple) -> io::Result<bool>;
}

impl<R: io::BufRead> TupleSource for Tuples<R> {
    fn next_into(&mut self, t: &mut Tuple) -> io::Result<bool> {
        Tuples::next_into(self, t)
    }
}

/// Sorted tuples held in memory: the bytes back to back, and where each
/// tuple and its key lie, in key order.
struct Run {
    bytes: Vec<u8>,
    order: Vec<Entry>,
    next: usize,
}

/// Where a tuple lies in its run's bytes, and its key (`None`: NULL).
struct Entry {
    start: usize,
    end: usize,
    key: Option<(usize, usize)>,
}

impl Run {
    /// Reads tuples from `from` until `budget` bytes are held or it ends;
    /// sorted. The flag says whether `from` has more.
    fn fill(
        from: &mut dyn TupleSource,
        by: SortBy,
        budget: usize,
        t: &mut Tuple,
    ) -> io::Result<(Run, bool)> {
        // Room for the budget and the tuple that passes it, so that the
        // buffer is never copied into one twice its size (untouched
        // capacity costs no memory).
        let mut run = Run {
            bytes: Vec::with_capacity(budget + (1 << 20)),
            order: Vec::new(),
            next: 0,
        };
        let mut more = true;
        while run.bytes.len() < budget {
            if !from.next_into(t)? {
                more = false;
                break;
            }
            let start = run.bytes.len();
            let key = t
                .field_range(by.field)
                .map(|r| (start + r.start, start + r.end));
            run.bytes.extend_from_slice(&t.bytes);
            run.order.push(Entry {
                start,
                end: run.bytes.len(),
                key,
            });
        }
        let bytes = &run.bytes;
        let key = |k: &Option<(usize, usize)>| k.map(|(s, e)| &bytes[s..e]);
        // Stable: equal keys keep their order.
        run.order
            .sort_by(|a, b| by.order.cmp(key(&a.key), key(&b.key)));
        Ok((run, more))
    }

    fn write_to(&self, path: &Path) -> io::Result<()> {
        let mut out = BufWriter::with_capacity(256 * 1024, File::create(path)?);
        for e in &self.order {
            out.write_all(&self.bytes[e.start..e.end])?;
        }
        out.flush()
    }
}

impl TupleSource for Run {
    fn next_into(&mut self, t: &mut Tuple) -> io::Result<bool> {
        let Some(e) = self.order.get(self.next) else {
            return Ok(false);
        };
        self.next += 1;
        t.set_from(&self.bytes[e.start..e.end])?;
        Ok(true)
    }
}

/// Runs written to files, merged: each run's next tuple (its head) read
/// ahead, the least key's taken first (the first run's of equal keys:
/// runs hold the file's tuples in order, so the sort stays stable). A
/// scan of the heads, with no allocation: a state has a few runs (at
/// 2,000,000 companies, three for most states, 44 for one with a quarter
/// of the rows).
struct Merge {
    runs: Vec<Tuples<BufReader<File>>>,
    heads: Vec<Option<Tuple>>,
    by: SortBy,
    paths: Vec<PathBuf>,
}

impl Merge {
    fn open(paths: Vec<PathBuf>, by: SortBy) -> io::Result<Merge> {
        // Removed with the merge, also when a run cannot be opened.
        let mut merge = Merge {
            runs: Vec::new(),
            heads: Vec::new(),
            by,
            paths,
        };
        for i in 0..merge.paths.len() {
            let file = File::open(&merge.paths[i])?;
            merge
                .runs
                .push(Tuples::bare(BufReader::with_capacity(64 * 1024, file)));
            let mut head = Tuple::default();
            let more = merge.runs[i].next_into(&mut head)?;
            merge.heads.push(more.then_some(head));
        }
        Ok(merge)
    }
}

impl TupleSource for Merge {
    fn next_into(&mut self, t: &mut Tuple) -> io::Result<bool> {
        let field = self.by.field;
        let mut least: Option<usize> = None;
        for (i, head) in self.heads.iter().enumerate() {
            let Some(head) = head else { continue };
            let less = least.is_none_or(|l| {
                let other = self.heads[l].as_ref().expect("a head");
                self.by.order.cmp(head.field(field), other.field(field)) == Ordering::Less
            });
            if less {
                least = Some(i);
            }
        }
        let Some(i) = least else {
            return Ok(false);
        };
        let head = self.heads[i].as_mut().expect("a head");
        std::mem::swap(t, head);
        if !self.runs[i].next_into(head)? {
            self.heads[i] = None;
        }
        Ok(true)
    }
}

impl Drop for Merge {
    fn drop(&mut self) {
        for path in &self.paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The tuples of the spool file at `path` in key order, sorted in at most
/// `budget` bytes; runs are written beside the file, and removed once
/// read.
pub fn sorted(path: &Path, by: SortBy, budget: usize) -> io::Result<Box<dyn TupleSource>> {
    let mut from = Tuples::bare(BufReader::with_capacity(256 * 1024, File::open(path)?));
    let mut t = Tuple::default();
    let mut paths: Vec<PathBuf> = Vec::new();
    loop {
        let (run, more) = Run::fill(&mut from, by, budget, &mut t)?;
        if !more && paths.is_empty() {
            return Ok(Box::new(run));
        }
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".run{}", paths.len()));
        let run_path = path.with_file_name(name);
        let written = run.write_to(&run_path);
        paths.push(run_path);
        if let Err(e) = written {
            for p in &paths {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        if !more {
            return Ok(Box::new(Merge::open(paths, by)?));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(key: Option<&[u8]>, n: u32) -> Vec<u8> {
        let mut b = 2i16.to_be_bytes().to_vec();
        match key {
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(k) => {
                b.extend_from_slice(&(k.len() as i32).to_be_bytes());
                b.extend_from_slice(k);
            }
        }
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(&n.to_be_bytes());
        b
    }

    fn read_all(mut s: Box<dyn TupleSource>) -> Vec<(Option<Vec<u8>>, u32)> {
        let mut t = Tuple::default();
        let mut out = Vec::new();
        while s.next_into(&mut t).unwrap() {
            let n = u32::from_be_bytes(t.field(1).unwrap().try_into().unwrap());
            out.push((t.field(0).map(<[u8]>::to_vec), n));
        }
        out
    }

    #[test]
    fn a_spool_sorts_the_same_in_memory_and_in_runs_stably_with_null_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.people");
        let mut keys: Vec<Option<Vec<u8>>> = (0..500u32)
            .map(|i| match i % 97 {
                0 => None,
                // Duplicates, to see that equal keys keep their order.
                1..=5 => Some(b"dup".to_vec()),
                _ => Some(format!("k{}", (i * 7919) % 1000).into_bytes()),
            })
            .collect();
        keys.push(Some("é".as_bytes().to_vec())); // after every ASCII byte
        let mut bytes = Vec::new();
        for (n, k) in keys.iter().enumerate() {
            bytes.extend_from_slice(&tuple(k.as_deref(), n as u32));
        }
        std::fs::write(&path, &bytes).unwrap();
        let mut expected: Vec<(Option<Vec<u8>>, u32)> = keys
            .iter()
            .enumerate()
            .map(|(n, k)| (k.clone(), n as u32))
            .collect();
        expected.sort_by(|a, b| KeyOrder::Bytes.cmp(a.0.as_deref(), b.0.as_deref()));
        let by = SortBy {
            field: 0,
            order: KeyOrder::Bytes,
        };
        let in_memory = read_all(sorted(&path, by, BUDGET).unwrap());
        assert_eq!(in_memory, expected);
        let in_runs = read_all(sorted(&path, by, 300).unwrap());
        assert_eq!(in_runs, expected, "about 30 runs of 300 bytes");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the spool file is left: {left:?}");
    }

    #[test]
    fn signed_integers_sort_by_value() {
        let mut v: Vec<i64> = vec![5, -1, 0, i64::MIN, 300, -300, i64::MAX, 1];
        let mut by_bytes: Vec<[u8; 8]> = v.iter().map(|n| n.to_be_bytes()).collect();
        by_bytes.sort_by(|a, b| KeyOrder::SignedInt.cmp(Some(a), Some(b)));
        v.sort();
        let back: Vec<i64> = by_bytes.iter().map(|b| i64::from_be_bytes(*b)).collect();
        assert_eq!(back, v);
    }
}
