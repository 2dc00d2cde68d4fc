//! PostgreSQL baselines: `idem generate`'s events parsed beforehand and
//! written by one raw binary `COPY`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::runtime::Runtime;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

/// A client of the test PostgreSQL ([`super::pg_url`]) on `rt`, with
/// schema `schema` created; the panic says how to start the server.
pub fn connect(rt: &Runtime, schema: &str) -> tokio_postgres::Client {
    let url = super::pg_url();
    let (client, conn) = rt
        .block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))
        .unwrap_or_else(|e| {
            panic!("PostgreSQL at {url}: {e}; start it with bash scripts/postgres.sh")
        });
    rt.spawn(conn);
    rt.block_on(client.batch_execute(&format!("CREATE SCHEMA {schema}")))
        .expect("create the schema");
    client
}

#[derive(Clone)]
pub struct Event {
    pub event_id: String,
    pub user_id: i64,
    pub kind: String,
    pub amount: f64,
    pub currency: String,
    pub ok: bool,
    pub at: SystemTime,
    pub note: String,
}

/// An event of `idem generate`, or `None` for one of its malformed lines.
pub fn parse(line: &str) -> Option<Event> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let s = |k: &str| v[k].as_str().map(str::to_string);
    let at = v["at"].as_str()?;
    // The generator writes whole seconds in UTC: 2026-01-01T00:00:00Z.
    let secs = chrono_like_parse(at);
    Some(Event {
        event_id: s("event_id")?,
        user_id: v["user_id"].as_i64()?,
        kind: s("kind")?,
        amount: v["amount"].as_f64()?,
        currency: s("currency")?,
        ok: v["ok"].as_bool()?,
        at: UNIX_EPOCH + Duration::from_secs(secs),
        note: s("note")?,
    })
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ` (days from civil).
fn chrono_like_parse(t: &str) -> u64 {
    let n = |a: usize, b: usize| t[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86_400 + n(11, 13) * 3600 + n(14, 16) * 60 + n(17, 19)) as u64
}

/// One `COPY .. FROM STDIN (FORMAT binary)` of every row, in one
/// transaction, each row's index as its `_idem_offset`.
pub async fn raw_copy(client: &tokio_postgres::Client, table: &str, rows: &[Event]) -> Duration {
    let started = Instant::now();
    client.batch_execute("BEGIN").await.unwrap();
    let sink = client
        .copy_in(&format!(
            "COPY {table} (event_id, user_id, kind, amount, currency, ok, at, note, _idem_partition, _idem_offset) FROM STDIN (FORMAT binary)"
        ))
        .await
        .unwrap();
    let types = [
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::FLOAT8,
        Type::TEXT,
        Type::BOOL,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures_util::pin_mut!(writer);
    let partition = "bench".to_string();
    for (i, e) in rows.iter().enumerate() {
        let offset = i as i64;
        let row: [&(dyn ToSql + Sync); 10] = [
            &e.event_id,
            &e.user_id,
            &e.kind,
            &e.amount,
            &e.currency,
            &e.ok,
            &e.at,
            &e.note,
            &partition,
            &offset,
        ];
        writer.as_mut().write(&row).await.unwrap();
    }
    writer.as_mut().finish().await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    started.elapsed()
}
