#!/usr/bin/env bash
# An Apache Iceberg REST catalog for the tests on 127.0.0.1:8181: the
# reference server of the REST spec from Iceberg's own test fixtures
# (iceberg-open-api and iceberg-core's test jar, Maven Central), started
# by scripts/iceberg-rest/RestServer.java on loopback only. Its tables are
# kept by a JdbcCatalog in database `idem_rest` of the test PostgreSQL
# (scripts/postgres.sh); the server writes their metadata files through
# S3FileIO to bucket `idem-rest` of the test S3 store (scripts/s3.sh).
# The jars come once into ~/.cache/idem/iceberg-rest-VERSION; the JVM gets
# a bounded heap. Reuses a server that already answers. Idempotent.
# `scripts/iceberg-rest.sh stop` stops it.
set -euo pipefail
VERSION=1.10.0
AWS_SDK=2.31.50
HOST=127.0.0.1
PORT="${IDEM_ICEBERG_REST_PORT:-8181}"
HOME_DIR="$HOME/.cache/idem/iceberg-rest-$VERSION"
DATA="${IDEM_ICEBERG_REST_DATA:-$HOME/.cache/idem/iceberg-rest-data-$PORT}"
PIDFILE="$DATA/iceberg-rest.pid"
HEAP="${IDEM_ICEBERG_REST_HEAP:-256m}"
HERE="$(cd "$(dirname "$0")" && pwd)"

# shellcheck source=scripts/server-lib.sh
. "$HERE/server-lib.sh"

if [ "${1:-}" = stop ]; then
  stop_server iceberg-rest
  exit 0
fi

if listening && curl -sf "http://$HOST:$PORT/v1/config" >/dev/null; then
  exit 0
fi

bash "$HERE/postgres.sh"
bash "$HERE/s3.sh"
need_java_maven
if ! command -v javac >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "iceberg-rest.sh: needs a JDK (javac): sudo apt-get install openjdk-17-jdk-headless" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jdk-headless >/dev/null
fi
if ! [ -f "$HOME_DIR/libs/iceberg-core-$VERSION-tests.jar" ]; then
  echo "iceberg-rest.sh: fetching Iceberg $VERSION's REST catalog fixture from Maven Central into $HOME_DIR (once)" >&2
  maven_jars "$HOME_DIR/libs" "$(maven_dep org.apache.iceberg iceberg-core "$VERSION")$(maven_dep org.apache.iceberg iceberg-core "$VERSION" tests)$(maven_dep org.apache.iceberg iceberg-open-api "$VERSION" test-fixtures)$(maven_dep org.apache.iceberg iceberg-aws "$VERSION")$(maven_dep software.amazon.awssdk s3 "$AWS_SDK")$(maven_dep software.amazon.awssdk kms "$AWS_SDK")$(maven_dep software.amazon.awssdk sts "$AWS_SDK")$(maven_dep software.amazon.awssdk url-connection-client "$AWS_SDK")$(maven_dep org.eclipse.jetty jetty-servlet 11.0.25)$(maven_dep org.postgresql postgresql 42.7.7)$(maven_dep org.slf4j slf4j-simple 2.0.17)$(maven_dep org.apache.hadoop hadoop-client-api 3.4.1)$(maven_dep org.apache.hadoop hadoop-client-runtime 3.4.1)"
fi
mkdir -p "$DATA/classes"
if ! [ "$DATA/classes/RestServer.class" -nt "$HERE/iceberg-rest/RestServer.java" ]; then
  javac -nowarn -d "$DATA/classes" -cp "$HOME_DIR/libs/*" "$HERE/iceberg-rest/RestServer.java"
fi

# The database the JdbcCatalog keeps its tables in (its own: it looks for
# `iceberg_tables` in every schema), and the bucket its metadata files go
# to (moto keeps buckets in memory: made again each time).
if [ -z "$(PGPASSWORD=idem psql -h 127.0.0.1 -U idem -d idem_test -qAt \
  -c "SELECT 1 FROM pg_database WHERE datname = 'idem_rest'")" ]; then
  PGPASSWORD=idem psql -h 127.0.0.1 -U idem -d idem_test -v ON_ERROR_STOP=1 -qAt \
    -c 'CREATE DATABASE idem_rest' >/dev/null
fi
curl -s -o /dev/null -X PUT "http://127.0.0.1:5000/idem-rest"

export CATALOG_CATALOG__IMPL=org.apache.iceberg.jdbc.JdbcCatalog
export CATALOG_URI="jdbc:postgresql://127.0.0.1:5432/idem_rest"
export CATALOG_JDBC_USER=idem CATALOG_JDBC_PASSWORD=idem
export CATALOG_JDBC_SCHEMA__VERSION=V1
export CATALOG_WAREHOUSE=s3://idem-rest/warehouse
export CATALOG_IO__IMPL=org.apache.iceberg.aws.s3.S3FileIO
export CATALOG_S3_ENDPOINT=http://127.0.0.1:5000
export CATALOG_S3_PATH__STYLE__ACCESS=true
export CATALOG_S3_ACCESS__KEY__ID=idem-test CATALOG_S3_SECRET__ACCESS__KEY=idem-test
export CATALOG_CLIENT_REGION=us-east-1
START_TRIES=600 start_server iceberg-rest java "-Xms64m" "-Xmx$HEAP" -XX:+UseSerialGC \
  -Djava.awt.headless=true -cp "$DATA/classes:$HOME_DIR/libs/*" RestServer "$HOST" "$PORT"
for _ in $(seq 1 100); do
  curl -sf "http://$HOST:$PORT/v1/config" >/dev/null && break
  sleep 0.2
done
curl -sf "http://$HOST:$PORT/v1/config" >/dev/null || {
  echo "iceberg-rest.sh: the server does not answer GET /v1/config; its log:" >&2
  tail -n 30 "$DATA/iceberg-rest.log" >&2
  exit 1
}
echo "iceberg-rest.sh: ready: http://$HOST:$PORT (Iceberg $VERSION REST fixture)" >&2
