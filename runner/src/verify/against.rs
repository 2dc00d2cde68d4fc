//! `idem verify --against URL`: a replica kept by a change data capture
//! connector, compared row for row with the PostgreSQL table it
//! replicates. The source table is named by the connector's Debezium topic
//! (`PREFIX.SCHEMA.TABLE`); the columns compared are those mapped from a
//! field of the row (`pointer = "/field"`, the source's column `field`),
//! each cast to the connector's type and printed as canonical text on
//! both sides ([`idem_core::table::audit`]).

use crate::connector::Connector;
use anyhow::Context;
use idem_config::{ColumnType, Envelope, Evolve, Pointer};
use idem_core::table::{audit, sql::q};
use std::collections::HashMap;

type Row = Vec<Option<String>>;

/// What the comparison found for one connector.
pub(super) struct Compared {
    /// `schema.table on postgres://...`
    pub source: String,
    pub source_rows: usize,
    pub target_rows: usize,
    /// Keys in the source and not in the target, the other way round, and
    /// keys whose other columns differ (the first column that does).
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    pub differing: Vec<String>,
}

/// `None`: the sink cannot read its rows back.
pub(super) async fn compare(c: &Connector, url: &str) -> anyhow::Result<Option<Compared>> {
    anyhow::ensure!(
        c.cfg.envelope == Envelope::Debezium,
        "connector {}: --against compares a change data capture connector (envelope = \"debezium\") with its source table",
        c.name
    );
    let (schema, table) = source_table(c)?;
    let (pool, server) =
        idem_postgres::pool_for(url, 1).map_err(|e| anyhow::anyhow!("--against {e}"))?;
    let client = pool
        .get()
        .await
        .with_context(|| format!("connect to the source database {server}"))?;
    // (source column, target column, type) of every column taken from the row.
    let mut cols: Vec<(String, String, ColumnType)> = c
        .cfg
        .columns
        .iter()
        .filter_map(|col| {
            // A top-level field of the row: a column of the source table.
            let pointer = col.pointer();
            let Pointer::Field(p) = Pointer::of(&pointer) else {
                return None;
            };
            match idem_config::pointer_tokens(p).as_slice() {
                [field] if !field.is_empty() => Some((field.clone(), col.name.clone(), col.ty)),
                _ => None,
            }
        })
        .collect();
    let info = c.sink.info();
    if let (Evolve::AddColumns, Some(adds)) = (c.cfg.evolve, info.adds_columns) {
        // The columns learnt from the schema are the source's other ones,
        // of the type Idem gives them.
        let found = client
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
                &[&schema, &table],
            )
            .await
            .with_context(|| format!("read the columns of {schema}.{table} on {server}"))?;
        for row in found {
            let (name, ty): (String, String) = (row.get(0), row.get(1));
            if !cols.iter().any(|(f, t, _)| *f == name || *t == name) {
                let ty = learnt_type(&ty, adds.decimal);
                cols.push((name.clone(), name, ty));
            }
        }
    }
    let key: Vec<usize> = info
        .rows
        .key
        .iter()
        .map(|k| {
            cols.iter().position(|(_, name, _)| name == k).with_context(|| {
                format!(
                    "connector {}: key column `{k}` is not mapped from a field of the row (pointer = \"/field\")",
                    c.name
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(
        !key.is_empty(),
        "connector {}: --against compares a replica keyed on the source's primary key (mode = \"upsert\")",
        c.name
    );

    c.sink
        .prepare()
        .await
        .with_context(|| format!("connector {}: open the sink", c.name))?;
    let target_cols: Vec<(String, ColumnType)> =
        cols.iter().map(|(_, t, ty)| (t.clone(), *ty)).collect();
    let Some(target) = c
        .sink
        .canonical_rows(&target_cols)
        .await
        .with_context(|| format!("connector {}: read the target's rows", c.name))?
    else {
        return Ok(None);
    };

    // A source column without a time zone reads as UTC, as Debezium sends it.
    client
        .batch_execute("SET TIME ZONE 'UTC'")
        .await
        .with_context(|| format!("set the time zone on {server}"))?;
    let source_cols: Vec<(&str, ColumnType)> =
        cols.iter().map(|(s, _, ty)| (s.as_str(), *ty)).collect();
    let select = audit::postgres_select(&format!("{}.{}", q(&schema), q(&table)), &source_cols);
    let source: Vec<Row> = client
        .query(&select, &[])
        .await
        .with_context(|| format!("read {schema}.{table} on {server}"))?
        .iter()
        .map(|r| {
            source_cols
                .iter()
                .enumerate()
                .map(|(i, (_, ty))| audit::canonical(*ty, r.get(i)))
                .collect()
        })
        .collect();

    let names: Vec<&str> = cols.iter().map(|(_, t, _)| t.as_str()).collect();
    let show_key = |row: &Row| {
        key.iter()
            .map(|&i| format!("{}={}", names[i], row[i].as_deref().unwrap_or("NULL")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let by_key = |rows: &[Row]| -> HashMap<Row, Row> {
        rows.iter()
            .map(|r| (key.iter().map(|&i| r[i].clone()).collect(), r.clone()))
            .collect()
    };
    let (src, dst) = (by_key(&source), by_key(&target));
    let mut out = Compared {
        source: format!("{schema}.{table} on {server}"),
        source_rows: source.len(),
        target_rows: target.len(),
        missing: Vec::new(),
        extra: Vec::new(),
        differing: Vec::new(),
    };
    for (k, row) in &src {
        match dst.get(k) {
            None => out.missing.push(show_key(row)),
            Some(other) if other != row => {
                let (i, _) = row
                    .iter()
                    .zip(other)
                    .enumerate()
                    .find(|(_, (a, b))| a != b)
                    .unwrap_or((0, (&None, &None)));
                out.differing.push(format!(
                    "{}: column `{}` is {} in the source, {} in the target",
                    show_key(row),
                    names[i],
                    shown(&row[i]),
                    shown(&other[i])
                ));
            }
            Some(_) => {}
        }
    }
    for (k, row) in &dst {
        if !src.contains_key(k) {
            out.extra.push(show_key(row));
        }
    }
    for list in [&mut out.missing, &mut out.extra, &mut out.differing] {
        list.sort();
    }
    Ok(Some(out))
}

/// The type a PostgreSQL column of `data_type` has in a target that
/// learnt it from Debezium's schema (decimals as the sink takes them).
fn learnt_type(data_type: &str, decimal: ColumnType) -> ColumnType {
    match data_type {
        "smallint" | "integer" => ColumnType::Integer,
        "bigint" => ColumnType::Bigint,
        "real" | "double precision" => ColumnType::Double,
        "boolean" => ColumnType::Boolean,
        "numeric" => decimal,
        "date" => ColumnType::Date,
        "timestamp without time zone" | "timestamp with time zone" => ColumnType::Timestamp,
        "json" | "jsonb" => ColumnType::Json,
        "uuid" => ColumnType::Uuid,
        "bytea" => ColumnType::Bytea,
        _ => ColumnType::Text,
    }
}

fn shown(v: &Option<String>) -> String {
    v.as_deref()
        .map_or_else(|| "NULL".into(), |s| format!("{s:?}"))
}

/// `(schema, table)` from the connector's one Debezium topic,
/// `PREFIX.SCHEMA.TABLE`.
fn source_table(c: &Connector) -> anyhow::Result<(String, String)> {
    let topics = c.cfg.source.kafka().map(|k| k.topics).unwrap_or_default();
    let named = match topics.as_slice() {
        [one] if !one.starts_with('^') => {
            let parts: Vec<&str> = one.split('.').collect();
            (parts.len() >= 3).then(|| {
                (
                    parts[parts.len() - 2].to_string(),
                    parts[parts.len() - 1].to_string(),
                )
            })
        }
        _ => None,
    };
    named.with_context(|| {
        format!(
            "connector {}: cannot tell the source table from its topics {topics:?}: --against needs one Debezium topic named PREFIX.SCHEMA.TABLE",
            c.name
        )
    })
}
