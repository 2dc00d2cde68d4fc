//! Writer schemas from a schema registry with the Confluent REST API
//! (`[connectors.NAME.registry]`): each id a chunk of messages names is
//! fetched once, before the chunk is mapped, with the connector's retries.
//! A registry that cannot be reached is transient (retried, never a dead
//! letter); an id it does not know, or refused credentials, stop the
//! connector with what to check.

use crate::retry::{retry_transient, Retriable};
use crate::stats::Stats;
use idem_config::{RegistryConfig, RetryConfig};
use idem_core::mapping::avro::AvroSchema;
use idem_core::mapping::protobuf::ProtoFile;
use idem_core::mapping::registry::{wire_format, RegistrySchemas, Writer};
use idem_core::Message;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry {url}: schema id {id}: {reason}")]
    Unreachable {
        url: String,
        id: u32,
        reason: String,
    },
    #[error("schema registry {url} answered HTTP {status} for schema id {id}{hint}: {body}")]
    Status {
        url: String,
        id: u32,
        status: u16,
        hint: &'static str,
        body: String,
    },
    #[error("schema id {id} is not in the schema registry at {url}: is it the registry the producers write to?")]
    NotFound { url: String, id: u32 },
    #[error("schema id {id} from the schema registry at {url}: {reason}")]
    Unreadable {
        url: String,
        id: u32,
        reason: String,
    },
}

impl Retriable for RegistryError {
    fn is_retriable(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Status { status, .. } => {
                *status >= 500 || matches!(status, 408 | 425 | 429)
            }
            RegistryError::NotFound { .. } | RegistryError::Unreadable { .. } => false,
        }
    }
}

/// One connector's registry: its client and the schemas fetched so far.
pub struct Registry {
    url: String,
    http: reqwest::Client,
    auth: Auth,
    pub schemas: Arc<RegistrySchemas>,
    /// Held while an id is fetched: chunks mapped side by side that name
    /// the same new id ask for it once.
    fetching: tokio::sync::Mutex<()>,
}

enum Auth {
    None,
    Basic(String, String),
    Bearer(String),
}

impl Registry {
    /// The client for `cfg` (no request yet). `Err`: a CA file that cannot
    /// be read or is not PEM.
    pub fn new(cfg: &RegistryConfig) -> Result<Registry, String> {
        // A password in the URL itself is hidden from every output too.
        idem_config::redact::register_url(&cfg.url);
        let mut http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(concat!("idem/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("registry.ca_file `{path}`: {e}"))?;
            let not_pem =
                |why: String| format!("registry.ca_file `{path}` is not a PEM certificate: {why}");
            let cas =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| not_pem(e.to_string()))?;
            if cas.is_empty() {
                return Err(not_pem("it holds no CERTIFICATE block".into()));
            }
            for ca in cas {
                http = http.add_root_certificate(ca);
            }
        }
        let auth = match (&cfg.username, &cfg.password, &cfg.token) {
            (Some(user), Some(password), _) => {
                idem_config::redact::register(password.expose());
                Auth::Basic(user.clone(), password.expose().to_string())
            }
            (_, _, Some(token)) => {
                idem_config::redact::register(token.expose());
                Auth::Bearer(token.expose().to_string())
            }
            _ => Auth::None,
        };
        Ok(Registry {
            url: cfg.url.trim_end_matches('/').to_string(),
            http: http.build().map_err(|e| format!("registry: {e}"))?,
            auth,
            schemas: Arc::default(),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.get(format!("{}{path}", self.url)).header(
            "Accept",
            "application/vnd.schemaregistry.v1+json, application/json",
        );
        match &self.auth {
            Auth::None => request,
            Auth::Basic(user, password) => request.basic_auth(user, Some(password)),
            Auth::Bearer(token) => request.bearer_auth(token),
        }
    }

    /// The schema registered under `id` (Avro or Protobuf).
    pub async fn fetch(&self, id: u32) -> Result<Writer, RegistryError> {
        let url = self.url.clone();
        let unreachable = |e: reqwest::Error| RegistryError::Unreachable {
            url: url.clone(),
            id,
            reason: error_chain(&e),
        };
        let response = self
            .get(&format!("/schemas/ids/{id}"))
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(unreachable)?;
        let unreadable = |reason: String| RegistryError::Unreadable {
            url: url.clone(),
            id,
            reason,
        };
        match status {
            200 => {}
            404 => return Err(RegistryError::NotFound { url, id }),
            _ => {
                return Err(RegistryError::Status {
                    hint: if matches!(status, 401 | 403) {
                        " (check registry.username and password, or token)"
                    } else {
                        ""
                    },
                    url,
                    id,
                    status,
                    body: body.chars().take(300).collect(),
                })
            }
        }
        let answer: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| unreadable(format!("the answer is not JSON: {e}")))?;
        let kind = answer["schemaType"].as_str().unwrap_or("AVRO");
        if !matches!(kind, "AVRO" | "PROTOBUF") {
            return Err(unreadable(format!(
                "a {kind} schema; Idem reads Avro and Protobuf values from a registry (JSON behind the registry's prefix is format = \"json_schema\")"
            )));
        }
        if answer["references"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
        {
            return Err(unreadable(
                "it references other subjects' schemas, which Idem does not read yet".into(),
            ));
        }
        let text = answer["schema"]
            .as_str()
            .ok_or_else(|| unreadable("the answer has no `schema`".into()))?;
        if kind == "PROTOBUF" {
            return ProtoFile::compile(text)
                .map(Writer::Protobuf)
                .map_err(unreadable);
        }
        AvroSchema::parse(text)
            .map(|s| Writer::Avro(Box::new(s)))
            .map_err(|e| unreadable(format!("not an Avro schema: {e}")))
    }

    /// Fetch every schema id that `msgs` name and that is not kept yet.
    /// `Err((offset, reason))`: the first message whose schema cannot be
    /// had (after retries on transient errors), which stops the connector.
    pub async fn fetch_for(
        &self,
        msgs: &[Message],
        retry: &RetryConfig,
        stats: &Stats,
        stop: &CancellationToken,
    ) -> Result<(), (u64, String)> {
        for msg in msgs {
            let Some(Ok((id, _))) = msg.value.as_deref().map(wire_format) else {
                continue;
            };
            if self.schemas.get(id).is_some() {
                continue;
            }
            let _one_at_a_time = self.fetching.lock().await;
            if self.schemas.get(id).is_some() {
                continue; // fetched while this chunk waited
            }
            let what = format!("fetch schema id {id} from the registry");
            match retry_transient(retry, stats, &what, stop, || self.fetch(id)).await {
                Ok(schema) => self.schemas.insert(id, schema),
                Err(e) => return Err((msg.offset, e.to_string())),
            }
        }
        Ok(())
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// `idem check`: the registry answers, with these credentials; the
    /// number of subjects it holds.
    pub async fn ping(&self) -> Result<usize, String> {
        let response = self
            .get("/subjects")
            .send()
            .await
            .map_err(|e| format!("schema registry {}: {}", self.url, error_chain(&e)))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!(
                "schema registry {} answered HTTP {status} to GET /subjects: {}",
                self.url,
                body.chars().take(300).collect::<String>()
            ));
        }
        serde_json::from_str::<Vec<String>>(&body)
            .map(|s| s.len())
            .map_err(|e| {
                format!(
                    "schema registry {}: GET /subjects is not a list of subjects: {e}",
                    self.url
                )
            })
    }
}

/// An error with its causes, which reqwest keeps apart ("error sending
/// request": connection refused).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
pub(crate) mod tests {
    //! Against a stand-in registry on 127.0.0.1 that answers as the
    //! Confluent REST API documents (no registry server is installed for
    //! the tests); what it is asked is recorded.
    use super::*;
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::Mutex;
    use std::time::Duration;

    const V1: &str =
        r#"{"type": "record", "name": "R", "fields": [{"name": "id", "type": "long"}]}"#;

    #[derive(Default)]
    pub(crate) struct Stand {
        /// The answer to a path, before `answers`.
        pub(crate) by_path: Mutex<std::collections::HashMap<String, (u16, String)>>,
        /// The answers, in turn; the last one repeats.
        answers: Mutex<Vec<(u16, String)>>,
        /// Each request's path and Authorization header.
        pub(crate) asked: Mutex<Vec<(String, String)>>,
    }

    async fn answer(
        State(stand): State<Arc<Stand>>,
        uri: axum::http::Uri,
        headers: HeaderMap,
    ) -> (StatusCode, String) {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        stand
            .asked
            .lock()
            .unwrap()
            .push((uri.path().to_string(), auth));
        if let Some((status, body)) = stand.by_path.lock().unwrap().get(uri.path()) {
            return (StatusCode::from_u16(*status).unwrap(), body.clone());
        }
        let mut answers = stand.answers.lock().unwrap();
        let (status, body) = if answers.len() > 1 {
            answers.remove(0)
        } else {
            answers[0].clone()
        };
        (StatusCode::from_u16(status).unwrap(), body)
    }

    /// A stand-in registry giving `answers` in turn; its URL.
    pub(crate) async fn stand_in(answers: &[(u16, &str)]) -> (Arc<Stand>, String) {
        let stand = Arc::new(Stand::default());
        *stand.answers.lock().unwrap() = answers.iter().map(|(s, b)| (*s, b.to_string())).collect();
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(stand.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (stand, url)
    }

    fn config(url: &str, extra: &str) -> RegistryConfig {
        #[derive(serde::Deserialize)]
        struct Wrap {
            registry: RegistryConfig,
        }
        toml::from_str::<Wrap>(&format!("[registry]\nurl = \"{url}/\"\n{extra}"))
            .unwrap()
            .registry
    }

    pub(crate) fn schema_answer(schema: &str) -> String {
        serde_json::json!({ "schema": schema }).to_string()
    }

    fn framed(id: u32) -> Message {
        let mut value = vec![0];
        value.extend(id.to_be_bytes());
        value.push(10); // the long 5
        Message {
            offset: u64::from(id),
            next_offset: u64::from(id) + 1,
            key: None,
            value: Some(value),
            poison: None,
            meta: Default::default(),
        }
    }

    /// Fetch the schemas of `msgs` with quick retries.
    async fn fetch(r: &Registry, msgs: &[Message]) -> Result<(), (u64, String)> {
        r.fetch_for(msgs, &quick(), &Stats::default(), &CancellationToken::new())
            .await
    }

    fn quick() -> RetryConfig {
        RetryConfig {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        }
    }

    #[tokio::test]
    async fn each_id_is_fetched_once_with_the_credentials() {
        let (stand, url) = stand_in(&[(200, &schema_answer(V1))]).await;
        let r =
            Registry::new(&config(&url, "username = \"u\"\npassword = \"p4ssw0rd-x\"")).unwrap();
        let msgs = [framed(7), framed(7), framed(9)];
        fetch(&r, &msgs).await.unwrap();
        fetch(&r, &msgs).await.unwrap();
        assert!(r.schemas.get(7).is_some() && r.schemas.get(9).is_some());
        let asked = stand.asked.lock().unwrap().clone();
        let paths: Vec<&str> = asked.iter().map(|a| a.0.as_str()).collect();
        assert_eq!(paths, ["/schemas/ids/7", "/schemas/ids/9"]);
        // Basic auth: base64 of "u:p4ssw0rd-x".
        assert_eq!(asked[0].1, "Basic dTpwNHNzdzByZC14");
        let (stand, url) = stand_in(&[(200, &schema_answer(V1))]).await;
        let r = Registry::new(&config(&url, "token = \"t0ken-abcdef\"")).unwrap();
        r.fetch(1).await.unwrap();
        assert_eq!(stand.asked.lock().unwrap()[0].1, "Bearer t0ken-abcdef");
    }

    #[tokio::test]
    async fn a_registry_down_is_retried_and_an_unknown_id_stops() {
        // Two 503s, then the schema: fetched, after two retries.
        let (stand, url) =
            stand_in(&[(503, "busy"), (503, "busy"), (200, &schema_answer(V1))]).await;
        let r = Registry::new(&config(&url, "")).unwrap();
        fetch(&r, &[framed(3)]).await.unwrap();
        assert_eq!(stand.asked.lock().unwrap().len(), 3);
        // Never up: after the attempts, the message that needs it stops
        // the connector, naming the registry.
        let r = Registry::new(&config("http://127.0.0.1:9", "")).unwrap();
        let (offset, reason) = fetch(&r, &[framed(4)]).await.unwrap_err();
        assert_eq!(offset, 4);
        assert!(
            reason.contains("127.0.0.1:9") && reason.contains("schema id 4"),
            "{reason}"
        );
        // Unknown id, refused credentials, another kind of schema: no retry.
        for (status, body, says) in [
            (404, "{\"error_code\": 40403}", "not in the schema registry"),
            (401, "unauthorized", "check registry.username"),
            (
                200,
                "{\"schema\": \"{}\", \"schemaType\": \"JSON\"}",
                "a JSON schema",
            ),
            (
                200,
                "{\"schema\": \"{}\", \"references\": [{\"name\": \"x\"}]}",
                "references",
            ),
        ] {
            let (stand, url) = stand_in(&[(status, body)]).await;
            let r = Registry::new(&config(&url, "")).unwrap();
            let (_, reason) = fetch(&r, &[framed(5)]).await.unwrap_err();
            assert!(reason.contains(says), "{reason}");
            assert_eq!(stand.asked.lock().unwrap().len(), 1, "{reason}");
        }
    }

    #[test]
    fn a_ca_file_that_is_not_pem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").unwrap();
        let e = Registry::new(&config(
            "https://r",
            &format!("ca_file = \"{}\"", ca.display()),
        ))
        .err()
        .unwrap();
        assert!(e.contains("ca.pem"), "{e}");
    }
}
