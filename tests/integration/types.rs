//! Every supported PostgreSQL type goes through to Parquet value for value,
//! with the type DuckDB's own PostgreSQL scanner would give it.

use crate::common::*;
use outreach_workbench::pipeline::{RunOptions, RunStatus};

const FIXTURE: &str = r#"
CREATE TYPE marketing.tier AS ENUM ('gold', 'silver');
ALTER TABLE marketing.company_master
    ADD COLUMN t_int2 int2, ADD COLUMN t_int8 int8,
    ADD COLUMN t_float4 float4, ADD COLUMN t_float8 float8,
    ADD COLUMN t_numeric numeric(12,2), ADD COLUMN t_numeric_free numeric,
    ADD COLUMN t_bool boolean, ADD COLUMN t_varchar varchar(20), ADD COLUMN t_bpchar char(4),
    ADD COLUMN t_date date, ADD COLUMN t_ts timestamp, ADD COLUMN t_time time,
    ADD COLUMN t_uuid uuid, ADD COLUMN t_json json, ADD COLUMN t_jsonb jsonb,
    ADD COLUMN t_bytea bytea, ADD COLUMN t_enum marketing.tier,
    ADD COLUMN t_int_arr int4[], ADD COLUMN t_num_arr numeric(6,3)[], ADD COLUMN t_uuid_arr uuid[],
    ADD COLUMN t_interval interval,
    ADD COLUMN "Mixed Case" text, ADD COLUMN "select" int4, ADD COLUMN "with space" text;

INSERT INTO marketing.company_master (company_unique_id, company_name, website_url, address_state,
    source_system, promoted_from_intake_at, created_at, keywords, employee_count,
    t_int2, t_int8, t_float4, t_float8, t_numeric, t_numeric_free, t_bool, t_varchar, t_bpchar,
    t_date, t_ts, t_time, t_uuid, t_json, t_jsonb, t_bytea, t_enum,
    t_int_arr, t_num_arr, t_uuid_arr, t_interval, "Mixed Case", "select", "with space")
VALUES
 ('r1', 'One', 'one.example', 'WV', 's', '2025-01-01 12:00:00+00', '2025-06-30 23:59:59.123456+02',
  ARRAY['b2b', NULL, ''], 42,
  -32768, 9223372036854775807, 1.5, 2.25, 1234567890.12, 3.14159265358979323846, true, 'vär', 'ab',
  '2024-02-29', '2025-03-09 02:30:00', '13:45:30.123456', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '{"a": [1,2]}', '{"b": 1, "a": [1, 2]}', '\x00ff41', 'gold',
  '{1,NULL,3}', '{1.5,-2.25}', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}', '1 day 02:00:00', 'MC', 7, 'ws'),
 ('r2', 'Two', 'two.example', 'WV', 's', '1999-12-31 23:59:59+00', '1970-01-01 00:00:00+00',
  '{}', -1,
  32767, -9223372036854775808, 'NaN', 'Infinity', -0.05, -1e-20, false, '', 'x',
  '1999-12-31', '1900-01-01 00:00:00', '00:00:00', '00000000-0000-0000-0000-000000000000',
  'null', '[]', '\x', 'silver',
  '{}', '{}', '{}', '-3 months', '', 0, NULL),
 ('r3', 'Three', 'three.example', 'WV', 's', '2025-01-01 00:00:00+00', NULL,
  NULL, NULL,
  NULL, NULL, '-Infinity', '-Infinity', 0, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL);
"#;

#[test]
fn every_type_round_trips_to_parquet() {
    needs_services!();
    let w = World::new("types");
    w.pg().batch_execute(FIXTURE).unwrap();
    let r = w.run_with(
        "WV",
        &RunOptions {
            dry_run: true,
            ..Default::default()
        },
    );
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    assert_eq!(r.companies.as_ref().unwrap().good, 3);
    let fallbacks = r.text_fallbacks.join(" ");
    assert!(fallbacks.contains("t_numeric_free"), "{fallbacks}");
    assert!(fallbacks.contains("t_interval"), "{fallbacks}");
    // Every type reaches the same bytes through an all-states run's one
    // read (binary COPY tuples, spooled, decoded by the state's run).
    let batch = outreach_workbench::pipeline::all_states::run_all_states(
        &w.config,
        &tokio_util::sync::CancellationToken::new(),
        &RunOptions {
            dry_run: true,
            ..Default::default()
        },
        &mut |_, _| {},
    );
    assert!(batch.succeeded(), "{}", batch.summary());
    let hashes = |r: &outreach_workbench::pipeline::RunReport| {
        r.files
            .iter()
            .map(|f| (f.table_name.clone(), f.sha256.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(hashes(&batch.runs[0]), hashes(&r));

    let path = w.export_path("wv", "companies", "good");
    let types: std::collections::HashMap<String, String> =
        parquet_types(&path).into_iter().collect();
    for (col, ty) in [
        ("employee_count", "INTEGER"),
        ("keywords", "VARCHAR[]"),
        ("created_at", "TIMESTAMP WITH TIME ZONE"),
        ("t_int2", "SMALLINT"),
        ("t_int8", "BIGINT"),
        ("t_float4", "FLOAT"),
        ("t_float8", "DOUBLE"),
        ("t_numeric", "DECIMAL(12,2)"),
        ("t_numeric_free", "VARCHAR"),
        ("t_bool", "BOOLEAN"),
        ("t_varchar", "VARCHAR"),
        ("t_bpchar", "VARCHAR"),
        ("t_date", "DATE"),
        ("t_ts", "TIMESTAMP"),
        ("t_time", "TIME"),
        ("t_uuid", "UUID"),
        ("t_json", "VARCHAR"),
        ("t_jsonb", "VARCHAR"),
        ("t_bytea", "BLOB"),
        ("t_enum", "VARCHAR"),
        ("t_int_arr", "INTEGER[]"),
        ("t_num_arr", "DECIMAL(6,3)[]"),
        ("t_uuid_arr", "UUID[]"),
        ("t_interval", "VARCHAR"),
        ("Mixed Case", "VARCHAR"),
        ("select", "INTEGER"),
        ("with space", "VARCHAR"),
    ] {
        assert_eq!(
            types.get(col).map(String::as_str),
            Some(ty),
            "type of {col}"
        );
    }

    let check = |expr: &str, expected: [&str; 3]| {
        let got = parquet_rows(&path, expr);
        assert_eq!(got, expected, "{expr}");
    };
    check("company_unique_id", ["r1", "r2", "r3"]);
    check("employee_count", ["42", "-1", "NULL"]);
    check("len(keywords)", ["3", "0", "NULL"]);
    check(
        "keywords[1] || '/' || keywords[3] || '/' || (keywords[2] IS NULL)",
        ["b2b//true", "NULL", "NULL"],
    );
    check("epoch_us(created_at)", ["1751320799123456", "0", "NULL"]);
    check(
        "epoch_us(promoted_from_intake_at)",
        ["1735732800000000", "946684799000000", "1735689600000000"],
    );
    check("t_int2", ["-32768", "32767", "NULL"]);
    check(
        "t_int8",
        ["9223372036854775807", "-9223372036854775808", "NULL"],
    );
    check("t_float4", ["1.5", "nan", "-inf"]);
    check("t_float8", ["2.25", "inf", "-inf"]);
    check("t_numeric", ["1234567890.12", "-0.05", "0.00"]);
    check(
        "t_numeric_free",
        ["3.14159265358979323846", "-0.00000000000000000001", "NULL"],
    );
    check("t_bool", ["true", "false", "NULL"]);
    check("t_varchar", ["vär", "", "NULL"]);
    check("t_bpchar", ["ab  ", "x   ", "NULL"]);
    check("t_date", ["2024-02-29", "1999-12-31", "NULL"]);
    check(
        "t_ts",
        ["2025-03-09 02:30:00", "1900-01-01 00:00:00", "NULL"],
    );
    check("t_time", ["13:45:30.123456", "00:00:00", "NULL"]);
    check(
        "t_uuid",
        [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "00000000-0000-0000-0000-000000000000",
            "NULL",
        ],
    );
    check("t_json", [r#"{"a": [1,2]}"#, "null", "NULL"]);
    check("t_jsonb", [r#"{"a": [1, 2], "b": 1}"#, "[]", "NULL"]);
    check("hex(t_bytea)", ["00FF41", "", "NULL"]);
    check("t_enum", ["gold", "silver", "NULL"]);
    check("t_int_arr", ["[1, NULL, 3]", "[]", "NULL"]);
    check("t_num_arr", ["[1.500, -2.250]", "[]", "NULL"]);
    check(
        "t_uuid_arr",
        ["[a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11, NULL]", "[]", "NULL"],
    );
    check("t_interval", ["1 day 02:00:00", "-3 mons", "NULL"]);
    check("\"Mixed Case\"", ["MC", "", "NULL"]);
    check("\"select\"", ["7", "0", "NULL"]);
    check("\"with space\"", ["ws", "NULL", "NULL"]);
}
