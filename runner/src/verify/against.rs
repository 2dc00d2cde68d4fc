//! `idem verify --against URL`: a replica kept by a change data capture
//! connector, compared row for row with the PostgreSQL table it
//! replicates. The source table is named by the connector's Debezium topic
//! (`PREFIX.SCHEMA.TABLE`); the columns compared are those mapped from a
//! field of the row (`pointer = "/field"`, the source's column `field`),
//! each cast to the connector's type and printed as canonical text on
//! both sides ([`idem_core::table::audit`]).

use crate::connector::routed::Learnt;
use crate::connector::Connector;
use anyhow::Context;
use idem_config::{ColumnConfig, ColumnType, ColumnsFrom, Envelope, Evolve, Pointer};
use idem_core::table::{audit, sql::q};
use idem_core::Sink;
use std::collections::HashMap;
use std::sync::Arc;

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

/// One source table and the target table that replicates it.
struct Pair {
    schema: String,
    table: String,
    /// The sink reading the target back, ready to read.
    sink: Arc<dyn Sink>,
    /// Its key: the sink's, or the source's primary key when learnt.
    key: Option<Vec<String>>,
    /// The columns compared (see [`columns_of`]).
    cols: Vec<(String, String, ColumnType)>,
}

/// Each replicated table compared; `None`: the sink cannot read its rows
/// back. A connector writing each source table to its own table compares
/// every table whose topic it has opened (the committed positions say
/// which).
pub(super) async fn compare(c: &Connector, url: &str) -> anyhow::Result<Option<Vec<Compared>>> {
    anyhow::ensure!(
        c.cfg.envelope == Envelope::Debezium,
        "connector {}: --against compares a change data capture connector (envelope = \"debezium\") with its source table",
        c.name
    );
    let (pool, server) =
        idem_postgres::pool_for(url, 1).map_err(|e| anyhow::anyhow!("--against {e}"))?;
    let client = pool
        .get()
        .await
        .with_context(|| format!("connect to the source database {server}"))?;
    // A source column without a time zone reads as UTC, as Debezium sends it.
    client
        .batch_execute("SET TIME ZONE 'UTC'")
        .await
        .with_context(|| format!("set the time zone on {server}"))?;
    c.sink
        .prepare()
        .await
        .with_context(|| format!("connector {}: open the sink", c.name))?;
    let pairs = match &c.routed {
        None => {
            let (schema, table) = source_table(c)?;
            let cols = columns_of(c, &client, &server, &schema, &table).await?;
            vec![Pair {
                schema,
                table,
                sink: c.sink.clone(),
                key: None,
                cols,
            }]
        }
        Some(routed) => {
            let positions = c
                .sink
                .positions(&c.name)
                .await
                .with_context(|| format!("connector {}: read positions", c.name))?;
            let mut topics: Vec<&str> = positions
                .iter()
                .map(|p| crate::connector::routed::topic_of(&p.partition))
                .collect();
            topics.sort_unstable();
            topics.dedup();
            anyhow::ensure!(
                !topics.is_empty(),
                "connector {}: no table replicated yet (no partition of its topics has opened): run it first",
                c.name
            );
            let mut pairs = Vec::new();
            for topic in topics {
                let (schema, table) = topic_table(topic).with_context(|| {
                    format!(
                        "connector {}: topic `{topic}` is not named PREFIX.SCHEMA.TABLE",
                        c.name
                    )
                })?;
                let target = routed
                    .table_for(topic)
                    .map_err(|e| anyhow::anyhow!("connector {}: {e}", c.name))?;
                let key = if routed.learns_key() {
                    Some(primary_key(&client, &server, &schema, &table).await?)
                } else {
                    None
                };
                let cols = columns_of(c, &client, &server, &schema, &table).await?;
                // Keyed on the source's key, of the columns compared: built
                // to read the table, which it neither creates nor alters.
                let mut configs = c.cfg.columns.clone();
                for (_, name, ty) in &cols {
                    if !configs.iter().any(|col| col.name == *name) {
                        configs.push(ColumnConfig {
                            name: name.clone(),
                            pointer: None,
                            ty: *ty,
                            required: false,
                        });
                    }
                }
                let learnt = key.as_deref().map(|key| Learnt {
                    key,
                    columns: &configs,
                });
                let sink = routed
                    .table_sink(&target, learnt)
                    .map_err(|e| anyhow::anyhow!("connector {}: {e}", c.name))?;
                sink.prepare_positions()
                    .await
                    .with_context(|| format!("connector {}: open table {target}", c.name))?;
                pairs.push(Pair {
                    schema,
                    table,
                    sink,
                    key,
                    cols,
                });
            }
            pairs
        }
    };
    let mut found = Vec::new();
    for pair in pairs {
        match compare_table(c, &client, &server, pair).await? {
            Some(f) => found.push(f),
            None => return Ok(None),
        }
    }
    Ok(Some(found))
}

/// (source column, target column, type) of every column taken from the
/// row: those mapped from a field, and with learnt columns the source
/// table's others, of the type Idem gives them.
async fn columns_of(
    c: &Connector,
    client: &deadpool_postgres::Client,
    server: &str,
    schema: &str,
    table: &str,
) -> anyhow::Result<Vec<(String, String, ColumnType)>> {
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
    if c.cfg.columns_from() == ColumnsFrom::Table {
        // The target's other columns, each compared with the source's
        // column of its name (a column the source lacks is the target's
        // own: not compared).
        let source: Vec<String> = client
            .query(
                "SELECT column_name::text FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = $2",
                &[&schema, &table],
            )
            .await
            .with_context(|| format!("read the columns of {schema}.{table} on {server}"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let found = c
            .sink
            .existing_columns()
            .await
            .with_context(|| format!("connector {}: read the target's columns", c.name))?
            .unwrap_or_default();
        for (name, ty) in found {
            let listed = cols.iter().any(|(f, t, _)| *f == name || *t == name);
            if let (Ok(ty), false, true) = (ty, listed, source.contains(&name)) {
                cols.push((name.clone(), name, ty));
            }
        }
    } else if let (Evolve::AddColumns, Some(adds)) = (c.cfg.evolve, c.sink.info().adds_columns) {
        let found = client
            .query(
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
                &[&schema, &table],
            )
            .await
            .with_context(|| format!("read the columns of {schema}.{table} on {server}"))?;
        anyhow::ensure!(
            !found.is_empty(),
            "no table {schema}.{table} on {server} (or no column of it this user can see)"
        );
        for row in found {
            let (name, ty): (String, String) = (row.get(0), row.get(1));
            if !cols.iter().any(|(f, t, _)| *f == name || *t == name) {
                let ty = learnt_type(&ty, adds.decimal);
                cols.push((name.clone(), name, ty));
            }
        }
    }
    Ok(cols)
}

/// The primary key columns of a source table, in the key's order.
async fn primary_key(
    client: &deadpool_postgres::Client,
    server: &str,
    schema: &str,
    table: &str,
) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT a.attname::text
               FROM pg_index x
               CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, i)
               JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
              WHERE x.indisprimary AND x.indrelid = format('%I.%I', $1::text, $2::text)::regclass
              ORDER BY k.i",
            &[&schema, &table],
        )
        .await
        .with_context(|| format!("read the primary key of {schema}.{table} on {server}"))?;
    let key: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    anyhow::ensure!(
        !key.is_empty(),
        "{schema}.{table} on {server} has no primary key to compare its replica by"
    );
    Ok(key)
}

/// `None`: the sink cannot read its rows back.
async fn compare_table(
    c: &Connector,
    client: &deadpool_postgres::Client,
    server: &str,
    pair: Pair,
) -> anyhow::Result<Option<Compared>> {
    let Pair {
        schema,
        table,
        sink,
        key,
        cols,
    } = pair;
    let key_names = key.unwrap_or_else(|| c.sink.info().rows.key);
    let key: Vec<usize> = key_names
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

    let target_cols: Vec<(String, ColumnType)> =
        cols.iter().map(|(_, t, ty)| (t.clone(), *ty)).collect();
    let Some(target) = sink
        .canonical_rows(&target_cols)
        .await
        .with_context(|| format!("connector {}: read the target's rows", c.name))?
    else {
        return Ok(None);
    };

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

/// `(schema, table)` of a Debezium topic, `PREFIX.SCHEMA.TABLE`, read as
/// a table template reads it.
fn topic_table(topic: &str) -> Option<(String, String)> {
    let part = |placeholder| idem_config::resolve_table(placeholder, topic).ok();
    Some((part("{source.schema}")?, part("{source.table}")?))
}

/// `(schema, table)` from the connector's one Debezium topic.
fn source_table(c: &Connector) -> anyhow::Result<(String, String)> {
    let topics = c.cfg.source.kafka().map(|k| k.topics).unwrap_or_default();
    let named = match topics.as_slice() {
        [one] if !one.starts_with('^') => topic_table(one),
        _ => None,
    };
    named.with_context(|| {
        format!(
            "connector {}: cannot tell the source table from its topics {topics:?}: --against needs one Debezium topic named PREFIX.SCHEMA.TABLE (or a table template)",
            c.name
        )
    })
}
