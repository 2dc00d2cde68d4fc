//! File source: newline-delimited JSON files, one partition per file.
//!
//! A message's offset is the byte offset of its line, so a position stays
//! valid across restarts as long as the file is only appended to. Batch mode
//! reads every matched file to its end; `follow = true` tails them (and
//! picks up new files matching the glob), like a sidecar shipping an
//! application's event log. Positions live in the sink, never here.

mod config;
mod source;

pub use config::FileSourceConfig;
pub use source::FileSource;

/// The `file` source's registry entry.
pub struct FileKind;

impl idem_core::registry::SourceKind for FileKind {
    const NAME: &'static str = "file";
    type Config = FileSourceConfig;

    fn build(cfg: &FileSourceConfig) -> std::sync::Arc<dyn idem_core::Source> {
        std::sync::Arc::new(FileSource::new(cfg.clone()))
    }

    fn is_bounded(cfg: &FileSourceConfig) -> bool {
        !cfg.follow
    }

    /// A file source that ends by itself must find a file at start; a
    /// followed one waits for files to appear.
    fn preflight(cfg: &FileSourceConfig) -> Result<(), idem_config::Invalid> {
        let matched = glob::glob(&cfg.path)
            .map(|paths| paths.flatten().any(|p| p.is_file()))
            .unwrap_or(false);
        if matched || cfg.follow {
            return Ok(());
        }
        Err(idem_config::Invalid::new(
            &["path"],
            format!(
                "no file matches `{}` (relative paths start from the working directory {})",
                cfg.path,
                std::env::current_dir().map_or_else(|_| "?".into(), |d| d.display().to_string())
            ),
        ))
    }
}
