//! Checks of a parsed config against this machine before anything starts,
//! for `idem run`, `check` and `verify`: each connector builds, its input
//! files exist, its dead-letter file can be a file, its Redis URL parses.
//! No network. A failure is a config mistake (exit 2), with file, line and
//! key, never a connector failing a minute into the run.

use crate::connector::Connector;
use crate::registry::Config;
use idem_config::{ConfigError, DeadLetterDestination, DedupStoreKind, Invalid};
use std::path::Path;

/// Every mistake of `config` (read from `path`) that this machine shows.
pub fn check(path: &Path, config: &Config) -> Result<(), ConfigError> {
    for (name, cfg) in &config.connectors {
        let at = |key: &[&str], message: String| {
            let mut full = vec!["connectors", name.as_str()];
            full.extend_from_slice(key);
            idem_config::invalid_at(path, Invalid::new(&full, message))
        };
        if let Err(e) = Connector::build(name, cfg.clone()) {
            return Err(at(&[], e.to_string()));
        }
        if let Err(e) = cfg.source.preflight() {
            let mut key = vec!["source"];
            key.extend(e.key.iter().map(String::as_str));
            return Err(at(&key, e.message));
        }
        if cfg.dead_letters.destination == DeadLetterDestination::File {
            let (key, file) = match (&cfg.dead_letters.path, &cfg.dead_letter) {
                (Some(p), _) => (&["dead_letters", "path"][..], Some(p)),
                (None, Some(p)) => (&["dead_letter"][..], Some(p)),
                (None, None) => (&[][..], None),
            };
            if let Some(file) = file.filter(|p| Path::new(p).is_dir()) {
                return Err(at(
                    key,
                    format!("`{file}` is a directory; name the dead-letter file, e.g. {file}/{name}.deadletter.jsonl"),
                ));
            }
        }
        if let Some(d) = &cfg.dedup {
            if d.store == DedupStoreKind::Redis {
                if let Some(url) = &d.url {
                    if let Err(message) = idem_dedup_store::check_redis_url(url.expose()) {
                        return Err(at(&["dedup", "url"], message));
                    }
                }
            }
        }
    }
    Ok(())
}
