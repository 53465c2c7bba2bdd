#!/usr/bin/env bash
# Entrypoint of the compose `kafka` service (apache/kafka image): the same broker as
# `KAFKA_SASL=1 scripts/stack.sh kafka-start`, rendered from the same two templates. Clients log in
# with SASL/SCRAM-SHA-512 on :9092 (advertised as kafka:9092); the controller listener is
# SASL_PLAINTEXT with PLAIN on the container's loopback; StandardAuthorizer, nothing allowed
# without an ACL. Passwords are compose secrets: /run/secrets/broker.password and
# admin.password (their SCRAM credentials are written when the volume is formatted, the first
# time). The service principals and their ACLs come from the `topics` service.
set -euo pipefail

TEMPLATES="${TEMPLATES:-/etc/kafka/segmentation}"
DATA="${DATA:-/var/lib/kafka/data}"
CONFIG_DIR="${CONFIG_DIR:-/tmp/kafka-config}" # the container's own: it holds the broker's password
SECRETS="${SECRETS:-/run/secrets}"
KAFKA_BIN="${KAFKA_BIN:-/opt/kafka/bin}"
PROPS="$CONFIG_DIR/server.properties"
secret() { tr -d '\n' <"$SECRETS/$1.password"; }

umask 077
mkdir -p "$CONFIG_DIR" "$DATA"
broker_pw="$(secret broker)"
admin_pw="$(secret admin)"
for pw in "$broker_pw" "$admin_pw"; do
  case "$pw" in *[!A-Za-z0-9._~-]* | "") echo "passwords: letters, digits and . _ ~ - only" >&2; exit 2 ;; esac
done
{
  sed -e 's|@KAFKA_PORT@|9092|g' -e 's|@CONTROLLER_PORT@|9093|g' -e "s|@DATA_DIR@|$DATA|g" \
    "$TEMPLATES/kafka-server.properties.template"
  printf '\n'
  sed -e 's|@KAFKA_PORT@|9092|g' -e 's|@CONTROLLER_PORT@|9093|g' -e "s|@BROKER_PASSWORD@|$broker_pw|g" \
    "$TEMPLATES/kafka-sasl.properties.template"
  # in a container: clients come from the compose network (a later key wins); the controller
  # stays on the container's loopback. Roles and id from the service's environment.
  printf '%s\n' 'listeners=SASL_PLAINTEXT://0.0.0.0:9092,CONTROLLER://127.0.0.1:9093' \
    "advertised.listeners=SASL_PLAINTEXT://${KAFKA_ADVERTISED_HOST:-kafka}:9092" \
    "process.roles=${KAFKA_PROCESS_ROLES:-broker,controller}" "node.id=${KAFKA_NODE_ID:-1}"
} >"$PROPS"
# what the healthcheck logs in with
printf '%s\n' 'security.protocol=SASL_PLAINTEXT' 'sasl.mechanism=SCRAM-SHA-512' \
  "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"admin\" password=\"$admin_pw\";" \
  >"$CONFIG_DIR/admin.properties"

if [ ! -f "$DATA/meta.properties" ]; then
  cid="$("$KAFKA_BIN"/kafka-storage.sh random-uuid)"
  "$KAFKA_BIN"/kafka-storage.sh format -t "$cid" -c "$PROPS" --ignore-formatted \
    --add-scram "SCRAM-SHA-512=[name=broker,password=$broker_pw]" \
    --add-scram "SCRAM-SHA-512=[name=admin,password=$admin_pw]"
fi
exec "$KAFKA_BIN"/kafka-server-start.sh "$PROPS"
