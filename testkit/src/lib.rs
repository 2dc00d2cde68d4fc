//! What Idem's integration tests share (a dev-dependency only): run the
//! real `idem` binary, write configs and data in a fresh temporary
//! directory, reach the test servers `scripts/` starts, and the suites every
//! sink instantiates: [`table_suite`] for table sinks and [`crash`] for all.
// Test code: a failed setup step should stop the test where it happened.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod crash;
pub mod iceberg;
pub mod receiver;
pub mod s3;
pub mod table_suite;

use idem_config::{ColumnConfig, ColumnType};
use idem_core::{Batch, Op, PartitionRef, Record, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

/// The `idem` binary under test: `IDEM_BIN` (scripts/soak.sh runs a copy,
/// so a build during a long run cannot replace it underneath), else the one
/// cargo built for the runner's integration tests.
pub fn idem_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("IDEM_BIN") {
        return bin.into();
    }
    if let Some(bin) = std::env::var_os("CARGO_BIN_EXE_idem") {
        return bin.into();
    }
    // target/<profile>/deps/<test binary> -> target/<profile>/idem
    let exe = std::env::current_exe().expect("the test binary's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("idem"))
        .expect("the test binary sits in target/<profile>/deps");
    assert!(
        bin.exists(),
        "{} does not exist: binary-level tests live in runner/tests, where cargo builds it",
        bin.display()
    );
    bin
}

pub fn idem() -> Command {
    let mut cmd = Command::new(idem_bin());
    cmd.env("RUST_LOG", "warn").env_remove("IDEM_FAILPOINTS");
    // Tests run many idem side by side: each admin API on a port of its own.
    cmd.env("IDEM_ADMIN_LISTEN", "127.0.0.1:0");
    // The test S3 store (scripts/s3.sh) takes any key; no instance
    // metadata lookups on a machine that is not in a cloud.
    cmd.env("AWS_ACCESS_KEY_ID", "idem-test")
        .env("AWS_SECRET_ACCESS_KEY", "idem-test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    cmd
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn idem");
    assert!(
        out.status.success(),
        "idem failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether process `pid` is stopped (SIGSTOP, or a `:stop` fail point).
pub fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// Wait (up to a minute) until process `pid` is stopped; a timeout shows
/// the process's `log`.
pub fn wait_stopped(pid: u32, log: &std::path::Path) {
    let started = std::time::Instant::now();
    while !is_stopped(pid) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "process {pid} never stopped:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Send signal `name` (TERM, KILL, STOP...) with the shell's builtin
/// `kill`: no unsafe code, no dependency on procps.
pub fn signal(pid: u32, name: &str) {
    let ok = Command::new("sh")
        .args(["-c", &format!("kill -{name} {pid}")])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{name} {pid}");
}

/// The crash tests' random generator: seeded from `IDEM_CRASH_SEED` when
/// set, else at random, and the seed printed so a failure can be replayed.
pub fn crash_rng(test: &str) -> rand::rngs::StdRng {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("IDEM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rngs::StdRng::from_os_rng().random());
    eprintln!("{test} crash test seed: {seed} (IDEM_CRASH_SEED={seed} replays it)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// The runs of a crash test against a group-reading source, and how each
/// ended.
#[derive(Default)]
pub struct Rounds {
    ends: std::collections::HashMap<&'static str, usize>,
    fired: std::collections::HashMap<String, usize>,
}

impl Rounds {
    /// One `idem run CFG`: with `failpoint`, armed at its 1st to 4th hit
    /// and given 40 s to fire; else SIGKILLed after a random time in
    /// `kill_ms`.
    pub async fn run(
        &mut self,
        cfg: &Path,
        failpoint: Option<&str>,
        rng: &mut rand::rngs::StdRng,
        kill_ms: std::ops::Range<u64>,
    ) {
        use rand::Rng;
        let mut cmd = idem();
        cmd.arg("run")
            .arg(cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(fp) = failpoint {
            cmd.env(
                "IDEM_FAILPOINTS",
                format!("{fp}={}", rng.random_range(1..=4)),
            );
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = std::time::Instant::now()
            + match failpoint {
                Some(_) => std::time::Duration::from_secs(40),
                None => std::time::Duration::from_millis(rng.random_range(kill_ms)),
            };
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() >= deadline {
                child.kill().unwrap();
                break child.wait().unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        };
        let how = ended_by(status);
        *self.ends.entry(how).or_default() += 1;
        if let (Some(fp), "fail point (abort)") = (failpoint, how) {
            *self.fired.entry(fp.to_string()).or_default() += 1;
        }
    }

    /// Print the tally; check that at least `kills` runs died mid-way and
    /// that every one of `failpoints` fired.
    pub fn check(&self, test: &str, kills: usize, failpoints: &[&str]) {
        let (ends, fired) = (&self.ends, &self.fired);
        eprintln!("{test} crash: runs ended by {ends:?}; fail points fired {fired:?}");
        let died = ends.get("SIGKILL").unwrap_or(&0) + ends.get("fail point (abort)").unwrap_or(&0);
        assert!(died >= kills, "only {died} runs died mid-way: {ends:?}");
        for fp in failpoints {
            assert!(
                fired.get(*fp).copied().unwrap_or(0) > 0,
                "fail point {fp} never fired"
            );
        }
    }
}

/// How a run of a crash test ended.
pub fn ended_by(status: std::process::ExitStatus) -> &'static str {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(6) => "fail point (abort)",
        Some(9) => "SIGKILL",
        _ if status.success() => "clean exit",
        _ => "error exit",
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A child process killed when the test ends, passed or not, so that a
/// failing test leaves no runner or server behind.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port nothing listens on now, for a server of the test's own.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private `redis-server` on `port` without persistence (a restart
/// forgets everything), data in `dir`; waits until it accepts connections.
pub fn private_redis(port: u16, dir: &Path) -> Reaped {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (bash scripts/redis.sh installs it)");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Reaped(child)
}

pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Default for Workdir {
    fn default() -> Self {
        Self::new()
    }
}

impl Workdir {
    pub fn new() -> Self {
        Workdir {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, content: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, content).expect("write file");
        p
    }

    pub fn append(&self, name: &str, content: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(name))
            .expect("open for append");
        f.write_all(content.as_bytes()).expect("append");
    }
}

/// Open a DuckDB file read-only for assertions.
pub fn duck(path: &Path) -> duckdb::Connection {
    let cfg = duckdb::Config::default()
        .access_mode(duckdb::AccessMode::ReadOnly)
        .expect("config");
    duckdb::Connection::open_with_flags(path, cfg).expect("open duckdb")
}

pub fn query_i64(conn: &duckdb::Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The PostgreSQL the tests use: `IDEM_TEST_PG_URL`, or the role and
/// database `scripts/postgres.sh` creates.
pub fn pg_url() -> String {
    std::env::var("IDEM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://idem:idem@127.0.0.1:5432/idem_test".into())
}

/// A fresh schema name, so tests never see each other's tables.
pub fn fresh_schema(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A client for assertions; a missing server fails with how to start it.
pub async fn pg() -> tokio_postgres::Client {
    let url = pg_url();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is not reachable at {url}: {e}. Start it with: bash scripts/postgres.sh")
        });
    tokio::spawn(conn);
    client
}

// Sink-level tests: columns (id text, v bigint), records and batches.

pub fn col(name: &str, ty: ColumnType) -> ColumnConfig {
    ColumnConfig {
        name: name.into(),
        pointer: None,
        ty,
        required: false,
    }
}

pub fn part(name: &str) -> PartitionRef {
    PartitionRef::new("c", "file", name)
}

pub fn rec(offset: u64, id: &str, v: i64) -> Record {
    Record {
        offset,
        op: Op::Upsert,
        values: vec![Value::Text(id.into()), Value::BigInt(v)].into(),
        id: None,
    }
}

pub fn del(offset: u64, id: &str) -> Record {
    Record {
        offset,
        op: Op::Delete,
        values: vec![Value::Text(id.into()), Value::Null].into(),
        id: None,
    }
}

pub fn batch(p: &PartitionRef, epoch: i64, records: Vec<Record>, next: u64) -> Arc<Batch> {
    Arc::new(Batch {
        partition: p.clone(),
        epoch,
        // A batch of dead letters alone: its end stands for its start.
        first_offset: records.first().map_or(next, |r| r.offset),
        records,
        next_offset: next,
        columns: None,
        key: None,
        attempt: 0,
    })
}

pub fn pairs(v: &[(&str, i64)]) -> Vec<(String, i64)> {
    v.iter().map(|(a, b)| (a.to_string(), *b)).collect()
}

pub fn columns() -> Vec<ColumnConfig> {
    vec![col("id", ColumnType::Text), col("v", ColumnType::Bigint)]
}

/// One record of every column type, and its columns (the last, `doc`, is the
/// whole message as JSON). `at` is 2026-03-01T10:00:00.123456+02:00 and `day`
/// 1969-12-31, so time zones, microseconds and pre-1970 dates are covered.
pub fn all_types() -> (Vec<ColumnConfig>, Record) {
    let mut whole = col("doc", ColumnType::Json);
    whole.pointer = Some(String::new());
    let cols = vec![
        col("t", ColumnType::Text),
        col("b", ColumnType::Bigint),
        col("i", ColumnType::Integer),
        col("d", ColumnType::Double),
        col("ok", ColumnType::Boolean),
        col("at", ColumnType::Timestamp),
        col("day", ColumnType::Date),
        whole,
        col("u", ColumnType::Uuid),
        col("raw", ColumnType::Bytea),
    ];
    let json = r#"{"t":"hé","b":9007199254740993,"i":-7,"d":2.5,"ok":false,"at":"2026-03-01T10:00:00.123456+02:00","day":"1969-12-31","u":"67E55044-10B1-426F-9247-BB680E5FE0C8","raw":"AAEC/w=="}"#;
    let record = idem_core::Mapper::new(&cols, &[], false, None)
        .map(&idem_core::Message {
            offset: 0,
            next_offset: 1,
            key: None,
            value: Some(json.into()),
            poison: None,
            meta: Default::default(),
        })
        .unwrap();
    (cols, record)
}

/// A certificate authority of its own, for TLS tests.
pub fn test_ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A TCP proxy the test can cut: while down it closes every connection it
/// carries and refuses new ones, as an unreachable server does. Armed with
/// [`TcpProxy::lose_answer_to`], it forwards the next request holding some
/// bytes, then drops the server's answer and the connection: the request
/// took effect, the client never hears it (a network cut after a commit).
pub struct TcpProxy {
    pub port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    live: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    armed: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
    lost: Arc<std::sync::atomic::AtomicU64>,
}

impl TcpProxy {
    pub fn start(target: &str) -> TcpProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let live: Arc<std::sync::Mutex<Vec<TcpStream>>> = Default::default();
        let armed: Arc<std::sync::Mutex<Option<Vec<u8>>>> = Default::default();
        let lost = Arc::new(AtomicU64::new(0));
        let (up2, live2, target) = (up.clone(), live.clone(), target.to_string());
        let (armed2, lost2) = (armed.clone(), lost.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut l = live2.lock().unwrap();
                l.push(client.try_clone().unwrap());
                l.push(server.try_clone().unwrap());
                drop(l);
                // Set before the request goes on, so its answer is never
                // relayed.
                let deaf = Arc::new(AtomicBool::new(false));
                let (mut from, mut to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (armed, lost, deaf2) = (armed2.clone(), lost2.clone(), deaf.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let chunk = &buf[..n];
                        let hit = {
                            let mut a = armed.lock().unwrap();
                            let hit = a.as_deref().is_some_and(|needle| {
                                chunk.windows(needle.len()).any(|w| w == needle)
                            });
                            if hit {
                                *a = None;
                            }
                            hit
                        };
                        if hit {
                            deaf2.store(true, Ordering::SeqCst);
                            lost.fetch_add(1, Ordering::SeqCst);
                        }
                        if to.write_all(chunk).is_err() {
                            break;
                        }
                        if hit {
                            // Time for the server to act on it, then cut.
                            std::thread::sleep(std::time::Duration::from_millis(300));
                            let _ = from.shutdown(Shutdown::Both);
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Both);
                });
                let (mut from, mut to) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || deaf.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err()
                        {
                            break;
                        }
                    }
                    let _ = to.shutdown(Shutdown::Both);
                });
            }
        });
        TcpProxy {
            port,
            up,
            live,
            armed,
            lost,
        }
    }

    /// The next request (one read from the client) holding `needle` goes
    /// through, and its answer is lost with the connection.
    pub fn lose_answer_to(&self, needle: &[u8]) {
        *self.armed.lock().unwrap() = Some(needle.to_vec());
    }

    /// How many answers [`TcpProxy::lose_answer_to`] made lost.
    pub fn answers_lost(&self) -> u64 {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Cut every connection and refuse new ones (`false`), or accept again.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for s in self.live.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}
