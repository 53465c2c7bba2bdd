#!/usr/bin/env bash
# Local stack without Docker: Apache Kafka 4.1.1 (single-node KRaft, classpath from Maven
# Central) and Redis (Debian's redis-server), both bound to 127.0.0.1.
#
#   scripts/stack.sh up | down | status
#   scripts/stack.sh kafka-start | kafka-stop | redis-start | redis-stop
#
# `up` is idempotent: a service already answering on its port (started by a previous `up` or
# by someone else) is reused, never started twice. Only what this script starts is recorded
# (pidfiles in $STACK_DIR) and only that is ever stopped.
#
# Environment: KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093), REDIS_PORT (6379),
#   STACK_DIR (.stack, relative to the repo root), KAFKA_HEAP_OPTS (-Xms256m -Xmx512m),
#   REDIS_MAXMEMORY (1gb; Redis runs with an append-only file and evicts only keys with a TTL),
#   KAFKA_READY_TIMEOUT (60 s), REDIS_READY_TIMEOUT (15 s), STOP_TIMEOUT (60 s), JAVA_HOME.
# status exits 0 when both services are up, 3 otherwise.
#
# KAFKA_SASL=1 (opt-in; default PLAINTEXT): the broker authenticates every client with
# SASL/SCRAM-SHA-512 (listener SASL_PLAINTEXT), its controller listener with SASL/PLAIN (KRaft
# cannot use SCRAM there), and authorises with StandardAuthorizer, nothing allowed without an
# ACL. Super users: `broker` (itself) and `admin` (the admin step, python -m segmentation.admin).
# Passwords: KAFKA_<NAME>_PASSWORD for NAME in BROKER ADMIN PRODUCER CONSUMER TRAINER, else a
# random one generated once into $STACK_DIR/kafka/secrets/<name>.password (mode 600). broker and
# admin get their SCRAM credentials when the storage is formatted; the service principals from
# `make topics` (segmentation.admin). A data dir keeps the mode it was formatted with: use
# another STACK_DIR for a SASL broker. `scripts/stack.sh kafka-client-env NAME` prints the
# SEG_KAFKA_EXTRA and SEG_KAFKA_PASSWORD lines (sh) that make a service log in as NAME;
# `scripts/stack.sh kafka-secrets DIR` writes random <name>.password files into DIR (mode 600)
# for the ones still missing (docker-compose.yml reads its Kafka secrets from ./secrets).
#
# Redis Cluster for per-customer state past one node (not part of up/down/status):
#   scripts/stack.sh redis-cluster-up | redis-cluster-down | redis-cluster-node-start PORT
# three cluster-mode redis-server processes on $REDIS_CLUSTER_PORTS (7001 7002 7003), no
# replicas, data in $STACK_DIR/redis-cluster/<port> (a restarted node rejoins).
#
# Prometheus (Debian's `prometheus` binary; not part of up/down/status):
#   scripts/stack.sh prometheus-up [CONFIG]   # default monitoring/prometheus.yml
#   scripts/stack.sh prometheus-down | prometheus-status | prometheus-reload
# serves http://127.0.0.1:$PROM_PORT with its data in $STACK_DIR/prometheus/data and its log in
# $STACK_DIR/prometheus/prometheus.log. The config is checked with promtool first. up waits
# for /-/ready (PROM_READY_TIMEOUT, 30 s); reload re-reads the config and rules (SIGHUP).
# Environment: PROM_PORT (9090), PROM_READY_TIMEOUT (30 s), PROM_RETENTION (2d).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
REDIS_PORT="${REDIS_PORT:-6379}"
STACK_DIR="${STACK_DIR:-.stack}"
case "$STACK_DIR" in /*) ;; *) STACK_DIR="$ROOT/$STACK_DIR" ;; esac
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
KAFKA_READY_TIMEOUT="${KAFKA_READY_TIMEOUT:-60}"
REDIS_READY_TIMEOUT="${REDIS_READY_TIMEOUT:-15}"
# Persistence on (append-only file in $STACK_DIR/redis); when full, Redis evicts only keys with a
# TTL (per-customer state, replica state), never the model registry.
REDIS_MAXMEMORY="${REDIS_MAXMEMORY:-1gb}"
REDIS_CLUSTER_PORTS="${REDIS_CLUSTER_PORTS:-7001 7002 7003}"
STOP_TIMEOUT="${STOP_TIMEOUT:-60}"

HOST=127.0.0.1
KAFKA_DIR="$STACK_DIR/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_LOGS="$KAFKA_DIR/logs"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
KAFKA_CLUSTER_ID_FILE="$KAFKA_DIR/cluster.id"
KAFKA_PIDFILE="$STACK_DIR/kafka.pid"
KAFKA_TEMPLATE="$ROOT/stack/kafka-server.properties.template"
KAFKA_LOG4J="$ROOT/stack/kafka-log4j2.properties"
KAFKA_POM="$ROOT/stack/kafka-pom.xml"
KAFKA_SASL="${KAFKA_SASL:-0}"
KAFKA_SASL_TEMPLATE="$ROOT/stack/kafka-sasl.properties.template"
KAFKA_SECRETS="$KAFKA_DIR/secrets"
KAFKA_SECURITY_FILE="$KAFKA_DIR/security" # the mode the data dir was formatted with
KAFKA_PRINCIPALS="broker admin producer consumer trainer subscriber"
REDIS_DIR="$STACK_DIR/redis"
REDIS_PIDFILE="$STACK_DIR/redis.pid"
PROM_PORT="${PROM_PORT:-9090}"
PROM_READY_TIMEOUT="${PROM_READY_TIMEOUT:-30}"
PROM_RETENTION="${PROM_RETENTION:-2d}"
PROM_DIR="$STACK_DIR/prometheus"
PROM_PIDFILE="$STACK_DIR/prometheus.pid"

log() { printf '[stack] %s\n' "$*"; }
err() { printf '[stack] ERROR: %s\n' "$*" >&2; }
die() { err "$*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# helpers

port_open() { # host port -> 0 if something accepts a TCP connection
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

pid_alive() { # pid -> 0 if running and not a zombie
  local pid="$1" state
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
  [ "$state" != "Z" ] && [ "$state" != "X" ]
}

# owned_pid pidfile pattern -> prints the pid if the pidfile names a live process whose command
# line matches pattern; removes a stale pidfile (dead process or recycled pid).
owned_pid() {
  local pidfile="$1" pattern="$2" pid
  [ -f "$pidfile" ] || return 1
  pid="$(tr -dc '0-9' <"$pidfile")"
  if pid_alive "$pid" && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$pattern"; then
    printf '%s\n' "$pid"
    return 0
  fi
  rm -f "$pidfile"
  return 1
}

kafka_owned_pid() { owned_pid "$KAFKA_PIDFILE" "kafka.Kafka"; }
redis_owned_pid() { owned_pid "$REDIS_PIDFILE" "redis-server"; }

kafka_up() { port_open "$HOST" "$KAFKA_PORT"; }

redis_up() {
  local reply
  if command -v redis-cli >/dev/null; then
    reply="$(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null || true)"
  else # raw RESP fallback
    reply="$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"; printf "PING\r\n" >&3; head -c 5 <&3' \
      "$HOST" "$REDIS_PORT" 2>/dev/null || true)"
  fi
  case "$reply" in *PONG*) return 0 ;; *) return 1 ;; esac
}

# Serialise concurrent invocations (parallel test runners, make -j). The fd is closed for the
# daemons we launch so they do not keep holding the lock.
take_lock() {
  mkdir -p "$STACK_DIR"
  if command -v flock >/dev/null; then
    exec 9>"$STACK_DIR/.lock"
    flock -w 180 9 || die "could not lock $STACK_DIR/.lock (another stack.sh still running?)"
  fi
}

# stop_pid name pid: TERM, wait up to STOP_TIMEOUT, then KILL.
stop_pid() {
  local name="$1" pid="$2" waited=0 limit=$((STOP_TIMEOUT * 5))
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  while pid_alive "$pid"; do
    if [ "$waited" -ge "$limit" ]; then
      err "$name (pid $pid) still running after ${STOP_TIMEOUT}s; sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
    waited=$((waited + 1))
  done
  log "$name stopped after ~$((waited / 5))s"
}

# ---------------------------------------------------------------------------------------------
# Kafka

java_bin() {
  if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ]; then
    printf '%s\n' "$JAVA_HOME/bin/java"
  elif command -v java >/dev/null; then
    command -v java
  else
    die "java not found: Kafka 4.x needs Java 17+ (apt-get install openjdk-17-jre-headless)"
  fi
}

kafka_libs() { # assemble the broker classpath from Maven Central once (cached in $KAFKA_LIBS)
  if [ -d "$KAFKA_LIBS" ] && compgen -G "$KAFKA_LIBS/kafka_2.13-*.jar" >/dev/null; then
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found: needed once to fetch the Kafka jars (apt-get install maven)"
  log "fetching Kafka jars from Maven Central into $KAFKA_LIBS (once)"
  local tmp="$KAFKA_LIBS.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$KAFKA_DIR"
  if ! mvn -q -B -Dstyle.color=never -f "$KAFKA_POM" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$tmp" </dev/null >"$KAFKA_DIR/mvn.log" 2>&1; then
    rm -rf "$tmp"
    tail -n 40 "$KAFKA_DIR/mvn.log" >&2
    die "mvn dependency:copy-dependencies failed (full output: $KAFKA_DIR/mvn.log)"
  fi
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS" # atomic-ish: a half-finished download never looks like a cache
}

new_cluster_id() { # 16 random bytes, base64url without padding, not starting with '-'
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    case "$id" in -*) ;; *) printf '%s\n' "$id"; return ;; esac
  done
}

# kafka_password NAME -> the password of principal NAME: $KAFKA_<NAME>_PASSWORD, else the file
# $KAFKA_SECRETS/NAME.password, generated once with a random value (mode 600).
kafka_password() {
  local name="$1" var file pw
  var="KAFKA_$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')_PASSWORD"
  file="$KAFKA_SECRETS/$name.password"
  pw="${!var:-}"
  if [ -z "$pw" ]; then
    if [ ! -s "$file" ]; then
      mkdir -p "$KAFKA_SECRETS"
      chmod 700 "$KAFKA_SECRETS"
      (umask 077; head -c 32 /dev/urandom | base64 | tr -d '/+=\n' | head -c 32 >"$file")
    fi
    pw="$(cat "$file")"
  fi
  # written into a JAAS line and a StorageTool argument: keep it to characters safe in both
  case "$pw" in *[!A-Za-z0-9._~-]*) die "$var: use only letters, digits and . _ ~ -" ;; esac
  [ "${#pw}" -ge 12 ] || die "$var: at least 12 characters"
  printf '%s\n' "$pw"
}

kafka_sasl() { [ "$KAFKA_SASL" = 1 ]; }

kafka_configure() {
  mkdir -p "$KAFKA_DATA" "$KAFKA_LOGS"
  [ -f "$KAFKA_TEMPLATE" ] || die "missing $KAFKA_TEMPLATE"
  [ -f "$KAFKA_LOG4J" ] || die "missing $KAFKA_LOG4J"
  local mode=plaintext broker_pw="" name
  if kafka_sasl; then
    mode=sasl
    [ -f "$KAFKA_SASL_TEMPLATE" ] || die "missing $KAFKA_SASL_TEMPLATE"
    for name in $KAFKA_PRINCIPALS; do kafka_password "$name" >/dev/null; done
    broker_pw="$(kafka_password broker)"
  fi
  if [ -f "$KAFKA_DATA/meta.properties" ]; then # a data dir keeps the mode it was formatted with
    local was=plaintext
    [ -s "$KAFKA_SECURITY_FILE" ] && was="$(cat "$KAFKA_SECURITY_FILE")"
    [ "$was" = "$mode" ] ||
      die "$KAFKA_DATA was formatted for $was, not $mode (KAFKA_SASL=$KAFKA_SASL): use another STACK_DIR"
  fi
  (
    if kafka_sasl; then umask 077; fi # then the file holds the broker's password
    sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" \
      -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
      -e "s|@DATA_DIR@|$KAFKA_DATA|g" "$KAFKA_TEMPLATE" >"$KAFKA_PROPS.tmp"
    if kafka_sasl; then
      printf '\n' >>"$KAFKA_PROPS.tmp"
      sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" \
        -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
        -e "s|@BROKER_PASSWORD@|$broker_pw|g" "$KAFKA_SASL_TEMPLATE" >>"$KAFKA_PROPS.tmp"
    fi
  )
  mv "$KAFKA_PROPS.tmp" "$KAFKA_PROPS"

  # Format the data dir once. An already formatted dir is the source of truth for the id.
  local meta="$KAFKA_DATA/meta.properties" cid
  if [ -f "$meta" ]; then
    cid="$(sed -n 's/^cluster\.id=//p' "$meta")"
    [ -n "$cid" ] && printf '%s\n' "$cid" >"$KAFKA_CLUSTER_ID_FILE"
    return 0
  fi
  if [ -s "$KAFKA_CLUSTER_ID_FILE" ]; then
    cid="$(cat "$KAFKA_CLUSTER_ID_FILE")"
  else
    cid="$(new_cluster_id)"
    printf '%s\n' "$cid" >"$KAFKA_CLUSTER_ID_FILE"
  fi
  local scram=()
  if kafka_sasl; then # the broker's and the admin step's SCRAM credentials, in the first metadata
    for name in broker admin; do
      scram+=(--add-scram "SCRAM-SHA-512=[name=$name,password=$(kafka_password "$name")]")
    done
  fi
  log "formatting Kafka storage in $KAFKA_DATA (cluster id $cid, $mode)"
  "$(java_bin)" -Xmx256m -cp "$KAFKA_LIBS/*" \
    -Dlog4j2.configurationFile="$KAFKA_LOG4J" -Dkafka.logs.dir="$KAFKA_LOGS" \
    kafka.tools.StorageTool format -t "$cid" -c "$KAFKA_PROPS" --ignore-formatted "${scram[@]}" \
    </dev/null >>"$KAFKA_LOGS/format.out" 2>&1 ||
    { tail -n 30 "$KAFKA_LOGS/format.out" >&2; die "kafka storage format failed"; }
  printf '%s\n' "$mode" >"$KAFKA_SECURITY_FILE"
}

# kafka_client_env NAME: sh lines that make a service (SEG_* settings) log in as NAME.
kafka_client_env() {
  local name="$1"
  case " $KAFKA_PRINCIPALS " in *" $name "*) ;; *) die "unknown principal $name ($KAFKA_PRINCIPALS)" ;; esac
  printf "export SEG_KAFKA_BOOTSTRAP='%s:%s'\n" "$HOST" "$KAFKA_PORT"
  printf "export SEG_KAFKA_EXTRA='%s'\n" \
    "{\"security.protocol\":\"SASL_PLAINTEXT\",\"sasl.mechanism\":\"SCRAM-SHA-512\",\"sasl.username\":\"$name\"}"
  printf "export SEG_KAFKA_PASSWORD='%s'\n" "$(kafka_password "$name")"
}

KAFKA_OUT_OFFSET=0
KAFKA_LOG_OFFSET=0
kafka_fail() { # pid message -> print what this start logged and exit non-zero
  local pid="${1:-}"
  err "$2"
  if [ -s "$KAFKA_LOGS/kafkaServer.out" ]; then
    printf '%s\n' "----- tail $KAFKA_LOGS/kafkaServer.out" >&2
    tail -c +"$((KAFKA_OUT_OFFSET + 1))" "$KAFKA_LOGS/kafkaServer.out" | tail -n 40 >&2
  fi
  if [ -s "$KAFKA_LOGS/server.log" ]; then
    printf '%s\n' "----- tail $KAFKA_LOGS/server.log" >&2
    tail -c +"$((KAFKA_LOG_OFFSET + 1))" "$KAFKA_LOGS/server.log" | tail -n 40 >&2
  fi
  if [ -n "$pid" ] && pid_alive "$pid"; then
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$KAFKA_PIDFILE"
  exit 1
}

file_size() { if [ -f "$1" ]; then wc -c <"$1" | tr -d ' '; else echo 0; fi; }

kafka_start() {
  local pid
  if pid="$(kafka_owned_pid)"; then
    if kafka_up; then
      log "kafka already up on $HOST:$KAFKA_PORT (ours, pid $pid)"
      return 0
    fi
    log "kafka (ours, pid $pid) is starting; waiting for it"
  elif kafka_up; then
    log "kafka already answering on $HOST:$KAFKA_PORT (not started by this script); reusing it"
    return 0
  else
    if port_open "$HOST" "$KAFKA_CONTROLLER_PORT"; then
      die "controller port $HOST:$KAFKA_CONTROLLER_PORT is taken by another process; set KAFKA_CONTROLLER_PORT"
    fi
    local java
    java="$(java_bin)"
    kafka_libs
    kafka_configure
    log "starting kafka on $HOST:$KAFKA_PORT (controller $KAFKA_CONTROLLER_PORT), logs in $KAFKA_LOGS"
    printf '=== %s stack.sh starting kafka.Kafka\n' "$(date -u +%FT%TZ)" >>"$KAFKA_LOGS/kafkaServer.out"
    KAFKA_OUT_OFFSET="$(file_size "$KAFKA_LOGS/kafkaServer.out")"
    KAFKA_LOG_OFFSET="$(file_size "$KAFKA_LOGS/server.log")"
    local launcher=()
    command -v setsid >/dev/null && launcher=(setsid)
    # shellcheck disable=SC2086  # KAFKA_HEAP_OPTS is a list of JVM flags
    nohup "${launcher[@]}" "$java" $KAFKA_HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$KAFKA_LOG4J" -Dkafka.logs.dir="$KAFKA_LOGS" \
      -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" \
      </dev/null >>"$KAFKA_LOGS/kafkaServer.out" 2>&1 9>&- &
    pid=$!
    printf '%s\n' "$pid" >"$KAFKA_PIDFILE"
  fi

  local start=$SECONDS
  until kafka_up; do
    pid_alive "$pid" || kafka_fail "" "kafka (pid $pid) exited during startup"
    if [ $((SECONDS - start)) -ge "$KAFKA_READY_TIMEOUT" ]; then
      kafka_fail "$pid" "kafka not accepting connections on $HOST:$KAFKA_PORT after ${KAFKA_READY_TIMEOUT}s"
    fi
    sleep 0.25
  done
  log "kafka ready on $HOST:$KAFKA_PORT after $((SECONDS - start))s (pid $pid)"
}

stop_owned() { # name owned-pid-fn up-fn pidfile port [quiet]: stop what this script started.
  # Something else answering on the port is reported: an error, or with `quiet` (used by `down`)
  # a note, and left running.
  local name=$1 owned=$2 up=$3 pidfile=$4 port=$5 quiet=${6:-} pid
  if pid="$($owned)"; then
    stop_pid "$name" "$pid"
    rm -f "$pidfile"
  elif $up; then
    if [ "$quiet" = quiet ]; then
      log "$name on $HOST:$port was not started by this script; leaving it running"
      return 0
    fi
    err "$name on $HOST:$port was not started by this script; not stopping it"
    return 1
  else
    log "$name not running"
  fi
}

kafka_stop() { stop_owned kafka kafka_owned_pid kafka_up "$KAFKA_PIDFILE" "$KAFKA_PORT" "${1:-}"; }

# ---------------------------------------------------------------------------------------------
# Redis

redis_start() {
  local pid
  if redis_up; then
    if pid="$(redis_owned_pid)"; then
      log "redis already up on $HOST:$REDIS_PORT (ours, pid $pid)"
    else
      log "redis already answering on $HOST:$REDIS_PORT (not started by this script); reusing it"
    fi
    return 0
  fi
  if ! pid="$(redis_owned_pid)"; then
    command -v redis-server >/dev/null ||
      die "redis-server not found. Run: sudo bash scripts/install-system.sh (installs redis-server; needs root)"
    if port_open "$HOST" "$REDIS_PORT"; then
      die "port $HOST:$REDIS_PORT is taken by something that does not answer Redis PING; set REDIS_PORT"
    fi
    mkdir -p "$REDIS_DIR"
    rm -f "$REDIS_PIDFILE"
    log "starting redis on $HOST:$REDIS_PORT (dir $REDIS_DIR)"
    redis-server --bind "$HOST" --port "$REDIS_PORT" --daemonize yes \
      --pidfile "$REDIS_PIDFILE" --dir "$REDIS_DIR" --logfile "$REDIS_DIR/redis.log" \
      --appendonly yes --appendfsync everysec --save '' \
      --maxmemory "$REDIS_MAXMEMORY" --maxmemory-policy volatile-lru </dev/null 9>&- ||
      { tail -n 20 "$REDIS_DIR/redis.log" >&2 2>/dev/null; die "redis-server failed to start"; }
  fi
  local start=$SECONDS
  until redis_up; do
    if [ $((SECONDS - start)) -ge "$REDIS_READY_TIMEOUT" ]; then
      tail -n 20 "$REDIS_DIR/redis.log" >&2 2>/dev/null || true
      pid="$(redis_owned_pid || true)"
      [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
      rm -f "$REDIS_PIDFILE"
      die "redis not answering PING on $HOST:$REDIS_PORT after ${REDIS_READY_TIMEOUT}s"
    fi
    sleep 0.1
  done
  # The daemon writes its pidfile itself, shortly after it starts listening.
  local i
  for i in $(seq 1 50); do
    [ -s "$REDIS_PIDFILE" ] && break
    sleep 0.1
  done
  log "redis ready on $HOST:$REDIS_PORT (pid $(redis_owned_pid || echo '?'))"
}

# The services' ACL user: only the project's keys and channels (prefix "seg"), no dangerous
# commands; its password is generated once into $REDIS_DIR/password (mode 600). Applied on every
# start (ACL users are configuration, not data). The default user stays for loopback tooling.
redis_acl() {
  local pw_file="$REDIS_DIR/password"
  mkdir -p "$REDIS_DIR"
  if [ ! -s "$pw_file" ]; then
    (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$pw_file")
  fi
  redis-cli -h "$HOST" -p "$REDIS_PORT" ACL SETUSER seg reset on ">$(cat "$pw_file")" \
    '~seg:*' '&seg:*' +@all -@dangerous >/dev/null || err "could not create the Redis ACL user seg"
}

redis_stop() { stop_owned redis redis_owned_pid redis_up "$REDIS_PIDFILE" "$REDIS_PORT" "${1:-}"; }

# ---------------------------------------------------------------------------------------------
# Prometheus (optional: the monitoring of the local stack; tests start their own instances)

# Our instance is recognised by its data dir on the command line.
prom_owned_pid() { owned_pid "$PROM_PIDFILE" "--storage.tsdb.path=$PROM_DIR/data"; }
prom_up() { port_open "$HOST" "$PROM_PORT"; }

http_ok() { # host port path -> 0 on an HTTP 2xx answer
  if command -v curl >/dev/null; then
    curl -fsS -m 3 -o /dev/null "http://$1:$2$3" 2>/dev/null
  else
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"; printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$2" "$0" >&3;
      head -n 1 <&3 | grep -q " 2[0-9][0-9] "' "$1" "$2" "$3" 2>/dev/null
  fi
}

prom_ready() { http_ok "$HOST" "$PROM_PORT" /-/ready; }

prometheus_start() { # [config file]
  local config="${1:-$ROOT/monitoring/prometheus.yml}" pid log="$PROM_DIR/prometheus.log"
  case "$config" in /*) ;; *) config="$PWD/$config" ;; esac
  if pid="$(prom_owned_pid)"; then
    if prom_ready; then
      log "prometheus already up on http://$HOST:$PROM_PORT (ours, pid $pid); to change its config: prometheus-reload, or prometheus-down then prometheus-up"
      return 0
    fi
    log "prometheus (ours, pid $pid) is starting; waiting for it"
  else
    [ -f "$config" ] || die "prometheus config not found: $config"
    command -v prometheus >/dev/null ||
      die "prometheus not found. Run: sudo bash scripts/install-system.sh (installs Debian's prometheus; needs root)"
    if port_open "$HOST" "$PROM_PORT"; then
      die "port $HOST:$PROM_PORT is taken by a process this script did not start; set PROM_PORT"
    fi
    mkdir -p "$PROM_DIR/data"
    if command -v promtool >/dev/null && ! promtool check config "$config" >"$PROM_DIR/check.out" 2>&1; then
      cat "$PROM_DIR/check.out" >&2
      die "promtool check config $config failed"
    fi
    log "starting prometheus on http://$HOST:$PROM_PORT (config $config, data $PROM_DIR/data, log $log)"
    printf '=== %s stack.sh starting prometheus --config.file=%s\n' "$(date -u +%FT%TZ)" "$config" >>"$log"
    local launcher=()
    command -v setsid >/dev/null && launcher=(setsid)
    nohup "${launcher[@]}" prometheus --config.file="$config" --storage.tsdb.path="$PROM_DIR/data" \
      --storage.tsdb.retention.time="$PROM_RETENTION" --web.listen-address="$HOST:$PROM_PORT" \
      --web.enable-lifecycle </dev/null >>"$log" 2>&1 9>&- &
    pid=$!
    printf '%s\n' "$pid" >"$PROM_PIDFILE"
  fi
  local start=$SECONDS
  until prom_ready; do
    if ! pid_alive "$pid"; then
      tail -n 30 "$log" >&2 || true
      rm -f "$PROM_PIDFILE"
      die "prometheus (pid $pid) exited during startup (log $log)"
    fi
    if [ $((SECONDS - start)) -ge "$PROM_READY_TIMEOUT" ]; then
      tail -n 30 "$log" >&2 || true
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "$PROM_PIDFILE"
      die "prometheus not ready on http://$HOST:$PROM_PORT/-/ready after ${PROM_READY_TIMEOUT}s"
    fi
    sleep 0.2
  done
  log "prometheus ready on http://$HOST:$PROM_PORT after $((SECONDS - start))s (pid $pid)"
}

prometheus_stop() { stop_owned prometheus prom_owned_pid prom_up "$PROM_PIDFILE" "$PROM_PORT"; }

prometheus_reload() {
  local pid
  pid="$(prom_owned_pid)" || die "no prometheus started by this script is running (prometheus-up)"
  kill -HUP "$pid"
  log "prometheus (pid $pid) asked to reload its config and rules (see $PROM_DIR/prometheus.log)"
}

prometheus_status() { # exits 0 when ready, 3 otherwise
  local pid state=down owner=- rc=3
  if prom_ready; then state=up; rc=0; fi
  if pid="$(prom_owned_pid)"; then owner="owned (pid $pid)"; elif port_open "$HOST" "$PROM_PORT"; then owner="external"; fi
  printf '%-10s %-22s %-5s %s\n' prometheus "$HOST:$PROM_PORT" "$state" "$owner"
  return $rc
}

# --- Redis Cluster (per-customer state past one node) ------------------------------------------
# Three redis-server processes in cluster mode (no replicas), each with its data and nodes.conf
# in $STACK_DIR/redis-cluster/<port>, so that a node restarted on its port rejoins the cluster.

cluster_node_pidfile() { printf '%s/redis-cluster/%s/redis.pid\n' "$STACK_DIR" "$1"; }

cluster_node_start() { # port
  local port="$1" dir="$STACK_DIR/redis-cluster/$1"
  command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server)"
  mkdir -p "$dir"
  if redis-cli -h "$HOST" -p "$port" ping >/dev/null 2>&1; then return 0; fi
  redis-server --bind "$HOST" --port "$port" --daemonize yes --dir "$dir" \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --cluster-enabled yes \
    --cluster-config-file nodes.conf --cluster-node-timeout 2000 --cluster-require-full-coverage no \
    --appendonly yes --save '' \
    </dev/null 9>&- || die "redis cluster node $port failed to start"
  local start=$SECONDS
  until redis-cli -h "$HOST" -p "$port" ping >/dev/null 2>&1; do
    [ $((SECONDS - start)) -ge "$REDIS_READY_TIMEOUT" ] && die "redis cluster node $port not answering"
    sleep 0.1
  done
}

cluster_up() {
  local port nodes=()
  for port in $REDIS_CLUSTER_PORTS; do
    cluster_node_start "$port"
    nodes+=("$HOST:$port")
  done
  local first="${REDIS_CLUSTER_PORTS%% *}"
  if ! redis-cli -h "$HOST" -p "$first" cluster info | grep -q 'cluster_known_nodes:[2-9]'; then
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null ||
      die "redis-cli --cluster create failed"
  fi
  local start=$SECONDS
  until redis-cli -h "$HOST" -p "$first" cluster info | grep -q 'cluster_state:ok'; do
    [ $((SECONDS - start)) -ge 30 ] && die "redis cluster not ok after 30s"
    sleep 0.2
  done
  log "redis cluster ready on ${nodes[*]}"
}

cluster_down() {
  local port pid
  for port in $REDIS_CLUSTER_PORTS; do
    pid="$(cat "$(cluster_node_pidfile "$port")" 2>/dev/null || true)"
    if [ -n "$pid" ] && pid_alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
}

# ---------------------------------------------------------------------------------------------

status() {
  local rc=0 pid state owner
  if kafka_up; then state=up; else state=down; rc=3; fi
  if pid="$(kafka_owned_pid)"; then owner="owned (pid $pid)"; elif [ $state = up ]; then owner="external"; else owner="-"; fi
  printf '%-6s %-22s %-5s %s\n' kafka "$HOST:$KAFKA_PORT" "$state" "$owner"
  if redis_up; then state=up; else state=down; rc=3; fi
  if pid="$(redis_owned_pid)"; then owner="owned (pid $pid)"; elif [ $state = up ]; then owner="external"; else owner="-"; fi
  printf '%-6s %-22s %-5s %s\n' redis "$HOST:$REDIS_PORT" "$state" "$owner"
  return $rc
}

usage() {
  sed -n '2,42p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

cmd="${1:-}"
case "$cmd" in
  up)
    take_lock
    redis_start
    redis_acl
    kafka_start
    ;;
  down)
    take_lock
    kafka_stop quiet
    redis_stop quiet
    ;;
  status) status ;;
  kafka-start) take_lock; kafka_start ;;
  kafka-stop) take_lock; kafka_stop ;;
  kafka-client-env) KAFKA_SASL=1 kafka_client_env "${2:?principal}" ;;
  kafka-secrets)
    KAFKA_SECRETS="${2:?directory}"
    for principal in $KAFKA_PRINCIPALS; do kafka_password "$principal" >/dev/null; done
    log "Kafka passwords in $KAFKA_SECRETS: $(cd "$KAFKA_SECRETS" && echo *.password)"
    ;;
  redis-start) take_lock; redis_start; redis_acl ;;
  redis-stop) take_lock; redis_stop ;;
  redis-cluster-up) take_lock; cluster_up ;;
  redis-cluster-down) take_lock; cluster_down ;;
  redis-cluster-node-start) cluster_node_start "${2:?port}" ;;
  prometheus-up) take_lock; prometheus_start "${2:-}" ;;
  prometheus-down) take_lock; prometheus_stop ;;
  prometheus-reload) prometheus_reload ;;
  prometheus-status) prometheus_status ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
