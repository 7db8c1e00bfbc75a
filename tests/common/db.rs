//! Throwaway PostgreSQL and MariaDB servers for the end-to-end tests: each lives in a temporary
//! directory, listens only on a Unix socket there, and is stopped when dropped.
//! scripts/install-test-deps.sh installs the server packages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `program` run as `user` when we are root (the servers refuse to run as root).
fn as_user(user: &str, program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", user, "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .chars()
        .rev()
        .take(2000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert!(out.status.success(), "{what} failed: {tail}");
    out
}

/// A dump's lines, sorted: the same rows and definitions in whatever order the server stores
/// them (an UPDATE moves a PostgreSQL row, so a restored table lists rows in another order).
/// Lines starting with `skip` are left out.
pub fn sorted_lines(dump: &[u8], skip: &[u8]) -> Vec<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = dump
        .split(|&b| b == b'\n')
        .filter(|l| skip.is_empty() || !l.starts_with(skip))
        .map(<[u8]>::to_vec)
        .collect();
    lines.sort();
    lines
}

/// A directory the server's own user can use.
fn server_dir(user: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("bkp-db")
        .tempdir_in("/tmp")
        .unwrap();
    if is_root() {
        run(Command::new("chown").arg(user).arg(dir.path()), "chown");
    }
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where initdb and pg_ctl are: pg_config's answer, else the newest Debian install.
fn postgres_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run scripts/install-test-deps.sh")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.iter()
            .rev()
            .nth(1)
            .and_then(|v| v.to_str()?.parse::<u32>().ok())
    });
    versions
        .pop()
        .expect("no PostgreSQL server binaries: run scripts/install-test-deps.sh")
}

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    running: bool,
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = postgres_bindir();
        let dir = server_dir("postgres");
        let data = dir.path().join("data");
        run(
            as_user("postgres", &bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ]),
            "initdb",
        );
        let mut pg = Postgres {
            dir,
            bin,
            running: false,
        };
        pg.start_server();
        pg
    }

    fn start_server(&mut self) {
        let options = format!("-k {} -c listen_addresses='' -c fsync=off", self.host());
        run(
            as_user("postgres", &self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .arg("-l")
                .arg(self.dir.path().join("log"))
                .args(["-w", "-o", &options, "start"]),
            "pg_ctl start",
        );
        self.running = true;
        wait_until("postgres", || {
            Command::new("pg_isready")
                .args(["-q", "-h", &self.host()])
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    /// The socket directory, used as the host name.
    pub fn host(&self) -> String {
        self.dir.path().to_string_lossy().into_owned()
    }

    pub fn sql(&self, db: &str, sql: &str) {
        self.query(db, sql);
    }

    /// The result of a query, unaligned and without headers.
    pub fn query(&self, db: &str, sql: &str) -> String {
        let out = run(
            Command::new("psql").args([
                "-tA",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &self.host(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ]),
            "psql",
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `pg_dump` of `db` as an argument vector (extra options go before the database name).
    pub fn dump_command(&self, extra: &[&str], db: &str) -> Vec<String> {
        let mut argv: Vec<String> = ["pg_dump", "-h", &self.host(), "-U", "postgres"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        argv.extend(extra.iter().map(|s| s.to_string()));
        argv.push(db.to_string());
        argv
    }

    /// A plain dump's sorted lines (fixed `\restrict` key), for comparing two databases.
    pub fn dump(&self, db: &str) -> Vec<Vec<u8>> {
        let argv = self.dump_command(&["--restrict-key=bkptest"], db);
        sorted_lines(
            &run(Command::new(&argv[0]).args(&argv[1..]), "pg_dump").stdout,
            b"",
        )
    }

    pub fn restore_command(&self, db: &str) -> String {
        format!(
            "psql -q -v ON_ERROR_STOP=1 -h {} -U postgres -d {db}",
            self.host()
        )
    }

    pub fn stop(&mut self) {
        if self.running {
            self.running = false;
            let _ = as_user("postgres", &self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .status();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct MariaDb {
    dir: tempfile::TempDir,
    server: Option<std::process::Child>,
}

impl MariaDb {
    pub fn start() -> MariaDb {
        let dir = server_dir("mysql");
        let user: &[&str] = if is_root() { &["--user=mysql"] } else { &[] };
        run(
            Command::new("mariadb-install-db")
                .arg("--no-defaults")
                .args(user)
                .arg(format!("--datadir={}", dir.path().join("data").display()))
                .args(["--auth-root-authentication-method=normal", "--skip-test-db"]),
            "mariadb-install-db (run scripts/install-test-deps.sh)",
        );
        let server = Command::new("mariadbd")
            .arg("--no-defaults")
            .args(user)
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg(format!("--log-error={}", dir.path().join("err").display()))
            .args([
                "--skip-networking",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=0",
                "--skip-log-bin",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mariadbd");
        let db = MariaDb {
            dir,
            server: Some(server),
        };
        wait_until("mariadb", || {
            Command::new("mariadb-admin")
                .args(["--no-defaults", &db.socket_arg(), "-uroot", "ping"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        db
    }

    fn socket_arg(&self) -> String {
        format!("--socket={}", self.dir.path().join("sock").display())
    }

    pub fn sql(&self, sql: &str) {
        self.query(sql);
    }

    /// The result of a query, tab-separated and without headers.
    pub fn query(&self, sql: &str) -> String {
        let out = run(
            Command::new("mariadb").args([
                "--no-defaults",
                &self.socket_arg(),
                "-uroot",
                "-N",
                "-B",
                "-e",
                sql,
            ]),
            "mariadb",
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn dump_command(&self, db: &str) -> Vec<String> {
        [
            "mysqldump",
            "--no-defaults",
            &self.socket_arg(),
            "-uroot",
            "--single-transaction",
            "--skip-dump-date",
            db,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// A dump's sorted lines without the one that names the database, for comparing two
    /// databases.
    pub fn dump(&self, db: &str) -> Vec<Vec<u8>> {
        let argv = self.dump_command(db);
        sorted_lines(
            &run(Command::new(&argv[0]).args(&argv[1..]), "mysqldump").stdout,
            b"-- Host: ",
        )
    }

    pub fn restore_command(&self, db: &str) -> String {
        format!("mariadb --no-defaults {} -uroot {db}", self.socket_arg())
    }

    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = Command::new("mariadb-admin")
                .args(["--no-defaults", &self.socket_arg(), "-uroot", "shutdown"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while server.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}
