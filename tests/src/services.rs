//! The service binaries, run as child processes.

use crate::{free_port, repo_root, wait_for, TempDir};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// Where `cargo build --bins` put `name`, next to this test binary's profile directory.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/it-<hash> (a test) or target/<profile>/<bench> (a binary of this
    // crate) -> target/<profile>/<name>
    exe.parent()
        .and_then(|dir| match dir.file_name() {
            Some(d) if d == "deps" => dir.parent(),
            _ => Some(dir),
        })
        .map(|profile| profile.join(name))
        .unwrap_or_else(|| repo_root().join("target/debug").join(name))
}

/// A running service process.
#[derive(Debug)]
pub struct Service {
    name: &'static str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub metrics_port: u16,
    child: Option<Child>,
    logs: TempDir,
    starts: u32,
}

impl Service {
    /// Starts `name` with `env` (plus a free metrics port) and waits until `/readyz` says so.
    pub async fn start(name: &'static str, env: &[(&str, String)]) -> Self {
        Self::start_with_args(name, &[], env).await
    }

    /// Like [`Service::start`], with command-line arguments.
    pub async fn start_with_args(
        name: &'static str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> Self {
        let mut s = Self::new(name, args, env);
        s.launch().await;
        s
    }

    fn new(name: &'static str, args: &[&str], env: &[(&str, String)]) -> Self {
        Self {
            name,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            metrics_port: free_port(),
            child: None,
            logs: TempDir::new(name),
            starts: 0,
        }
    }

    /// Starts a service without waiting for it to be ready (one that is expected not to be).
    pub async fn spawn(name: &'static str, env: &[(&str, String)]) -> Self {
        let mut s = Self::new(name, &[], env);
        s.run();
        s
    }

    /// Everything the service logged, over all its starts.
    pub fn log_text(&self) -> String {
        (1..=self.starts)
            .filter_map(|n| {
                std::fs::read_to_string(self.logs.0.join(format!("{}-{n}.log", self.name))).ok()
            })
            .collect()
    }

    /// Sets an environment variable for the next start (a rotated credential, say).
    pub fn set_env(&mut self, key: &str, value: String) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value));
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    async fn launch(&mut self) {
        self.run();
        let (port, name) = (self.metrics_port, self.name);
        wait_for(
            &format!("{name} to be ready"),
            Duration::from_secs(60),
            || async move { (http_get(port, "/readyz").await?.0 == 200).then_some(()) },
        )
        .await;
    }

    fn run(&mut self) {
        self.starts += 1;
        let log_path = self
            .logs
            .0
            .join(format!("{}-{}.log", self.name, self.starts));
        let log = std::fs::File::create(&log_path).expect("service log");
        // The dashboard serves its health and metrics on its one address.
        let metrics_var = match self.name {
            "dashboard" => "DASHBOARD_ADDR".to_owned(),
            name => format!("{}_METRICS_ADDR", name.to_uppercase()),
        };
        let mut cmd = Command::new(bin_path(self.name));
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(metrics_var, format!("127.0.0.1:{}", self.metrics_port))
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if std::env::var_os("TEST_LOG").is_some() {
            cmd.stderr(Stdio::inherit());
        } else {
            cmd.stdout(Stdio::from(log.try_clone().expect("log handle")))
                .stderr(Stdio::from(log));
        }
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", self.name)),
        );
    }

    /// Sends `signal` (`USR1`, `TERM`, ...) to the running process.
    pub fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(tokio::process::Child::id)
            .expect("service running");
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// SIGKILL: no flushing, no goodbye.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("SIGKILL");
        }
    }

    /// The binary's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// SIGKILL, then starts it again at once, without waiting for it to be ready (storage
    /// may be down).
    pub async fn restart_now(&mut self) {
        self.kill9().await;
        self.run();
    }

    /// Starts the same service again, with the same settings and metrics port.
    pub async fn restart(&mut self) {
        self.kill9().await;
        self.launch().await;
    }

    /// SIGTERM, then asserts a clean exit within `grace`.
    pub async fn terminate(&mut self, grace: Duration) {
        self.signal("TERM");
        let mut child = self.child.take().expect("service running");
        let exit = tokio::time::timeout(grace, child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {grace:?} of SIGTERM", self.name))
            .expect("wait for the service");
        assert!(exit.success(), "{} exited with {exit}", self.name);
    }

    /// Sum of a metric's samples across label sets: 0 until its first sample, since
    /// counters appear on first use. Panics for a name the service's code never uses, so a
    /// typo or a renamed metric fails the test instead of reading 0 for ever.
    pub async fn metric(&self, name: &str) -> f64 {
        assert!(
            exports(self.name, name),
            "{} exports no metric named {name:?}",
            self.name
        );
        let Some((_, body)) = http_get(self.metrics_port, "/metrics").await else {
            return 0.0;
        };
        infra::serve::metric_sum(&body, name)
    }

    /// The service's log so far (for assertion messages).
    pub fn log(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            let path = self.logs.0.join(format!("{}-{n}.log", self.name));
            out.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        out
    }
}

/// A bare HTTP GET on loopback: (status, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    infra::serve::http_get(([127, 0, 0, 1], port).into(), path).await
}

/// Whether `service`'s code (or the shared `infra`) names metric `name` as a string literal.
pub fn exports(service: &str, name: &str) -> bool {
    fn sources(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = crate::repo_root();
    let mut files = Vec::new();
    sources(&root.join(service).join("src"), &mut files);
    sources(&root.join("infra/src"), &mut files);
    // A sample selector (`name{label="v"}`) names the metric before its labels.
    let name = name.split('{').next().unwrap_or(name);
    let literal = format!("\"{name}\"");
    files
        .iter()
        .any(|f| std::fs::read_to_string(f).is_ok_and(|text| text.contains(&literal)))
}
