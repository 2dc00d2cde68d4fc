//! Idem's configuration: one TOML file, any number of connectors.
//!
//! Parsing is pure (no network, no files but the config itself): every
//! mistake is reported with the file, the line and the key before anything
//! starts. Strings may use `${ENV_VAR}`; secrets use [`Secret`], which
//! redacts itself in `Debug` and logs.

mod error;
pub use error::Invalid;
pub mod interp;
mod schema;

pub use error::ConfigError;
pub use interp::{interpolate, Secret};
pub use schema::*;

use serde::de::DeserializeOwned;
use std::path::Path;

/// Read, parse and validate a config file.
pub fn load<S, K>(path: &Path) -> Result<Config<S, K>, ConfigError>
where
    S: DeserializeOwned + Validate,
    K: DeserializeOwned + Validate,
{
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parse and validate config text; `path` only names the file in errors.
pub fn parse<S, K>(path: &Path, text: &str) -> Result<Config<S, K>, ConfigError>
where
    S: DeserializeOwned + Validate,
    K: DeserializeOwned + Validate,
{
    let de = toml::de::Deserializer::parse(text)
        .map_err(|e| error::from_toml(path, text, &e, Vec::new()))?;
    let config: Config<S, K> = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e
            .path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                _ => None,
            })
            .collect();
        error::from_toml(path, text, e.inner(), key)
    })?;
    if let Err(invalid) = config.validate() {
        return Err(error::from_invalid(path, text, invalid));
    }
    Ok(config)
}
