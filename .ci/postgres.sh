#!/usr/bin/env bash
# PostgreSQL's server binaries (initdb, pg_ctl) for tests/reliability (shared tuning on a real server): Debian's
# package, installed only when missing; idempotent and quiet. No cluster is created or started here: the tests
# start their own throwaway cluster (loopback only, trust auth, in a temporary folder) and remove it after.
set -euo pipefail

have_server() {
  command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

have_server && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[ci] PostgreSQL server binaries missing and no apt-get to install them" >&2
  exit 1
fi
# Debian's postinst would create and start a system-wide 'main' cluster: not wanted, the tests bring their own
$SUDO mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.d/dskc-ci.conf >/dev/null
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
have_server || { echo "[ci] PostgreSQL was installed but initdb is not found" >&2; exit 1; }
