# Shared by the scripts that start a test server in the background:
# `listening`, `stop_server NAME`, `start_server NAME CMD...`. The caller
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
