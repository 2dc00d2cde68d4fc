# Shared by the scripts that start a test server in the background:
# `listening`, `stop_server NAME`, `start_server NAME CMD...`, and for the
# Java ones `need_java_maven`, `maven_dep` and `maven_jars`. The caller
# sets HOST, PORT, DATA (its folder) and PIDFILE.

# DATA made absolute: servers run from it (see start_server).
mkdir -p "$DATA"
DATA="$(cd "$DATA" && pwd)"

listening() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

# Stop the server this script started, if it runs.
stop_server() {
  if [ -f "$PIDFILE" ] && kill "$(cat "$PIDFILE")" 2>/dev/null; then
    for _ in $(seq 1 50); do listening || break; sleep 0.1; done
    echo "$(basename "$0"): stopped $1" >&2
  fi
  rm -f "$PIDFILE"
}

# Start CMD in the background, logging to $DATA/NAME.log; wait until it
# listens (START_TRIES tenths of a second, 10 s by default) or show its
# log and fail.
start_server() {
  local name="$1"
  shift
  echo "$(basename "$0"): starting $name on $HOST:$PORT" >&2
  # From DATA, not from the caller's folder: a server outlives the checkout
  # that started it, and some (s3s-fs) fail once their working directory
  # is deleted. The subshell execs the server, so $! is its pid.
  (cd "$DATA" && exec nohup "$@" >"$DATA/$name.log" 2>&1) &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 "${START_TRIES:-100}"); do
    listening && return 0
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "$(basename "$0"): $name did not start; its log:" >&2
  tail -n 20 "$DATA/$name.log" >&2
  return 1
}

# Java 17+ and Maven: from Debian when missing.
need_java_maven() {
  if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "$(basename "$0"): needs Java 17+ and Maven: sudo apt-get install openjdk-17-jre-headless maven" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
  fi
}

# `maven_dep GROUP ARTIFACT VERSION`: a pom <dependency>.
maven_dep() {
  # An optional 4th argument is the artifact's classifier (`tests`, ...).
  printf '<dependency><groupId>%s</groupId><artifactId>%s</artifactId><version>%s</version>%s</dependency>' "$1" "$2" "$3" "${4:+<classifier>$4</classifier>}"
}

# `maven_jars DIR DEPENDENCIES`: the runtime jars of DEPENDENCIES (from
# maven_dep) into DIR, from Maven Central through a small pom written to a
# temporary folder; DIR appears whole or not at all.
maven_jars() {
  local dir="$1" work
  work="$(mktemp -d)"
  mkdir -p "$(dirname "$dir")"
  cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>idem.test</groupId>
  <artifactId>$(basename "$dir")</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>$2</dependencies>
</project>
EOF
  rm -rf "$dir.tmp"
  (cd "$work" && mvn -q -B -Dstyle.color=never dependency:copy-dependencies \
    -DoutputDirectory="$dir.tmp" -DincludeScope=runtime >&2)
  rm -rf "$dir" "$work"
  mv "$dir.tmp" "$dir"
}
