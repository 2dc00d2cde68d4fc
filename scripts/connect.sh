#!/usr/bin/env bash
# Kafka Connect with Debezium's PostgreSQL connector, for the change data
# capture tests: one distributed worker (REST API on 127.0.0.1:8083) on the
# broker of scripts/kafka.sh, capturing the cluster of scripts/postgres.sh
# (which sets wal_level = logical). The jars come from Maven Central once
# (`mvn dependency:copy-dependencies`, server-lib's maven_jars, into
# ~/.cache/idem/connect-VERSION: the worker on its classpath, Debezium as a
# plugin of its own); the JVM gets a bounded heap. Reuses a worker that
# already answers with the same configuration. Idempotent.
# `scripts/connect.sh stop` stops it.
set -euo pipefail
# Debezium 3.6 is built against Kafka 4.3 (4.4 dropped a class it uses); the
# 4.3 worker talks to the 4.4 broker.
KAFKA_VERSION=4.3.0
DEBEZIUM_VERSION=3.6.1.Final
HOST=127.0.0.1
PORT="${IDEM_CONNECT_PORT:-8083}"
BROKERS="${IDEM_KAFKA_BROKERS:-127.0.0.1:9092}"
HOME_DIR="$HOME/.cache/idem/connect-$KAFKA_VERSION"
PLUGINS="$HOME_DIR/plugins"
DATA="${IDEM_CONNECT_DATA:-$HOME/.cache/idem/connect-data-$PORT}"
PIDFILE="$DATA/connect.pid"
HEAP="${IDEM_CONNECT_HEAP:-512m}"

# shellcheck source=scripts/server-lib.sh
. "$(dirname "$0")/server-lib.sh"

if [ "${1:-}" = stop ]; then
  stop_server connect
  exit 0
fi

need_java_maven
if ! [ -f "$HOME_DIR/libs/connect-runtime-$KAFKA_VERSION.jar" ]; then
  echo "connect.sh: fetching Kafka Connect $KAFKA_VERSION from Maven Central into $HOME_DIR (once)" >&2
  maven_jars "$HOME_DIR/libs" "$(maven_dep org.apache.kafka connect-runtime "$KAFKA_VERSION")$(maven_dep org.apache.kafka connect-json "$KAFKA_VERSION")$(maven_dep org.apache.logging.log4j log4j-slf4j-impl 2.25.5)"
fi
if ! [ -f "$PLUGINS/debezium-connector-postgres/debezium-connector-postgres-$DEBEZIUM_VERSION.jar" ]; then
  echo "connect.sh: fetching Debezium $DEBEZIUM_VERSION (PostgreSQL connector) from Maven Central (once)" >&2
  mkdir -p "$PLUGINS"
  maven_jars "$PLUGINS/debezium-connector-postgres" "$(maven_dep io.debezium debezium-connector-postgres "$DEBEZIUM_VERSION")"
  # The worker provides the Kafka and Connect classes; a second copy in the
  # plugin would shadow them.
  rm -f "$PLUGINS"/debezium-connector-postgres/{kafka-clients,connect-api,connect-json,slf4j-api}-*.jar
fi

cat >"$DATA/log4j2.properties" <<EOF
status = error
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.connect.name = org.apache.kafka.connect.runtime.Worker
logger.connect.level = info
logger.debezium.name = io.debezium
logger.debezium.level = info
EOF

cat >"$DATA/worker.properties.new" <<EOF
# Kafka Connect $KAFKA_VERSION with Debezium $DEBEZIUM_VERSION
bootstrap.servers=$BROKERS
group.id=idem-connect
config.storage.topic=idem-connect-configs
offset.storage.topic=idem-connect-offsets
status.storage.topic=idem-connect-status
config.storage.replication.factor=1
offset.storage.replication.factor=1
status.storage.replication.factor=1
offset.storage.partitions=1
status.storage.partitions=1
# Each test names its own converters; these are the worker's defaults.
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
offset.flush.interval.ms=1000
listeners=http://$HOST:$PORT
plugin.path=$PLUGINS
plugin.discovery=hybrid_warn
EOF

if listening; then
  if cmp -s "$DATA/worker.properties.new" "$DATA/worker.properties"; then
    rm -f "$DATA/worker.properties.new"
    exit 0
  fi
  stop_server connect
fi
mv "$DATA/worker.properties.new" "$DATA/worker.properties"

java_cmd=(java "-Xms128m" "-Xmx$HEAP" -XX:+UseG1GC -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$DATA/log4j2.properties"
  -cp "$HOME_DIR/libs/*")
# A worker joins its group and reads its topics before the REST API
# answers: wait up to 90 s.
START_TRIES=900 start_server connect "${java_cmd[@]}" \
  org.apache.kafka.connect.cli.ConnectDistributed "$DATA/worker.properties"
# The REST API listens a little before the worker has joined its group.
for _ in $(seq 1 60); do
  curl -sf "http://$HOST:$PORT/connector-plugins" | grep -q PostgresConnector && break
  sleep 1
done
curl -sf "http://$HOST:$PORT/connector-plugins" | grep -q PostgresConnector || {
  echo "connect.sh: the worker does not list Debezium's PostgresConnector; its log:" >&2
  tail -n 30 "$DATA/connect.log" >&2
  exit 1
}
echo "connect.sh: ready: http://$HOST:$PORT (Debezium $DEBEZIUM_VERSION)" >&2
