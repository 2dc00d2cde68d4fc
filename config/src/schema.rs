//! The schema shared by every connector. Source and sink sections are typed
//! by their own crates (`S`, `K`) and plugged in by the runner, so a new
//! connector adds its `config.rs` without touching this crate.

use crate::error::Invalid;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// A section that can check itself once parsed, without I/O. `Invalid`
/// keys are relative to the section; the caller prefixes its path.
pub trait Validate {
    fn validate(&self, columns: &[ColumnConfig]) -> Result<(), Invalid>;
}

/// A whole config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config<S, K> {
    /// Process-wide settings.
    #[serde(default)]
    pub runner: RunnerConfig,
    /// The connectors, by name: each moves one source into one sink.
    pub connectors: BTreeMap<String, ConnectorConfig<S, K>>,
}

/// `[runner]`: process-wide settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunnerConfig {
    /// How often each running connector logs a progress line.
    #[serde(default = "default_progress_interval", with = "humantime_serde")]
    pub progress_interval: Duration,
    /// How long SIGTERM/SIGINT waits for in-flight batches to commit
    /// before abandoning them (an abandoned batch is re-read on restart).
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Log levels, `RUST_LOG` syntax (e.g. `"info,idem_sink_postgres=debug"`);
    /// `RUST_LOG` in the environment wins.
    #[serde(default = "default_log")]
    pub log: String,
    /// The admin HTTP server: health, metrics, connector control.
    #[serde(default)]
    pub admin: AdminConfig,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            progress_interval: default_progress_interval(),
            shutdown_grace: default_shutdown_grace(),
            log: default_log(),
            admin: AdminConfig::default(),
        }
    }
}

fn default_log() -> String {
    "info".into()
}

/// `[runner.admin]`: the admin HTTP server of `idem run`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `false` runs without it (no health checks, no metrics).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Address and port; loopback by default so nothing is exposed by
    /// accident. Port 0 picks a free one (logged at start).
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Environment variable holding a bearer token. When set, every request
    /// that changes state (pause, resume, restart, reload) must carry it;
    /// health and metrics stay open for probes and scrapers.
    #[serde(default)]
    pub token_env: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: default_admin_listen(),
            token_env: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// The admin server's address unless the config names another.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9898";

fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.into()
}

fn default_progress_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}

/// `[connectors.NAME]`: one source, one sink, and how to move between them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig<S, K> {
    /// The delivery guarantee this connector requires. Start fails, saying
    /// why, when the sink's mode cannot give it.
    #[serde(default)]
    pub guarantee: Guarantee,
    /// What to do with a message that cannot be decoded or mapped.
    #[serde(default)]
    pub errors: ErrorPolicy,
    /// Where dead letters go (JSON lines with position, reason and the raw
    /// bytes). Default: `NAME.deadletter.jsonl` in the working directory.
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// Where dead letters go when not a file (a table, a topic), and a cap.
    #[serde(default)]
    pub dead_letters: DeadLettersConfig,
    /// JSON pointer of a boolean field that marks a message as a delete
    /// (a tombstone). Messages with a null value are tombstones too. Only
    /// used by sinks with `delete_on_tombstone = true`.
    #[serde(default)]
    pub tombstone_field: Option<String>,
    /// How message values are encoded: `json` or `avro` (Avro's binary
    /// encoding of one value, decoded with the writer's schema in
    /// `schema_file`).
    #[serde(default)]
    pub format: Format,
    /// `format = "avro"`: the writer's schema of the values (an `.avsc`
    /// file).
    #[serde(default)]
    pub schema_file: Option<String>,
    /// `format = "protobuf"`: the message type of the values, with its
    /// package (`shop.Order`).
    #[serde(default)]
    pub message: Option<String>,
    /// A Confluent-compatible schema registry: values are in its wire
    /// format (a zero byte, the writer schema's id, the Avro value), each
    /// decoded with the schema of its id, fetched once.
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    /// How a message wraps its row: `none` (the message is the row) or
    /// `debezium` (a change event: `op`, `before`, `after`, `source`).
    #[serde(default)]
    pub envelope: Envelope,
    /// Whether the target follows the source's schema: `off` (the listed
    /// `[[columns]]` only) or `add_columns` (every field of the event's
    /// schema becomes a column too, added to the target when it first
    /// appears).
    #[serde(default)]
    pub evolve: Evolve,
    /// Where the columns beyond the listed ones come from: `config` (none,
    /// or the events' schemas with `evolve`), `table` (every other column
    /// of the existing target table, read from the field of its name; for
    /// Debezium events without the converter's schema) or `schema` (every
    /// other field of the Avro writer's schema). Unset: `schema` with
    /// `format = "avro"`, else `config`; read it with
    /// [`ConnectorConfig::columns_from`].
    #[serde(default, rename = "columns_from")]
    pub columns_from_set: Option<ColumnsFrom>,
    /// Batching: a batch closes on the first limit reached.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Retries of transient sink errors.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Deduplicate by message id before the sink: two copies of one id
    /// anywhere in the stream take effect once. Off unless this section is
    /// present; the HTTP sink always uses it (embedded by default).
    #[serde(default)]
    pub dedup: Option<DedupConfig>,
    /// Where messages come from.
    pub source: S,
    /// Where they go.
    pub sink: K,
    /// How a JSON message becomes a row: one entry per column.
    #[serde(default)]
    pub columns: Vec<ColumnConfig>,
}

/// `[connectors.NAME.dead_letters]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLettersConfig {
    #[serde(default)]
    pub destination: DeadLetterDestination,
    /// The file (`destination = "file"`); `dead_letter = "..."` is the same.
    #[serde(default)]
    pub path: Option<String>,
    /// The table (`destination = "table"`), in the sink's schema.
    /// Default: `NAME_dead_letters`.
    #[serde(default)]
    pub table: Option<String>,
    /// The topic (`destination = "topic"`), on the source's brokers.
    /// Default: `NAME.dead-letters`.
    #[serde(default)]
    pub topic: Option<String>,
    /// Stop the connector when more than this many messages would be
    /// dead-lettered by one run (0: no cap). A flood of dead letters usually
    /// means the input or the mapping is wrong, not a few bad messages.
    #[serde(default)]
    pub max: u64,
}

/// Where dead letters go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterDestination {
    /// JSON lines in a file, synced before the batch commits.
    #[default]
    File,
    /// Rows in a table of the sink's PostgreSQL database, keyed by position.
    Table,
    /// Messages on a Kafka topic of the source's brokers.
    Topic,
}

/// The guarantee a connector requires (and a sink declares).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Guarantee {
    /// Effects and positions commit atomically, or effects are idempotent
    /// and keyed: a replay after any crash changes nothing.
    #[default]
    ExactlyOnce,
    /// Nothing is lost; a crash may repeat some effects.
    AtLeastOnce,
}

impl std::fmt::Display for Guarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Guarantee::ExactlyOnce => "exactly-once",
            Guarantee::AtLeastOnce => "at-least-once",
        })
    }
}

/// How a message wraps its row (`envelope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Envelope {
    /// The message's value is the row.
    #[default]
    None,
    /// A Debezium change event, with or without the JSON converter's
    /// `schema`/`payload` wrapper: `c`, `r` and `u` write `after`, `d`
    /// deletes by `before` (or the message key), the tombstone that follows
    /// a delete is skipped.
    Debezium,
}

/// Whether the target follows the source's schema (`evolve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Evolve {
    /// Only the listed `[[columns]]`; other fields are not written.
    #[default]
    Off,
    /// The listed columns, and every other field of the row's schema (a
    /// Debezium event's, or an Avro value's writer schema) as a nullable
    /// column of the schema's type, added to the target (in the batch's
    /// transaction) when it first appears. A field that changes
    /// type stops the connector; a field that disappears leaves its column,
    /// which newer rows leave null.
    AddColumns,
}

/// How a connector's message values are encoded (`format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// A JSON document (UTF-8).
    #[default]
    Json,
    /// One Avro value in the binary encoding, without a container or a
    /// registry's prefix, written with the schema in `schema_file`; read
    /// as the JSON document it stands for (see `docs/sources/formats.md`).
    Avro,
    /// One serialized Protobuf message of type `message`, from the
    /// `.proto` in `schema_file`; read as its canonical JSON.
    Protobuf,
    /// A JSON document after a schema registry's 5-byte prefix (a zero
    /// byte, the schema id), as Confluent's JSON Schema serializer writes
    /// it; the JSON is read as `json` reads it.
    JsonSchema,
}

/// `[connectors.NAME.registry]`: a schema registry with the Confluent
/// REST API (Confluent Schema Registry, Apicurio's `ccompat` API,
/// Karapace, Redpanda).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Its base URL, e.g. `https://registry:8081` (Apicurio:
    /// `.../apis/ccompat/v7`).
    pub url: String,
    /// Basic auth: the user (with `password`).
    #[serde(default)]
    pub username: Option<String>,
    /// Basic auth: the password (with `username`); use `${VAR}`.
    #[serde(default)]
    pub password: Option<crate::Secret>,
    /// A bearer token instead of basic auth; use `${VAR}`.
    #[serde(default)]
    pub token: Option<crate::Secret>,
    /// PEM file of the CA that signed an `https` registry's certificate,
    /// when it is not one the system trusts.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// The longest one request may take.
    #[serde(default = "default_registry_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_registry_timeout() -> Duration {
    Duration::from_secs(10)
}

impl RegistryConfig {
    fn validate(&self) -> Result<(), Invalid> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(Invalid::new(
                &["registry", "url"],
                format!("`{}` is not an http:// or https:// URL", self.url),
            ));
        }
        match (&self.username, &self.password, &self.token) {
            (Some(_), None, _) | (None, Some(_), _) => Err(Invalid::new(
                &[
                    "registry",
                    if self.username.is_some() {
                        "password"
                    } else {
                        "username"
                    },
                ],
                "basic auth needs both username and password",
            )),
            (Some(_), Some(_), Some(_)) => Err(Invalid::new(
                &["registry", "token"],
                "is a bearer token, in place of username and password: keep one of them",
            )),
            _ if self.timeout.is_zero() => Err(Invalid::new(
                &["registry", "timeout"],
                "must be longer than zero (e.g. \"10s\")",
            )),
            _ => Ok(()),
        }
    }
}

impl Format {
    /// As the config spells it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Avro => "avro",
            Format::Protobuf => "protobuf",
            Format::JsonSchema => "json_schema",
        }
    }
}

/// Where a connector's columns come from (`columns_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnsFrom {
    /// The listed `[[columns]]` (and with `evolve`, the events' schemas).
    #[default]
    Config,
    /// The listed columns, then every other column of the target table,
    /// which must exist (the sink does not create it): each is read from
    /// the row's field of the same name, as the table's type.
    Table,
    /// The listed columns, then every other top-level field of the Avro
    /// writer's schema (`schema_file`), as the column type its Avro type
    /// maps to. Added by the runner when it loads the file, before the
    /// sink's checks see the columns (see [`Config::validate_parsed`]).
    Schema,
}

/// What happens to a message that cannot be decoded or mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorPolicy {
    /// Write it to the dead letters with its reason and position, move on.
    #[default]
    DeadLetter,
    /// Commit what came before it, then stop the connector with the reason.
    Fail,
}

/// `[connectors.NAME.batch]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Close a batch at this many messages. Unset: the sink's own default
    /// ([`BatchConfig::records`]), set by the runner when it builds the
    /// connector.
    #[serde(default)]
    pub max_records: Option<usize>,
    /// Close a batch at this many bytes of message values.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Close a non-empty batch this long after its first message.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub linger: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: None,
            max_bytes: default_max_bytes(),
            linger: default_linger(),
        }
    }
}

/// Messages per batch when neither the connector nor its sink says.
pub const DEFAULT_MAX_RECORDS: usize = 10_000;
/// Messages per batch for sinks that write tables or files: a 1M-event
/// keyed load into DuckDB took 26 s in batches of 10,000 and 12 s in
/// batches of 100,000 (bounded by max_bytes to about 88,000).
pub const TABLE_MAX_RECORDS: usize = 100_000;

impl BatchConfig {
    /// Messages per batch at most.
    pub fn records(&self) -> usize {
        self.max_records.unwrap_or(DEFAULT_MAX_RECORDS)
    }
}

fn default_max_bytes() -> usize {
    16 * 1024 * 1024
}

fn default_linger() -> Duration {
    Duration::from_millis(500)
}

/// `[connectors.NAME.retry]`: capped exponential backoff with jitter.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts of one operation before the connector fails (0 = forever).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: usize,
    /// The first delay.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// The cap on any delay.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

fn default_max_attempts() -> usize {
    10
}

fn default_initial_backoff() -> Duration {
    Duration::from_millis(100)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

/// `[connectors.NAME.dedup]`: where message ids come from and where the
/// processed ones are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// The message id: `@position` (partition and offset: only catches
    /// replays), `@key`, `@header/NAME`, or a JSON pointer into the value
    /// such as `/event_id`. A message without one goes to the dead letters.
    #[serde(default = "default_dedup_id")]
    pub id: String,
    /// Where processed ids are kept.
    #[serde(default)]
    pub store: DedupStoreKind,
    /// `embedded`: the file. Default: `NAME.dedup.redb` in the working
    /// directory.
    #[serde(default)]
    pub path: Option<String>,
    /// `redis`: `redis://[:password@]host:port[/db]` or `rediss://` (TLS);
    /// `postgres`: a connection string. `${VAR}` keeps passwords out.
    #[serde(default)]
    pub url: Option<crate::Secret>,
    /// `redis` over TLS: a PEM file of the CA to trust (default: the
    /// system's roots).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// `postgres`: the schema and table of the ids (positions go to
    /// `TABLE_positions`).
    #[serde(default = "default_dedup_schema")]
    pub schema: String,
    #[serde(default = "default_dedup_table")]
    pub table: String,
    /// How long an id is remembered. Copies further apart than this are
    /// both processed: keep it longer than the source's retention.
    #[serde(default = "default_dedup_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// Ids are kept per namespace. Default: the connector's name.
    #[serde(default)]
    pub namespace: Option<String>,
    /// When the store reports it lost its ids (a Redis restarted without
    /// persistence): `fail` stops the connector; `warn` logs, accepts the
    /// loss and goes on (copies of earlier messages are not recognised).
    #[serde(default)]
    pub on_loss: OnLoss,
}

fn default_dedup_id() -> String {
    "@position".into()
}

fn default_dedup_schema() -> String {
    "public".into()
}

fn default_dedup_table() -> String {
    "idem_dedup".into()
}

fn default_dedup_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            id: default_dedup_id(),
            store: DedupStoreKind::default(),
            path: None,
            url: None,
            ca_file: None,
            schema: default_dedup_schema(),
            table: default_dedup_table(),
            retention: default_dedup_retention(),
            namespace: None,
            on_loss: OnLoss::default(),
        }
    }
}

/// Where a connector's processed ids are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DedupStoreKind {
    /// A redb file beside the runner: no server, one runner.
    #[default]
    Embedded,
    Redis,
    Postgres,
    /// The sink's own database, in each batch's transaction (PostgreSQL
    /// and DuckDB sinks): no second store, no round trip of its own.
    Sink,
}

/// What to do when the dedup store lost its ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLoss {
    #[default]
    Fail,
    Warn,
}

/// Where a message's id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdSource {
    Position,
    Key,
    Header(String),
    Pointer(String),
}

impl DedupConfig {
    /// The parsed `id`.
    pub fn id_source(&self) -> Result<IdSource, Invalid> {
        let id = self.id.as_str();
        match id {
            "@position" => Ok(IdSource::Position),
            "@key" => Ok(IdSource::Key),
            _ => {
                if let Some(name) = id.strip_prefix("@header/").filter(|n| !n.is_empty()) {
                    Ok(IdSource::Header(name.to_string()))
                } else if id.starts_with('/') {
                    Ok(IdSource::Pointer(id.to_string()))
                } else {
                    Err(Invalid::new(
                        &["dedup", "id"],
                        format!("`{id}` is none of @position, @key, @header/NAME or a JSON pointer (starting with `/`)"),
                    ))
                }
            }
        }
    }

    fn validate(&self) -> Result<(), Invalid> {
        self.id_source()?;
        let needs_url = matches!(self.store, DedupStoreKind::Redis | DedupStoreKind::Postgres);
        if needs_url && self.url.is_none() {
            return Err(Invalid::new(
                &["dedup", "url"],
                "is required with store = \"redis\" or \"postgres\"",
            ));
        }
        if !needs_url && self.url.is_some() {
            return Err(Invalid::new(
                &["dedup", "url"],
                "is only used with store = \"redis\" or \"postgres\"",
            ));
        }
        if self.path.is_some() && self.store != DedupStoreKind::Embedded {
            return Err(Invalid::new(
                &["dedup", "path"],
                "is only used with store = \"embedded\"",
            ));
        }
        if self.ca_file.is_some() && self.store != DedupStoreKind::Redis {
            return Err(Invalid::new(
                &["dedup", "ca_file"],
                "is only used with store = \"redis\"",
            ));
        }
        if self.retention.is_zero() {
            return Err(Invalid::new(
                &["dedup", "retention"],
                "must be longer than zero (e.g. \"7d\")",
            ));
        }
        if self.store == DedupStoreKind::Sink && self.namespace.is_some() {
            return Err(Invalid::new(
                &["dedup", "namespace"],
                "is not used with store = \"sink\": the ids belong to the sink's table, shared by every connector writing it",
            ));
        }
        if let Some(ns) = &self.namespace {
            if ns.is_empty() || ns.contains(['\t', '{', '}']) {
                return Err(Invalid::new(
                    &["dedup", "namespace"],
                    "must be non-empty, without tabs or braces",
                ));
            }
        }
        for (key, value) in [("schema", &self.schema), ("table", &self.table)] {
            crate::check_ident(key, value).map_err(|mut e| {
                e.key.insert(0, "dedup".into());
                e
            })?;
            if self.store == DedupStoreKind::Postgres {
                crate::check_postgres_name(&["dedup", key], value)?;
            }
        }
        Ok(())
    }
}

/// `[[connectors.NAME.columns]]`: one column of the sink's table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnConfig {
    /// The column's name in the sink.
    pub name: String,
    /// JSON pointer (RFC 6901) to the field, e.g. `/user/id`; `""` is the
    /// whole message; `@key`, `@timestamp` and `@header/NAME` take the
    /// message's key, timestamp or a header instead; with the Debezium
    /// envelope, pointers are into the changed row, and `@source/POINTER`
    /// and `@op` take a field of the event's `source` block and its op.
    /// Default: `/NAME`.
    #[serde(default)]
    pub pointer: Option<String>,
    /// The column's type.
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// A message without this field (or with null) goes to the dead letters.
    /// Key columns are always required.
    #[serde(default)]
    pub required: bool,
}

impl ColumnConfig {
    /// The pointer, defaulting to `/NAME`.
    pub fn pointer(&self) -> String {
        self.pointer
            .clone()
            .unwrap_or_else(|| format!("/{}", self.name))
    }
}

/// What a column's pointer names: the one reading of its grammar, shared
/// by the config's checks and the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointer<'a> {
    /// A JSON pointer into the value (`""` or starting with `/`).
    Field(&'a str),
    /// `@key`: the message key, as UTF-8 text.
    Key,
    /// `@timestamp`: the source's timestamp of the message.
    Timestamp,
    /// `@header/NAME`: a header's value, as UTF-8 text.
    Header(&'a str),
    /// `@source` or `@source/POINTER` (Debezium envelope): the event's
    /// `source` block, or a JSON pointer into it (`""` or `/...`).
    Source(&'a str),
    /// `@op` (Debezium envelope): the event's op.
    Op,
    /// None of these.
    Invalid,
}

impl<'a> Pointer<'a> {
    pub fn of(p: &'a str) -> Pointer<'a> {
        match p {
            "@key" => Pointer::Key,
            "@timestamp" => Pointer::Timestamp,
            "@op" => Pointer::Op,
            p if p.is_empty() || p.starts_with('/') => Pointer::Field(p),
            p => {
                if let Some(name) = p.strip_prefix("@header/").filter(|n| !n.is_empty()) {
                    Pointer::Header(name)
                } else if let Some(rest) = p
                    .strip_prefix("@source")
                    .filter(|r| r.is_empty() || r.starts_with('/'))
                {
                    Pointer::Source(rest)
                } else {
                    Pointer::Invalid
                }
            }
        }
    }

    /// A part of a Debezium change event rather than of the message.
    pub fn of_event(self) -> bool {
        matches!(self, Pointer::Source(_) | Pointer::Op)
    }
}

/// RFC 6901 tokens of a JSON pointer, unescaped (`""` is the whole
/// document: no token).
pub fn pointer_tokens(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// Column types, named as SQL users know them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    Text,
    Bigint,
    Integer,
    Double,
    Boolean,
    /// RFC 3339 string (or integer microseconds since the epoch), stored in UTC.
    Timestamp,
    /// `YYYY-MM-DD`.
    Date,
    /// Any JSON value, stored as JSON text.
    Json,
    /// An exact decimal, from a JSON number or a decimal string such as
    /// `"12.50"` (digits are kept as written, never rounded through a float).
    Numeric,
    /// A UUID string, e.g. `"67e55044-10b1-426f-9247-bb680e5fe0c8"`.
    Uuid,
    /// Bytes, from a base64 string (standard alphabet, padded).
    Bytea,
}

impl ColumnType {
    pub const ALL: [ColumnType; 11] = [
        ColumnType::Text,
        ColumnType::Bigint,
        ColumnType::Integer,
        ColumnType::Double,
        ColumnType::Boolean,
        ColumnType::Timestamp,
        ColumnType::Date,
        ColumnType::Json,
        ColumnType::Numeric,
        ColumnType::Uuid,
        ColumnType::Bytea,
    ];

    /// The name a config gives it (`type = "bigint"`).
    pub fn name(self) -> &'static str {
        match self {
            ColumnType::Text => "text",
            ColumnType::Bigint => "bigint",
            ColumnType::Integer => "integer",
            ColumnType::Double => "double",
            ColumnType::Boolean => "boolean",
            ColumnType::Timestamp => "timestamp",
            ColumnType::Date => "date",
            ColumnType::Json => "json",
            ColumnType::Numeric => "numeric",
            ColumnType::Uuid => "uuid",
            ColumnType::Bytea => "bytea",
        }
    }
}

impl<S: Validate, K: Validate> Config<S, K> {
    /// Pure checks across keys, with every connector's columns known.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.checks(true)
    }

    /// The checks that need no file but the config: as [`Config::validate`],
    /// except that a connector with `columns_from = "schema"` is not yet
    /// checked against its columns (its source and sink sections), which
    /// the writer's schema completes. Whoever adds those columns calls
    /// `validate` after.
    pub fn validate_parsed(&self) -> Result<(), Invalid> {
        self.checks(false)
    }

    fn checks(&self, columns_known: bool) -> Result<(), Invalid> {
        if self.runner.progress_interval.is_zero() {
            return Err(Invalid::new(
                &["runner", "progress_interval"],
                "must be longer than zero (e.g. \"5s\")",
            ));
        }
        if self.runner.admin.enabled
            && self
                .runner
                .admin
                .listen
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(Invalid::new(
                &["runner", "admin", "listen"],
                "must be an IP address and port, e.g. \"127.0.0.1:9898\" (\"0.0.0.0:9898\" listens on every interface)",
            ));
        }
        if self.connectors.is_empty() {
            return Err(Invalid::new(
                &["connectors"],
                "no connector is defined; add a [connectors.NAME] table",
            ));
        }
        for (name, c) in &self.connectors {
            let at = |rest: &[&str], e: Invalid| {
                let mut key: Vec<String> = vec!["connectors".into(), name.clone()];
                if !e.connector_relative {
                    key.extend(rest.iter().map(|s| s.to_string()));
                }
                key.extend(e.key);
                Invalid {
                    key,
                    message: e.message,
                    connector_relative: false,
                }
            };
            if !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
            {
                return Err(at(
                    &[],
                    Invalid::new(
                        &[],
                        "a connector name may hold only letters, digits, `_` and `-`",
                    ),
                ));
            }
            c.validate_common().map_err(|e| at(&[], e))?;
            if c.dead_letters.destination == DeadLetterDestination::Table
                && c.dead_letters.table.is_none()
            {
                crate::check_postgres_name(
                    &["dead_letters", "destination"],
                    &default_dead_letter_table(name),
                )
                .map_err(|e| at(&[], e))?;
            }
            if !columns_known && c.columns_from() == ColumnsFrom::Schema {
                continue;
            }
            c.source
                .validate(&c.columns)
                .map_err(|e| at(&["source"], e))?;
            c.sink.validate(&c.columns).map_err(|e| at(&["sink"], e))?;
        }
        Ok(())
    }
}

impl<S, K> ConnectorConfig<S, K> {
    /// Where the columns beyond the listed ones come from, with the
    /// default resolved: `schema` for Avro values with a `schema_file`,
    /// else `config`.
    pub fn columns_from(&self) -> ColumnsFrom {
        self.columns_from_set
            .unwrap_or(match (self.format, &self.schema_file) {
                (Format::Avro | Format::Protobuf, Some(_)) => ColumnsFrom::Schema,
                _ => ColumnsFrom::Config,
            })
    }

    fn validate_common(&self) -> Result<(), Invalid> {
        if self.batch.max_records == Some(0) {
            return Err(Invalid::new(
                &["batch", "max_records"],
                "must be at least 1",
            ));
        }
        if self.batch.max_bytes == 0 {
            return Err(Invalid::new(&["batch", "max_bytes"], "must be at least 1"));
        }
        if self.retry.initial_backoff > self.retry.max_backoff {
            return Err(Invalid::new(
                &["retry", "initial_backoff"],
                "is larger than retry.max_backoff",
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, col) in self.columns.iter().enumerate() {
            let idx = i.to_string();
            if col.name.is_empty() || col.name.starts_with("_idem_") {
                return Err(Invalid::new(
                    &["columns", &idx, "name"],
                    "a column name must be non-empty and not start with `_idem_` (reserved)",
                ));
            }
            if let Err(msg) = crate::check_column_name(&col.name) {
                return Err(Invalid::new(&["columns", &idx, "name"], msg));
            }
            if !seen.insert(col.name.as_str()) {
                return Err(Invalid::new(
                    &["columns", &idx, "name"],
                    format!("column `{}` is defined twice", col.name),
                ));
            }
            let p = col.pointer();
            let kind = Pointer::of(&p);
            if kind.of_event() && self.envelope != Envelope::Debezium {
                return Err(Invalid::new(
                    &["columns", &idx, "pointer"],
                    format!("`{p}` is a part of a change event: it needs envelope = \"debezium\""),
                ));
            }
            if kind == Pointer::Invalid {
                return Err(Invalid::new(
                    &["columns", &idx, "pointer"],
                    format!("`{p}` is neither a JSON pointer (\"\" or starting with `/`) nor one of @key, @timestamp, @header/NAME, @source/POINTER, @op"),
                ));
            }
        }
        if let Some(d) = &self.dedup {
            d.validate()?;
        }
        let dl = &self.dead_letters;
        let only = |key: &str, set: bool, dest: &str| {
            if set {
                Err(Invalid::new(
                    &["dead_letters", key],
                    format!("is only used with destination = \"{dest}\""),
                ))
            } else {
                Ok(())
            }
        };
        only(
            "path",
            dl.path.is_some() && dl.destination != DeadLetterDestination::File,
            "file",
        )?;
        only(
            "table",
            dl.table.is_some() && dl.destination != DeadLetterDestination::Table,
            "table",
        )?;
        only(
            "topic",
            dl.topic.is_some() && dl.destination != DeadLetterDestination::Topic,
            "topic",
        )?;
        if self.dead_letter.is_some()
            && (dl.path.is_some() || dl.destination != DeadLetterDestination::File)
        {
            return Err(Invalid::new(
                &["dead_letter"],
                "is the same as [dead_letters] path; keep one of them",
            ));
        }
        if let Some(t) = &dl.table {
            crate::check_ident(t, t)
                .map_err(|e| Invalid::new(&["dead_letters", "table"], e.message))?;
            // The table lives in the PostgreSQL sink's schema.
            crate::check_postgres_name(&["dead_letters", "table"], t)?;
        }
        if self.evolve == Evolve::AddColumns
            && self.envelope != Envelope::Debezium
            && self.format != Format::Avro
        {
            return Err(Invalid::new(
                &["evolve"],
                "evolve = \"add_columns\" reads the columns from each message's schema: it needs envelope = \"debezium\" (with the JSON converter's schemas.enable = true) or format = \"avro\"",
            ));
        }
        if let Some(r) = &self.registry {
            r.validate()?;
            if self.format == Format::JsonSchema {
                return Err(Invalid::new(
                    &["registry"],
                    "format = \"json_schema\" reads the JSON after the registry's prefix and asks the registry nothing: leave [registry] out",
                ));
            }
            if self.format == Format::Json {
                return Err(Invalid::new(
                    &["registry"],
                    "reads Avro or Protobuf values in the registry's wire format: set format = \"avro\" or \"protobuf\" (JSON behind the registry's prefix is format = \"json_schema\", with no [registry])",
                ));
            }
        }
        match (self.format, &self.message) {
            (Format::Protobuf, None) if self.schema_file.is_some() => {
                return Err(Invalid::new(
                    &["message"],
                    "format = \"protobuf\" needs the values' message type: message = \"package.Message\"",
                ))
            }
            (Format::Json | Format::JsonSchema | Format::Avro, Some(_)) => {
                return Err(Invalid::new(
                    &["message"],
                    "is the Protobuf message type of format = \"protobuf\"",
                ))
            }
            _ => {}
        }
        match (self.format, &self.schema_file) {
            (Format::Protobuf, None) if self.registry.is_none() => {
                return Err(Invalid::new(
                    &["schema_file"],
                    "format = \"protobuf\" needs the .proto that defines `message`: schema_file = \"path/to/order.proto\"",
                ))
            }
            (Format::Protobuf, Some(_)) if self.envelope != Envelope::None => {
                return Err(Invalid::new(
                    &["format"],
                    "format = \"protobuf\" reads plain rows; Debezium events in Protobuf are not read",
                ))
            }
            (Format::Avro, None) if self.registry.is_none() => {
                return Err(Invalid::new(
                    &["schema_file"],
                    "format = \"avro\" needs the writer's schema: schema_file = \"path/to/value.avsc\", or a [registry] whose wire format names it",
                ))
            }
            (Format::JsonSchema, _) if self.envelope != Envelope::None => {
                return Err(Invalid::new(
                    &["format"],
                    "format = \"json_schema\" reads plain rows; Debezium events through the JSON Schema converter are not read yet (use the JSON converter)",
                ))
            }
            (Format::Json | Format::JsonSchema, Some(_)) => {
                return Err(Invalid::new(
                    &["schema_file"],
                    "is the schema of format = \"avro\" or \"protobuf\"; this connector reads JSON",
                ))
            }
            (Format::Avro, Some(_)) if self.envelope != Envelope::None => {
                return Err(Invalid::new(
                    &["format"],
                    "format = \"avro\" reads plain rows for now; Debezium events in Avro are not read yet (use the JSON converter)",
                ))
            }
            _ => {}
        }
        if self.columns_from() == ColumnsFrom::Schema
            && (matches!(self.format, Format::Json | Format::JsonSchema)
                || self.schema_file.is_none())
        {
            return Err(Invalid::new(
                &["columns_from"],
                "columns_from = \"schema\" takes the columns from the fields of a schema: it needs format = \"avro\" or \"protobuf\" with schema_file (with a registry, the schema the table follows)",
            ));
        }
        if self.columns_from() == ColumnsFrom::Table && self.envelope != Envelope::Debezium {
            return Err(Invalid::new(
                &["columns_from"],
                "columns_from = \"table\" reads each column of the target table from the change event's row of the same name: it needs envelope = \"debezium\"",
            ));
        }
        if let Some(p) = &self.tombstone_field {
            if self.envelope == Envelope::Debezium {
                return Err(Invalid::new(
                    &["tombstone_field"],
                    "has no use with envelope = \"debezium\": the event's `op` says what is a delete",
                ));
            }
            if !p.starts_with('/') {
                return Err(Invalid::new(
                    &["tombstone_field"],
                    format!("`{p}` is not a JSON pointer: it must start with `/`"),
                ));
            }
        }
        Ok(())
    }
}

/// The dead-letter table of connector `name` when `dead_letters.table` is
/// not set.
pub fn default_dead_letter_table(name: &str) -> String {
    format!("{name}_dead_letters").replace('-', "_")
}
