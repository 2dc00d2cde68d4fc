//! PostgreSQL connections as Idem makes them, for the sink, the dedup
//! store and dead-letter tables alike: TLS the way libpq's `sslmode` does
//! it, a server's name without its password, and a small pool.

mod tls;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use serde::Deserialize;

pub use tls::connector as tls_connector;

/// How the connection uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyFull,
}

/// `postgres://user@host:port/db`: where a connection goes, never its password.
pub fn server_name(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        cfg.get_user().unwrap_or(""),
        cfg.get_dbname().unwrap_or("")
    )
}

/// A small pool on `url` (its own `sslmode`; certificates unverified as
/// with `sslmode = "require"`) and the server's name without password, for
/// other parts of Idem that keep state in PostgreSQL (the dedup store).
pub fn pool_for(url: &str, size: usize) -> Result<(Pool, String), String> {
    pool_with_timeout(url, size, None)
}

/// [`pool_for`], whose sessions have the server abort a transaction left
/// idle for `idle_in_transaction` (a runner frozen while it holds a lock
/// then holds it no longer).
pub fn pool_with_timeout(
    url: &str,
    size: usize,
    idle_in_transaction: Option<std::time::Duration>,
) -> Result<(Pool, String), String> {
    let mut pg = url
        .parse::<tokio_postgres::Config>()
        .map_err(|e| format!("invalid PostgreSQL URL: {e}"))?;
    let shown = server_name(&pg);
    pg.connect_timeout(std::time::Duration::from_secs(10));
    match idle_in_transaction {
        Some(t) => pg.options(format!(
            "-c client_min_messages=warning -c idle_in_transaction_session_timeout={}",
            t.as_millis()
        )),
        None => pg.options("-c client_min_messages=warning"),
    };
    if pg.get_application_name().is_none() {
        pg.application_name("idem");
    }
    let tls = tls::connector(SslMode::Require, None)?;
    let manager = Manager::from_config(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(size)
        .build()
        .map_err(|e| e.to_string())?;
    Ok((pool, shown))
}
