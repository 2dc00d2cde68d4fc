//! PostgreSQL sink against a real server (scripts/postgres.sh): the
//! table-sink conformance suite (`idem_testkit::table_suite`), then what only
//! PostgreSQL has: numerics, dedup mode, TLS, a missing server, a connection
//! killed mid-run. Each test has its own schema.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use idem_config::ColumnConfig;
use idem_config::{ColumnType, Secret, WriteMode};
use idem_core::Sink;
use idem_sink_postgres::{PostgresSink, PostgresSinkConfig, SslMode};
use idem_testkit::table_suite::{TableTarget, TypesRow};
use idem_testkit::*;
use std::sync::Arc;
use std::time::Duration;

fn sink_cfg(schema: &str, mode: WriteMode, key: &[&str]) -> PostgresSinkConfig {
    PostgresSinkConfig {
        url: Secret::new(pg_url()),
        schema: schema.into(),
        table: "t".into(),
        mode,
        key: key.iter().map(|s| s.to_string()).collect(),
        version: None,
        delete_on_tombstone: mode == WriteMode::Upsert,
        dedup_retention: Duration::from_secs(3600),
        create: true,
        offsets_table: "idem_offsets".into(),
        pool_size: 2,
        connect_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(30),
        idle_in_transaction_timeout: Duration::from_secs(60),
        sslmode: SslMode::Prefer,
        ca_file: None,
    }
}

async fn rows(schema: &str, table: &str) -> Vec<(String, i64)> {
    pg().await
        .query(
            &format!("SELECT id, v FROM \"{schema}\".\"{table}\" ORDER BY id, v"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

struct PgTarget {
    schema: String,
}

#[async_trait]
impl TableTarget for PgTarget {
    fn new(name: &str) -> Self {
        PgTarget {
            schema: fresh_schema(&format!("it_{}", &name[..name.len().min(12)])),
        }
    }

    fn sink(
        &self,
        table: &str,
        mode: WriteMode,
        key: &[&str],
        version: Option<&str>,
        create: bool,
        columns: Vec<ColumnConfig>,
    ) -> Arc<dyn Sink> {
        let mut cfg = sink_cfg(&self.schema, mode, key);
        cfg.table = table.into();
        cfg.version = version.map(str::to_string);
        cfg.create = create;
        Arc::new(PostgresSink::new(cfg, columns))
    }

    fn sink_keeping_ids(
        &self,
        table: &str,
        mode: WriteMode,
        key: &[&str],
        create: bool,
        retention: Duration,
    ) -> Arc<dyn Sink> {
        let mut cfg = sink_cfg(&self.schema, mode, key);
        cfg.table = table.into();
        cfg.create = create;
        Arc::new(PostgresSink::new(cfg, columns()).keeping_ids(retention))
    }

    /// Its own pool, as another process.
    fn second_runner(&self, _first: &Arc<dyn Sink>, table: &str) -> Arc<dyn Sink> {
        self.sink(table, WriteMode::Append, &[], None, true, columns())
    }

    async fn execute(&self, sql: &str) {
        pg().await
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{}\"; {sql}",
                self.schema
            ))
            .await
            .unwrap();
    }

    async fn rows(&self, table: &str) -> Vec<(String, i64)> {
        rows(&self.schema, table).await
    }

    async fn text_column(&self, table: &str, column: &str) -> Vec<(String, Option<String>)> {
        pg().await
            .query(
                &format!(
                    "SELECT id, \"{column}\" FROM \"{}\".\"{table}\" ORDER BY id",
                    self.schema
                ),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    fn type_names(&self) -> (&'static str, &'static str) {
        ("text", "bigint")
    }

    fn table(&self, name: &str) -> String {
        format!("\"{}\".\"{name}\"", self.schema)
    }

    async fn types_row(&self) -> TypesRow {
        let row = pg()
            .await
            .query_one(
                &format!(
                    "SELECT t, b, i, d, ok, (extract(epoch FROM at) * 1000000)::bigint, day::text, doc->>'t', u::text, raw FROM \"{}\".types",
                    self.schema
                ),
                &[],
            )
            .await
            .unwrap();
        (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
            row.get(6),
            row.get(7),
            row.get(8),
            row.get(9),
        )
    }
}

idem_testkit::table_suite!(PgTarget);
idem_testkit::table_suite!(kept_ids PgTarget);

#[tokio::test]
async fn a_missing_server_is_named_and_retriable() {
    let mut cfg = sink_cfg("public", WriteMode::Append, &[]);
    cfg.url = Secret::new("postgres://idem:secret-pw@127.0.0.1:1/idem_test");
    cfg.connect_timeout = Duration::from_secs(1);
    let err = PostgresSink::new(cfg, columns())
        .prepare()
        .await
        .unwrap_err();
    assert!(err.is_retriable(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("127.0.0.1:1") && text.contains("scripts/postgres.sh"),
        "{text}"
    );
    assert!(!text.contains("secret-pw"), "the password leaked: {text}");
}

/// Numerics go in through their binary form, written by Idem: compare each
/// with PostgreSQL's own parse of the same text, scale included.
#[tokio::test]
async fn numerics_arrive_digit_for_digit() {
    let schema = fresh_schema("it_numeric");
    let p = part("a");
    let inputs = [
        "0",
        "-0.00",
        "12.50",
        "-10000",
        "0.0001",
        "0.00001",
        "123456789.1",
        "99999999999999999999999999999999999999.999999999",
        "-1.5e3",
        "1e-20",
        "31415926535897932384626433832795028841971693993751",
        "0.000000000000000000000000000000000000000000000000001",
        "9999",
        "10000.0001",
    ];
    let cols = vec![col("n", ColumnType::Numeric), col("k", ColumnType::Bigint)];
    let mapper = idem_core::Mapper::new(&cols, &[], false, None);
    let records: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(k, n)| {
            let json = format!(r#"{{"n":"{n}","k":{k}}}"#);
            mapper
                .map(&idem_core::Message {
                    offset: k as u64,
                    next_offset: k as u64 + 1,
                    key: None,
                    value: Some(json.into_bytes()),
                    poison: None,
                    meta: Default::default(),
                })
                .unwrap()
        })
        .collect();
    let mut cfg = sink_cfg(&schema, WriteMode::Append, &[]);
    cfg.table = "nums".into();
    let sink = PostgresSink::new(cfg, cols);
    sink.prepare().await.unwrap();
    let e = sink.open(&p).await.unwrap().epoch;
    let n = records.len() as u64;
    sink.commit(batch(&p, e, records, n)).await.unwrap();
    let rows = pg()
        .await
        .query(
            &format!("SELECT k, n::text FROM \"{schema}\".nums ORDER BY k"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), inputs.len());
    for (row, input) in rows.iter().zip(inputs) {
        let stored: String = row.get(1);
        let parsed: String = pg()
            .await
            .query_one("SELECT $1::text::numeric::text", &[&input])
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored, parsed, "{input}");
    }
}

#[tokio::test]
async fn a_killed_connection_is_retried_and_nothing_is_half_written() {
    let schema = fresh_schema("it_kill");
    let p = part("a");
    let mut cfg = sink_cfg(&schema, WriteMode::Append, &[]);
    // Its own application_name, so only this sink's connections are killed.
    cfg.url = Secret::new(format!("{}?application_name={schema}", pg_url()));
    let sink = PostgresSink::new(cfg, columns());
    sink.prepare().await.unwrap();
    let e = sink.open(&p).await.unwrap().epoch;
    sink.commit(batch(&p, e, vec![rec(0, "a", 1)], 1))
        .await
        .unwrap();
    // Terminate every connection of the sink's pool, as a server restart would.
    let killed: i64 = pg()
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 1);
    // The next commit on a dead connection fails transiently, or the pool
    // notices first; either way a retry succeeds and nothing is doubled.
    let mut attempts = 0;
    loop {
        attempts += 1;
        match sink.commit(batch(&p, e, vec![rec(1, "b", 2)], 2)).await {
            Ok(_) => break,
            Err(err) => {
                assert!(err.is_retriable(), "{err}");
                assert!(attempts < 5, "still failing: {err}");
            }
        }
    }
    assert_eq!(rows(&schema, "t").await, pairs(&[("a", 1), ("b", 2)]));
}

async fn server_has_ssl() {
    let on: String = pg().await.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    assert_eq!(
        on, "on",
        "the test server must offer TLS (Debian's postgresql does, with the snakeoil certificate)"
    );
}

#[tokio::test]
async fn sslmode_require_encrypts_the_connection() {
    server_has_ssl().await;
    let schema = fresh_schema("it_tls");
    let mut cfg = sink_cfg(&schema, WriteMode::Append, &[]);
    cfg.sslmode = SslMode::Require;
    cfg.url = Secret::new(format!("{}?application_name={schema}", pg_url()));
    let sink = PostgresSink::new(cfg, columns());
    sink.prepare().await.unwrap();
    let p = part("a");
    let e = sink.open(&p).await.unwrap().epoch;
    sink.commit(batch(&p, e, vec![rec(0, "a", 1)], 1))
        .await
        .unwrap();
    let encrypted: Vec<bool> = pg()
        .await
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !encrypted.is_empty() && encrypted.iter().all(|&b| b),
        "{encrypted:?}"
    );
    assert_eq!(rows(&schema, "t").await, pairs(&[("a", 1)]));
}

#[tokio::test]
async fn sslmode_verify_full_refuses_a_certificate_for_another_name() {
    server_has_ssl().await;
    let ca: String = pg()
        .await
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .unwrap()
        .get(0);
    let mut cfg = sink_cfg("public", WriteMode::Append, &[]);
    cfg.sslmode = SslMode::VerifyFull;
    // The server's own (self-signed) certificate as the CA: trusted, but it
    // names the machine, not 127.0.0.1, so verification must fail.
    cfg.ca_file = Some(ca);
    let err = PostgresSink::new(cfg, columns())
        .prepare()
        .await
        .unwrap_err();
    assert!(
        !err.is_retriable(),
        "a certificate failure is permanent: {err}"
    );
    let text = format!("{err:?}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    let mut cfg = sink_cfg("public", WriteMode::Append, &[]);
    cfg.sslmode = SslMode::VerifyFull;
    cfg.ca_file = Some("/nonexistent/ca.pem".into());
    let err = PostgresSink::new(cfg, columns())
        .prepare()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read ca_file /nonexistent/ca.pem"),
        "{err}"
    );
}

/// The first two batches of both dedup shapes: copies in one batch and
/// across batches are dropped, the first message of each id kept.
async fn dedup_two_batches(sink: &PostgresSink, schema: &str, p: &idem_core::PartitionRef) {
    sink.prepare().await.unwrap();
    let e = sink.open(p).await.unwrap().epoch;
    // Two copies of `a` in one batch (a producer retry): the first wins.
    let s = sink
        .commit(batch(
            p,
            e,
            vec![rec(0, "a", 1), rec(1, "b", 1), rec(2, "a", 9)],
            3,
        ))
        .await
        .unwrap();
    assert_eq!((s.written, s.deduplicated), (2, 1));
    // A later copy at another offset changes nothing; a new id is written.
    let s = sink
        .commit(batch(p, e, vec![rec(3, "a", 7), rec(4, "c", 3)], 5))
        .await
        .unwrap();
    assert_eq!((s.written, s.deduplicated), (1, 1));
    assert_eq!(
        rows(schema, "t").await,
        pairs(&[("a", 1), ("b", 1), ("c", 3)])
    );
}

/// A table Idem creates in dedup mode is keyed on the key: the rows are the
/// ids, so no ids table is kept and a copy is dropped however late.
#[tokio::test]
async fn dedup_into_a_created_table_keys_it_and_drops_copies_for_good() {
    let schema = fresh_schema("it_dedupk");
    let p = part("a");
    let sink = PostgresSink::new(sink_cfg(&schema, WriteMode::Dedup, &["id"]), columns());
    dedup_two_batches(&sink, &schema, &p).await;
    let client = pg().await;
    let pk: Vec<String> = client
        .query(
            &format!(
                "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a
                 ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                 WHERE i.indrelid = '\"{schema}\".t'::regclass AND i.indisprimary"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pk, ["id"]);
    let ids: Option<String> = client
        .query_one(
            &format!("SELECT to_regclass('\"{schema}\".idem_ids_t')::text"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ids, None, "no ids table beside a keyed table");
    // A restarted sink still drops a copy of `a`, and writes `d`: it does
    // not know `a`, so its `COPY` straight into the table meets the
    // existing key and the whole batch takes the staged insert.
    let again = PostgresSink::new(sink_cfg(&schema, WriteMode::Dedup, &["id"]), columns());
    again.prepare().await.unwrap();
    let e = again.open(&p).await.unwrap().epoch;
    let s = again
        .commit(batch(&p, e, vec![rec(5, "a", 5), rec(6, "d", 6)], 7))
        .await
        .unwrap();
    assert_eq!((s.written, s.deduplicated), (1, 1));
    assert_eq!(
        rows(&schema, "t").await,
        pairs(&[("a", 1), ("b", 1), ("c", 3), ("d", 6)])
    );
}

/// A table without a unique index on the key (made by hand, or by an
/// earlier Idem): ids go to `idem_ids_<table>` and are kept for
/// `dedup_retention`.
#[tokio::test]
async fn dedup_into_an_unkeyed_table_writes_each_id_once_within_the_retention() {
    let schema = fresh_schema("it_dedup");
    pg().await
        .batch_execute(&format!(
            "CREATE SCHEMA \"{schema}\";
             CREATE TABLE \"{schema}\".t (id text NOT NULL, v bigint,
                 _idem_partition text NOT NULL, _idem_offset bigint NOT NULL)"
        ))
        .await
        .unwrap();
    let p = part("a");
    let sink = PostgresSink::new(sink_cfg(&schema, WriteMode::Dedup, &["id"]), columns());
    dedup_two_batches(&sink, &schema, &p).await;
    // Past the retention an id is forgotten (the purge runs at start).
    pg().await
        .batch_execute(&format!(
            "UPDATE \"{schema}\".idem_ids_t SET seen_at = now() - interval '2 hours' WHERE id = 'a'"
        ))
        .await
        .unwrap();
    let again = PostgresSink::new(sink_cfg(&schema, WriteMode::Dedup, &["id"]), columns());
    again.prepare().await.unwrap();
    let e = again.open(&p).await.unwrap().epoch;
    let s = again
        .commit(batch(&p, e, vec![rec(5, "a", 5), rec(6, "b", 6)], 7))
        .await
        .unwrap();
    assert_eq!((s.written, s.deduplicated), (1, 1));
    assert_eq!(
        rows(&schema, "t").await,
        pairs(&[("a", 1), ("a", 5), ("b", 1), ("c", 3)])
    );
}

/// A throwaway PostgreSQL cluster on its own port, serving a certificate
/// for `localhost` signed by a CA made here: the positive side of
/// `verify-full`, which the shared server's snakeoil certificate cannot give.
struct TlsCluster {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
}

impl TlsCluster {
    /// Run a server binary as `postgres` (initdb refuses root).
    fn command(&self, tool: &str) -> std::process::Command {
        let exe = self.bin.join(tool);
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            std::process::Command::new(exe)
        }
    }

    fn start(cert_pem: &str, key_pem: &str) -> TlsCluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's server binaries under /usr/lib/postgresql (scripts/postgres.sh)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .max()
            .expect("an initdb under /usr/lib/postgresql/*/bin");
        let port = free_port();
        let cluster = TlsCluster {
            dir: tempfile::tempdir().unwrap(),
            bin,
            port,
        };
        let root = cluster.dir.path();
        let data = root.join("data");
        std::fs::write(root.join("server.crt"), cert_pem).unwrap();
        std::fs::write(root.join("server.key"), key_pem).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            root.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        // Harmless when not root: the files are ours already.
        let _ = std::process::Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(root)
            .status();
        let ok = cluster
            .command("initdb")
            .args(["--auth=trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(ok.status.success(), "initdb: {ok:?}");
        let opts = format!(
            "-p {port} -k {dir} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={dir}/server.crt -c ssl_key_file={dir}/server.key -c fsync=off",
            dir = root.display()
        );
        let ok = cluster
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-w", "-l"])
            .arg(root.join("log"))
            .args(["-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "pg_ctl start: {ok:?}\n{}",
            std::fs::read_to_string(root.join("log")).unwrap_or_default()
        );
        cluster
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

#[tokio::test]
async fn sslmode_verify_full_accepts_a_certificate_from_the_ca_file() {
    use rcgen::{CertificateParams, KeyPair};
    let ca = test_ca;
    let trusted = ca("Idem test CA");
    let other = ca("Someone else's CA");
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &trusted)
        .unwrap();
    let cluster = TlsCluster::start(&server_cert.pem(), &server_key.serialize_pem());
    let files = tempfile::tempdir().unwrap();
    let ca_file = |name: &str, pem: String| {
        let path = files.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    let trusted_file = ca_file("trusted.pem", trusted.pem());
    let other_file = ca_file("other.pem", other.pem());
    let cfg = |host: &str, ca: &str| {
        let mut cfg = sink_cfg("idem_tls", WriteMode::Append, &[]);
        cfg.url = Secret::new(format!(
            "postgres://postgres@{host}:{}/postgres",
            cluster.port
        ));
        cfg.sslmode = SslMode::VerifyFull;
        cfg.ca_file = Some(ca.to_string());
        cfg
    };

    // The name on the certificate and a CA that signed it: connects,
    // writes, and the connection is encrypted.
    let sink = PostgresSink::new(cfg("localhost", &trusted_file), columns());
    sink.prepare().await.unwrap();
    let p = part("a");
    let e = sink.open(&p).await.unwrap().epoch;
    sink.commit(batch(&p, e, vec![rec(0, "a", 1)], 1))
        .await
        .unwrap();
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            cluster.port
        ),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let n: i64 = client
        .query_one("SELECT count(*) FROM idem_tls.t WHERE id = 'a'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let encrypted: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE s.ssl AND a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted >= 1, "the sink's connection is not encrypted");

    // Another CA, or another name for the same server: refused, for good.
    for (host, ca) in [("localhost", &other_file), ("127.0.0.1", &trusted_file)] {
        let err = PostgresSink::new(cfg(host, ca), columns())
            .prepare()
            .await
            .unwrap_err();
        assert!(!err.is_retriable(), "{host} with {ca}: {err}");
        let text = format!("{err:?}").to_lowercase();
        assert!(text.contains("certificate"), "{host} with {ca}: {text}");
    }
}

/// Runners started together on an empty database all create the same
/// schema and tables: none may fail on the other's concurrent create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_starting_together_create_the_tables_once() {
    for round in 0..5 {
        let schema = fresh_schema(&format!("it_race{round}"));
        let prepares: Vec<_> = (0..8)
            .map(|_| {
                let cfg = sink_cfg(&schema, WriteMode::Upsert, &["id"]);
                tokio::spawn(async move { PostgresSink::new(cfg, columns()).prepare().await })
            })
            .collect();
        for p in prepares {
            p.await.unwrap().unwrap();
        }
    }
}

/// Record `rec(offset, key, v)` carrying message id `id`.
fn with_msg_id(offset: u64, key: &str, v: i64, id: &str) -> idem_core::Record {
    let mut r = rec(offset, key, v);
    r.id = Some(id.into());
    r
}

/// `[dedup] store = "sink"` makes its ids table with `COLLATE "C"` (only
/// equality matters, and byte order is the cheapest to index); an ids
/// table made before, with the database's collation, still works. Both
/// are met on the checked path: a restarted sink's `COPY` of new-looking
/// ids fails on one the table holds, and the batch checks every id.
#[tokio::test]
async fn kept_ids_compare_bytewise_and_an_ids_table_made_before_still_works() {
    let schema = fresh_schema("it_seenc");
    let hour = Duration::from_secs(3600);
    let keeping = |table: &str| {
        let mut cfg = sink_cfg(&schema, WriteMode::Append, &[]);
        cfg.table = table.into();
        PostgresSink::new(cfg, columns()).keeping_ids(hour)
    };
    let client = pg().await;
    client
        .batch_execute(&format!(
            "CREATE SCHEMA \"{schema}\";
             CREATE TABLE \"{schema}\".idem_seen_old (id text PRIMARY KEY, seen_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO \"{schema}\".idem_seen_old (id) VALUES ('e1')"
        ))
        .await
        .unwrap();
    let p = part("a");
    for (table, before) in [("t", true), ("old", false)] {
        if before {
            let sink = keeping(table);
            sink.prepare().await.unwrap();
            let e = sink.open(&p).await.unwrap().epoch;
            let first = vec![with_msg_id(0, "x", 1, "e1")];
            sink.commit(batch(&p, e, first, 1)).await.unwrap();
        }
        let sink = keeping(table);
        sink.prepare().await.unwrap();
        let e = sink.open(&p).await.unwrap().epoch;
        let next = vec![
            with_msg_id(1, "x", 1, "e1"),
            with_msg_id(2, "y", 2, "e2"),
            with_msg_id(3, "y", 2, "e2"),
        ];
        let s = sink.commit(batch(&p, e, next, 4)).await.unwrap();
        assert_eq!((s.written, s.deduplicated), (1, 2), "{table}");
    }
    assert_eq!(rows(&schema, "t").await, pairs(&[("x", 1), ("y", 2)]));
    assert_eq!(rows(&schema, "old").await, pairs(&[("y", 2)]));
    let collation = |table: &'static str| {
        let client = &client;
        let schema = &schema;
        async move {
            let c: Option<String> = client
                .query_one(
                    "SELECT collation_name::text FROM information_schema.columns
                     WHERE table_schema = $1 AND table_name = $2 AND column_name = 'id'",
                    &[schema, &table],
                )
                .await
                .unwrap()
                .get(0);
            c
        }
    };
    assert_eq!(collation("idem_seen_t").await.as_deref(), Some("C"));
    assert_eq!(
        collation("idem_seen_old").await,
        None,
        "left as it was made"
    );
}
