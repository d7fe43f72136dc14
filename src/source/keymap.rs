//! Which state values each company key has, built from an all-states
//! read's companies and asked for each person's company (see
//! `source::country`): the join of people to their companies' states made
//! on our side, so that PostgreSQL scans `company_master` once.
//!
//! Compact, since it holds every company key at once: the keys lie back to
//! back in one buffer and the hash table holds 4-byte indexes into it
//! (about 45 bytes a key with 21-byte keys, against ~65 for a
//! `HashMap<Vec<u8>, u32>` of the same). It is dropped once the people are
//! read.

use hashbrown::HashTable;
use std::hash::BuildHasher;

/// Company key → the state values (segments of the read, by index) whose
/// companies have that key. A key is usually in one; a key shared by
/// companies of several states gives its people to each, as a run of each
/// state alone would.
#[derive(Default)]
pub struct KeyMap {
    table: HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
    /// Key `i` is `bytes[ends[i - 1]..ends[i]]`.
    ends: Vec<usize>,
    bytes: Vec<u8>,
    /// Key `i`'s segment, or `MULTI | j` for the segments `multi[j]`.
    segment: Vec<u32>,
    multi: Vec<Vec<u32>>,
}

const MULTI: u32 = 1 << 31;

impl KeyMap {
    fn key(&self, i: u32) -> &[u8] {
        let i = i as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.bytes[start..self.ends[i]]
    }

    fn find(&self, key: &[u8], hash: u64) -> Option<u32> {
        self.table.find(hash, |&i| self.key(i) == key).copied()
    }

    /// Records that a company of `segment` has `key`.
    pub fn insert(&mut self, key: &[u8], segment: u32) {
        let hash = self.hasher.hash_one(key);
        let Some(i) = self.find(key, hash) else {
            let i = u32::try_from(self.ends.len())
                .ok()
                .filter(|i| *i < MULTI)
                .expect("fewer than 2^31 company keys");
            self.bytes.extend_from_slice(key);
            self.ends.push(self.bytes.len());
            self.segment.push(segment);
            let (table, hasher, ends, bytes) =
                (&mut self.table, &self.hasher, &self.ends, &self.bytes);
            table.insert_unique(hash, i, |&j| {
                let j = j as usize;
                let start = if j == 0 { 0 } else { ends[j - 1] };
                hasher.hash_one(&bytes[start..ends[j]])
            });
            return;
        };
        let s = &mut self.segment[i as usize];
        if *s & MULTI != 0 {
            let set = &mut self.multi[(*s & !MULTI) as usize];
            if !set.contains(&segment) {
                set.push(segment);
            }
        } else if *s != segment {
            self.multi.push(vec![*s, segment]);
            *s = MULTI | (self.multi.len() - 1) as u32;
        }
    }

    /// The segments whose companies have `key`: none for a key no company
    /// has.
    pub fn get(&self, key: &[u8]) -> &[u32] {
        match self.find(key, self.hasher.hash_one(key)) {
            None => &[],
            Some(i) => {
                let s = &self.segment[i as usize];
                match *s & MULTI {
                    0 => std::slice::from_ref(s),
                    _ => &self.multi[(*s & !MULTI) as usize],
                }
            }
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_every_segment_they_are_in() {
        let mut m = KeyMap::default();
        for i in 0..10_000u32 {
            m.insert(format!("C-{i:06}").as_bytes(), i % 51);
        }
        m.insert(b"C-000007", 7); // again, same segment: still one
        m.insert(b"C-000008", 3);
        m.insert(b"C-000008", 9);
        m.insert(b"C-000008", 3);
        m.insert(b"", 50);
        assert_eq!(m.len(), 10_001);
        assert_eq!(m.get(b"C-000007"), &[7]);
        assert_eq!(m.get(b"C-000008"), &[8, 3, 9]);
        assert_eq!(m.get(b"C-009999"), &[9999 % 51]);
        assert_eq!(m.get(b""), &[50]);
        assert!(m.get(b"C-010000").is_empty());
        assert!(m.get(b"C-00000").is_empty());
    }
}
