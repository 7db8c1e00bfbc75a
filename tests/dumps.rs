//! End to end with real database servers and their real dump tools: PostgreSQL 15 (pg_dump,
//! psql) and MariaDB 10.11 (mysqldump, mariadb), both started by the test in a temporary
//! directory. Backup both ways (pipe and `-- command`), restore into a new database, compare;
//! the daily-cron scenario; and the failures that must never look like a good backup.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::db::{MariaDb, Postgres};
use common::s3::S3Server;

const BKP_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// Where the scenarios' repository is: a location and the environment that reaches it.
struct Repo {
    location: String,
    env: Vec<(&'static str, String)>,
}

impl Repo {
    fn local(dir: &Path) -> Repo {
        Repo {
            location: dir.join("repo").to_str().unwrap().to_string(),
            env: Vec::new(),
        }
    }
}

/// Runs a shell script with `bkp` on PATH and the repository and password in the environment.
fn shell(repo: &Repo, script: &str) -> Output {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_bkp")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(["-c", &format!("set -o pipefail; {script}")])
        .current_dir(BKP_DIR)
        .env("PATH", path)
        .env("BKP_REPOSITORY", &repo.location)
        .envs(repo.env.iter().map(|(k, v)| (k, v)))
        .env("BKP_PASSWORD", common::PASSWORD)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ok(repo: &Repo, script: &str) -> Output {
    let out = shell(repo, script);
    assert!(
        out.status.success(),
        "`{script}` failed: {}",
        text(&out.stderr)
    );
    out
}

fn backup_json(repo: &Repo, script: &str) -> serde_json::Value {
    let out = ok(repo, script);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no JSON from `{script}`: {}", text(&out.stdout)))
}

fn snapshot_count(repo: &Repo) -> usize {
    let out = ok(repo, "bkp snapshots --json");
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .len()
}

/// The table of contents bkp reads from the dump `argv` writes, fed in 64 KiB blocks as a
/// backup reads.
fn dump_toc(argv: &[String], kind: bkp::DumpKind) -> Vec<bkp::toc::Section> {
    let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    assert!(out.status.success(), "{argv:?}: {}", text(&out.stderr));
    let (sections, _) = bkp::toc::read_in_blocks(kind, &out.stdout, 64 << 10).unwrap();
    assert_eq!(sections.last().unwrap().end, out.stdout.len() as u64);
    sections
}

/// Each table's rows in `sections`' table data.
fn assert_rows(sections: &[bkp::toc::Section], expected: &[(&str, u64)]) {
    for (table, rows) in expected {
        let data = sections
            .iter()
            .find(|s| s.kind == "TABLE DATA" && s.name == *table)
            .unwrap_or_else(|| panic!("no data of {table} in {sections:#?}"));
        assert_eq!(data.rows, *rows, "{table}");
    }
}

fn quote(argv: &[String]) -> String {
    argv.iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A failing backup: the exit code, a message, and no new snapshot.
fn assert_backup_fails(repo: &Repo, script: &str, code: i32, message: &str) {
    let before = snapshot_count(repo);
    let out = shell(repo, script);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "`{script}`: {stderr}");
    assert!(
        stderr.contains(message),
        "`{script}`: expected {message:?} in: {stderr}"
    );
    assert_eq!(
        snapshot_count(repo),
        before,
        "`{script}` recorded a snapshot"
    );
}

const PG_SCHEMA: &str = "
CREATE TABLE customers (id int PRIMARY KEY, name text, email text, balance numeric(12,2), note text, created timestamptz);
INSERT INTO customers SELECT g, 'name ' || g, 'user' || g || '@example.com', (g * 37 % 100000) / 100.0,
  CASE WHEN g % 10 = 0 THEN NULL ELSE 'Zürich ✓ 日本 ' || md5(g::text) END,
  '2025-01-01 00:00:00+00'::timestamptz + g * interval '1 minute' FROM generate_series(1, 20000) g;
CREATE TABLE blobs (id int PRIMARY KEY, data bytea);
INSERT INTO blobs SELECT g, decode(md5(g::text) || md5((g + 1)::text), 'hex') FROM generate_series(1, 3000) g;
CREATE TABLE big (id int PRIMARY KEY, body text);
INSERT INTO big VALUES (1, repeat('a large row ', 200000));
CREATE TABLE orders (id serial PRIMARY KEY, customer int REFERENCES customers(id), total numeric(10,2));
CREATE INDEX orders_customer_idx ON orders (customer);
INSERT INTO orders (customer, total) SELECT (g % 1000) * 10 + 1, g / 7.0 FROM generate_series(1, 5000) g;
";

const DAILY_CHANGE: &str = "
UPDATE customers SET balance = balance + 1 WHERE id % 1000 = 0;
DELETE FROM customers WHERE id IN (5, 5005, 15005);
INSERT INTO customers (id, name, email) VALUES (30001, 'new', 'new@example.com'), (30002, 'newer', 'newer@example.com');
";

const MARIADB_SCHEMA: &str = "
CREATE DATABASE shop CHARACTER SET utf8mb4;
USE shop;
CREATE TABLE customers (id INT PRIMARY KEY, name VARCHAR(100), email VARCHAR(200), balance DECIMAL(12,2), note TEXT, created DATETIME);
INSERT INTO customers SELECT seq, CONCAT('name ', seq), CONCAT('user', seq, '@example.com'), (seq * 37 % 100000) / 100,
  IF(seq % 10 = 0, NULL, CONCAT('Zürich ✓ 日本 ', MD5(seq))), '2025-01-01' + INTERVAL seq MINUTE FROM seq_1_to_20000;
CREATE TABLE blobs (id INT PRIMARY KEY, data BLOB);
INSERT INTO blobs SELECT seq, UNHEX(CONCAT(MD5(seq), MD5(seq + 1))) FROM seq_1_to_3000;
CREATE TABLE big (id INT PRIMARY KEY, body LONGTEXT);
INSERT INTO big VALUES (1, REPEAT('a large row ', 200000));
CREATE TABLE orders (id INT PRIMARY KEY, customer INT, total DECIMAL(10,2), INDEX (customer),
  FOREIGN KEY (customer) REFERENCES customers (id));
INSERT INTO orders SELECT seq, (seq % 1000) * 10 + 1, seq / 7 FROM seq_1_to_5000;
";

/// The tables of the schemas above, as each dump names them.
const TABLES: [&str; 4] = ["customers", "blobs", "big", "orders"];

/// What the shared scenarios need from a database server.
trait Database {
    fn name(&self) -> &'static str;
    /// The `dump.kind` bkp should recognise.
    fn dump_kind(&self) -> &'static str;
    fn create_database(&self, db: &str);
    fn apply(&self, db: &str, sql: &str);
    fn dump_argv(&self, db: &str) -> Vec<String>;
    /// The database's dump as sorted lines, for comparing two databases.
    fn dump_lines(&self, db: &str) -> Vec<Vec<u8>>;
    fn restore_command(&self, db: &str) -> String;
    fn stop(&mut self);
    /// `table` (of [`TABLES`]) as its dump names it.
    fn qualified(&self, table: &str) -> String;
    fn count_rows(&self, db: &str, table: &str) -> u64;
    /// The tables of `db`, sorted.
    fn tables(&self, db: &str) -> Vec<String>;
    /// A digest of `table`'s rows in key order.
    fn table_digest(&self, db: &str, table: &str) -> String;
}

impl Database for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }
    fn dump_kind(&self) -> &'static str {
        "postgres-plain"
    }
    fn create_database(&self, db: &str) {
        self.sql("postgres", &format!("CREATE DATABASE {db}"));
    }
    fn apply(&self, db: &str, sql: &str) {
        self.sql(db, sql);
    }
    fn dump_argv(&self, db: &str) -> Vec<String> {
        self.dump_command(&[], db)
    }
    fn dump_lines(&self, db: &str) -> Vec<Vec<u8>> {
        self.dump(db)
    }
    fn restore_command(&self, db: &str) -> String {
        Postgres::restore_command(self, db)
    }
    fn stop(&mut self) {
        Postgres::stop(self);
    }
    fn qualified(&self, table: &str) -> String {
        format!("public.{table}")
    }
    fn count_rows(&self, db: &str, table: &str) -> u64 {
        self.query(db, &format!("SELECT count(*) FROM {table}"))
            .parse()
            .unwrap()
    }
    fn tables(&self, db: &str) -> Vec<String> {
        let sql = "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1";
        self.query(db, sql).lines().map(str::to_string).collect()
    }
    fn table_digest(&self, db: &str, table: &str) -> String {
        let sql = format!("SELECT md5(string_agg(t::text, E'\\n' ORDER BY id)) FROM {table} t");
        self.query(db, &sql)
    }
}

impl Database for MariaDb {
    fn name(&self) -> &'static str {
        "mariadb"
    }
    fn dump_kind(&self) -> &'static str {
        "mysql"
    }
    fn create_database(&self, db: &str) {
        self.sql(&format!("CREATE DATABASE {db}"));
    }
    fn apply(&self, db: &str, sql: &str) {
        self.sql(&format!("USE {db}; {sql}"));
    }
    fn dump_argv(&self, db: &str) -> Vec<String> {
        self.dump_command(db)
    }
    fn dump_lines(&self, db: &str) -> Vec<Vec<u8>> {
        self.dump(db)
    }
    fn restore_command(&self, db: &str) -> String {
        MariaDb::restore_command(self, db)
    }
    fn stop(&mut self) {
        MariaDb::stop(self);
    }
    fn qualified(&self, table: &str) -> String {
        table.to_string()
    }
    fn count_rows(&self, db: &str, table: &str) -> u64 {
        self.query(&format!("SELECT count(*) FROM {db}.{table}"))
            .parse()
            .unwrap()
    }
    fn tables(&self, db: &str) -> Vec<String> {
        let sql = format!(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = '{db}' ORDER BY 1"
        );
        self.query(&sql).lines().map(str::to_string).collect()
    }
    fn table_digest(&self, db: &str, table: &str) -> String {
        let out = self.query(&format!("CHECKSUM TABLE {db}.{table}"));
        out.split('\t').nth(1).unwrap().to_string()
    }
}

/// `bkp restore --table` of the latest `shop` snapshot into new databases: one table alone
/// (its foreign key to a table not restored left out, with a note), two tables together (the
/// key kept), and a name that is not there.
fn assert_restores_tables(repo: &Repo, db: &dyn Database) {
    let name = db.name();
    db.create_database("onlyorders");
    let out = ok(
        repo,
        &format!(
            "bkp restore latest --tag shop --table orders | {}",
            db.restore_command("onlyorders")
        ),
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("left out a foreign key to") && stderr.contains("customers"),
        "{name}: {stderr}"
    );
    assert_eq!(db.tables("onlyorders"), ["orders"], "{name}");
    assert_eq!(
        db.table_digest("onlyorders", "orders"),
        db.table_digest("shop", "orders"),
        "{name}"
    );
    db.create_database("twotables");
    let out = ok(
        repo,
        &format!(
            "bkp restore latest --tag shop --table {} --table customers | {}",
            db.qualified("orders"),
            db.restore_command("twotables")
        ),
    );
    assert!(
        !text(&out.stderr).contains("foreign key"),
        "{name}: {}",
        text(&out.stderr)
    );
    assert_eq!(db.tables("twotables"), ["customers", "orders"], "{name}");
    for table in ["customers", "orders"] {
        assert_eq!(
            db.table_digest("twotables", table),
            db.table_digest("shop", table),
            "{name} {table}"
        );
    }
    // The foreign key came along: a row for a customer that does not exist is refused.
    let refused = shell(
        repo,
        &format!(
            "echo 'INSERT INTO orders (id, customer, total) VALUES (999999, 424242, 1);' | {}",
            db.restore_command("twotables")
        ),
    );
    assert!(
        !refused.status.success(),
        "{name}: the foreign key is missing"
    );
    let unknown = shell(repo, "bkp restore latest --tag shop --table order");
    assert_eq!(
        unknown.status.code(),
        Some(1),
        "{name}: {}",
        text(&unknown.stderr)
    );
    assert!(
        text(&unknown.stderr).contains("did you mean") && text(&unknown.stderr).contains("orders"),
        "{name}: {}",
        text(&unknown.stderr)
    );
}

/// `bkp ls` of the latest `shop` snapshot: every table, with the rows the database holds.
fn assert_ls_counts_rows(repo: &Repo, db: &dyn Database) {
    let out = ok(repo, "bkp ls latest --tag shop --json");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), TABLES.len(), "{listed:?}");
    for table in TABLES {
        let entry = listed
            .iter()
            .find(|t| t["name"] == db.qualified(table))
            .unwrap_or_else(|| panic!("{}: no {table} in {listed:?}", db.name()));
        assert_eq!(entry["rows"], db.count_rows("shop", table), "{table}");
        assert!(entry["bytes"].as_u64().unwrap() > 0, "{entry}");
    }
}

/// `bkp diff` between two snapshots of `shop`: the tables it says changed, sorted.
fn changed_tables(repo: &Repo, before: &str, after: &str) -> Vec<String> {
    let out = ok(repo, &format!("bkp diff {before} {after} --json"));
    let diff: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tables = diff["tables"].as_array().unwrap();
    assert_eq!(tables.len(), TABLES.len(), "{diff}");
    let mut changed: Vec<String> = tables
        .iter()
        .filter(|t| t["status"] != "unchanged")
        .map(|t| {
            format!(
                "{} {}",
                t["status"].as_str().unwrap(),
                t["name"].as_str().unwrap()
            )
        })
        .collect();
    changed.sort();
    changed
}

/// A restore of the latest `shop` snapshot into a new database `into` equals database `shop`.
fn assert_restores(repo: &Repo, db: &dyn Database, into: &str) {
    db.create_database(into);
    ok(
        repo,
        &format!(
            "bkp restore latest --tag shop | {}",
            db.restore_command(into)
        ),
    );
    assert!(
        db.dump_lines(into) == db.dump_lines("shop"),
        "{}: {into} differs from shop",
        db.name()
    );
}

/// The scenarios every database goes through, on database `shop`: backups both ways, restores,
/// the daily cron run, and failures.
fn shared_scenarios(repo: &Repo, db: &dyn Database, unchanged_max: u64, missing_db_message: &str) {
    ok(repo, "BKP_INSECURE_FAST_KDF=1 bkp init");
    let dump = quote(&db.dump_argv("shop"));
    let name = db.name();

    // Piped, then restored into a new database: the data is the same.
    let first = backup_json(repo, &format!("{dump} | bkp backup --json --tag shop"));
    assert_eq!(first["dump_kind"], db.dump_kind());
    assert_eq!(first["complete"], true);
    assert_restores(repo, db, "restored1");

    // bkp runs the dump itself; an unchanged database adds (almost) nothing.
    let size = first["bytes_read"].as_u64().unwrap();
    let unchanged = backup_json(repo, &format!("bkp backup --json --tag shop -- {dump}"));
    let added = unchanged["bytes_added"].as_u64().unwrap();
    eprintln!(
        "{name}: dump {size} B, first backup added {}, unchanged database added {added}",
        first["bytes_added"]
    );
    assert!(
        added <= unchanged_max,
        "{name}: unchanged database added {added} bytes"
    );
    assert_ls_counts_rows(repo, db);
    let unchanged_id = unchanged["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(
        changed_tables(repo, first["snapshot_id"].as_str().unwrap(), &unchanged_id),
        Vec::<String>::new()
    );
    let listed = ok(repo, "bkp snapshots --json --tag shop");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        listed[1]["command"].as_str().unwrap(),
        db.dump_argv("shop").join(" ")
    );

    // The daily cron run: a few rows changed add a small fraction of the dump.
    db.apply("shop", DAILY_CHANGE);
    let daily = backup_json(repo, &format!("bkp backup --json --tag shop -- {dump}"));
    let added = daily["bytes_added"].as_u64().unwrap();
    eprintln!("{name}: a day of changes added {added} B to a {size} B dump");
    assert!(
        added < size / 10,
        "{name}: daily change added {added} of {size} bytes"
    );
    assert_restores(repo, db, "restored2");
    // Only `customers` changed, and the catalog says so without reading the dumps.
    assert_eq!(
        changed_tables(repo, &unchanged_id, "latest"),
        [format!("changed {}", db.qualified("customers"))]
    );
    assert_ls_counts_rows(repo, db);
    assert_restores_tables(repo, db);

    // A dump that fails, at the start or midway, never records a snapshot.
    let missing_db = quote(&db.dump_argv("nosuchdb"));
    assert_backup_fails(
        repo,
        &format!("bkp backup --tag shop -- {missing_db}"),
        7,
        missing_db_message,
    );
    assert_backup_fails(
        repo,
        &format!("bkp backup --tag shop -- sh -c \"{dump} | head -c 200000; kill -KILL \\$\\$\""),
        7,
        "killed by signal 9",
    );

    // A truncated dump through a pipe is saved, flagged, and exits 6.
    let out = shell(
        repo,
        &format!("{dump} | head -c 100000 | bkp backup --tag cut"),
    );
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("INCOMPLETE"));
    assert!(text(&ok(repo, "bkp snapshots --tag cut").stdout).contains("INCOMPLETE"));
    // `latest` never picks an incomplete dump; by id it restores, with a warning.
    let refused = shell(repo, "bkp restore --quiet latest --tag cut");
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("INCOMPLETE"),
        "{}",
        text(&refused.stderr)
    );
    let listed: serde_json::Value =
        serde_json::from_slice(&ok(repo, "bkp snapshots --tag cut --json").stdout).unwrap();
    let id = listed[0]["id"].as_str().unwrap().to_string();
    let restored = ok(repo, &format!("bkp restore --quiet {id}"));
    assert!(text(&restored.stderr).contains("INCOMPLETE"));
    assert_eq!(restored.stdout.len(), 100_000);

    // Compressed input: backed up, with a warning that says how to fix it.
    let out = ok(repo, &format!("{dump} | gzip | bkp backup --tag gz"));
    assert!(
        text(&out.stderr).contains("gzip-compressed"),
        "{}",
        text(&out.stderr)
    );
}

/// A dump from a server that has gone away fails and records nothing.
fn assert_fails_without_server(repo: &Repo, db: &mut dyn Database, message: &str) {
    let dump = quote(&db.dump_argv("shop"));
    db.stop();
    assert_backup_fails(
        repo,
        &format!("bkp backup --tag shop -- {dump}"),
        7,
        message,
    );
}

#[test]
fn postgres_dumps_round_trip_dedup_and_fail_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::local(dir.path());
    let mut pg = Postgres::start();
    pg.sql("postgres", "CREATE DATABASE shop");
    pg.sql("shop", PG_SCHEMA);
    // Only the sections holding pg_dump's random \restrict key (top and bottom) change, and
    // each is a small chunk of its own.
    shared_scenarios(&repo, &pg, 16 * 1024, "\"nosuchdb\" does not exist");

    // The table of contents of the real dump: rows as the tables hold them after the day's change
    // (20,000 - 3 + 2 customers), and the primary keys tied to their tables.
    let toc = dump_toc(&pg.dump_command(&[], "shop"), bkp::DumpKind::PostgresPlain);
    assert_rows(
        &toc,
        &[
            ("public.customers", 19_999),
            ("public.blobs", 3_000),
            ("public.big", 1),
        ],
    );
    for table in ["public.customers", "public.blobs", "public.big"] {
        assert!(
            toc.iter()
                .any(|s| s.kind == "CONSTRAINT" && s.table.as_deref() == Some(table)),
            "no primary key of {table}: {toc:#?}"
        );
    }

    let listed = ok(&repo, "bkp snapshots --json --tag shop");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert!(
        listed[0]["server_version"]
            .as_str()
            .unwrap()
            .starts_with("15.")
    );
    // With a fixed key the dump is byte-identical, and only the snapshot object is added.
    let fixed = quote(&pg.dump_command(&["--restrict-key=bkptest"], "shop"));
    backup_json(&repo, &format!("bkp backup --json --tag fixed -- {fixed}"));
    let again = backup_json(&repo, &format!("bkp backup --json --tag fixed -- {fixed}"));
    assert_eq!(again["bytes_added"], 4096);
    // Plain output names its database only with -C (--create); bkp records it then.
    let created = quote(&pg.dump_command(&["-C"], "shop"));
    backup_json(
        &repo,
        &format!("bkp backup --json --tag created -- {created}"),
    );
    let listed = ok(&repo, "bkp snapshots --json --tag created");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["database"], "shop", "{listed}");
    // A compressed custom archive warns how to fix it; an uncompressed one does not.
    let custom = quote(&pg.dump_command(&["-Fc"], "shop"));
    let out = ok(&repo, &format!("bkp backup --tag fc -- {custom}"));
    assert!(text(&out.stderr).contains("-Z0"), "{}", text(&out.stderr));
    let uncompressed = quote(&pg.dump_command(&["-Fc", "-Z0"], "shop"));
    let out = ok(&repo, &format!("bkp backup --tag fc -- {uncompressed}"));
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );
    // An uncompressed custom archive has a table of contents too: its data blocks, with rows.
    let custom = dump_toc(
        &pg.dump_command(&["-Fc", "-Z0"], "shop"),
        bkp::DumpKind::PostgresCustom,
    );
    assert_rows(
        &custom,
        &[
            ("public.customers", 19_999),
            ("public.blobs", 3_000),
            ("public.big", 1),
            ("public.orders", 5_000),
        ],
    );
    let listed = ok(&repo, "bkp ls latest --tag fc --json");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let orders = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "public.orders")
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(orders["rows"], 5_000);
    // Its tables are not SQL in the stream: restore --table says what to do instead.
    let refused = shell(&repo, "bkp restore latest --tag fc --table orders");
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("pg_restore"),
        "{}",
        text(&refused.stderr)
    );

    assert_drills(&repo, &pg, dir.path());
    assert_fails_without_server(&repo, &mut pg, "connection");
}

/// `bkp drill` into scratch databases: one that succeeds, one whose psql fails (the tables
/// exist already), one interrupted; each recorded and shown by `bkp snapshots`.
fn assert_drills(repo: &Repo, pg: &Postgres, dir: &Path) {
    let last_drill = || -> serde_json::Value {
        let out = ok(repo, "bkp snapshots --json --tag shop");
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        listed[0]["series_last_drill"].clone()
    };
    assert!(last_drill().is_null());
    pg.sql("postgres", "CREATE DATABASE drill");
    let psql = pg.restore_command("drill");
    let metrics = dir.join("drill.prom");
    let out = ok(
        repo,
        &format!(
            "bkp drill latest --tag shop --metrics-file {} -- {psql}",
            metrics.display()
        ),
    );
    assert!(text(&out.stderr).contains("OK"), "{}", text(&out.stderr));
    let drill = last_drill();
    assert_eq!(drill["ok"], true, "{drill}");
    assert!(drill["bytes"].as_u64().unwrap() > 1_000_000, "{drill}");
    assert_eq!(Database::tables(pg, "drill"), Database::tables(pg, "shop"));
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.contains("bkp_drill_last_exit_code{tags=\"shop\"} 0"),
        "{prom}"
    );
    assert!(
        prom.contains("bkp_drill_last_success_timestamp_seconds"),
        "{prom}"
    );
    let listed = text(&ok(repo, "bkp snapshots --tag shop").stdout);
    assert!(
        listed.contains("shop: last drill") && listed.contains(" OK"),
        "{listed}"
    );

    // Again into the same database: psql stops at the first CREATE TABLE, exit 9, recorded.
    let failed = shell(repo, &format!("bkp drill latest --tag shop -- {psql}"));
    assert_eq!(failed.status.code(), Some(9), "{}", text(&failed.stderr));
    assert!(
        text(&failed.stderr).contains("FAILED"),
        "{}",
        text(&failed.stderr)
    );
    let drill = last_drill();
    assert_eq!(drill["ok"], false, "{drill}");
    assert!(
        drill["failure"]
            .as_str()
            .unwrap()
            .contains("exited with status 3"),
        "{drill}"
    );
    let listed = text(&ok(repo, "bkp snapshots --tag shop").stdout);
    assert!(listed.contains("FAILED"), "{listed}");

    // Interrupted while the command does not read: stopped, recorded, 128 + SIGTERM.
    let interrupted = shell(
        repo,
        "bkp drill latest --tag shop -- sleep 60 & pid=$!; sleep 2; kill -TERM $pid; wait $pid",
    );
    assert_eq!(
        interrupted.status.code(),
        Some(143),
        "{}",
        text(&interrupted.stderr)
    );
    let drill = last_drill();
    assert_eq!(drill["failure"], "interrupted by signal 15", "{drill}");

    // A command that does not exist is a failed drill too.
    let missing = shell(repo, "bkp drill latest --tag shop -- no-such-psql -d drill");
    assert_eq!(missing.status.code(), Some(9), "{}", text(&missing.stderr));
    assert!(
        last_drill()["failure"]
            .as_str()
            .unwrap()
            .contains("could not be started"),
    );
}

#[test]
fn mariadb_dumps_round_trip_dedup_and_fail_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::local(dir.path());
    let mut db = MariaDb::start();
    db.sql(MARIADB_SCHEMA);
    // mysqldump --skip-dump-date repeats itself byte for byte: only the snapshot is added.
    shared_scenarios(&repo, &db, 4096, "nosuchdb");

    // The table of contents of the real dump (extended inserts; a 2.4 MB row longer than any head).
    let toc = dump_toc(&db.dump_command("shop"), bkp::DumpKind::MySql);
    assert_rows(&toc, &[("customers", 19_999), ("blobs", 3_000), ("big", 1)]);

    // With the dump date (mysqldump's default) an unchanged database adds only the chunk of
    // the trailer that holds it.
    let dated: Vec<String> = db
        .dump_command("shop")
        .into_iter()
        .filter(|a| a != "--skip-dump-date")
        .collect();
    let dated = quote(&dated);
    backup_json(&repo, &format!("bkp backup --json --tag dated -- {dated}"));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = backup_json(&repo, &format!("bkp backup --json --tag dated -- {dated}"));
    let added = again["bytes_added"].as_u64().unwrap();
    assert!(
        added <= 16 * 1024,
        "an unchanged dated dump added {added} bytes"
    );

    let listed = ok(&repo, "bkp snapshots --json --tag shop");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["database"], "shop");
    assert!(
        listed[0]["server_version"]
            .as_str()
            .unwrap()
            .contains("MariaDB")
    );

    assert_fails_without_server(&repo, &mut db, "Can't connect");
}

/// The same scenarios with the repository in S3 (a real S3 server on loopback).
#[test]
fn postgres_dumps_round_trip_through_an_s3_repository() {
    let server = S3Server::start();
    let repo = Repo {
        location: server.url("postgres"),
        env: server.env(),
    };
    let mut pg = Postgres::start();
    pg.sql("postgres", "CREATE DATABASE shop");
    pg.sql("shop", PG_SCHEMA);
    shared_scenarios(&repo, &pg, 64 * 1024, "\"nosuchdb\" does not exist");
    assert_fails_without_server(&repo, &mut pg, "connection");
}
