use idem_config::{ColumnConfig, Invalid, Validate};
use serde::Deserialize;
use std::time::Duration;

/// `[connectors.NAME.source]` with `type = "file"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// A file, or a glob such as `logs/*.jsonl`. Each file is a partition,
    /// named by its absolute path.
    pub path: String,
    /// Keep reading as files grow and new ones appear, instead of finishing
    /// at their end.
    #[serde(default)]
    pub follow: bool,
    /// When following: how often to look for new lines and new files.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A longer line goes to the dead letters instead of being parsed.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
}

fn default_poll_interval() -> Duration {
    Duration::from_millis(250)
}

fn default_max_line_bytes() -> usize {
    1024 * 1024
}

impl Validate for FileSourceConfig {
    fn validate(&self, _columns: &[ColumnConfig]) -> Result<(), Invalid> {
        if self.path.trim().is_empty() {
            return Err(Invalid::new(&["path"], "must name a file or a glob"));
        }
        if let Err(e) = glob::Pattern::new(&self.path) {
            return Err(Invalid::new(&["path"], format!("not a valid glob: {e}")));
        }
        if self.max_line_bytes == 0 {
            return Err(Invalid::new(&["max_line_bytes"], "must be at least 1"));
        }
        Ok(())
    }
}
