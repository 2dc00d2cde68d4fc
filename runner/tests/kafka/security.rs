//! The source against the broker's SASL/SCRAM-SHA-512 listener and its TLS
//! listener (scripts/kafka.sh writes both, the TLS certificate signed by a
//! CA of its own): the password only through `${VAR}` and never printed, a
//! wrong password and a CA that did not sign the broker's certificate
//! named at start.

use super::support::*;
use idem_testkit::*;
use std::process::Output;
use std::time::Duration;

/// scripts/kafka.sh's listeners and its user's default password.
const SASL: &str = "127.0.0.1:9094";
const SASL_SSL: &str = "127.0.0.1:9095";
const PASSWORD: &str = "idem-kafka-secret";

/// The CA that signed the TLS listener's certificate.
fn broker_ca() -> String {
    let home = std::env::var("HOME").unwrap();
    format!("{home}/.cache/idem/kafka-data-9092/tls/ca.pem")
}

/// A backfill of `topic` through `brokers` with the SCRAM user, its
/// password from `KAFKA_PASSWORD`; `extra` more librdkafka properties.
fn secured(
    topic: &str,
    schema: &str,
    brokers: &str,
    protocol: &str,
    extra: &[(&str, &str)],
) -> String {
    let conf = extra.iter().fold(
        Conf::new(topic, schema)
            .source("stop_at_end = true")
            .property("security.protocol", protocol)
            .property("sasl.mechanism", "SCRAM-SHA-512")
            .property("sasl.username", "idem")
            .property("sasl.password", "${KAFKA_PASSWORD}"),
        |c, (k, v)| c.property(k, v),
    );
    conf.toml().replace(
        &format!("brokers = \"{BROKERS}\""),
        &format!("brokers = \"{brokers}\""),
    )
}

fn run(w: &Workdir, name: &str, toml: &str, password: &str, command: &str) -> Output {
    let cfg = w.write(name, toml);
    idem()
        .arg(command)
        .arg(&cfg)
        .env("KAFKA_PASSWORD", password)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap()
}

fn all(out: &Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_tls_listeners_take_the_password_from_the_environment_only() {
    let topic = fresh_topic("idem_secure", 2).await;
    produce(&topic, 0..1_000).await;
    let w = Workdir::new();
    let ca = broker_ca();
    for (name, brokers, protocol, extra) in [
        ("sasl", SASL, "SASL_PLAINTEXT", vec![]),
        (
            "sasl_ssl",
            SASL_SSL,
            "SASL_SSL",
            vec![("ssl.ca.location", ca.as_str())],
        ),
    ] {
        let schema = fresh_schema(&format!("kafka_{name}"));
        let toml = secured(&topic, &schema, brokers, protocol, &extra);
        let out = run(&w, &format!("{name}.toml"), &toml, PASSWORD, "check");
        assert!(out.status.success(), "{name}: {}", all(&out));
        let out = run(&w, &format!("{name}.toml"), &toml, PASSWORD, "run");
        let printed = all(&out);
        assert!(out.status.success(), "{name}: {printed}");
        assert!(
            !printed.contains(PASSWORD),
            "{name}: the password was printed:\n{printed}"
        );
        assert_eq!(count(&schema).await, (1_000, 1_000), "{name}");
        assert_eq!(positions(&schema).await, end_offsets(&topic, 2), "{name}");
    }

    // A wrong password stops the connector at start, saying why; neither
    // password is printed.
    let schema = fresh_schema("kafka_badpw");
    let toml = secured(&topic, &schema, SASL, "SASL_PLAINTEXT", &[]);
    let started = std::time::Instant::now();
    let out = run(&w, "badpw.toml", &toml, "wrong-Pa55word", "run");
    let printed = all(&out);
    assert_eq!(out.status.code(), Some(1), "{printed}");
    assert!(started.elapsed() < Duration::from_secs(60), "{printed}");
    assert!(
        printed.contains(&format!("could not connect to {SASL} within 10s"))
            && printed.contains("SASL authentication error: Authentication failed"),
        "{printed}"
    );
    assert!(
        !printed.contains("wrong-Pa55word") && !printed.contains(PASSWORD),
        "{printed}"
    );

    // A CA of the test's own did not sign the broker's certificate.
    let other = w.write("other-ca.pem", &test_ca("not the broker's CA").pem());
    let schema = fresh_schema("kafka_badca");
    let other = other.display().to_string();
    let toml = secured(
        &topic,
        &schema,
        SASL_SSL,
        "SASL_SSL",
        &[("ssl.ca.location", &other)],
    );
    let out = run(&w, "badca.toml", &toml, PASSWORD, "run");
    let printed = all(&out);
    assert_eq!(out.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains(&format!("could not connect to {SASL_SSL} within 10s"))
            && printed.contains("certificate verify failed"),
        "{printed}"
    );
}
