#!/usr/bin/env bash
# Apache Kafka for the tests on 127.0.0.1:9092: one KRaft node (broker and
# controller, the controller on the next port), no docker. Two more
# listeners for the security tests: SASL_PLAINTEXT on 9094 and SASL_SSL on
# 9095, both SCRAM-SHA-512 for the user `idem` (password
# IDEM_KAFKA_PASSWORD, default `idem-kafka-secret`), the TLS one with a
# certificate from a test CA made once with openssl (DATA/tls/ca.pem). The
# jars come from Maven Central once (`mvn dependency:copy-dependencies`,
# server-lib's maven_jars, into ~/.cache/idem/kafka-VERSION/libs, about
# 15 s); the storage is formatted afresh each time the broker starts; the
# JVM gets a bounded heap. Reuses a broker that already answers there with
# the same configuration (one started with another is started again).
# Idempotent. `scripts/kafka.sh stop` stops it.
set -euo pipefail
VERSION=4.4.0
HOST=127.0.0.1
PORT="${IDEM_KAFKA_PORT:-9092}"
CONTROLLER_PORT=$((PORT + 1))
SASL_PORT=$((PORT + 2))
TLS_PORT=$((PORT + 3))
SCRAM_USER=idem
SCRAM_PASSWORD="${IDEM_KAFKA_PASSWORD:-idem-kafka-secret}"
HOME_DIR="$HOME/.cache/idem/kafka-$VERSION"
DATA="${IDEM_KAFKA_DATA:-$HOME/.cache/idem/kafka-data-$PORT}"
PIDFILE="$DATA/kafka.pid"
HEAP="${IDEM_KAFKA_HEAP:-768m}"

# shellcheck source=scripts/server-lib.sh
. "$(dirname "$0")/server-lib.sh"

if [ "${1:-}" = stop ]; then
  stop_server kafka
  exit 0
fi

# The broker's own tools, for the tests and for operators, e.g.
# ~/.cache/idem/kafka-4.4.0/bin/kafka-consumer-groups --describe --group G
# (written before the reuse check: a broker started earlier gets them too).
mkdir -p "$HOME_DIR/bin"
cat >"$HOME_DIR/bin/kafka-consumer-groups" <<EOF
#!/usr/bin/env bash
exec java -Xmx128m -cp "$HOME_DIR/libs/*" \\
  org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --bootstrap-server $HOST:$PORT "\$@"
EOF
chmod +x "$HOME_DIR/bin/kafka-consumer-groups"

# The SCRAM user, through the plaintext listener (idempotent).
scram_user() {
  java -Xmx128m -cp "$HOME_DIR/libs/*" org.apache.kafka.tools.ConfigCommand \
    --bootstrap-server "$HOST:$PORT" --alter --entity-type users --entity-name "$SCRAM_USER" \
    --add-config "SCRAM-SHA-512=[iterations=4096,password=$SCRAM_PASSWORD]" >/dev/null
}

need_java_maven
if ! [ -f "$HOME_DIR/libs/kafka_2.13-$VERSION.jar" ]; then
  echo "kafka.sh: fetching Apache Kafka $VERSION from Maven Central into $HOME_DIR (once)" >&2
  maven_jars "$HOME_DIR/libs" "$(maven_dep org.apache.kafka kafka_2.13 "$VERSION")$(maven_dep org.apache.kafka kafka-tools "$VERSION")$(maven_dep org.apache.logging.log4j log4j-slf4j-impl 2.25.5)"
fi

# The TLS listener's certificate, from a CA of its own (once).
TLS="$DATA/tls"
if ! [ -f "$TLS/broker.p12" ]; then
  if ! command -v openssl >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "kafka.sh: openssl is needed for the TLS listener: sudo apt-get install openssl" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null
  fi
  mkdir -p "$TLS"
  (
    cd "$TLS"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=idem test CA" \
      -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$HOST" -keyout broker.key -out broker.csr 2>/dev/null
    printf 'subjectAltName=IP:%s,DNS:localhost\n' "$HOST" >san.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile san.ext -out broker.pem 2>/dev/null
    openssl pkcs12 -export -in broker.pem -inkey broker.key -certfile ca.pem \
      -passout pass:idem-tls -out broker.p12.part
    mv broker.p12.part broker.p12
  )
fi

cat >"$DATA/log4j2.properties" <<EOF
status = error
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.kafka.name = kafka.server.KafkaRaftServer
logger.kafka.level = info
EOF

mkdir -p "$DATA"
cat >"$DATA/server.properties.new" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT,SASL_PLAINTEXT://$HOST:$SASL_PORT,SASL_SSL://$HOST:$TLS_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT,SASL_PLAINTEXT://$HOST:$SASL_PORT,SASL_SSL://$HOST:$TLS_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS/broker.p12
ssl.keystore.password=idem-tls
ssl.key.password=idem-tls
log.dirs=$DATA/logs
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
# A transaction left open by a dead producer is aborted soon after its
# transaction.timeout.ms (the broker looks every 2 s instead of 10 s).
transaction.abort.timed.out.transaction.cleanup.interval.ms=2000
# Groups on the consumer protocol (KIP-848) time out a silent member on the
# broker's side: 6 s, as the tests' classic groups ask for (default 45 s).
group.consumer.min.session.timeout.ms=6000
group.consumer.session.timeout.ms=6000
group.consumer.min.heartbeat.interval.ms=1000
group.consumer.heartbeat.interval.ms=1000
EOF

# A broker already answering is reused if it runs with this configuration;
# one started by an older version of this script is started again.
if listening; then
  if cmp -s "$DATA/server.properties.new" "$DATA/server.properties"; then
    rm -f "$DATA/server.properties.new"
    exit 0
  fi
  stop_server kafka
fi
mv "$DATA/server.properties.new" "$DATA/server.properties"

java_cmd=(java "-Xms256m" "-Xmx$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20
  -Djava.awt.headless=true "-Dlog4j2.configurationFile=$DATA/log4j2.properties"
  -cp "$HOME_DIR/libs/*")

# A broker that is not running starts on fresh storage: its topics are the
# tests' own (each test makes its own), and a broker recovering thousands of
# them from earlier runs took 50 s to 60+ s to listen. A Connect worker keeps
# its state in topics of this broker, so one still running is stopped too
# (connect.sh starts it again). IDEM_KAFKA_KEEP_DATA=1 keeps the storage.
if [ "${IDEM_KAFKA_KEEP_DATA:-0}" != 1 ] && [ -d "$DATA/logs" ]; then
  echo "kafka.sh: starting on fresh storage (the old topics were the tests'; IDEM_KAFKA_KEEP_DATA=1 keeps them)" >&2
  rm -rf "$DATA/logs"
  bash "$(dirname "$0")/connect.sh" stop
fi
if ! [ -f "$DATA/logs/meta.properties" ]; then
  cluster="$("${java_cmd[@]}" kafka.tools.StorageTool random-uuid)"
  "${java_cmd[@]}" kafka.tools.StorageTool format --ignore-formatted \
    -t "$cluster" -c "$DATA/server.properties" >/dev/null
fi

# A JVM takes a few seconds to listen: wait up to 120 s.
START_TRIES=1200 start_server kafka "${java_cmd[@]}" kafka.Kafka "$DATA/server.properties"
scram_user
