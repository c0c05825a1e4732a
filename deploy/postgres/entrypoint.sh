#!/bin/sh
# Initialise PGDATA on first start (superuser POSTGRES_USER with POSTGRES_PASSWORD, database POSTGRES_DB),
# then run the server as the postgres user, listening on every interface of the container network.
# Password (scram-sha-256) for TCP; trust on the container's own Unix socket (pg_isready, psql via exec).
set -eu

: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (in .env: cp .env.example .env)}"
user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  echo "postgres-entrypoint: initialising $PGDATA (user $user, database $db)"
  init=$(mktemp -d)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$init/pwfile"
  chown -R postgres:postgres "$init"
  as_postgres initdb -D "$PGDATA" -U "$user" --pwfile="$init/pwfile" -E UTF8 \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  if [ "$db" != postgres ]; then
    # A private socket and no TCP while the database is made: nothing (healthcheck included) sees a
    # half-initialised server.
    as_postgres pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories=$init" start >/dev/null
    as_postgres createdb -h "$init" -U "$user" "$db"
    as_postgres pg_ctl -D "$PGDATA" -w -m fast stop >/dev/null
  fi
  rm -rf "$init"
fi

exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" -c listen_addresses='*' "$@"
