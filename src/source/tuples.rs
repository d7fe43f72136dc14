//! Rows in PostgreSQL's binary COPY format: what `COPY … TO STDOUT
//! (FORMAT binary)` sends, and what an all-states read keeps in its spool
//! files, byte for byte. Each field is in the type's binary send format,
//! the same bytes a query's binary result gives, which
//! `pgtypes::ColumnBuilder` decodes.
//!
//! A tuple is a 16-bit field count, then per field a 32-bit length (-1 for
//! NULL) and that many bytes; a count of -1 ends the stream.

use std::io::{self, BufRead, Read};
use std::ops::Range;

/// What the stream starts with, before its flags and header extension.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// One tuple: its bytes as they came, and where each field lies in them.
#[derive(Default)]
pub struct Tuple {
    pub bytes: Vec<u8>,
    fields: Vec<Option<Range<usize>>>,
}

impl Tuple {
    /// Field `i`, `None` for NULL.
    pub fn field(&self, i: usize) -> Option<&[u8]> {
        self.fields[i].clone().map(|r| &self.bytes[r])
    }

    /// Where field `i` lies in [`bytes`](Self::bytes), `None` for NULL.
    pub fn field_range(&self, i: usize) -> Option<Range<usize>> {
        self.fields[i].clone()
    }

    /// This tuple made a copy of `bytes`, one whole tuple.
    pub fn set_from(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut from = Tuples::bare(bytes);
        match from.next_into(self)? {
            true => Ok(()),
            false => Err(bad("an empty tuple".into())),
        }
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// Reads tuples one at a time into a [`Tuple`] that is reused.
pub struct Tuples<R> {
    r: R,
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl<R: BufRead> Tuples<R> {
    /// A COPY stream: checks and skips its header.
    pub fn copy_stream(mut r: R) -> io::Result<Tuples<R>> {
        let mut head = [0u8; 19];
        r.read_exact(&mut head)?;
        if &head[..11] != SIGNATURE {
            return Err(bad("not PostgreSQL's binary COPY format".into()));
        }
        let ext = u32::from_be_bytes(head[15..19].try_into().expect("4 bytes"));
        io::copy(&mut (&mut r).take(ext.into()), &mut io::sink())?;
        Ok(Tuples { r })
    }

    /// Tuples with no header, as a spool file holds them.
    pub fn bare(r: R) -> Tuples<R> {
        Tuples { r }
    }

    /// Reads the next tuple into `t`; `false` at the end (the trailer, or
    /// the end of a spool file).
    pub fn next_into(&mut self, t: &mut Tuple) -> io::Result<bool> {
        t.bytes.clear();
        t.fields.clear();
        let buf = self.r.fill_buf()?;
        if buf.is_empty() {
            return Ok(false);
        }
        // Most often the whole tuple is in the buffer (PostgreSQL sends a
        // row per message): its fields are found there and it is copied
        // once, rather than read a length and a value at a time.
        if buf.starts_with(&(-1i16).to_be_bytes()) {
            self.r.consume(2);
            return Ok(false);
        }
        if let Some(n) = whole(buf, &mut t.fields) {
            t.bytes.extend_from_slice(&buf[..n]);
            self.r.consume(n);
            return Ok(true);
        }
        t.fields.clear();
        let mut count = [0u8; 2];
        self.r.read_exact(&mut count)?;
        let n = i16::from_be_bytes(count);
        if n == -1 {
            return Ok(false);
        }
        t.bytes.extend_from_slice(&count);
        for _ in 0..n {
            let mut len = [0u8; 4];
            self.r.read_exact(&mut len)?;
            t.bytes.extend_from_slice(&len);
            let len = i32::from_be_bytes(len);
            if len < 0 {
                t.fields.push(None);
                continue;
            }
            let start = t.bytes.len();
            (&mut self.r).take(len as u64).read_to_end(&mut t.bytes)?;
            if t.bytes.len() != start + len as usize {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            t.fields.push(Some(start..t.bytes.len()));
        }
        Ok(true)
    }
}

/// The length of the tuple `buf` starts with, and its fields, if all of it
/// is there.
fn whole(buf: &[u8], fields: &mut Vec<Option<Range<usize>>>) -> Option<usize> {
    let n = i16::from_be_bytes(buf.get(..2)?.try_into().ok()?);
    let mut at = 2usize;
    for _ in 0..n {
        let len = i32::from_be_bytes(buf.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            fields.push(None);
            continue;
        }
        let end = at.checked_add(len as usize).filter(|e| *e <= buf.len())?;
        fields.push(Some(at..end));
        at = end;
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(fields: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            match f {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        b
    }

    #[test]
    fn a_copy_stream_reads_back_field_by_field_and_ends_at_its_trailer() {
        let mut s = SIGNATURE.to_vec();
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&3u32.to_be_bytes());
        s.extend_from_slice(b"ext");
        let one = tuple(&[Some(b"WV"), None, Some(b"")]);
        s.extend_from_slice(&one);
        s.extend_from_slice(&tuple(&[Some(b"OH"), Some(b"x"), None]));
        s.extend_from_slice(&(-1i16).to_be_bytes());
        s.extend_from_slice(b"after the trailer");
        let mut r = Tuples::copy_stream(&s[..]).unwrap();
        let mut t = Tuple::default();
        assert!(r.next_into(&mut t).unwrap());
        assert_eq!(t.bytes, one, "the tuple's bytes as they came");
        assert_eq!(
            (t.field(0), t.field(1), t.field(2)),
            (Some(&b"WV"[..]), None, Some(&b""[..]))
        );
        assert!(r.next_into(&mut t).unwrap());
        assert_eq!(t.field(1), Some(&b"x"[..]));
        assert!(!r.next_into(&mut t).unwrap());
    }

    #[test]
    fn bare_tuples_end_with_their_file_and_a_cut_one_is_an_error() {
        let mut s = tuple(&[Some(b"a")]);
        s.extend_from_slice(&tuple(&[Some(b"bc"), None]));
        let mut t = Tuple::default();
        let mut r = Tuples::bare(&s[..]);
        assert!(r.next_into(&mut t).unwrap());
        assert!(r.next_into(&mut t).unwrap());
        assert_eq!(t.len(), 2);
        assert!(!r.next_into(&mut t).unwrap());
        let mut r = Tuples::bare(&s[..s.len() - 3]);
        assert!(r.next_into(&mut t).unwrap());
        assert!(r.next_into(&mut t).is_err());
        // Tuples split across the reader's buffer: read a field at a time.
        let mut r = Tuples::bare(std::io::BufReader::with_capacity(3, &s[..]));
        assert!(r.next_into(&mut t).unwrap());
        assert_eq!((t.len(), t.field(0)), (1, Some(&b"a"[..])));
        assert!(r.next_into(&mut t).unwrap());
        assert_eq!(t.bytes, tuple(&[Some(b"bc"), None]));
        assert_eq!((t.field(0), t.field(1)), (Some(&b"bc"[..]), None));
        assert!(!r.next_into(&mut t).unwrap());
        let mut r = Tuples::bare(std::io::BufReader::with_capacity(3, &s[..s.len() - 3]));
        assert!(r.next_into(&mut t).unwrap());
        assert!(r.next_into(&mut t).is_err());
        assert!(Tuples::copy_stream(&b"PGCOPY\nnope, not this"[..]).is_err());
    }
}
