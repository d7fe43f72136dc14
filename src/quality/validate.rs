//! Step 3: split each raw table into good and bad rows with SQL in DuckDB.
//!
//! A rule is a code and a DuckDB boolean that is TRUE for a failing row. A
//! row is good when no error rule fails; bad rows carry `validation_errors`,
//! the failing codes in rule order. Rules of `severity = "warn"` decide
//! nothing: when there are any, every row carries `validation_warnings`,
//! their failing codes. NULL from a condition counts as "not failing"
//! (`coalesce(..., false)`) so that good and bad are exact complements and
//! every raw row lands in exactly one of them.

use std::collections::BTreeMap;

use crate::config::Severity;
use crate::config::{quote_ident, Config};
use crate::error::PipelineError;
use crate::ident::quote_literal;
use crate::names::{Entity, FileKind};
use crate::quality::rules::Rule;
use crate::workbench::{DuckError, RawConnection};

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Validation {
    pub good: u64,
    pub bad: u64,
    /// Rows whose primary key is NULL (for the `no_null_ids` gate).
    pub null_keys: u64,
    /// Rows failing each error rule (a row can fail several).
    pub errors: BTreeMap<String, u64>,
    /// Rows failing each warning rule, good and bad alike.
    pub warnings: BTreeMap<String, u64>,
}

/// The rules of one severity, in order.
fn of(rules: &[Rule], severity: Severity) -> Vec<Rule> {
    rules
        .iter()
        .filter(|r| r.severity == severity)
        .cloned()
        .collect()
}

/// Each rule's condition as a plain boolean: TRUE when the row fails it.
fn failing(rules: &[Rule]) -> Vec<String> {
    rules
        .iter()
        .map(|r| format!("coalesce(({}), false)", r.condition))
        .collect()
}

/// The codes of the rules whose verdict (`fails`, in the rules' order) is
/// TRUE for the row, in rule order.
fn codes(rules: &[&Rule], fails: &[&String]) -> String {
    if rules.is_empty() {
        return "[]::VARCHAR[]".to_string();
    }
    fails
        .iter()
        .zip(rules)
        .map(|(f, r)| {
            format!(
                "(CASE WHEN {f} THEN ['{}'] ELSE []::VARCHAR[] END)",
                r.code.replace('\'', "''")
            )
        })
        .collect::<Vec<_>>()
        .join(" || ")
}

fn any_fails(fails: &[&String]) -> String {
    if fails.is_empty() {
        "false".to_string()
    } else {
        fails
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join(" OR ")
    }
}

/// How the good and bad rows of `rows` are selected. Rules that judge each
/// row alone are conditions in a `WHERE`. When one reads the whole state
/// (a window function), every verdict is computed first in an inner
/// `SELECT` (where window functions are allowed) over all of `rows`, and
/// the rows come out ordered by `key` again, which the window may not keep.
struct Split {
    from: String,
    /// Each rule's verdict, in rule order.
    fails: Vec<String>,
    /// `EXCLUDE (…)` of the verdict columns, or nothing.
    exclude: String,
    order: String,
}

impl Split {
    fn new(rows: &str, rules: &[Rule], key: &str) -> Split {
        if !rules.iter().any(Rule::reads_the_state) {
            return Split {
                from: rows.to_string(),
                fails: failing(rules),
                exclude: String::new(),
                order: String::new(),
            };
        }
        let names: Vec<String> = (0..rules.len()).map(|i| format!("_ow_v{i}")).collect();
        let verdicts = rules
            .iter()
            .zip(&names)
            .map(|(r, n)| format!("({}) AS {n}", r.condition))
            .collect::<Vec<_>>()
            .join(", ");
        Split {
            from: format!("(SELECT *, {verdicts} FROM {rows}) AS judged"),
            fails: names
                .iter()
                .map(|n| format!("coalesce({n}, false)"))
                .collect(),
            exclude: format!(" EXCLUDE ({})", names.join(", ")),
            order: format!(" ORDER BY {}", quote_ident(key)),
        }
    }

    /// The verdicts of the rules of `severity`, with those rules.
    fn of<'a>(&'a self, rules: &'a [Rule], severity: Severity) -> (Vec<&'a Rule>, Vec<&'a String>) {
        rules
            .iter()
            .zip(&self.fails)
            .filter(|(r, _)| r.severity == severity)
            .unzip()
    }

    /// `, <codes> AS validation_warnings` when there are warning rules.
    fn warnings_column(&self, rules: &[Rule]) -> String {
        let (warn, fails) = self.of(rules, Severity::Warn);
        match warn.is_empty() {
            true => String::new(),
            false => format!(", {} AS validation_warnings", codes(&warn, &fails)),
        }
    }
}

/// The query for the good rows of `rows` (a table, or a subquery with an
/// alias) in `key` order: the `_good` view's, and what the export writes.
pub fn good_rows(rows: &str, rules: &[Rule], key: &str) -> String {
    let split = Split::new(rows, rules, key);
    let (_, errors) = split.of(rules, Severity::Error);
    format!(
        "SELECT *{}{} FROM {} WHERE NOT ({}){}",
        split.exclude,
        split.warnings_column(rules),
        split.from,
        any_fails(&errors),
        split.order
    )
}

/// The query for the bad rows of `rows`, each with its `validation_errors`
/// in rule order: the `_bad` view's, and what the export writes.
pub fn bad_rows(rows: &str, rules: &[Rule], key: &str) -> String {
    let split = Split::new(rows, rules, key);
    let (error_rules, errors) = split.of(rules, Severity::Error);
    format!(
        "SELECT *{}, {} AS validation_errors{} FROM {} WHERE {}{}",
        split.exclude,
        codes(&error_rules, &errors),
        split.warnings_column(rules),
        split.from,
        any_fails(&errors),
        split.order
    )
}

/// Defines `<schema>.<entity>_good` and `<entity>_bad` over `<entity>_raw`
/// and counts them (and the rows without a primary key `key`).
///
/// They are views, not tables: the split is a cheap filter, and views keep
/// the workbench from storing every row three times (measured: building
/// them as tables took as long as the export). Analysts query them the same
/// way; they always show the last run's raw rows under the last run's rules.
pub fn split(
    duck: &RawConnection,
    schema: &str,
    entity: Entity,
    key: &str,
    rules: &[Rule],
) -> Result<Validation, PipelineError> {
    let err = |e: DuckError| PipelineError::Validate(format!("{entity}: {e}"));
    let s = quote_ident(schema);
    let raw = format!("{s}.{}", quote_ident(entity.raw_table()));
    let good = format!("{s}.{}", quote_ident(&entity.table(FileKind::Good)));
    let bad = format!("{s}.{}", quote_ident(&entity.table(FileKind::Bad)));
    duck.execute(&format!(
        "CREATE OR REPLACE VIEW {good} AS {};
         CREATE OR REPLACE VIEW {bad} AS {};",
        good_rows(&raw, rules, key),
        bad_rows(&raw, rules, key)
    ))
    .map_err(err)?;
    let fails = failing(rules);
    let is_error: Vec<bool> = rules.iter().map(|r| r.severity.is_error()).collect();

    // One pass over the raw rows for every count, each rule evaluated once
    // per row: the inner query names each rule's verdict, the outer one
    // counts them (a rule inside both `any_fails` and its own count was
    // evaluated twice, and a regular expression is the costly part).
    let verdicts: Vec<String> = (0..fails.len()).map(|i| format!("_ow_rule_{i}")).collect();
    let mut inner = vec![format!("{} IS NULL AS _ow_no_key", quote_ident(key))];
    inner.extend(
        fails
            .iter()
            .zip(&verdicts)
            .map(|(f, v)| format!("{f} AS {v}")),
    );
    let error_verdicts: Vec<&String> = verdicts
        .iter()
        .zip(&is_error)
        .filter(|(_, e)| **e)
        .map(|(v, _)| v)
        .collect();
    let any_verdict = if error_verdicts.is_empty() {
        "false".to_string()
    } else {
        error_verdicts
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    let mut counts = vec![
        "count(*)".to_string(),
        format!("count(*) FILTER (WHERE {any_verdict})"),
        "count(*) FILTER (WHERE _ow_no_key)".to_string(),
    ];
    counts.extend(
        verdicts
            .iter()
            .map(|v| format!("count(*) FILTER (WHERE {v})")),
    );
    let row = duck
        .query_row_i64(&format!(
            "SELECT {} FROM (SELECT {} FROM {raw})",
            counts.join(", "),
            inner.join(", ")
        ))
        .map_err(err)?;
    let (total, per_rule) = (row[0] as u64, &row[1..]);
    let bad_rows = per_rule[0] as u64;
    let (errors, warnings) = by_severity(rules, &per_rule[2..]);
    Ok(Validation {
        good: total - bad_rows,
        bad: bad_rows,
        null_keys: per_rule[1] as u64,
        errors,
        warnings,
    })
}

/// Both entities' splits, in the run's transaction: companies with their
/// rules, then people with theirs (and the link rule, reading the
/// companies' verdicts, when it is on).
pub fn split_all(
    duck: &RawConnection,
    schema: &str,
    config: &Config,
    link_rule: bool,
) -> Result<(Validation, Validation), PipelineError> {
    let src = &config.source;
    let companies = Entity::Companies;
    let people = Entity::People;
    let mut people_rules = config.rules.of(people).to_vec();
    if link_rule {
        people_rules.push(crate::quality::rules::company_not_valid_rule(
            schema,
            &src.people_company_column,
            src.key(companies),
        ));
    }
    Ok((
        split(
            duck,
            schema,
            companies,
            src.key(companies),
            config.rules.of(companies),
        )?,
        split(duck, schema, people, src.key(people), &people_rules)?,
    ))
}

/// A written file: where it is and how many rows it holds.
#[derive(Debug, Clone, Copy)]
pub struct FileRows<'a> {
    pub path: &'a std::path::Path,
    pub rows: u64,
}

/// The views of a run whose rows went only to its files (every run but the
/// link rule's): `_good` and `_bad` over the two Parquet files, `_raw` over
/// both, since every pulled row is in exactly one of them. So the rows are
/// encoded once, as Parquet, instead of once more into the workbench file
/// (measured on the benchmark: the run's peak RSS 235 -> 157 MiB, its time
/// -16 %). The counts are read back from the files. Inside `duck`'s
/// transaction; the files are in place already.
pub fn over_files(
    duck: &RawConnection,
    schema: &str,
    entity: Entity,
    key: &str,
    rules: &[Rule],
    good: FileRows,
    bad: FileRows,
) -> Result<Validation, PipelineError> {
    let err = |e: DuckError| PipelineError::Validate(format!("{entity}: {e}"));
    let s = quote_ident(schema);
    // Absolute: DuckDB resolves a relative path against the reader's own
    // working directory, not the workbench's.
    let file = |f: &FileRows| {
        let path = std::path::absolute(f.path).unwrap_or_else(|_| f.path.to_path_buf());
        format!("read_parquet({})", quote_literal(&path.to_string_lossy()))
    };
    let (good_file, bad_file) = (file(&good), file(&bad));
    let views = [
        (entity.table(FileKind::Good), format!("SELECT * FROM {good_file}")),
        (entity.table(FileKind::Bad), format!("SELECT * FROM {bad_file}")),
        (
            entity.raw_table().to_string(),
            match of(rules, Severity::Warn).is_empty() {
                true => format!(
                    "SELECT * FROM {good_file} UNION ALL SELECT * EXCLUDE (validation_errors) FROM {bad_file}"
                ),
                false => format!(
                    "SELECT * EXCLUDE (validation_warnings) FROM {good_file} UNION ALL
                     SELECT * EXCLUDE (validation_errors, validation_warnings) FROM {bad_file}"
                ),
            },
        ),
    ];
    for (name, query) in &views {
        crate::workbench::drop_other_kind(duck, schema, name, true).map_err(err)?;
        duck.execute(&format!(
            "CREATE OR REPLACE VIEW {s}.{} AS {query}",
            quote_ident(name)
        ))
        .map_err(err)?;
    }
    // Rows without a key, among all; each rule's failures, from the codes
    // the bad rows carry (each failing code once per row, in rule order).
    // `count(*)` first: an aggregate gives its one row even over no rows.
    let mut counts = vec![
        "count(*)".to_string(),
        format!(
            "(SELECT count(*) FROM {s}.{} WHERE {} IS NULL)",
            quote_ident(entity.raw_table()),
            quote_ident(key)
        ),
    ];
    let errors = of(rules, Severity::Error);
    counts.extend(errors.iter().map(|r| {
        format!(
            "count(*) FILTER (WHERE list_contains(validation_errors, {}))",
            quote_literal(&r.code)
        )
    }));
    let row = duck
        .query_row_i64(&format!("SELECT {} FROM {bad_file}", counts.join(", ")))
        .map_err(err)?;
    // Warnings from the codes every row carries, good or bad.
    let warn = of(rules, Severity::Warn);
    let warned = match warn.is_empty() {
        true => Vec::new(),
        false => duck
            .query_row_i64(&format!(
                "SELECT count(*), {} FROM (SELECT validation_warnings FROM {good_file}
                                        UNION ALL SELECT validation_warnings FROM {bad_file})",
                warn.iter()
                    .map(|r| format!(
                        "count(*) FILTER (WHERE list_contains(validation_warnings, {}))",
                        quote_literal(&r.code)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
            .map_err(err)?
            .split_off(1),
    };
    Ok(Validation {
        good: good.rows,
        bad: bad.rows,
        null_keys: row[1] as u64,
        errors: by_code(&errors, &row[2..]),
        warnings: by_code(&warn, &warned),
    })
}

/// `counts` in rule order, split into the error rules' and the warning
/// rules', by code.
fn by_severity(rules: &[Rule], counts: &[i64]) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let pick = |s: Severity| {
        rules
            .iter()
            .zip(counts)
            .filter(|(r, _)| r.severity == s)
            .map(|(r, n)| (r.code.clone(), *n as u64))
            .collect()
    };
    (pick(Severity::Error), pick(Severity::Warn))
}

/// Each rule's count of failing rows, by its code: `counts` in rule order.
fn by_code(rules: &[Rule], counts: &[i64]) -> BTreeMap<String, u64> {
    rules
        .iter()
        .zip(counts)
        .map(|(r, n)| (r.code.clone(), *n as u64))
        .collect()
}

/// One entity's counts in a run's report: pulled, good, bad, per rule.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EntityCounts {
    pub raw: u64,
    pub good: u64,
    pub bad: u64,
    /// Rows with a NULL primary key.
    #[serde(default)]
    pub null_keys: u64,
    /// Rows failing each rule code.
    pub errors: BTreeMap<String, u64>,
    /// Rows failing each warning rule (`severity = "warn"`), good or bad.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub warnings: BTreeMap<String, u64>,
}

impl EntityCounts {
    pub fn new(raw: u64, v: Validation) -> Self {
        EntityCounts {
            raw,
            good: v.good,
            bad: v.bad,
            null_keys: v.null_keys,
            errors: v.errors,
            warnings: v.warnings,
        }
    }
}
