//! Regression tests for defects found by probing Idem as a hostile user
//! would: identifiers, poison values, secrets, shutdown, partial files.
//! Each runs the real binary against the real servers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

/// A config with one file connector and the given sink and columns.
fn file_connector(w: &Workdir, sink: &str, columns: &str) -> String {
    format!(
        r#"
[connectors.h]
dead_letter = "{dl}"

[connectors.h.source]
type = "file"
path = "{src}"

[connectors.h.sink]
{sink}

{columns}
"#,
        dl = w.path("dl.jsonl").display(),
        src = w.path("in.jsonl").display(),
    )
}

fn pg_sink(schema: &str) -> String {
    format!(
        "type = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\ntable = \"t\"",
        pg_url()
    )
}

/// Tables named `name` in any schema of the test database.
async fn pg_tables_named(name: &str) -> i64 {
    pg().await
        .query_one("SELECT count(*) FROM pg_class WHERE relname = $1", &[&name])
        .await
        .unwrap()
        .get(0)
}

/// A TOML literal string (no escapes) holding `s`, which has no `'`.
fn lit(s: &str) -> String {
    assert!(!s.contains('\''));
    format!("'{s}'")
}

// 1. A column name is one quoted identifier, never SQL.

#[tokio::test]
async fn a_hostile_column_name_runs_no_sql_on_postgres() {
    let w = Workdir::new();
    let schema = fresh_schema("hard_ident");
    let pwned = format!("pwned_{}", std::process::id());
    w.write(
        "in.jsonl",
        "{\"id\":\"a\",\"n\":1}\n{\"id\":\"b\",\"n\":2}\n",
    );

    // The issue's name is 66 bytes: PostgreSQL would truncate it, so it is
    // refused at start, with the key.
    let long = format!(r#"a" text); COMMIT; CREATE TABLE {pwned}(i int); CREATE TABLE junk ("b"#);
    let cols = format!(
        "[[connectors.h.columns]]\nname = {}\npointer = \"/id\"\ntype = \"text\"",
        lit(&long)
    );
    let cfg = w.write("long.toml", &file_connector(&w, &pg_sink(&schema), &cols));
    let out = idem().arg("check").arg(&cfg).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("connectors.h.columns.0.name") && err.contains("63 bytes"),
        "{err}"
    );
    assert_eq!(pg_tables_named(&pwned).await, 0);

    // A shorter one is accepted and becomes a column of exactly that name.
    let hostile = format!(r#"x" int); CREATE TABLE {pwned}(i int); --"#);
    let cols = format!(
        "[[connectors.h.columns]]\nname = \"id\"\ntype = \"text\"\n\n\
         [[connectors.h.columns]]\nname = {}\npointer = \"/n\"\ntype = \"bigint\"",
        lit(&hostile)
    );
    let cfg = w.write("short.toml", &file_connector(&w, &pg_sink(&schema), &cols));
    run_ok(idem().arg("check").arg(&cfg));
    run_ok(idem().arg("run").arg(&cfg));
    assert_eq!(pg_tables_named(&pwned).await, 0, "foreign SQL ran");
    let client = pg().await;
    let quoted = format!("\"{}\"", hostile.replace('"', "\"\""));
    let sum: i64 = client
        .query_one(
            &format!("SELECT sum({quoted})::bigint FROM \"{schema}\".t"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, 3);
}

#[test]
fn a_hostile_column_name_runs_no_sql_on_duckdb() {
    let w = Workdir::new();
    w.write(
        "in.jsonl",
        "{\"id\":\"a\",\"n\":1}\n{\"id\":\"b\",\"n\":2}\n",
    );
    let hostile = r#"a" text); CREATE TABLE pwned(i int); CREATE TABLE junk ("b"#;
    let db = w.path("t.duckdb");
    let sink = format!(
        "type = \"duckdb\"\npath = \"{}\"\ntable = \"t\"",
        db.display()
    );
    let cols = format!(
        "[[connectors.h.columns]]\nname = \"id\"\ntype = \"text\"\n\n\
         [[connectors.h.columns]]\nname = {}\npointer = \"/n\"\ntype = \"bigint\"",
        lit(hostile)
    );
    let cfg = w.write("c.toml", &file_connector(&w, &sink, &cols));
    run_ok(idem().arg("check").arg(&cfg));
    run_ok(idem().arg("run").arg(&cfg));
    let conn = duck(&db);
    assert_eq!(
        query_i64(
            &conn,
            "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('pwned', 'junk')"
        ),
        0,
        "foreign SQL ran"
    );
    let quoted = format!("\"{}\"", hostile.replace('"', "\"\""));
    assert_eq!(
        query_i64(&conn, &format!("SELECT sum({quoted})::BIGINT FROM t")),
        3
    );
}
