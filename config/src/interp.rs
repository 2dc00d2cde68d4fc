//! `${ENV_VAR}` interpolation inside string values, applied to the parsed
//! document before it is deserialized, so an unset variable is reported at
//! its key and line. `$${` writes a literal `${`. `${VAR:-default}` falls
//! back to a default.

use serde::{Deserialize, Deserializer};
use std::fmt;

/// Expand `${VAR}` in `raw` with `lookup`.
pub fn interpolate(raw: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(literal) = after.strip_prefix("${") {
            out.push_str("${");
            rest = literal;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in {raw:?}"))?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid environment variable name {name:?}"));
            }
            match (lookup(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set (use ${{{name}:-default}} for a fallback)"
                    ))
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Where an expansion failed: the key path from the document's root, the
/// value's byte span and what is wrong.
pub(crate) struct Unexpanded {
    pub key: Vec<String>,
    pub span: std::ops::Range<usize>,
    pub message: String,
}

/// Expand `${VAR}` in every string value of a parsed document (keys stay
/// as written), so that any string in any section, a sink's or a source's
/// included, may use it: no field can forget to.
pub(crate) fn expand_document(
    root: &mut toml::de::DeTable<'_>,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<(), Unexpanded> {
    let mut key = Vec::new();
    expand_table(root, lookup, &mut key)
}

fn expand_table(
    table: &mut toml::de::DeTable<'_>,
    lookup: &impl Fn(&str) -> Option<String>,
    key: &mut Vec<String>,
) -> Result<(), Unexpanded> {
    for (k, v) in table.iter_mut() {
        key.push(k.get_ref().to_string());
        expand_value(v, lookup, key)?;
        key.pop();
    }
    Ok(())
}

fn expand_value(
    value: &mut toml::Spanned<toml::de::DeValue<'_>>,
    lookup: &impl Fn(&str) -> Option<String>,
    key: &mut Vec<String>,
) -> Result<(), Unexpanded> {
    use toml::de::DeValue;
    let span = value.span();
    match value.get_mut() {
        DeValue::String(s) if s.contains('$') => {
            let expanded = interpolate(s, lookup).map_err(|message| Unexpanded {
                key: key.clone(),
                span,
                message,
            })?;
            *s = expanded.into();
        }
        DeValue::Table(t) => expand_table(t, lookup, key)?,
        DeValue::Array(a) => {
            for (i, item) in a.iter_mut().enumerate() {
                key.push(i.to_string());
                expand_value(item, lookup, key)?;
                key.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

/// Like `String`, for a URL that may carry credentials (a password, a
/// token parameter): they are registered with [`crate::redact`].
pub fn url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    crate::redact::register_url(&value);
    Ok(value)
}

/// A secret (password, token, URL with credentials). Interpolated like any
/// string; `Debug` and `Display` print `***`, so it never reaches a log.
/// The credentials inside a URL are registered with [`crate::redact`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A URL's password and secret parameters are hidden from every
        // output from now on (see `redact`).
        let value = String::deserialize(d)?;
        crate::redact::register_url(&value);
        Ok(Secret(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "USER" => Some("idem".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_defaults_and_escapes() {
        assert_eq!(interpolate("a ${USER} b", env).unwrap(), "a idem b");
        assert_eq!(interpolate("${NOPE:-x}", env).unwrap(), "x");
        assert_eq!(interpolate("${EMPTY:-x}", env).unwrap(), "");
        assert_eq!(interpolate("$${USER} $5", env).unwrap(), "${USER} $5");
        assert_eq!(interpolate("no vars", env).unwrap(), "no vars");
    }

    #[test]
    fn unset_and_malformed_variables_are_errors() {
        let err = interpolate("${NOPE}", env).unwrap_err();
        assert!(err.contains("NOPE is not set"), "{err}");
        assert!(interpolate("${USER", env).is_err());
        assert!(interpolate("${BAD-NAME}", env).is_err());
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        assert_eq!(s.expose(), "hunter2");
    }
}
