#!/usr/bin/env bash
# Starts Debian's PostgreSQL on 127.0.0.1:5432 with a role for the tests' MLflow
# tracking server (tests/test_cluster.py), and prints the URI the tests read from
# RL_PRUNER_TEST_POSTGRES. Run as root; safe to run again.
set -euo pipefail

if ! command -v pg_ctlcluster >/dev/null; then
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
fi

version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$version main"; then
    pg_createcluster "$version" main >&2
fi
# Loopback only: nothing outside this machine can reach the test database.
echo "listen_addresses = '127.0.0.1'" > "/etc/postgresql/$version/main/conf.d/rl-pruner-tests.conf"
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -qx online; then
    pg_ctlcluster "$version" main start >&2
fi

runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 >&2 <<'SQL'
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rl_pruner_test') THEN
        CREATE ROLE rl_pruner_test LOGIN CREATEDB PASSWORD 'rl_pruner_test';
    END IF;
END
$$;
SQL
echo "postgresql://rl_pruner_test:rl_pruner_test@127.0.0.1:5432/postgres"
