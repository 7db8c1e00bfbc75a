//! A real S3 server for the tests: SeaweedFS (`weed mini`, installed into .test-tools/ by
//! scripts/install-test-deps.sh), on loopback only, with one access key, stopped on drop.
//! `weed mini` also opens fixed internal ports, so a test binary runs one server at a time.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bkp::Store;

pub const ACCESS_KEY: &str = "bkp-test-access";
pub const SECRET_KEY: &str = "bkp-test-secret-0123456789";
pub const BUCKET: &str = "bkp-test";

pub struct S3Server {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub port: u16,
}

fn weed() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".test-tools/venv/bin/weed");
    assert!(
        path.exists(),
        "{} is missing: run scripts/install-test-deps.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

impl S3Server {
    pub fn start() -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        let identities = format!(
            r#"{{"identities":[{{"name":"bkp","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","List","Tagging","Write"]}}]}}"#
        );
        std::fs::write(dir.path().join("s3.json"), identities).unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let mut server = S3Server {
            child: None,
            dir,
            port: free_port(),
        };
        server.run();
        server
    }

    fn run(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("weed.log")).unwrap();
        let child = Command::new(weed())
            .arg("mini")
            .arg(format!("-dir={}", self.dir.path().join("data").display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
            ])
            .args(["-webdav=false", "-admin.ui=false"])
            .arg(format!("-s3.port={}", self.port))
            .arg(format!(
                "-s3.config={}",
                self.dir.path().join("s3.json").display()
            ))
            .arg(format!("-bucket={BUCKET}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("weed starts");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls with signed requests until the bucket accepts a write.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self
                .try_store("probe", SECRET_KEY)
                .and_then(|probe| probe.put_new("ready", b"1".to_vec()));
            if ready.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS did not become ready; see {}",
                self.dir.path().join("weed.log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `s3://bucket/prefix` for a repository of its own.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The environment the CLI takes S3 settings from.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("BKP_RETRY_TIMEOUT", "5".to_string()),
        ]
    }

    /// A library store on `prefix`, with explicit settings (tests cannot set the environment).
    pub fn store(&self, prefix: &str) -> Store {
        self.store_with_secret(prefix, SECRET_KEY)
    }

    pub fn store_with_secret(&self, prefix: &str, secret: &str) -> Store {
        self.try_store(prefix, secret).unwrap()
    }

    fn try_store(&self, prefix: &str, secret: &str) -> bkp::Result<Store> {
        let endpoint = self.endpoint();
        Store::open_with_options(
            &self.url(prefix),
            &[
                ("aws_access_key_id", ACCESS_KEY),
                ("aws_secret_access_key", secret),
                ("aws_region", "us-east-1"),
                ("aws_endpoint", &endpoint),
                ("aws_allow_http", "true"),
                ("retry_timeout", "5"),
            ],
        )
    }

    /// Kills the server (as a crash would); [`S3Server::restart`] brings it back with its data.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
