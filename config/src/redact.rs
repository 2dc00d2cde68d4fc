//! Secrets never reach an output: every text Idem prints (logs human and
//! JSON, errors, summaries, the admin API, dead-letter reasons) passes
//! through [`text`], which hides
//! - the password (or whole userinfo) of anything shaped like a URL
//!   authority, `scheme://user:PW@host`, malformed ones too
//!   (`redis//:PW@host`), and a password holding an unencoded `@`;
//! - the values of well-known secret parameters (`?password=`, `token=`,
//!   `X-Amz-Signature=`, ...), in URLs and in `key=value` strings;
//! - every secret value [`register`]ed by the config (tokens, passwords
//!   from URLs), wherever it appears, when it is at least
//!   [`MIN_REGISTERED`] bytes long (a shorter one would hide ordinary words;
//!   it is still hidden in its URL).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::RwLock;

/// What a hidden secret is replaced with.
pub const MASK: &str = "***";

/// Registered secrets shorter than this are not searched for on their own.
pub const MIN_REGISTERED: usize = 6;

static SECRETS: RwLock<BTreeSet<String>> = RwLock::new(BTreeSet::new());

/// Parameter names whose values are secrets (compared case-insensitively).
const SECRET_PARAMS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "pass",
    "secret",
    "client_secret",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "auth",
    "auth_token",
    "authorization",
    "api_key",
    "apikey",
    "api-key",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "sslpassword",
];

/// Remember `secret` so that [`text`] hides it anywhere.
pub fn register(secret: &str) {
    if secret.len() < MIN_REGISTERED {
        return;
    }
    if let Ok(mut set) = SECRETS.write() {
        set.insert(secret.to_string());
        // A URL's password is often printed decoded, or encoded.
        if let Ok(decoded) = percent_decode(secret) {
            if decoded.len() >= MIN_REGISTERED {
                set.insert(decoded);
            }
        }
    }
}

/// Remember the secrets inside a URL (its password and secret parameters).
pub fn register_url(url: &str) {
    for (start, end) in userinfo_secrets(url) {
        register(&url[start..end]);
    }
    for (start, end) in param_secrets(url) {
        register(&url[start..end]);
    }
}

/// `s` with every secret hidden.
pub fn text(s: &str) -> Cow<'_, str> {
    let mut spans: Vec<(usize, usize)> = userinfo_secrets(s);
    spans.extend(param_secrets(s));
    let mut out = if spans.is_empty() {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(mask_spans(s, spans))
    };
    if let Ok(set) = SECRETS.read() {
        for secret in set.iter().rev() {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), MASK));
            }
        }
    }
    out
}

fn mask_spans(s: &str, mut spans: Vec<(usize, usize)>) -> String {
    spans.sort_unstable();
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    for (start, end) in spans {
        if start < at {
            continue;
        }
        out.push_str(&s[at..start]);
        out.push_str(MASK);
        at = end;
    }
    out.push_str(&s[at..]);
    out
}

/// Bytes that end a URL authority (or a parameter value) in running text.
fn ends_token(b: u8) -> bool {
    b.is_ascii_whitespace() || matches!(b, b'"' | b'\'' | b'<' | b'>' | b'`' | b'\\')
}

/// Spans of secrets in `//userinfo@host`: the password after the first `:`
/// (the user name stays), or the whole userinfo when it has no `:`. The
/// authority runs to the next `/`, `?`, `#` or blank; its last `@` ends the
/// userinfo, so a password with a raw `@` is hidden whole.
fn userinfo_secrets(s: &str) -> Vec<(usize, usize)> {
    let bytes = s.as_bytes();
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(found) = s[from..].find("//") {
        let start = from + found + 2;
        let end = bytes[start..]
            .iter()
            .position(|&b| ends_token(b) || matches!(b, b'/' | b'?' | b'#'))
            .map_or(bytes.len(), |n| start + n);
        if let Some(at) = s[start..end].rfind('@') {
            let userinfo = start..start + at;
            match s[userinfo.clone()].find(':') {
                Some(colon) if userinfo.start + colon + 1 < userinfo.end => {
                    spans.push((userinfo.start + colon + 1, userinfo.end))
                }
                Some(_) => {}
                None if !userinfo.is_empty() => spans.push((userinfo.start, userinfo.end)),
                None => {}
            }
        }
        from = end.max(start);
    }
    spans
}

/// Spans of the values of secret parameters: `name=value` where `name` is
/// in [`SECRET_PARAMS`] and starts the text or follows `?`, `&`, `;`, `,`
/// or a blank; the value runs to `&`, `;`, `#` or a blank.
fn param_secrets(s: &str) -> Vec<(usize, usize)> {
    let bytes = s.as_bytes();
    let mut spans = Vec::new();
    for (eq, _) in s.match_indices('=') {
        let name_start = bytes[..eq]
            .iter()
            .rposition(|&b| ends_token(b) || matches!(b, b'?' | b'&' | b';' | b','))
            .map_or(0, |n| n + 1);
        let name = &s[name_start..eq];
        if !SECRET_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(name)) {
            continue;
        }
        let value_start = eq + 1;
        let value_end = bytes[value_start..]
            .iter()
            .position(|&b| ends_token(b) || matches!(b, b'&' | b';' | b'#'))
            .map_or(bytes.len(), |n| value_start + n);
        if value_end > value_start {
            spans.push((value_start, value_end));
        }
    }
    spans
}

fn percent_decode(s: &str) -> Result<String, ()> {
    if !s.contains('%') {
        return Err(());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_hidden_user_names_kept() {
        assert_eq!(
            text("POST http://user:PW1@host:8080/x failed"),
            "POST http://user:***@host:8080/x failed"
        );
        assert_eq!(
            text("postgres://idem:p@ss@127.0.0.1/db"),
            "postgres://idem:***@127.0.0.1/db"
        );
        assert_eq!(
            text("bad url redis//:PW2@127.0.0.1:6379/0"),
            "bad url redis//:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            text("https://ghp_tok3n@github.com/x"),
            "https://***@github.com/x"
        );
        assert_eq!(text("http://host/a?mail=a@b"), "http://host/a?mail=a@b");
        assert_eq!(
            text("\"url\":\"http://u:PW4@h/\""),
            "\"url\":\"http://u:***@h/\""
        );
        assert_eq!(text("no url here"), "no url here");
    }

    #[test]
    fn secret_parameters_are_hidden() {
        assert_eq!(
            text("redis://h:6379/?password=PW3&db=1"),
            "redis://h:6379/?password=***&db=1"
        );
        assert_eq!(
            text("host=h user=u password=PW5 dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(
            text("GET /o?X-Amz-Signature=abcd&x=1"),
            "GET /o?X-Amz-Signature=***&x=1"
        );
        assert_eq!(text("offset=10 partition=a"), "offset=10 partition=a");
    }

    #[test]
    fn registered_secrets_are_hidden_anywhere() {
        register("s3cr3t-t0ken-value");
        register("abc"); // too short to look for on its own
        assert_eq!(
            text("header said s3cr3t-t0ken-value, abc"),
            "header said ***, abc"
        );
        register_url("http://u:p%40ssw0rd@host/");
        assert_eq!(text("p@ssw0rd and p%40ssw0rd"), "*** and ***");
    }
}
