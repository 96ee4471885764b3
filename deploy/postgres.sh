#!/usr/bin/env bash
# Local PostgreSQL for the stack (Debian/Ubuntu): install if missing, run a cluster on loopback, create the
# `prefect` and `mlflow` databases owned by one role, and print the URLs the stack reads.
#
#   sudo deploy/postgres.sh [--port 5433] [--cluster longitudinal] [--user longitudinal] [--password PW]
#   eval "$(sudo deploy/postgres.sh --port 5433 | grep ^export)"   # then: longitudinal stack up
#   sudo deploy/postgres.sh --cluster longitudinal --drop            # stop and delete the cluster
#
# The cluster listens on 127.0.0.1 only and accepts password (scram-sha-256) logins over TCP. Its data lives
# where Debian keeps clusters (/var/lib/postgresql/<version>/<cluster>) unless --datadir is given (every parent
# of it must be searchable by the postgres user).
set -euo pipefail

PORT=5433
CLUSTER=longitudinal
DB_USER=longitudinal
PASSWORD=""
DATADIR=""
ACTION=up

while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --cluster) CLUSTER="$2"; shift 2 ;;
    --user) DB_USER="$2"; shift 2 ;;
    --password) PASSWORD="$2"; shift 2 ;;
    --datadir) DATADIR="$2"; shift 2 ;;
    --drop) ACTION=drop; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if [[ $(id -u) -ne 0 ]]; then
  echo "run as root (it installs packages and manages clusters as the postgres user)" >&2
  exit 1
fi
if [[ ! "$CLUSTER" =~ ^[a-z][a-z0-9_]*$ || ! "$DB_USER" =~ ^[a-z][a-z0-9_]*$ ]]; then
  echo "cluster and user names must match ^[a-z][a-z0-9_]*$" >&2
  exit 2
fi

if ! command -v pg_createcluster >/dev/null || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi
VERSION=$(ls /usr/lib/postgresql | sort -V | tail -n 1)

if [[ "$ACTION" == drop ]]; then
  if pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$VERSION $CLUSTER"; then
    pg_dropcluster --stop "$VERSION" "$CLUSTER"
    echo "dropped cluster $VERSION/$CLUSTER"
  else
    echo "no cluster $VERSION/$CLUSTER"
  fi
  exit 0
fi

if [[ -z "$PASSWORD" ]]; then
  PASSWORD=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
fi

if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$VERSION $CLUSTER"; then
  args=("$VERSION" "$CLUSTER" --port "$PORT")
  if [[ -n "$DATADIR" ]]; then
    mkdir -p "$DATADIR"
    chown postgres:postgres "$DATADIR"
    args+=(--datadir "$DATADIR")
  fi
  pg_createcluster "${args[@]}" -- --auth-local=peer --auth-host=scram-sha-256 >/dev/null
  # Loopback only: production puts the database on its own host behind the network's rules, not here.
  echo "listen_addresses = '127.0.0.1'" >"/etc/postgresql/$VERSION/$CLUSTER/conf.d/longitudinal.conf"
fi
if ! pg_lsclusters -h | awk '{print $1" "$2" "$4}' | grep -qx "$VERSION $CLUSTER online"; then
  pg_ctlcluster "$VERSION" "$CLUSTER" start
fi
for _ in $(seq 1 60); do
  runuser -u postgres -- pg_isready -q -h 127.0.0.1 -p "$PORT" && break
  sleep 0.5
done
runuser -u postgres -- pg_isready -h 127.0.0.1 -p "$PORT" >/dev/null

psql_admin() { runuser -u postgres -- psql -v ON_ERROR_STOP=1 -q -p "$PORT" -d postgres "$@"; }
if [[ -z $(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'") ]]; then
  psql_admin -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$PASSWORD'"
else
  psql_admin -c "ALTER ROLE $DB_USER PASSWORD '$PASSWORD'"
fi
for db in prefect mlflow; do
  if [[ -z $(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'") ]]; then
    psql_admin -c "CREATE DATABASE $db OWNER $DB_USER"
  fi
done

echo "postgresql $VERSION cluster $CLUSTER on 127.0.0.1:$PORT, databases prefect and mlflow owned by $DB_USER"
echo "export LONGITUDINAL_PREFECT_DATABASE_URL=postgresql+asyncpg://$DB_USER:$PASSWORD@127.0.0.1:$PORT/prefect LONGITUDINAL_MLFLOW_BACKEND_URI=postgresql+psycopg://$DB_USER:$PASSWORD@127.0.0.1:$PORT/mlflow"
