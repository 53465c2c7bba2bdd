#!/usr/bin/env bash
# The one step that needs root: Debian packages for the local stack.
# redis-server (model store + per-customer state), prometheus/promtool (scrape + rule tests),
# docker-compose (validates docker-compose.yml without an engine).
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || need+=(docker-compose)
if [ ${#need[@]} -eq 0 ]; then echo "system packages present"; exit 0; fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
# Debian starts packaged services; the project runs its own instances on its own ports and dirs.
for svc in redis-server prometheus prometheus-node-exporter; do
  $SUDO systemctl stop "$svc" 2>/dev/null || $SUDO service "$svc" stop 2>/dev/null || true
done
