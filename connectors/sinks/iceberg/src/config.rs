//! The `[connectors.X.sink]` section of `type = "iceberg"`.

use idem_config::{ColumnConfig, Invalid, Validate};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcebergSinkConfig {
    /// Where the table's metadata pointer lives.
    pub catalog: CatalogConfig,
    /// Where new tables put their data and metadata files:
    /// `s3://bucket/prefix` or `file:///absolute/path`.
    pub warehouse: String,
    /// The table's namespace (dot-separated levels).
    pub namespace: String,
    pub table: String,
    /// Create the namespace and the table from the connector's columns when
    /// missing; `false` makes a missing table an error at start.
    #[serde(default = "yes")]
    pub create: bool,
    /// For an `s3://` warehouse on another store than AWS (MinIO, ...).
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    #[serde(default)]
    pub s3_region: Option<String>,
    #[serde(default)]
    pub s3_path_style: bool,
    /// How long batches' data files wait to be committed: one snapshot
    /// then adds every partition's staged files and moves their positions.
    /// `"0s"`: a snapshot per batch.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: std::time::Duration,
    /// The partition spec of a table Idem creates, e.g.
    /// `["day(placed_at)", "bucket(16, order_id)"]`; an existing table's
    /// spec must be this one. Empty: a new table is unpartitioned and an
    /// existing one is written by its own spec.
    #[serde(default)]
    pub partition_by: Vec<String>,
}

impl IcebergSinkConfig {
    /// `partition_by`, parsed (checked by `validate`).
    pub fn partition_fields(&self) -> Result<Vec<crate::partition::PartitionBy>, String> {
        self.partition_by
            .iter()
            .map(|f| crate::partition::parse(f))
            .collect()
    }
}

fn default_commit_interval() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum CatalogConfig {
    /// The JDBC/SQL catalog layout (`iceberg_tables`,
    /// `iceberg_namespace_properties`) in a PostgreSQL database, as
    /// PyIceberg's `SqlCatalog` and Iceberg's `JdbcCatalog` keep it.
    Sql {
        url: String,
        /// The catalog's name: the `catalog_name` of its rows.
        #[serde(default = "default_catalog_name")]
        name: String,
        /// Server-side `idle_in_transaction_session_timeout`: a runner
        /// frozen while it holds a table's row lock (mid-commit) releases
        /// it after this long, so other writers of the table go on.
        #[serde(
            default = "default_idle_in_transaction_timeout",
            with = "humantime_serde"
        )]
        idle_in_transaction_timeout: std::time::Duration,
    },
    /// An Iceberg REST catalog (Polaris, Unity, Lakekeeper, Nessie, AWS
    /// Glue's and S3 Tables' REST endpoints, ...).
    Rest {
        #[serde(deserialize_with = "idem_config::interp::url")]
        uri: String,
        /// The warehouse the catalog serves, if it serves several.
        #[serde(default)]
        warehouse: Option<String>,
        /// A bearer token.
        #[serde(default)]
        token: Option<idem_config::Secret>,
        /// OAuth2 client credentials, `client_id:client_secret`.
        #[serde(default)]
        credential: Option<idem_config::Secret>,
        /// More of the REST client's properties (`oauth2-server-uri`,
        /// `scope`, `header.X-Name`, ...).
        #[serde(default)]
        properties: std::collections::BTreeMap<String, idem_config::Secret>,
    },
    /// AWS Glue's Data Catalog through Glue's own API; credentials from
    /// the usual AWS chain (variables, profile, instance or task role).
    Glue {
        /// The catalog's region (else `AWS_REGION` or the profile's).
        #[serde(default)]
        region: Option<String>,
        /// Another account's catalog (its account id).
        #[serde(default)]
        catalog_id: Option<String>,
        /// A profile of `~/.aws/config`.
        #[serde(default)]
        profile: Option<String>,
        /// Another endpoint than AWS's public one (a VPC endpoint).
        #[serde(default)]
        endpoint: Option<String>,
    },
}

fn yes() -> bool {
    true
}

fn default_idle_in_transaction_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

fn default_catalog_name() -> String {
    "idem".into()
}

impl Validate for IcebergSinkConfig {
    fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid> {
        if !(self.warehouse.starts_with("s3://") || self.warehouse.starts_with("file:///")) {
            return Err(Invalid::new(
                &["warehouse"],
                "must be s3://bucket/prefix or file:///absolute/path",
            ));
        }
        for (key, value) in [("namespace", &self.namespace), ("table", &self.table)] {
            if value.trim().is_empty() {
                return Err(Invalid::new(&[key], "must not be empty"));
            }
        }
        if matches!(self.catalog, CatalogConfig::Glue { .. }) && self.namespace.contains('.') {
            return Err(Invalid::new(
                &["namespace"],
                "a Glue catalog's namespace is one Glue database: a name without dots",
            ));
        }
        if columns.is_empty() {
            return Err(Invalid::new(
                &[],
                "the iceberg sink needs [[columns]] (the table's schema is made from them)",
            ));
        }
        if let Some(c) = columns
            .iter()
            .find(|c| c.name == crate::schema::PARTITION || c.name == crate::schema::OFFSET)
        {
            return Err(Invalid::new(
                &["columns"],
                format!("`{}` is written by Idem itself", c.name),
            ));
        }
        let fields = self
            .partition_fields()
            .map_err(|e| Invalid::new(&["partition_by"], e))?;
        if !fields.is_empty() {
            let schema = crate::schema::table_schema(columns)
                .map_err(|e| Invalid::new(&["columns"], e.message().to_string()))?;
            crate::partition::spec(&schema, &fields)
                .map_err(|e| Invalid::new(&["partition_by"], e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(namespace: &str, catalog: &str) -> IcebergSinkConfig {
        toml::from_str(&format!(
            "warehouse = \"s3://lake/w\"\nnamespace = \"{namespace}\"\ntable = \"t\"\ncatalog = {catalog}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_glue_catalog_takes_its_settings_and_a_one_level_namespace() {
        let columns: Vec<ColumnConfig> =
            vec![toml::from_str("name = \"id\"\ntype = \"text\"").unwrap()];
        let cfg = parse(
            "sales",
            r#"{ type = "glue", region = "eu-west-1", catalog_id = "123456789012", endpoint = "https://glue.example" }"#,
        );
        match &cfg.catalog {
            CatalogConfig::Glue {
                region,
                catalog_id,
                profile,
                endpoint,
            } => assert_eq!(
                (region, catalog_id, profile, endpoint),
                (
                    &Some("eu-west-1".to_string()),
                    &Some("123456789012".to_string()),
                    &None,
                    &Some("https://glue.example".to_string())
                )
            ),
            other => panic!("{other:?}"),
        }
        assert!(cfg.validate(&columns).is_ok());
        let nested = parse("sales.eu", r#"{ type = "glue" }"#);
        let err = nested.validate(&columns).unwrap_err();
        assert!(format!("{err:?}").contains("namespace"), "{err:?}");
        // Any other catalog takes levels.
        let rest = parse("sales.eu", r#"{ type = "rest", uri = "http://c" }"#);
        assert!(rest.validate(&columns).is_ok());
    }
}
