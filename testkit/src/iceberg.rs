//! Iceberg tables written by Idem, read back with PyIceberg
//! (scripts/iceberg-tools.sh installs it, scripts/iceberg-read.py reads):
//! its SqlCatalog on the test PostgreSQL, the warehouse on the test S3
//! store (moto) or the local disk.

use crate::pg_url;
use serde_json::Value;
use std::collections::BTreeMap;

/// The `[connectors.X.sink]` lines of an Iceberg sink on catalog `catalog`
/// of the test PostgreSQL, table `namespace.table`, warehouse `warehouse`
/// (`s3://bucket/..` on moto, or `file:///..`).
pub fn sink_lines(catalog: &str, warehouse: &str, table: &str) -> String {
    let (namespace, table) = table.rsplit_once('.').expect("namespace.table");
    let s3 = if warehouse.starts_with("s3://") {
        format!(
            "s3_endpoint = \"{}\"\ns3_path_style = true\n",
            crate::s3::ENDPOINT
        )
    } else {
        String::new()
    };
    format!(
        "type = \"iceberg\"\nwarehouse = \"{warehouse}\"\nnamespace = \"{namespace}\"\ntable = \"{table}\"\n{s3}catalog = {{ type = \"sql\", url = \"{}\", name = \"{catalog}\" }}\n",
        pg_url()
    )
}

/// What PyIceberg finds in a table.
pub struct Read {
    /// JSON objects, one per row.
    pub rows: Vec<Value>,
    pub properties: BTreeMap<String, String>,
    pub snapshots: u64,
    /// The partition spec, in Iceberg's words: `day(at)`, `bucket[4](id)`.
    pub spec: Vec<String>,
    /// `inspect.partitions()`: `{"partition": {..}, "record_count": N, ..}`.
    pub partitions: Vec<Value>,
}

impl Read {
    /// The stored next offset per partition of `connector`, from the
    /// positions Idem keeps in the table's properties.
    pub fn positions(&self, connector: &str) -> BTreeMap<String, i64> {
        let prefix = format!("idem.position/{connector}/");
        self.properties
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| {
                let v: Value = serde_json::from_str(v).expect("a position");
                (
                    v["partition"].as_str().unwrap().to_string(),
                    v["next_offset"].as_i64().unwrap(),
                )
            })
            .collect()
    }
}

/// `scripts/{script} ARGS.. SQLALCHEMY_URL CATALOG WAREHOUSE TABLE`,
/// run by PyIceberg's interpreter with the test store's S3 settings, for
/// table `namespace.table` of `catalog` on the test PostgreSQL.
pub fn pyiceberg_command(
    script: &str,
    args: &[&str],
    catalog: &str,
    warehouse: &str,
    table: &str,
) -> std::process::Command {
    let url = pg_url().replacen("postgres://", "postgresql+psycopg2://", 1);
    command_at(&url, script, args, catalog, warehouse, table)
}

/// The test REST catalog (scripts/iceberg-rest.sh).
pub const REST_URI: &str = "http://127.0.0.1:8181";

/// The test store's Glue API (moto serves Glue beside S3, scripts/s3.sh).
/// It does not check the table version an update names, so the race
/// Glue settles that way is not covered by tests; the rest is.
pub const GLUE_ENDPOINT: &str = crate::s3::ENDPOINT;

/// The `[connectors.X.sink]` lines of an Iceberg sink on the test REST
/// catalog, its tables' files in `warehouse` on the test S3 store (the
/// REST server writes metadata files there too).
pub fn rest_sink_lines(warehouse: &str, table: &str) -> String {
    remote_sink_lines(
        warehouse,
        table,
        &format!("{{ type = \"rest\", uri = \"{REST_URI}\" }}"),
    )
}

/// The same on the test store's Glue.
pub fn glue_sink_lines(warehouse: &str, table: &str) -> String {
    remote_sink_lines(
        warehouse,
        table,
        &format!("{{ type = \"glue\", region = \"us-east-1\", endpoint = \"{GLUE_ENDPOINT}\" }}"),
    )
}

fn remote_sink_lines(warehouse: &str, table: &str, catalog: &str) -> String {
    let (namespace, table) = table.rsplit_once('.').expect("namespace.table");
    format!(
        "type = \"iceberg\"\nwarehouse = \"{warehouse}\"\nnamespace = \"{namespace}\"\ntable = \"{table}\"\ns3_endpoint = \"{}\"\ns3_path_style = true\ncatalog = {catalog}\n",
        crate::s3::ENDPOINT
    )
}

/// Table `namespace.table` of the test REST catalog, as PyIceberg's
/// RestCatalog reads it.
pub fn read_rest(warehouse: &str, table: &str) -> Read {
    let cmd = command_at(REST_URI, "iceberg-read.py", &[], "rest", warehouse, table);
    parse_read(&succeed(cmd, "iceberg-read.py"))
}

/// The same through PyIceberg's GlueCatalog on the test store's Glue.
pub fn read_glue(warehouse: &str, table: &str) -> Read {
    let url = format!("glue:{GLUE_ENDPOINT}");
    let cmd = command_at(&url, "iceberg-read.py", &[], "glue", warehouse, table);
    parse_read(&succeed(cmd, "iceberg-read.py"))
}

fn command_at(
    url: &str,
    script: &str,
    args: &[&str],
    catalog: &str,
    warehouse: &str,
    table: &str,
) -> std::process::Command {
    let home = std::env::var("HOME").unwrap_or_default();
    let venv = std::env::var("IDEM_ICEBERG_VENV")
        .unwrap_or_else(|_| format!("{home}/.cache/idem/iceberg/venv"));
    let script = format!("{}/../scripts/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut cmd = std::process::Command::new(format!("{venv}/bin/python"));
    cmd.arg(&script)
        .args(args)
        .args([url, catalog, warehouse, table])
        .env("IDEM_S3_ENDPOINT", crate::s3::ENDPOINT)
        .env("AWS_ACCESS_KEY_ID", "idem-test")
        .env("AWS_SECRET_ACCESS_KEY", "idem-test");
    cmd
}

/// [`pyiceberg_command`], which must succeed; its output.
fn pyiceberg(script: &str, args: &[&str], catalog: &str, warehouse: &str, table: &str) -> Vec<u8> {
    succeed(
        pyiceberg_command(script, args, catalog, warehouse, table),
        script,
    )
}

/// Run `cmd` (PyIceberg running `script`), which must succeed; its output.
fn succeed(mut cmd: std::process::Command, script: &str) -> Vec<u8> {
    let out = cmd
        .output()
        .expect("PyIceberg: install it with bash scripts/iceberg-tools.sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Append a copy of the table's first row in a snapshot of its own, as a
/// writer that duplicated a message would.
pub fn append_copy(catalog: &str, warehouse: &str, table: &str) {
    pyiceberg("iceberg-append-copy.py", &[], catalog, warehouse, table);
}

/// Table `namespace.table` of `catalog`, as PyIceberg reads it.
pub fn read(catalog: &str, warehouse: &str, table: &str) -> Read {
    read_args(&[], catalog, warehouse, table)
}

/// [`read`] with PyIceberg's row filter (`"id in ('a', 'b')"`): its scan
/// skips data files by the partition values their manifests give.
pub fn read_where(filter: &str, catalog: &str, warehouse: &str, table: &str) -> Read {
    read_args(&["--filter", filter], catalog, warehouse, table)
}

fn read_args(args: &[&str], catalog: &str, warehouse: &str, table: &str) -> Read {
    parse_read(&pyiceberg(
        "iceberg-read.py",
        args,
        catalog,
        warehouse,
        table,
    ))
}

fn parse_read(out: &[u8]) -> Read {
    let v: Value = serde_json::from_slice(out).expect("iceberg-read.py's JSON");
    let list = |key: &str| v[key].as_array().unwrap().clone();
    Read {
        rows: list("rows"),
        properties: v["properties"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect(),
        snapshots: v["snapshots"].as_u64().unwrap(),
        spec: list("spec")
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect(),
        partitions: list("partitions"),
    }
}
