#!/usr/bin/env bash
# Makes a real pg_dump pair from a throwaway PostgreSQL server: day1.sql, then, after a day of
# changes (1.3 % of rows updated and 0.2 % deleted at random, 0.5 % inserted), day2.sql.
# Usage: benches/pg_dump_pair.sh OUT_DIR [ROWS]      (8,000,000 rows make a ~1 GB dump)
# ORDERS_ROWS=N adds a table `orders` of N rows (80,000: ~1 % of the dump), with a foreign key
# to customers and an index, which day 2 does not change: what `bkp restore --table` reads.
# Then:  BKP_BENCH_DAY1=OUT_DIR/day1.sql BKP_BENCH_DAY2=OUT_DIR/day2.sql cargo bench --bench pipeline
set -euo pipefail
out=$(realpath "$1")
rows=${2:-8000000}
orders=${ORDERS_ROWS:-0}
mkdir -p "$out"
bin=$(pg_config --bindir)
dir=$(mktemp -d /tmp/bkp-pg-pair.XXXXXX)
chmod 755 "$dir"
as_pg() { if [ "$(id -u)" -eq 0 ]; then chown -R postgres "$dir"; runuser -u postgres -- "$@"; else "$@"; fi; }
as_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres --no-sync -E UTF8 --locale=C.UTF-8 > /dev/null
as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -o "-k $dir -c listen_addresses='' -c fsync=off -c autovacuum=off" start > /dev/null
trap 'as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop > /dev/null; rm -rf "$dir"' EXIT
psql() { command psql -q -v ON_ERROR_STOP=1 -h "$dir" -U postgres "$@"; }
psql -c "CREATE DATABASE shop"
psql -d shop <<SQL
CREATE TABLE phrases (n int PRIMARY KEY, text text);
INSERT INTO phrases SELECT n, (SELECT string_agg(w, ' ') FROM (SELECT (ARRAY['shipped','pending','refund','premium','basic','express','warehouse','invoice','paid','late','customer','order','gift','return','priority','standard'])[1 + ((n * 7 + k * 13) % 16)] AS w FROM generate_series(1, 3 + n % 9) k) words) FROM generate_series(0, 399) n;
CREATE TABLE customers (id bigint PRIMARY KEY, name text, email text, city text, balance numeric(12,2), updated timestamptz, note text, score int);
INSERT INTO customers
SELECT g, 'name ' || (g % 50000), 'user' || g || '@example.com',
       (ARRAY['Berlin','Paris','Lisbon','Oslo','Kraków','Zürich','Tokyo','Austin'])[1 + g % 8],
       (g * 37 % 100000) / 100.0, '2025-11-01'::timestamptz + (g % 86400) * interval '1 second',
       (SELECT text FROM phrases WHERE n = g % 400), (g * 7) % 1000
FROM generate_series(1, $rows) g;
SQL
if [ "$orders" -gt 0 ]; then
psql -d shop <<SQL
CREATE TABLE orders (id serial PRIMARY KEY, customer bigint REFERENCES customers(id), total numeric(10,2), placed timestamptz, status text);
INSERT INTO orders (customer, total, placed, status)
SELECT 1 + (g * 7919) % $rows, (g % 100000) / 100.0, '2025-10-01'::timestamptz + g * interval '37 seconds',
       (ARRAY['shipped','pending','refunded','delivered'])[1 + g % 4] || ' via ' || (ARRAY['post','courier','pickup'])[1 + g % 3]
FROM generate_series(1, $orders) g;
CREATE INDEX orders_customer_idx ON orders (customer);
SQL
fi
pg_dump -h "$dir" -U postgres shop > "$out/day1.sql"
keep_ordered=""
[ "$orders" -gt 0 ] && keep_ordered="AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.customer = customers.id)"
psql -d shop <<SQL
SELECT setseed(0.42);
UPDATE customers SET balance = balance + 1, updated = updated + interval '1 day' WHERE random() < 0.013;
DELETE FROM customers WHERE random() < 0.002 $keep_ordered;
INSERT INTO customers SELECT g, 'new ' || g, 'new' || g || '@example.com', 'Oslo', 1, now(), 'new', 1
FROM generate_series($rows + 1, $rows + $rows / 200) g;
SQL
pg_dump -h "$dir" -U postgres shop > "$out/day2.sql"
ls -l "$out"/day1.sql "$out"/day2.sql
