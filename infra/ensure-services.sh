#!/usr/bin/env bash
# Make sure the Postgres and Redis the tests use answer on 127.0.0.1 (5432, 6379); start the machine's own
# if they are installed but stopped. The broker is not started here: the tests start their own Tansu.
set -euo pipefail

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
  for _ in $(seq 1 50); do answers "$1" && return 0; sleep 0.2; done
  return 1
}

if ! answers 5432; then
  echo "Postgres is not answering on 127.0.0.1:5432; starting it"
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  fi
  wait_for 5432 || { echo "Postgres did not start: set INFERLOG_TEST_POSTGRES_URL to a reachable one" >&2; exit 1; }
fi

if ! answers 6379; then
  echo "Redis is not answering on 127.0.0.1:6379; starting it"
  if command -v redis-server >/dev/null; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  fi
  wait_for 6379 || { echo "Redis did not start: set INFERLOG_TEST_REDIS_URL to a reachable one" >&2; exit 1; }
fi
echo "Postgres and Redis answer"
