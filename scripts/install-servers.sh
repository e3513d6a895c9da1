#!/usr/bin/env bash
# Installs what the test-suite starts by itself: redis-server and redis-cli
# (single node and cluster), PostgreSQL 15 server binaries and pgvector.
# Idempotent: a second run checks and returns. Needs root (apt-get) the first time.
set -euo pipefail

pg_bin=/usr/lib/postgresql/15/bin
need_redis=0; need_pg=0; need_vector=0
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || need_redis=1
[ -x "$pg_bin/postgres" ] && [ -x "$pg_bin/pg_config" ] || need_pg=1
[ -f /usr/share/postgresql/15/extension/vector.control ] || need_vector=1
if [ $need_redis$need_pg$need_vector = 000 ]; then exit 0; fi

if [ "$(id -u)" != 0 ]; then
  echo "install-servers: need root to install redis-server, postgresql-15 and pgvector" >&2
  echo "  (or install them yourself: redis-server, postgresql-server-dev-15, pgvector for PG 15)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# postgresql-server-dev-15 brings pg_config and the headers pgvector builds against;
# it also upgrades the PG 15 server packages, so it goes before any initdb.
apt-get install -y -qq redis-server postgresql-15 postgresql-server-dev-15 build-essential dpkg-dev >/dev/null

if [ $need_vector = 1 ] || [ ! -f /usr/share/postgresql/15/extension/vector.control ]; then
  # pgvector is not packaged for bookworm: build Debian's source package from the
  # next release, fetched from the same mirror apt already uses.
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)
  cat > /etc/apt/sources.list.d/lshrs-pgvector-src.sources <<SRC
Types: deb-src
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq
  build=$(mktemp -d)
  (cd "$build" && apt-get source -qq --download-only pgvector >/dev/null && dpkg-source -x --no-check ./*.dsc src >/dev/null)
  # OPTFLAGS="": no -march=native, so the build runs on any x86-64 machine.
  make -s -C "$build/src" OPTFLAGS="" PG_CONFIG="$pg_bin/pg_config" >/dev/null
  make -s -C "$build/src" OPTFLAGS="" PG_CONFIG="$pg_bin/pg_config" install >/dev/null
  rm -rf "$build"
fi
echo "install-servers: redis-server $(redis-server --version | awk '{print $3}'), postgres $("$pg_bin/postgres" --version | awk '{print $3}'), pgvector $(awk -F"'" '/default_version/ {print $2}' /usr/share/postgresql/15/extension/vector.control)"
