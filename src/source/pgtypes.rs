//! PostgreSQL column types, their DuckDB equivalents, and decoding of
//! PostgreSQL's binary wire format straight into Arrow arrays.
//!
//! The mapping follows DuckDB's own PostgreSQL scanner so that files made by
//! this tool look like files analysts made by hand with `ATTACH ... (TYPE
//! postgres)`. Where the scanner would lose information (unconstrained
//! `numeric` becomes DOUBLE there) or a type has no DuckDB equivalent here,
//! the column is selected as `::text` instead and the caller logs it.
//!
//! Binary rather than text format: no number parsing, no date parsing, and
//! arrays arrive with explicit NULL markers, which text format makes
//! ambiguous.

use std::sync::Arc;

use duckdb::arrow::array::builder::NullBufferBuilder;
use duckdb::arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder,
    Float32Builder, Float64Builder, Int16Builder, Int32Builder, Int64Builder, ListArray,
    StringArray, StringBuilder, Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use duckdb::arrow::buffer::{OffsetBuffer, ScalarBuffer};
use duckdb::arrow::datatypes::{DataType, Field, TimeUnit};
use postgres::types::{Kind, Type};

/// A column's type as this tool carries it from PostgreSQL to Parquet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Decimal {
        precision: u8,
        scale: i8,
    },
    /// text, varchar, bpchar, name, json, enums and text fallbacks.
    Text,
    /// jsonb: a version byte, then the JSON text.
    Jsonb,
    Bytea,
    Date,
    Time,
    Timestamp,
    TimestampTz,
    Uuid,
    List(Box<ColType>),
}

/// `"name" TYPE, ...` for a DuckDB `CREATE TABLE` with these columns,
/// stored uncompressed unless `compress` (see `workbench.compress_tables`).
pub fn column_defs(columns: &[(String, ColType)], compress: bool) -> String {
    let storage = if compress {
        ""
    } else {
        " USING COMPRESSION uncompressed"
    };
    columns
        .iter()
        .map(|(n, t)| {
            format!(
                "{} {}{storage}",
                crate::config::quote_ident(n),
                t.duckdb_sql()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Days and microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_DAYS: i32 = 10_957;
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl ColType {
    /// The DuckDB type for `ty` with type modifier `typmod`, or `None` when
    /// there is no exact mapping (the column is then read as text).
    pub fn from_pg(ty: &Type, typmod: i32) -> Option<ColType> {
        match ty.kind() {
            Kind::Enum(_) => return Some(ColType::Text),
            Kind::Array(elem) => {
                // Arrays of arrays do not exist in PostgreSQL (dimensions are
                // per value), so the element is always a scalar type.
                return ColType::from_pg(elem, typmod).map(|t| ColType::List(Box::new(t)));
            }
            Kind::Domain(base) => return ColType::from_pg(base, typmod),
            _ => {}
        }
        Some(match *ty {
            Type::BOOL => ColType::Bool,
            Type::INT2 => ColType::Int2,
            Type::INT4 => ColType::Int4,
            Type::INT8 => ColType::Int8,
            Type::FLOAT4 => ColType::Float4,
            Type::FLOAT8 => ColType::Float8,
            Type::NUMERIC => {
                // typmod = ((precision << 16) | scale) + 4; -1 = unconstrained.
                if typmod < 4 {
                    return None;
                }
                let m = typmod - 4;
                let precision = (m >> 16) & 0xffff;
                let scale = m & 0x7ff;
                // PostgreSQL 15 allows negative scales (stored as 11-bit
                // two's complement); DuckDB does not.
                if precision == 0 || precision > 38 || scale > precision || scale >= 0x400 {
                    return None;
                }
                ColType::Decimal {
                    precision: precision as u8,
                    scale: scale as i8,
                }
            }
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::JSON => ColType::Text,
            Type::JSONB => ColType::Jsonb,
            Type::BYTEA => ColType::Bytea,
            Type::DATE => ColType::Date,
            Type::TIME => ColType::Time,
            Type::TIMESTAMP => ColType::Timestamp,
            Type::TIMESTAMPTZ => ColType::TimestampTz,
            Type::UUID => ColType::Uuid,
            _ => return None,
        })
    }

    /// DuckDB DDL spelling.
    pub fn duckdb_sql(&self) -> String {
        match self {
            ColType::Bool => "BOOLEAN".into(),
            ColType::Int2 => "SMALLINT".into(),
            ColType::Int4 => "INTEGER".into(),
            ColType::Int8 => "BIGINT".into(),
            ColType::Float4 => "FLOAT".into(),
            ColType::Float8 => "DOUBLE".into(),
            ColType::Decimal { precision, scale } => format!("DECIMAL({precision},{scale})"),
            ColType::Text | ColType::Jsonb => "VARCHAR".into(),
            ColType::Bytea => "BLOB".into(),
            ColType::Date => "DATE".into(),
            ColType::Time => "TIME".into(),
            ColType::Timestamp => "TIMESTAMP".into(),
            ColType::TimestampTz => "TIMESTAMP WITH TIME ZONE".into(),
            ColType::Uuid => "UUID".into(),
            ColType::List(inner) => format!("{}[]", inner.duckdb_sql()),
        }
    }

    fn arrow_type(&self) -> DataType {
        match self {
            ColType::Bool => DataType::Boolean,
            ColType::Int2 => DataType::Int16,
            ColType::Int4 => DataType::Int32,
            ColType::Int8 => DataType::Int64,
            ColType::Float4 => DataType::Float32,
            ColType::Float8 => DataType::Float64,
            ColType::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            // DuckDB casts the strings on append into the UUID column.
            ColType::Text | ColType::Jsonb | ColType::Uuid => DataType::Utf8,
            ColType::Bytea => DataType::Binary,
            ColType::Date => DataType::Date32,
            ColType::Time => DataType::Time64(TimeUnit::Microsecond),
            ColType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            ColType::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            ColType::List(inner) => {
                DataType::List(Arc::new(Field::new("item", inner.arrow_type(), true)))
            }
        }
    }

    pub fn arrow_field(&self, name: &str) -> Field {
        Field::new(name, self.arrow_type(), true)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("value of {len} bytes is too short for {what}")]
    Short { what: &'static str, len: usize },
    #[error("invalid UTF-8 in text value")]
    Utf8,
    #[error("numeric {0} cannot be stored in a DECIMAL column")]
    NumericSpecial(&'static str),
    #[error("numeric value does not fit DECIMAL({precision},{scale})")]
    NumericOverflow { precision: u8, scale: i8 },
    #[error("multi-dimensional arrays ({0} dimensions) are not supported; select the column as text or unnest it in a view")]
    MultiDim(i32),
    #[error("unsupported jsonb version {0}")]
    JsonbVersion(u8),
}

fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn need(raw: &[u8], n: usize, what: &'static str) -> Result<(), DecodeError> {
    if raw.len() < n {
        Err(DecodeError::Short {
            what,
            len: raw.len(),
        })
    } else {
        Ok(())
    }
}

/// PostgreSQL's binary numeric (base-10000 digits) as an integer scaled by
/// `10^scale`, which is what Arrow's Decimal128 stores.
pub fn numeric_to_i128(raw: &[u8], precision: u8, scale: i8) -> Result<i128, DecodeError> {
    need(raw, 8, "numeric")?;
    let ndigits = be_i16(raw, 0).max(0) as usize;
    let weight = be_i16(raw, 2) as i32;
    let sign = u16::from_be_bytes([raw[4], raw[5]]);
    match sign {
        0xC000 => return Err(DecodeError::NumericSpecial("NaN")),
        0xD000 => return Err(DecodeError::NumericSpecial("Infinity")),
        0xF000 => return Err(DecodeError::NumericSpecial("-Infinity")),
        _ => {}
    }
    need(raw, 8 + 2 * ndigits, "numeric digits")?;
    let digits: Vec<i16> = (0..ndigits).map(|i| be_i16(raw, 8 + 2 * i)).collect();
    // Trailing zero groups carry no value but could overflow i128 in the loop.
    let used = digits.iter().rposition(|&d| d != 0).map_or(0, |p| p + 1);
    let mut v: i128 = 0;
    for &d in &digits[..used] {
        v = v
            .checked_mul(10_000)
            .and_then(|v| v.checked_add(d as i128))
            .ok_or(DecodeError::NumericOverflow { precision, scale })?;
    }
    // `v` is the value times 10000^(used - 1 - weight); rescale to 10^scale.
    let exp10 = scale as i32 - 4 * (used as i32 - 1 - weight);
    if used > 0 {
        if exp10 >= 0 {
            v = 10i128
                .checked_pow(exp10 as u32)
                .and_then(|p| v.checked_mul(p))
                .ok_or(DecodeError::NumericOverflow { precision, scale })?;
        } else {
            // Only zeros are dropped: the column's typmod bounds the scale.
            v /= 10i128.checked_pow((-exp10) as u32).unwrap_or(i128::MAX);
        }
    }
    Ok(if sign == 0x4000 { -v } else { v })
}

/// An Arrow array under construction for one column.
///
/// Text and JSON are collected as bytes and checked to be UTF-8 once per
/// batch, in [`ColumnBuilder::finish`]: one pass over the batch's buffer
/// instead of one call per value (measured: the per-value check was 11% of
/// the reading thread's CPU on the benchmark).
pub enum ColumnBuilder {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Decimal(Decimal128Builder, u8, i8),
    Text(BinaryBuilder),
    Jsonb(BinaryBuilder),
    Uuid(StringBuilder),
    Bytea(BinaryBuilder),
    Date(Date32Builder),
    Time(Time64MicrosecondBuilder),
    Timestamp(TimestampMicrosecondBuilder),
    TimestampTz(TimestampMicrosecondBuilder),
    List {
        field: Arc<Field>,
        offsets: Vec<i32>,
        nulls: NullBufferBuilder,
        child: Box<ColumnBuilder>,
    },
}

impl ColumnBuilder {
    pub fn new(ty: &ColType, capacity: usize) -> ColumnBuilder {
        match ty {
            ColType::Bool => ColumnBuilder::Bool(BooleanBuilder::with_capacity(capacity)),
            ColType::Int2 => ColumnBuilder::I16(Int16Builder::with_capacity(capacity)),
            ColType::Int4 => ColumnBuilder::I32(Int32Builder::with_capacity(capacity)),
            ColType::Int8 => ColumnBuilder::I64(Int64Builder::with_capacity(capacity)),
            ColType::Float4 => ColumnBuilder::F32(Float32Builder::with_capacity(capacity)),
            ColType::Float8 => ColumnBuilder::F64(Float64Builder::with_capacity(capacity)),
            ColType::Decimal { precision, scale } => ColumnBuilder::Decimal(
                Decimal128Builder::with_capacity(capacity)
                    .with_precision_and_scale(*precision, *scale)
                    .expect("precision checked in from_pg"),
                *precision,
                *scale,
            ),
            ColType::Text => {
                ColumnBuilder::Text(BinaryBuilder::with_capacity(capacity, capacity * 16))
            }
            ColType::Jsonb => {
                ColumnBuilder::Jsonb(BinaryBuilder::with_capacity(capacity, capacity * 16))
            }
            ColType::Uuid => {
                ColumnBuilder::Uuid(StringBuilder::with_capacity(capacity, capacity * 36))
            }
            ColType::Bytea => {
                ColumnBuilder::Bytea(BinaryBuilder::with_capacity(capacity, capacity * 16))
            }
            ColType::Date => ColumnBuilder::Date(Date32Builder::with_capacity(capacity)),
            ColType::Time => ColumnBuilder::Time(Time64MicrosecondBuilder::with_capacity(capacity)),
            ColType::Timestamp => {
                ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::with_capacity(capacity))
            }
            ColType::TimestampTz => ColumnBuilder::TimestampTz(
                TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC"),
            ),
            ColType::List(inner) => ColumnBuilder::List {
                field: Arc::new(Field::new("item", inner.arrow_type(), true)),
                offsets: {
                    let mut o = Vec::with_capacity(capacity + 1);
                    o.push(0);
                    o
                },
                nulls: NullBufferBuilder::new(capacity),
                child: Box::new(ColumnBuilder::new(inner, capacity)),
            },
        }
    }

    pub fn append_null(&mut self) {
        match self {
            ColumnBuilder::Bool(b) => b.append_null(),
            ColumnBuilder::I16(b) => b.append_null(),
            ColumnBuilder::I32(b) => b.append_null(),
            ColumnBuilder::I64(b) => b.append_null(),
            ColumnBuilder::F32(b) => b.append_null(),
            ColumnBuilder::F64(b) => b.append_null(),
            ColumnBuilder::Decimal(b, ..) => b.append_null(),
            ColumnBuilder::Text(b) | ColumnBuilder::Jsonb(b) | ColumnBuilder::Bytea(b) => {
                b.append_null()
            }
            ColumnBuilder::Uuid(b) => b.append_null(),
            ColumnBuilder::Date(b) => b.append_null(),
            ColumnBuilder::Time(b) => b.append_null(),
            ColumnBuilder::Timestamp(b) | ColumnBuilder::TimestampTz(b) => b.append_null(),
            ColumnBuilder::List { offsets, nulls, .. } => {
                offsets.push(*offsets.last().unwrap());
                nulls.append_null();
            }
        }
    }

    /// Appends one non-NULL value given in PostgreSQL's binary format.
    pub fn append(&mut self, raw: &[u8]) -> Result<(), DecodeError> {
        match self {
            ColumnBuilder::Bool(b) => {
                need(raw, 1, "bool")?;
                b.append_value(raw[0] != 0)
            }
            ColumnBuilder::I16(b) => {
                need(raw, 2, "int2")?;
                b.append_value(be_i16(raw, 0))
            }
            ColumnBuilder::I32(b) => {
                need(raw, 4, "int4")?;
                b.append_value(be_i32(raw, 0))
            }
            ColumnBuilder::I64(b) => {
                need(raw, 8, "int8")?;
                b.append_value(be_i64(raw, 0))
            }
            ColumnBuilder::F32(b) => {
                need(raw, 4, "float4")?;
                b.append_value(f32::from_bits(be_i32(raw, 0) as u32))
            }
            ColumnBuilder::F64(b) => {
                need(raw, 8, "float8")?;
                b.append_value(f64::from_bits(be_i64(raw, 0) as u64))
            }
            ColumnBuilder::Decimal(b, p, s) => b.append_value(numeric_to_i128(raw, *p, *s)?),
            ColumnBuilder::Text(b) => b.append_value(raw),
            ColumnBuilder::Jsonb(b) => {
                need(raw, 1, "jsonb")?;
                if raw[0] != 1 {
                    return Err(DecodeError::JsonbVersion(raw[0]));
                }
                b.append_value(&raw[1..])
            }
            ColumnBuilder::Uuid(b) => {
                need(raw, 16, "uuid")?;
                let u = uuid::Uuid::from_slice(&raw[..16]).expect("16 bytes");
                b.append_value(
                    u.hyphenated()
                        .encode_lower(&mut uuid::Uuid::encode_buffer()),
                )
            }
            ColumnBuilder::Bytea(b) => b.append_value(raw),
            ColumnBuilder::Date(b) => {
                need(raw, 4, "date")?;
                // ±infinity are INT32 MIN/MAX in both systems; keep them so.
                let d = be_i32(raw, 0);
                b.append_value(match d {
                    i32::MAX | i32::MIN => d,
                    _ => d + PG_EPOCH_DAYS,
                })
            }
            ColumnBuilder::Time(b) => {
                need(raw, 8, "time")?;
                b.append_value(be_i64(raw, 0))
            }
            ColumnBuilder::Timestamp(b) | ColumnBuilder::TimestampTz(b) => {
                need(raw, 8, "timestamp")?;
                let t = be_i64(raw, 0);
                b.append_value(match t {
                    i64::MAX | i64::MIN => t,
                    _ => t + PG_EPOCH_MICROS,
                })
            }
            ColumnBuilder::List {
                offsets,
                nulls,
                child,
                ..
            } => {
                // ndim, has-null flag, element oid, then (size, lower bound)
                // per dimension, then length-prefixed elements (-1 = NULL).
                need(raw, 12, "array")?;
                let ndim = be_i32(raw, 0);
                let mut count = 0usize;
                if ndim > 1 {
                    return Err(DecodeError::MultiDim(ndim));
                }
                let mut at = 12;
                if ndim == 1 {
                    need(raw, 20, "array")?;
                    count = be_i32(raw, 12).max(0) as usize;
                    at = 20;
                }
                for _ in 0..count {
                    need(raw, at + 4, "array element")?;
                    let len = be_i32(raw, at);
                    at += 4;
                    if len < 0 {
                        child.append_null();
                    } else {
                        let end = at + len as usize;
                        need(raw, end, "array element")?;
                        child.append(&raw[at..end])?;
                        at = end;
                    }
                }
                offsets.push(*offsets.last().unwrap() + count as i32);
                nulls.append_non_null();
            }
        }
        Ok(())
    }

    /// Takes the rows appended so far as an array; the builder starts over.
    /// Fails when a text value is not UTF-8 (PostgreSQL does not check it
    /// in a `SQL_ASCII` database).
    pub fn finish(&mut self) -> Result<ArrayRef, DecodeError> {
        Ok(match self {
            ColumnBuilder::Bool(b) => Arc::new(b.finish()),
            ColumnBuilder::I16(b) => Arc::new(b.finish()),
            ColumnBuilder::I32(b) => Arc::new(b.finish()),
            ColumnBuilder::I64(b) => Arc::new(b.finish()),
            ColumnBuilder::F32(b) => Arc::new(b.finish()),
            ColumnBuilder::F64(b) => Arc::new(b.finish()),
            ColumnBuilder::Decimal(b, ..) => Arc::new(b.finish()),
            ColumnBuilder::Text(b) | ColumnBuilder::Jsonb(b) => {
                Arc::new(StringArray::try_from_binary(b.finish()).map_err(|_| DecodeError::Utf8)?)
            }
            ColumnBuilder::Uuid(b) => Arc::new(b.finish()),
            ColumnBuilder::Bytea(b) => Arc::new(b.finish()),
            ColumnBuilder::Date(b) => Arc::new(b.finish()),
            ColumnBuilder::Time(b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(b) | ColumnBuilder::TimestampTz(b) => Arc::new(b.finish()),
            ColumnBuilder::List {
                field,
                offsets,
                nulls,
                child,
            } => {
                let values = child.finish()?;
                let offs = std::mem::replace(offsets, vec![0]);
                let array = ListArray::new(
                    field.clone(),
                    OffsetBuffer::new(ScalarBuffer::from(offs)),
                    values,
                    nulls.finish(),
                );
                Arc::new(array)
            }
        })
    }

    pub fn len(&self) -> usize {
        match self {
            ColumnBuilder::Bool(b) => b.len(),
            ColumnBuilder::I16(b) => b.len(),
            ColumnBuilder::I32(b) => b.len(),
            ColumnBuilder::I64(b) => b.len(),
            ColumnBuilder::F32(b) => b.len(),
            ColumnBuilder::F64(b) => b.len(),
            ColumnBuilder::Decimal(b, ..) => b.len(),
            ColumnBuilder::Text(b) | ColumnBuilder::Jsonb(b) | ColumnBuilder::Bytea(b) => b.len(),
            ColumnBuilder::Uuid(b) => b.len(),
            ColumnBuilder::Date(b) => b.len(),
            ColumnBuilder::Time(b) => b.len(),
            ColumnBuilder::Timestamp(b) | ColumnBuilder::TimestampTz(b) => b.len(),
            ColumnBuilder::List { offsets, .. } => offsets.len() - 1,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binary numeric as PostgreSQL sends it.
    fn numeric(weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((digits.len() as i16).to_be_bytes());
        v.extend(weight.to_be_bytes());
        v.extend(sign.to_be_bytes());
        v.extend(dscale.to_be_bytes());
        for d in digits {
            v.extend(d.to_be_bytes());
        }
        v
    }

    #[test]
    fn numeric_decoding() {
        // 1234.56 = [1234, 5600] weight 0
        assert_eq!(
            numeric_to_i128(&numeric(0, 0, 2, &[1234, 5600]), 12, 2).unwrap(),
            123456
        );
        // -0.05 = [500] weight -1
        assert_eq!(
            numeric_to_i128(&numeric(-1, 0x4000, 2, &[500]), 12, 2).unwrap(),
            -5
        );
        // 0
        assert_eq!(numeric_to_i128(&numeric(0, 0, 0, &[]), 12, 2).unwrap(), 0);
        // 10000000 = [1000, 0] weight 1 -> scale 2 -> 1000000000
        assert_eq!(
            numeric_to_i128(&numeric(1, 0, 0, &[1000]), 12, 2).unwrap(),
            1_000_000_000
        );
        assert!(numeric_to_i128(&numeric(0, 0xC000, 0, &[]), 12, 2).is_err());
    }

    #[test]
    fn typmod_mapping() {
        let t = ColType::from_pg(&Type::NUMERIC, ((12 << 16) | 2) + 4).unwrap();
        assert_eq!(t.duckdb_sql(), "DECIMAL(12,2)");
        assert_eq!(ColType::from_pg(&Type::NUMERIC, -1), None);
        assert_eq!(
            ColType::from_pg(&Type::TEXT_ARRAY, -1)
                .unwrap()
                .duckdb_sql(),
            "VARCHAR[]"
        );
        assert_eq!(ColType::from_pg(&Type::INTERVAL, -1), None);
    }

    #[test]
    fn text_is_checked_once_per_batch_yet_value_by_value() {
        use duckdb::arrow::array::{Array, AsArray};
        let mut b = ColumnBuilder::new(&ColType::Text, 4);
        b.append("é".as_bytes()).unwrap();
        b.append_null();
        b.append(b"plain").unwrap();
        let a = b.finish().unwrap();
        let a = a.as_string::<i32>();
        assert_eq!((a.value(0), a.is_null(1), a.value(2)), ("é", true, "plain"));

        // Each half of "é" is invalid on its own, though the batch's bytes
        // end to end are valid: the check is per value, not per buffer.
        let mut b = ColumnBuilder::new(&ColType::Text, 4);
        b.append(&"é".as_bytes()[..1]).unwrap();
        b.append(&"é".as_bytes()[1..]).unwrap();
        assert!(matches!(b.finish(), Err(DecodeError::Utf8)));
        // The builder starts over after a failed batch.
        b.append(b"ok").unwrap();
        assert_eq!(b.finish().unwrap().len(), 1);

        let mut b = ColumnBuilder::new(&ColType::List(Box::new(ColType::Text)), 4);
        let mut array = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 25, 0, 0, 0, 1, 0, 0, 0, 1];
        array.extend([0, 0, 0, 1, 0xff]);
        b.append(&array).unwrap();
        assert!(matches!(b.finish(), Err(DecodeError::Utf8)));
    }
}
