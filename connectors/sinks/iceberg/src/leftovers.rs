//! Data files under a table's `data/` that no snapshot names: a batch's
//! files written and never committed (a crash between the two, a fenced
//! runner). Readers never see them; `idem verify` lists them, and the
//! table's orphan-file removal deletes them.

use crate::config::IcebergSinkConfig;
use iceberg::spec::ManifestList;
use iceberg::table::Table;
use std::collections::HashSet;

/// A file in the warehouse: its full location and size.
pub struct Listed {
    pub location: String,
    pub bytes: u64,
}

/// Every data and delete file any snapshot of `table` names: a file that
/// compaction removed from the current snapshot is still an older
/// snapshot's, and not a leftover.
pub async fn referenced(table: &Table) -> iceberg::Result<HashSet<String>> {
    let m = table.metadata();
    let io = table.file_io();
    let mut manifests = HashSet::new();
    let mut files = HashSet::new();
    for snapshot in m.snapshots() {
        let bytes = io.new_input(snapshot.manifest_list())?.read().await?;
        let list = ManifestList::parse_with_version(&bytes, m.format_version())?;
        for mf in list.entries() {
            if !manifests.insert(mf.manifest_path.clone()) {
                continue;
            }
            let manifest = mf.load_manifest(io).await?;
            for entry in manifest.entries() {
                files.insert(entry.file_path().to_string());
            }
        }
    }
    Ok(files)
}

/// The files under `location` (`s3://bucket/path` or `file:///path`), at
/// any depth (a partitioned table's files are in folders).
pub async fn list(cfg: &IcebergSinkConfig, location: &str) -> Result<Vec<Listed>, String> {
    let (op, scheme, path) = if let Some(rest) = location.strip_prefix("s3://") {
        let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut b = opendal::services::S3::default().root("/").bucket(bucket);
        if let Some(e) = &cfg.s3_endpoint {
            b = b.endpoint(e);
        }
        let region = cfg
            .s3_region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        b = b.region(&region);
        if !cfg.s3_path_style {
            b = b.enable_virtual_host_style();
        }
        let op = opendal::Operator::new(b)
            .map_err(|e| e.to_string())?
            .finish();
        (op, format!("s3://{bucket}/"), path.to_string())
    } else if let Some(path) = location.strip_prefix("file://") {
        let b = opendal::services::Fs::default().root("/");
        let op = opendal::Operator::new(b)
            .map_err(|e| e.to_string())?
            .finish();
        (
            op,
            "file:///".to_string(),
            path.trim_start_matches('/').to_string(),
        )
    } else {
        return Err(format!("cannot list {location}: not s3:// or file://"));
    };
    let dir = format!("{}/", path.trim_end_matches('/'));
    let entries = match op.list_with(&dir).recursive(true).await {
        Ok(e) => e,
        Err(e) if e.kind() == opendal::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("list {location}: {e}")),
    };
    Ok(entries
        .into_iter()
        .filter(|e| e.metadata().is_file())
        .map(|e| Listed {
            location: format!("{scheme}{}", e.path().trim_start_matches('/')),
            bytes: e.metadata().content_length(),
        })
        .collect())
}
