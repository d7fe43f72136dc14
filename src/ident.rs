//! SQL identifiers, for PostgreSQL and DuckDB alike: quoting, and the
//! `schema.table` names the config gives. A leaf: the config, the
//! PostgreSQL plumbing and the pipeline all use it.

use std::fmt;

/// Double-quotes an identifier for PostgreSQL and DuckDB alike.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `s` as an SQL string literal: a file path, a rule code.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A `schema.table` name, split and checked so it can be quoted safely.
/// Parsed once, where the config is read (`"a.b"` in TOML or the
/// environment); a value that is not one is refused with the config key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct QualifiedName {
    pub schema: String,
    pub table: String,
}

impl QualifiedName {
    pub fn new(schema: &str, table: &str) -> QualifiedName {
        QualifiedName {
            schema: schema.into(),
            table: table.into(),
        }
    }

    /// `"schema"."table"`, safe to paste into SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

impl std::str::FromStr for QualifiedName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let ok = |p: &str| !p.is_empty() && !p.contains('"') && !p.contains('\0');
        match s.split('.').collect::<Vec<_>>().as_slice() {
            [schema, table] if ok(schema) && ok(table) => Ok(QualifiedName::new(schema, table)),
            _ => Err(format!(
                "`{s}` is not a `schema.table` name (e.g. marketing.company_master)"
            )),
        }
    }
}

impl TryFrom<String> for QualifiedName {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}
