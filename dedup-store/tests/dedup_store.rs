//! One conformance suite for every dedup store: the embedded redb file (in
//! a temp dir), Redis (scripts/redis.sh, or `IDEM_TEST_REDIS_URL`) and
//! PostgreSQL (scripts/postgres.sh), each test under a namespace of its
//! own; the in-memory store runs it too, as the reference.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem_dedup_store::{
    Claim, DedupError, DedupStore, EmbeddedDedupStore, MemoryDedupStore, PostgresDedupStore,
    RedisDedupStore, Reservation, Seen,
};
use idem_testkit::*;
use std::sync::Arc;
use std::time::Duration;

fn redis_url() -> String {
    std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Memory,
    Embedded,
    Redis,
    /// Redis reserving through its Lua script (the path for Redis < 7.0).
    RedisScript,
    Postgres,
}

const KINDS: [Kind; 5] = [
    Kind::Memory,
    Kind::Embedded,
    Kind::Redis,
    Kind::RedisScript,
    Kind::Postgres,
];

/// Where one test's stores live: two handles on the same ids (two
/// connections, or the same file) for races.
struct Place {
    kind: Kind,
    namespace: String,
    dir: tempfile::TempDir,
    schema: String,
    memory: Arc<MemoryDedupStore>,
    embedded: std::sync::Mutex<Option<Arc<EmbeddedDedupStore>>>,
}

impl Place {
    fn new(kind: Kind, retention: Duration) -> Self {
        Place {
            kind,
            namespace: fresh_schema("ns"),
            dir: tempfile::tempdir().unwrap(),
            schema: fresh_schema("dedup"),
            memory: Arc::new(MemoryDedupStore::new(retention)),
            embedded: std::sync::Mutex::new(None),
        }
    }

    /// A handle on this place's ids with `retention`.
    async fn open(&self, retention: Duration) -> Arc<dyn DedupStore> {
        match self.kind {
            Kind::Memory => self.memory.clone(),
            Kind::Embedded => {
                let mut slot = self.embedded.lock().unwrap();
                let store = slot.get_or_insert_with(|| {
                    Arc::new(
                        EmbeddedDedupStore::open(
                            &self.dir.path().join("ids.redb"),
                            &self.namespace,
                            retention,
                        )
                        .unwrap(),
                    )
                });
                Arc::new(store.clone())
            }
            Kind::Redis | Kind::RedisScript => {
                let mut s =
                    RedisDedupStore::connect(&redis_url(), None, &self.namespace, retention)
                        .await
                        .unwrap_or_else(|e| panic!("{e}"));
                if matches!(self.kind, Kind::RedisScript) {
                    s = s.reserving_by_script();
                }
                s.ensure_marker().await.unwrap();
                Arc::new(s)
            }
            Kind::Postgres => {
                let cfg: tokio_postgres::Config = pg_url().parse().unwrap();
                let mgr = deadpool_postgres::Manager::new(cfg, tokio_postgres::NoTls);
                let pool = deadpool_postgres::Pool::builder(mgr)
                    .max_size(2)
                    .build()
                    .unwrap();
                Arc::new(
                    PostgresDedupStore::open(
                        pool,
                        "test",
                        &self.schema,
                        "idem_dedup",
                        &self.namespace,
                        retention,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
                )
            }
        }
    }
}

fn claims(ids: &[&str]) -> Vec<Claim> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| Claim::new(*id, "orders/0", i as u64))
        .collect()
}

const HOUR: Duration = Duration::from_secs(3600);

/// Reserve, repeat, pending, confirm, own retry, release, take over.
async fn lifecycle(kind: Kind) {
    let place = Place::new(kind, HOUR);
    let s = place.open(HOUR).await;
    // Empty calls (a batch of repeats only) are no-ops, not errors.
    assert_eq!(s.reserve("r1", &[]).await.unwrap(), []);
    s.confirm(&[]).await.unwrap();
    s.take_over("r1", &[]).await.unwrap();
    s.release("r1", &[]).await.unwrap();
    let batch = claims(&["a", "b", "a", "c"]);
    assert_eq!(
        s.reserve("r1", &batch).await.unwrap(),
        [Seen::New, Seen::New, Seen::Repeat, Seen::New],
        "{kind:?}"
    );
    // The same runner retrying its batch gets its reservations back.
    assert_eq!(
        s.reserve("r1", &batch).await.unwrap(),
        [Seen::New, Seen::New, Seen::Repeat, Seen::New],
        "{kind:?}: own retry"
    );
    // Another runner sees them pending, with the position that holds them.
    let pending = |offset| {
        Seen::Pending(Reservation {
            owner: "r1".into(),
            partition: "orders/0".into(),
            offset,
        })
    };
    assert_eq!(
        s.reserve("r2", &claims(&["a", "b"])).await.unwrap(),
        [pending(0), pending(1)],
        "{kind:?}: pending"
    );
    s.confirm(&["a"]).await.unwrap();
    assert_eq!(
        s.reserve("r2", &claims(&["a", "b", "d"])).await.unwrap(),
        [Seen::Done, pending(1), Seen::New],
        "{kind:?}: after confirm"
    );
    // Done stays done even for the runner that reserved it.
    assert_eq!(
        s.reserve("r1", &claims(&["a"])).await.unwrap(),
        [Seen::Done]
    );

    // Releasing: only the owner's reservation goes.
    s.release("r2", &["b", "a"]).await.unwrap();
    assert_eq!(
        s.reserve("r3", &claims(&["b", "a"])).await.unwrap(),
        [pending(1), Seen::Done],
        "{kind:?}: a stranger's release changes nothing"
    );
    s.release("r1", &["b", "c"]).await.unwrap();
    assert_eq!(
        s.reserve("r3", &claims(&["b"])).await.unwrap(),
        [Seen::New],
        "{kind:?}: released"
    );

    // Taking over a pending id: it is the new owner's, at its position.
    let d = Claim::new("d", "orders/7", 99);
    s.take_over("r4", &[&d]).await.unwrap();
    assert_eq!(
        s.reserve("r5", &claims(&["d"])).await.unwrap(),
        [Seen::Pending(Reservation {
            owner: "r4".into(),
            partition: "orders/7".into(),
            offset: 99
        })],
        "{kind:?}: taken over"
    );
    assert_eq!(s.reserve("r4", &[d]).await.unwrap(), [Seen::New]);
}

/// Ids are forgotten after the retention, reserved or done.
async fn expiry(kind: Kind) {
    let short = Duration::from_millis(1500);
    let place = Place::new(kind, short);
    let s = place.open(short).await;
    assert_eq!(
        s.reserve("r1", &claims(&["x", "y"])).await.unwrap(),
        [Seen::New, Seen::New]
    );
    s.confirm(&["x"]).await.unwrap();
    assert_eq!(
        s.reserve("r2", &claims(&["x"])).await.unwrap(),
        [Seen::Done]
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        s.reserve("r2", &claims(&["x", "y"])).await.unwrap(),
        [Seen::New, Seen::New],
        "{kind:?}: expired"
    );
}

/// 1,000 claims with 10% repeated ids: each distinct id New once, every
/// repeat Repeat; the next batch sees them all as pending or done.
async fn big_batch(kind: Kind) {
    let place = Place::new(kind, HOUR);
    let s = place.open(HOUR).await;
    let batch: Vec<Claim> = (0..1000u64)
        .map(|i| {
            let id = if i % 10 == 9 { i - 5 } else { i };
            Claim::new(format!("id-{id}"), "p", i)
        })
        .collect();
    let seen = s.reserve("r1", &batch).await.unwrap();
    let news = seen.iter().filter(|s| **s == Seen::New).count();
    let repeats = seen.iter().filter(|s| **s == Seen::Repeat).count();
    assert_eq!((news, repeats), (900, 100), "{kind:?}");
    let ids: Vec<&str> = batch.iter().map(|c| c.id.as_str()).collect();
    s.confirm(&ids).await.unwrap();
    let again = s.reserve("r2", &batch).await.unwrap();
    assert_eq!(
        again.iter().filter(|s| **s == Seen::Done).count(),
        900,
        "{kind:?}"
    );
}

/// Two handles reserve the same 500 ids at once: each id is New for
/// exactly one of them.
async fn race(kind: Kind) {
    let place = Place::new(kind, HOUR);
    let (a, b) = (place.open(HOUR).await, place.open(HOUR).await);
    let batch: Vec<Claim> = (0..500u64)
        .map(|i| Claim::new(format!("r-{i}"), "p", i))
        .collect();
    let mut wins = vec![0; 500];
    for round in 0..4 {
        // Chunks in opposite orders, so the two interleave.
        let fwd: Vec<Vec<Claim>> = batch.chunks(50).map(|c| c.to_vec()).collect();
        let mut back = fwd.clone();
        back.reverse();
        let owner = |w: &str| format!("{w}{round}");
        let (ra, rb) = tokio::join!(
            async {
                let mut out = Vec::new();
                for c in &fwd {
                    out.extend(a.reserve(&owner("a"), c).await.unwrap());
                }
                out
            },
            async {
                let mut out = Vec::new();
                for c in &back {
                    out.push(b.reserve(&owner("b"), c).await.unwrap());
                }
                out.reverse();
                out.concat()
            }
        );
        for (i, (x, y)) in ra.iter().zip(&rb).enumerate() {
            let n = usize::from(*x == Seen::New) + usize::from(*y == Seen::New);
            if round == 0 {
                assert_eq!(n, 1, "{kind:?}: id {i}: {x:?} / {y:?}");
            }
            wins[i] += n;
        }
    }
    // Later rounds find every id held by round 0's winner.
    assert!(wins.iter().all(|w| *w == 1), "{kind:?}");
}

/// Two namespaces never see each other's ids.
async fn namespaces(kind: Kind) {
    let (p1, p2) = (Place::new(kind, HOUR), Place::new(kind, HOUR));
    if matches!(kind, Kind::Memory) {
        return; // one store per namespace by construction
    }
    let (s1, s2) = (p1.open(HOUR).await, p2.open(HOUR).await);
    s1.reserve("r", &claims(&["n"])).await.unwrap();
    s1.confirm(&["n"]).await.unwrap();
    assert_eq!(s2.reserve("r", &claims(&["n"])).await.unwrap(), [Seen::New]);
}

/// Positions for sinks without their own: each open fences the one
/// before; a fenced save stores nothing; namespaces are apart.
async fn positions(kind: Kind) {
    let place = Place::new(kind, HOUR);
    let (a, b) = (place.open(HOUR).await, place.open(HOUR).await);
    assert_eq!(a.positions().await.unwrap(), []);
    let first = a.open_position("orders/0").await.unwrap();
    assert_eq!(first.next_offset, None, "{kind:?}");
    assert!(a.save_position("orders/0", first.epoch, 10).await.unwrap());
    let second = b.open_position("orders/0").await.unwrap();
    assert!(second.epoch > first.epoch, "{kind:?}");
    assert_eq!(second.next_offset, Some(10), "{kind:?}");
    // The first runner is fenced: its save is refused and changes nothing.
    assert!(!a.save_position("orders/0", first.epoch, 99).await.unwrap());
    assert!(b.save_position("orders/0", second.epoch, 20).await.unwrap());
    // A partition never opened cannot be saved to.
    assert!(!a.save_position("orders/1", 1, 5).await.unwrap());
    b.open_position("orders/1").await.unwrap();
    let all = a.positions().await.unwrap();
    let names: Vec<&str> = all.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(names, ["orders/0", "orders/1"], "{kind:?}");
    assert_eq!(all[0].1.next_offset, Some(20), "{kind:?}");
    assert_eq!(all[1].1.next_offset, None, "{kind:?}");
    if !matches!(kind, Kind::Memory) {
        let other = Place::new(kind, HOUR).open(HOUR).await;
        assert_eq!(other.positions().await.unwrap(), [], "{kind:?}");
    }
}

macro_rules! suite {
    ($($name:ident),+) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            for kind in KINDS {
                super::$name(kind).await;
            }
        }
    )+};
}

mod every_store {
    suite!(lifecycle, expiry, big_batch, race, namespaces, positions);
    use super::KINDS;
}

#[tokio::test]
async fn the_embedded_store_keeps_ids_across_a_reopen_and_refuses_a_second_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ids.redb");
    {
        let s = Arc::new(EmbeddedDedupStore::open(&path, "ns", HOUR).unwrap());
        s.reserve("r1", &claims(&["a", "b"])).await.unwrap();
        s.confirm(&["a"]).await.unwrap();
        // The same file open twice (as a second runner would): refused.
        let err = EmbeddedDedupStore::open(&path, "ns", HOUR).err().unwrap();
        assert!(
            err.to_string().contains("one runner per dedup file"),
            "{err}"
        );
    }
    let s = Arc::new(EmbeddedDedupStore::open(&path, "ns", HOUR).unwrap());
    assert_eq!(
        s.reserve("r2", &claims(&["a", "b"])).await.unwrap(),
        [
            Seen::Done,
            Seen::Pending(Reservation {
                owner: "r1".into(),
                partition: "orders/0".into(),
                offset: 1
            })
        ]
    );
}

/// A runner killed while creating the file (redb had not written its
/// header yet, as a crash test once caught) does not leave a file that
/// never opens again; nor does a creation killed before its rename.
#[tokio::test]
async fn an_embedded_store_whose_creation_was_killed_opens_anew() {
    let dir = tempfile::tempdir().unwrap();
    for (i, junk) in [vec![], vec![0u8; 8192]].into_iter().enumerate() {
        let path = dir.path().join(format!("ids{i}.redb"));
        std::fs::write(&path, &junk).unwrap();
        let leftover = dir.path().join(format!(".ids{i}.redb.creating-1"));
        std::fs::write(&leftover, b"half").unwrap();
        let s = Arc::new(EmbeddedDedupStore::open(&path, "ns", HOUR).unwrap());
        s.reserve("r", &claims(&["a"])).await.unwrap();
        s.confirm(&["a"]).await.unwrap();
        drop(s);
        let s = Arc::new(EmbeddedDedupStore::open(&path, "ns", HOUR).unwrap());
        assert_eq!(
            s.reserve("r2", &claims(&["a"])).await.unwrap(),
            [Seen::Done]
        );
        assert!(!leftover.exists(), "the killed creation's file is left");
    }
    // A file that is not a store at all is still refused, not replaced.
    let other = dir.path().join("other.redb");
    std::fs::write(&other, b"not a redb file").unwrap();
    assert!(EmbeddedDedupStore::open(&other, "ns", HOUR).is_err());
    assert_eq!(std::fs::read(&other).unwrap(), b"not a redb file");
}

#[tokio::test]
async fn a_redis_that_lost_its_ids_is_reported_not_trusted() {
    let namespace = fresh_schema("lost");
    let s = RedisDedupStore::connect(&redis_url(), None, &namespace, HOUR)
        .await
        .unwrap();
    assert!(
        !s.ensure_marker().await.unwrap(),
        "a new namespace has no marker"
    );
    assert!(s.ensure_marker().await.unwrap());
    s.reserve("r", &claims(&["a"])).await.unwrap();
    let epoch = s.open_position("p").await.unwrap().epoch;
    // What a restart without persistence (or FLUSHDB) does to the marker.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("idem:{{{namespace}}}:_marker"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = s.reserve("r", &claims(&["b"])).await.unwrap_err();
    assert!(!err.is_retriable(), "{err}");
    assert!(err.to_string().contains("lost its ids"), "{err}");
    // Positions went with the ids: a loss, not a newer owner (fenced).
    let err = s.save_position("p", epoch, 5).await.unwrap_err();
    assert!(matches!(err, DedupError::Lost { .. }), "{err}");
    let err = s.open_position("p").await.unwrap_err();
    assert!(matches!(err, DedupError::Lost { .. }), "{err}");
    // Acknowledged (the marker written again), it goes on.
    assert!(!s.ensure_marker().await.unwrap());
    assert_eq!(s.reserve("r", &claims(&["b"])).await.unwrap(), [Seen::New]);
}

#[tokio::test]
async fn a_missing_redis_is_named_with_how_to_start_it() {
    let err = match RedisDedupStore::connect("redis://:hunter2@127.0.0.1:1", None, "ns", HOUR).await
    {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("127.0.0.1:1") && err.contains("scripts/redis.sh"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "the password leaked: {err}");
}

/// Redis over TLS with a password (a private `redis-server`, Debian's
/// build, on a port of its own): the conformance lifecycle passes with the
/// CA file; another CA, a wrong password, or plain TCP are refused with
/// messages that keep the password out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_a_password() {
    use rcgen::{CertificateParams, KeyPair};
    let ca = test_ca;
    let (trusted, other) = (ca("Idem test CA"), ca("Someone else's CA"));
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &trusted)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let (cert_file, key_file) = (
        file("cert.pem", cert.pem()),
        file("key.pem", key.serialize_pem()),
    );
    let (trusted_file, other_file) = (
        file("ca.pem", trusted.pem()),
        file("other.pem", other.pem()),
    );
    let port = free_port();
    let _server = Reaped(
        std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--tls-cert-file")
            .arg(&cert_file)
            .arg("--tls-key-file")
            .arg(&key_file)
            .arg("--tls-ca-cert-file")
            .arg(&trusted_file)
            .args([
                "--tls-auth-clients",
                "no",
                "--requirepass",
                "s3cret",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/redis.sh installs it)"),
    );
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = |pw: &str| format!("rediss://:{pw}@localhost:{port}");

    let s = RedisDedupStore::connect(&url("s3cret"), Some(&trusted_file), "tls", HOUR)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.ensure_marker().await.unwrap();
    assert_eq!(
        s.reserve("r", &claims(&["a", "a"])).await.unwrap(),
        [Seen::New, Seen::Repeat]
    );
    s.confirm(&["a"]).await.unwrap();
    assert_eq!(s.reserve("q", &claims(&["a"])).await.unwrap(), [Seen::Done]);

    let refused = |r: Result<RedisDedupStore, idem_dedup_store::DedupError>| match r {
        Ok(_) => panic!("connected"),
        Err(e) => e.to_string(),
    };
    let err =
        refused(RedisDedupStore::connect(&url("s3cret"), Some(&other_file), "tls", HOUR).await);
    assert!(err.contains("certificate"), "{err}");
    assert!(!err.contains("s3cret"), "the password leaked: {err}");
    let err =
        refused(RedisDedupStore::connect(&url("wrong-pw"), Some(&trusted_file), "tls", HOUR).await);
    assert!(!err.contains("wrong-pw"), "the password leaked: {err}");
    assert!(
        err.to_lowercase().contains("pass") || err.to_lowercase().contains("auth"),
        "{err}"
    );
}

/// A private Redis without persistence, restarted under a connected store:
/// calls fail as retriable while it is down, then the restarted (empty)
/// server is reported as having lost its ids, not trusted; acknowledged,
/// the store goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let start = || private_redis(port, dir.path());
    let mut server = start();
    let url = format!("redis://127.0.0.1:{port}");
    let s = RedisDedupStore::connect(&url, None, "restart", HOUR)
        .await
        .unwrap();
    s.ensure_marker().await.unwrap();
    s.reserve("r", &claims(&["a"])).await.unwrap();
    s.confirm(&["a"]).await.unwrap();

    server.0.kill().unwrap();
    server.0.wait().unwrap();
    let down = s.reserve("r", &claims(&["a"])).await.unwrap_err();
    assert!(down.is_retriable(), "{down}");

    let _server = start();
    // The connection comes back; the ids do not, and that is said.
    let mut lost = None;
    for _ in 0..50 {
        match s.reserve("r", &claims(&["a"])).await {
            Err(e) if !e.is_retriable() => {
                lost = Some(e);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(seen) => panic!("an emptied store answered {seen:?}"),
        }
    }
    let lost = lost.expect("the loss was never reported");
    assert!(lost.to_string().contains("lost its ids"), "{lost}");
    assert!(!s.ensure_marker().await.unwrap());
    // "a" is forgotten: that is what the loss means.
    assert_eq!(s.reserve("r", &claims(&["a"])).await.unwrap(), [Seen::New]);
}
