#!/usr/bin/env bash
# Debian packages for the local stack, installed when missing (make stack, hence make run and
# make test, call this first). Installing needs root: as root it installs, otherwise it uses sudo
# when there is one, and else stops with one line saying what to run.
# redis-server (model store + per-customer state), prometheus/promtool (scrape + rule tests),
# docker-compose (validates docker-compose.yml without an engine).
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v redis-cli >/dev/null || need+=(redis-tools)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO="sudo"
  else
    echo "missing Debian packages (${need[*]}): run as root: bash scripts/install-system.sh" >&2
    exit 1
  fi
fi
echo "installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
# Debian starts packaged services; the project runs its own instances on its own ports and dirs.
for svc in redis-server prometheus prometheus-node-exporter; do
  $SUDO systemctl stop "$svc" 2>/dev/null || $SUDO service "$svc" stop 2>/dev/null || true
done
