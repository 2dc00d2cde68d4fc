use std::path::{Path, PathBuf};

/// A config mistake, located in its file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax, unknown key, wrong type, missing key, unset `${VAR}`.
    #[error("{path}:{line}: {}{message}", if key.is_empty() { String::new() } else { format!("key `{key}`: ") })]
    Parse {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    /// Parsed, but the values do not make sense together.
    #[error("{path}:{line}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// A validation failure before it is located: the key path and what is wrong.
#[derive(Debug)]
pub struct Invalid {
    pub key: Vec<String>,
    pub message: String,
    /// `key` starts at the connector, not at the section that reported it:
    /// a source or sink refusing one of the connector's `[[columns]]`.
    pub connector_relative: bool,
}

impl Invalid {
    pub fn new(key: &[&str], message: impl Into<String>) -> Self {
        Invalid {
            key: key.iter().map(|s| s.to_string()).collect(),
            message: message.into(),
            connector_relative: false,
        }
    }

    /// `field` of the connector's column number `index` (from 0).
    pub fn column(index: usize, field: &str, message: impl Into<String>) -> Self {
        Invalid {
            key: vec!["columns".into(), index.to_string(), field.into()],
            message: message.into(),
            connector_relative: true,
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Locate a parse error. Spans are lost inside `type`-tagged sections, so
/// the line is the most specific of: the error's span, the key path serde
/// reached (plus the unknown field it names).
pub(crate) fn from_toml(
    path: &Path,
    text: &str,
    err: &toml::de::Error,
    mut key: Vec<String>,
) -> ConfigError {
    let message = err.message().trim_end().to_string();
    let mut line = err.span().map_or(1, |span| line_col(text, span.start).0);
    if let Some(field) = between(&message, "unknown field `", "`") {
        if key.last().map(String::as_str) != Some(field) {
            key.push(field.to_string());
        }
    }
    if !key.is_empty() {
        line = line.max(locate(text, &key));
    }
    ConfigError::Parse {
        path: path.to_path_buf(),
        line,
        key: key.join("."),
        message,
    }
}

/// A mistake in the value at `span` (bytes into `text`), under `key`.
pub(crate) fn at_span(
    path: &Path,
    text: &str,
    span: std::ops::Range<usize>,
    key: Vec<String>,
    message: String,
) -> ConfigError {
    ConfigError::Parse {
        path: path.to_path_buf(),
        line: line_col(text, span.start).0,
        key: key.join("."),
        message,
    }
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &s[s.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// The line of the deepest part of `key` that exists in the document.
fn locate(text: &str, key: &[String]) -> usize {
    let mut line = 1;
    if let Ok(doc) = toml_edit::Document::parse(text) {
        walk_table(doc.as_table(), key, text, &mut line);
    }
    line
}

fn walk_table(table: &dyn toml_edit::TableLike, key: &[String], text: &str, line: &mut usize) {
    let Some((first, rest)) = key.split_first() else {
        return;
    };
    let Some((k, item)) = table.get_key_value(first) else {
        return;
    };
    if let Some(span) = k.span() {
        *line = line_col(text, span.start).0;
    }
    walk_item(item, rest, text, line);
}

fn walk_item(item: &toml_edit::Item, key: &[String], text: &str, line: &mut usize) {
    use toml_edit::{Item, Value};
    let index = key.first().and_then(|k| k.parse::<usize>().ok());
    match (item, index) {
        (Item::Table(t), _) => walk_table(t, key, text, line),
        (Item::Value(Value::InlineTable(t)), _) => walk_table(t, key, text, line),
        (Item::ArrayOfTables(a), Some(i)) => {
            if let Some(t) = a.get(i) {
                if let Some(span) = t.span() {
                    *line = line_col(text, span.start).0;
                }
                walk_table(t, &key[1..], text, line);
            }
        }
        (Item::Value(Value::Array(a)), Some(i)) => {
            if let Some(v) = a.get(i) {
                if let Some(span) = v.span() {
                    *line = line_col(text, span.start).0;
                }
                if let Value::InlineTable(t) = v {
                    walk_table(t, &key[1..], text, line);
                }
            }
        }
        _ => {}
    }
}

pub(crate) fn from_invalid(path: &Path, text: &str, invalid: Invalid) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line: locate(text, &invalid.key),
        key: invalid.key.join("."),
        message: invalid.message,
    }
}
