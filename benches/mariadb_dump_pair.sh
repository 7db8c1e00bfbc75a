#!/usr/bin/env bash
# Makes a real mariadb-dump pair from a throwaway MariaDB server: day1.sql, then, after a day of
# changes (1.3 % of rows updated and 0.2 % deleted at random, 0.5 % inserted), day2.sql.
# The same table as benches/pg_dump_pair.sh, dumped as extended INSERTs.
# Usage: benches/mariadb_dump_pair.sh OUT_DIR [ROWS]     (5,000,000 rows make a ~0.65 GB dump)
# Then:  benches/side_by_side.sh OUT_DIR/day1.sql OUT_DIR/day2.sql
set -euo pipefail
out=$(realpath "$1")
rows=${2:-5000000}
mkdir -p "$out"
dir=$(mktemp -d /tmp/bkp-mariadb-pair.XXXXXX)
chmod 755 "$dir"
user=(); [ "$(id -u)" -eq 0 ] && { user=(--user=mysql); chown -R mysql "$dir" 2> /dev/null || true; }
mariadb-install-db --no-defaults "${user[@]}" --datadir="$dir/data" \
    --auth-root-authentication-method=normal --skip-test-db > /dev/null
mariadbd --no-defaults "${user[@]}" --datadir="$dir/data" --socket="$dir/sock" \
    --pid-file="$dir/pid" --log-error="$dir/err" --skip-networking \
    --innodb-buffer-pool-size=512M --innodb-flush-log-at-trx-commit=0 --skip-log-bin \
    > /dev/null 2>&1 &
server=$!
trap 'kill $server 2> /dev/null; wait $server 2> /dev/null; rm -rf "$dir"' EXIT
sql() { mariadb --no-defaults --socket="$dir/sock" -uroot "$@"; }
for _ in $(seq 1 100); do mariadb-admin --no-defaults --socket="$dir/sock" -uroot ping > /dev/null 2>&1 && break; sleep 0.2; done
sql -e "CREATE DATABASE shop"
sql shop <<SQL
CREATE TABLE phrases (n int PRIMARY KEY, text text);
INSERT INTO phrases SELECT seq, (SELECT GROUP_CONCAT(ELT(1 + ((seq * 7 + k.seq * 13) % 16), 'shipped','pending','refund','premium','basic','express','warehouse','invoice','paid','late','customer','order','gift','return','priority','standard') SEPARATOR ' ') FROM seq_1_to_11 k WHERE k.seq <= 3 + seq % 9) FROM seq_0_to_399;
CREATE TABLE customers (id bigint PRIMARY KEY, name text, email text, city text, balance decimal(12,2), updated datetime, note text, score int);
INSERT INTO customers
SELECT seq, CONCAT('name ', seq % 50000), CONCAT('user', seq, '@example.com'),
       ELT(1 + seq % 8, 'Berlin','Paris','Lisbon','Oslo','Kraków','Zürich','Tokyo','Austin'),
       (seq * 37 % 100000) / 100.0, '2025-11-01' + INTERVAL (seq % 86400) SECOND,
       (SELECT text FROM phrases WHERE n = seq % 400), (seq * 7) % 1000
FROM seq_1_to_${rows};
SQL
dump() { mariadb-dump --no-defaults --socket="$dir/sock" -uroot --single-transaction shop; }
dump > "$out/day1.sql"
sql shop <<SQL
UPDATE customers SET balance = balance + 1, updated = updated + INTERVAL 1 DAY WHERE RAND(42) < 0.013;
DELETE FROM customers WHERE RAND(43) < 0.002;
INSERT INTO customers SELECT ${rows} + seq, CONCAT('new ', seq), CONCAT('new', seq, '@example.com'), 'Oslo', 1, NOW(), 'new', 1
FROM seq_1_to_$((rows / 200));
SQL
dump > "$out/day2.sql"
ls -l "$out"
