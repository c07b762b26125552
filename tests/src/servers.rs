//! Azurite and Mosquitto, started on free loopback ports with disk persistence.

use crate::{free_port, repo_root, wait_for, TempDir};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

pub fn azurite_bin() -> PathBuf {
    std::env::var_os("AZURITE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/node_modules/.bin/azurite"))
}

pub fn mosquitto_bin() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("mosquitto"))
                .collect()
        })
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/sbin/mosquitto")])
        .find(|p| p.is_file())
}

/// SIGTERM, so the server saves its data; SIGKILL if it has not exited within 15 s.
async fn terminate(mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// Azurite in disk mode (in-memory mode hangs under queue load).
#[derive(Debug)]
pub struct Azurite {
    pub queue_port: u16,
    pub table_port: u16,
    pub blob_port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// HTTPS with OAuth (`--oauth basic`): the certificate and key it serves, and the CA
    /// clients must trust.
    tls: Option<(PathBuf, PathBuf, Vec<u8>)>,
}

impl Azurite {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Azurite over HTTPS, accepting Entra ID bearer tokens (`--oauth basic`: their
    /// signature is not checked) besides the account key.
    pub async fn start_oauth(cert: PathBuf, key: PathBuf, ca: &std::path::Path) -> Self {
        let ca = std::fs::read(ca).expect("read the CA");
        Self::start_with(Some((cert, key, ca))).await
    }

    async fn start_with(tls: Option<(PathBuf, PathBuf, Vec<u8>)>) -> Self {
        let mut a = Self {
            queue_port: free_port(),
            table_port: free_port(),
            blob_port: free_port(),
            dir: TempDir::new("azurite"),
            child: None,
            tls,
        };
        // A free port can be taken by another test's server between its choice and
        // Azurite's bind: then Azurite exits, and it is tried again on other ports.
        for _ in 0..3 {
            match a.try_launch().await {
                Ok(()) => return a,
                Err(log) => {
                    eprintln!("azurite exited at start, trying other ports: {log}");
                    (a.queue_port, a.table_port, a.blob_port) =
                        (free_port(), free_port(), free_port());
                }
            }
        }
        panic!("azurite exited at start three times: {}", a.log_tail());
    }

    /// Starts it on its ports; panics, with its log, if it cannot.
    async fn launch(&mut self) {
        if let Err(log) = self.try_launch().await {
            panic!("azurite exited at start: {log}");
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.0.join("azurite.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Starts it and waits until it listens. An exit before then is an error carrying its
    /// log. It is given long, as a start on a machine busy with other tests' loads is slow,
    /// not wrong.
    async fn try_launch(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.0.join("azurite.log")).expect("azurite log");
        let mut cmd = Command::new(azurite_bin());
        if let Some((cert, key, _)) = &self.tls {
            cmd.args(["--oauth", "basic", "--cert"])
                .arg(cert)
                .arg("--key")
                .arg(key);
        }
        let child = cmd
            .args(["--silent", "--skipApiVersionCheck", "--location"])
            .arg(self.dir.0.join("data"))
            .args([
                "--blobHost",
                "127.0.0.1",
                "--queueHost",
                "127.0.0.1",
                "--tableHost",
                "127.0.0.1",
            ])
            .args(["--blobPort", &self.blob_port.to_string()])
            .args(["--queuePort", &self.queue_port.to_string()])
            .args(["--tablePort", &self.table_port.to_string()])
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("start azurite");
        let (q, t) = (self.queue_port, self.table_port);
        let child = self.child.insert(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            if port_open(q).await && port_open(t).await {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!("{status}: {}", self.log_tail()));
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "azurite did not listen within 90 s: {}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the emulator the way an operator would (SIGTERM, so it saves its database);
    /// its data stays on disk.
    pub async fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child).await;
        }
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }

    /// Starts it again after [`Azurite::stop`], on the same ports and data.
    pub async fn start_again(&mut self) {
        self.launch().await;
    }

    pub fn connection_string(&self) -> String {
        format!(
            "AccountName=devstoreaccount1;\
             AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;{}",
            self.endpoints()
        )
    }

    /// The account's endpoints alone, as a connection string (for Entra ID: no key).
    pub fn endpoints(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!(
            "QueueEndpoint={scheme}://127.0.0.1:{}/devstoreaccount1;\
             TableEndpoint={scheme}://127.0.0.1:{}/devstoreaccount1;\
             BlobEndpoint={scheme}://127.0.0.1:{}/devstoreaccount1",
            self.queue_port, self.table_port, self.blob_port
        )
    }

    pub fn account(&self) -> infra::storage::Account {
        infra::storage::Account::open(
            &self.connection_string(),
            Duration::from_secs(10),
            infra::storage::Access {
                trusted_ca: self.tls.as_ref().map(|t| t.2.as_slice()),
                ..infra::storage::Access::FULL
            },
        )
        .expect("valid connection string")
    }
}

/// Where this machine's Mosquitto keeps its dynamic-security plugin (Debian: multiarch).
fn dynamic_security_plugin() -> PathBuf {
    ["x86_64-linux-gnu", "aarch64-linux-gnu", ""]
        .iter()
        .map(|arch| {
            PathBuf::from("/usr/lib")
                .join(arch)
                .join("mosquitto_dynamic_security.so")
        })
        .find(|p| p.is_file())
        .expect("mosquitto's dynamic-security plugin (Debian package mosquitto)")
}

/// Writes `conf` into `dir` and starts Mosquitto on it, logging to `dir/mosquitto.log`.
///
/// Started as root, Mosquitto switches to its `mosquitto` user unless told otherwise, and can
/// then not write its store in a folder root made: sessions and queued readings would not
/// survive a restart, and only its log would say so. So as root it is told to stay root (what
/// scripts/run.sh does too).
fn launch_mosquitto(dir: &std::path::Path, conf: &str) -> Child {
    let conf_path = dir.join("mosquitto.conf");
    let mut conf = conf.to_owned();
    if running_as_root() {
        conf.push_str("\nuser root\n");
    }
    std::fs::write(&conf_path, conf).expect("write mosquitto.conf");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("mosquitto.log"))
        .expect("mosquitto log");
    Command::new(mosquitto_bin().expect("mosquitto installed"))
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::from(log.try_clone().expect("log handle")))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("start mosquitto")
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Asks the broker to save its store now (SIGUSR1) and panics, with its log, if it cannot:
/// a broker that cannot persist loses every session and queued reading when it restarts.
async fn assert_persists(child: &Child, log: &std::path::Path) {
    // Mosquitto listens before it installs its signal handlers, and a SIGUSR1 before them
    // kills it: wait for its "running" line, which follows them (the log is appended to
    // across restarts, so each start's line is counted against its "starting").
    wait_for(
        "mosquitto to say it is running",
        Duration::from_secs(10),
        || async move {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let count = |what: &str| text.lines().filter(|l| l.ends_with(what)).count();
            (count(" running") >= count(" starting")).then_some(())
        },
    )
    .await;
    let saves = |text: &str| text.matches("Saving in-memory database").count();
    let before = saves(&std::fs::read_to_string(log).unwrap_or_default());
    let pid = child.id().expect("mosquitto running");
    let status = std::process::Command::new("kill")
        .args(["-USR1", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "cannot signal mosquitto");
    let text = wait_for(
        "mosquitto to save its store",
        Duration::from_secs(10),
        || async move {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            (saves(&text) > before).then_some(text)
        },
    )
    .await;
    // The error lines follow the save line at once; give the log a moment to show them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(log).unwrap_or(text);
    assert!(
        !text.contains("Error saving"),
        "mosquitto cannot write its store, so a restart would lose sessions and readings:\n{text}"
    );
}

/// Mosquitto with the project's shipped configuration (deploy/mosquitto.conf), so the tests
/// prove the configuration users get, not a friendlier one.
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    dir: TempDir,
    conf: String,
    child: Option<Child>,
}

impl Mosquitto {
    pub async fn start() -> Self {
        let dir = TempDir::new("mosquitto");
        let port = free_port();
        let shipped = std::fs::read_to_string(repo_root().join("deploy/mosquitto.conf"))
            .expect("deploy/mosquitto.conf");
        let conf: String = shipped
            .lines()
            .map(|line| {
                if line.starts_with("listener ") {
                    format!("listener {port} 127.0.0.1")
                } else if line.starts_with("persistence_location ") {
                    format!("persistence_location {}/", dir.0.display())
                } else {
                    line.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut m = Self {
            port,
            dir,
            conf,
            child: None,
        };
        m.launch().await;
        m
    }

    async fn launch(&mut self) {
        let child = launch_mosquitto(&self.dir.0, &self.conf);
        let port = self.port;
        wait_for(
            "mosquitto to listen",
            Duration::from_secs(10),
            || async move { port_open(port).await.then_some(()) },
        )
        .await;
        assert_persists(&child, &self.dir.0.join("mosquitto.log")).await;
        self.child = Some(child);
    }

    /// Stops the broker the way an operator would (SIGTERM: it saves its store), then starts
    /// it again on the same port and store.
    pub async fn restart(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child).await;
        }
        self.launch().await;
    }

    /// Stops the broker the way an operator would (SIGTERM: it saves its store).
    pub async fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child).await;
        }
    }

    /// Starts a stopped broker again, on the same port and store.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "the broker is running");
        self.launch().await;
    }

    /// Stops the broker and starts it again with an empty store, as a broker that lost its
    /// disk would: every session, subscription and queued message is gone.
    pub async fn restart_forgetting(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child).await;
        }
        let store = self.dir.0.join("mosquitto.db");
        if store.exists() {
            std::fs::remove_file(&store).expect("remove the broker's store");
        }
        self.launch().await;
    }

    /// The broker's log so far (every start).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("mosquitto.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// Mosquitto with the production configuration (deploy/mosquitto/): TLS only, passwords on
/// one listener and client certificates on the other, permissions by the dynamic-security
/// plugin, and identities made by the shipped script (deploy/mosquitto/gen-identities.sh), so
/// the tests prove what operators deploy.
#[derive(Debug)]
pub struct SecureMosquitto {
    /// TLS with user name and password.
    pub tls_port: u16,
    /// Mutual TLS: the client certificate's CN is the identity.
    pub mtls_port: u16,
    /// What the script wrote: `ca.crt`, `ingest.crt`, `ingest.password`, ...
    pub identities: TempDir,
    _child: Child,
}

impl SecureMosquitto {
    /// Starts it with the service identities and `devices` (`user:password` lines).
    pub async fn start(devices: &str) -> Self {
        let identities = TempDir::new("identities");
        let credentials = identities.0.join("devices.txt");
        std::fs::write(&credentials, devices).expect("write device credentials");
        let script = repo_root().join("deploy/mosquitto/gen-identities.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(identities.0.join("out"))
            .env("DEVICE_CREDENTIALS", &credentials)
            .output()
            .expect("run gen-identities.sh");
        assert!(
            out.status.success(),
            "gen-identities.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (tls_port, mtls_port) = (free_port(), free_port());
        let dir = identities.0.join("out");
        let data = identities.0.join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let shipped = std::fs::read_to_string(repo_root().join("deploy/mosquitto/mosquitto.conf"))
            .expect("deploy/mosquitto/mosquitto.conf");
        let mut listeners = [tls_port, mtls_port].into_iter();
        let file = |name: &str| dir.join(name).display().to_string();
        let conf: String = shipped
            .lines()
            .map(|line| {
                let directive = line.split_whitespace().next().unwrap_or_default();
                match directive {
                    "listener" => format!(
                        "listener {} 127.0.0.1",
                        listeners.next().expect("two listeners")
                    ),
                    "cafile" => format!("cafile {}", file("ca.crt")),
                    "certfile" => format!("certfile {}", file("server.crt")),
                    "keyfile" => format!("keyfile {}", file("server.key")),
                    "plugin" => format!("plugin {}", dynamic_security_plugin().display()),
                    "plugin_opt_config_file" => {
                        format!("plugin_opt_config_file {}", file("dynamic-security.json"))
                    }
                    "persistence_location" => {
                        format!("persistence_location {}/", data.display())
                    }
                    _ => line.to_owned(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let child = launch_mosquitto(&identities.0, &conf);
        wait_for(
            "the secure mosquitto to listen",
            Duration::from_secs(10),
            || async move { (port_open(tls_port).await && port_open(mtls_port).await).then_some(()) },
        )
        .await;
        assert_persists(&child, &identities.0.join("mosquitto.log")).await;
        Self {
            tls_port,
            mtls_port,
            identities,
            _child: child,
        }
    }

    /// A file the identity script wrote.
    pub fn file(&self, name: &str) -> PathBuf {
        self.identities.0.join("out").join(name)
    }

    /// The generated password of a service identity (`ingest`, `gateway`).
    pub fn password(&self, identity: &str) -> String {
        std::fs::read_to_string(self.file(&format!("{identity}.password"))).expect("password file")
    }

    pub fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.tls_port)
    }

    pub fn mtls_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.mtls_port)
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.identities.0.join("mosquitto.log")).unwrap_or_default()
    }
}
