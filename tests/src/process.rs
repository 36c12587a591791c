//! Real processes: the `fedtune-coordinator` and `fedtune-client` binaries on loopback, with the
//! faults a deployment meets (`kill -9`, restarts, clients vanishing mid-upload).
//!
//! The binaries are the workspace's own build outputs in `target/<profile>/`, next to the folder
//! holding the test executable (`target/<profile>/deps/`). `cargo test -p fedtune-tests` alone
//! does not build them: run `cargo build --workspace` first (`scripts/test.sh` does). That build
//! gives them the `test-support` feature (`--fake-trainer`), which this crate enables and cargo
//! unifies across the workspace; a binary built without it (`cargo build -p fedtune-client`
//! alone, a release build) is refused by [`binary`] with that advice, rather than failing a
//! scenario later with a client that never joins.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fedtune_coordinator::settings::CoordinatorSettings;
use fedtune_shared::round::StatusReport;
use tokio::time::Instant;

/// Path of a workspace binary (`fedtune-coordinator`, `fedtune-client`), checked once per test
/// process to have been built with the `test-support` feature.
pub fn binary(name: &str) -> Result<PathBuf> {
    static CHECKED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let exe = std::env::current_exe()?;
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    let path =
        exe.ancestors().skip(1).take(2).map(|dir| dir.join(&file)).find(|p| p.is_file()).with_context(
            || format!("{file} not found next to {}: run `cargo build --workspace` first", exe.display()),
        )?;
    let mut checked = CHECKED.lock().unwrap_or_else(PoisonError::into_inner);
    if !checked.contains(&path) {
        // Only a test-support build accepts the hidden flag; `--help` then ends the probe.
        let subcommand = if name == "fedtune-client" { "run" } else { "simulate" };
        let accepted = Command::new(&path)
            .args([subcommand, "--fake-trainer", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !accepted {
            bail!(
                "{} was built without the `test-support` feature (`cargo build -p {name}` alone, or a \
                 release build): run `cargo build --workspace` first",
                path.display()
            );
        }
        checked.push(path.clone());
    }
    Ok(path)
}

/// Runs `fedtune-coordinator simulate ARGS --out OUT` to completion and returns what it printed
/// on stdout; fails with both streams unless it succeeded. The report lies under `out`.
pub fn simulate(args: &[&str], out: &Path) -> Result<String> {
    let output = Command::new(binary("fedtune-coordinator")?)
        .arg("simulate")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("simulate failed ({}):\n{stdout}\n{stderr}", output.status);
    }
    Ok(stdout.into_owned())
}

/// [`simulate`] with `--fake-trainer`: `clients` clients over `model` and `data`, every one of
/// them sampled in each of `rounds` rounds, and `extra` flags.
pub fn simulate_fake(
    model: &Path,
    data: &Path,
    clients: usize,
    rounds: u64,
    extra: &[&str],
    out: &Path,
) -> Result<String> {
    let (clients, rounds) = (clients.to_string(), rounds.to_string());
    let (model, data) = (model.to_str().context("model path")?, data.to_str().context("data path")?);
    let mut args = vec!["--fake-trainer", "--model", model, "--data", data, "--clients", &clients];
    args.extend(["--rounds", &rounds, "--sample", "0"]);
    args.extend_from_slice(extra);
    simulate(&args, out)
}

/// A loopback port that was free a moment ago (the coordinator must come back on the same port
/// after a restart, so tests choose it instead of binding port 0).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process with its log file, killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `command` with stdin closed and stdout and stderr appended to `log`.
    pub fn spawn(mut command: Command, log: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        Ok(Self { child: Some(child), log: log.to_path_buf() })
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`: no chance to clean up, exactly like a crash or an OOM kill.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, the polite stop.
    pub fn terminate(&self) -> Result<()> {
        let pid = self.child.as_ref().context("process already gone")?.id();
        let status = Command::new("kill").arg("-TERM").arg(pid.to_string()).status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().context("process already gone")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("process did not exit within {timeout:?}; log:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Resident memory of a process now and at its peak (`VmRSS`, `VmHWM`), in bytes.
pub fn resident_memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib << 10)
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// A `fedtune-coordinator serve` process with its configuration file, restartable on its port.
#[derive(Debug)]
pub struct CoordinatorProc {
    /// The running process, if any.
    pub proc: Option<Proc>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    config: PathBuf,
    log: PathBuf,
    /// Global flags passed before `serve` on every start (e.g. `--log-format json`).
    flags: Vec<String>,
}

impl CoordinatorProc {
    /// Writes `settings` (with `server.listen` on a free loopback port) to `dir/coordinator.toml`
    /// and starts `fedtune-coordinator serve` on it.
    pub fn start(settings: CoordinatorSettings, dir: &Path) -> Result<Self> {
        Self::start_with_env(settings, dir, &[])
    }

    /// [`Self::start`] with extra environment variables for this first incarnation only (a
    /// [`Self::restart`] runs without them), e.g. a test pause point.
    pub fn start_with_env(settings: CoordinatorSettings, dir: &Path, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_with(settings, dir, env, &[])
    }

    /// [`Self::start`] with global command-line flags, kept for every restart.
    pub fn start_with_flags(settings: CoordinatorSettings, dir: &Path, flags: &[&str]) -> Result<Self> {
        Self::start_with(settings, dir, &[], flags)
    }

    fn start_with(
        mut settings: CoordinatorSettings,
        dir: &Path,
        env: &[(&str, &str)],
        flags: &[&str],
    ) -> Result<Self> {
        let port = free_port()?;
        settings.server.listen = ([127, 0, 0, 1], port).into();
        let config = dir.join("coordinator.toml");
        std::fs::write(&config, toml::to_string(&settings)?)?;
        let mut me = Self {
            proc: None,
            url: format!("http://127.0.0.1:{port}"),
            config,
            log: dir.join("coordinator.log"),
            flags: flags.iter().map(|f| f.to_string()).collect(),
        };
        crate::identities::register(&me.url, &settings.storage.state_dir);
        me.spawn(env)?;
        Ok(me)
    }

    /// Starts the process (again) on the same configuration and state directory.
    pub fn restart(&mut self) -> Result<()> {
        self.spawn(&[])
    }

    fn spawn(&mut self, env: &[(&str, &str)]) -> Result<()> {
        let mut command = Command::new(binary("fedtune-coordinator")?);
        command.args(&self.flags).arg("serve").arg("--config").arg(&self.config);
        command.envs(env.iter().copied());
        self.proc = Some(Proc::spawn(command, &self.log)?);
        Ok(())
    }

    /// Waits up to `timeout` for `needle` to appear in the log (all incarnations).
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(needle) {
            if Instant::now() > deadline {
                let log = self.log_text();
                let lines: Vec<&str> = log.lines().collect();
                bail!(
                    "`{needle}` not in the coordinator log within {timeout:?}; last 40 lines:\n{}",
                    lines[lines.len().saturating_sub(40)..].join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// `kill -9` the coordinator.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// The coordinator's log (all incarnations).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// [`wait_for_status`] on this coordinator; on failure the error carries the end of its log.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl FnMut(&StatusReport) -> bool,
    ) -> Result<StatusReport> {
        wait_for_status(&self.url, timeout, done).await.with_context(|| {
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            format!(
                "coordinator log (last 40 lines):\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            )
        })
    }
}

/// Starts `fedtune-client run --coordinator URL --data DATA --name NAME --key KEY --insecure
/// ARGS…` (the key allowlisted for NAME, see [`crate::identities`]), logging to `dir/NAME.log`.
pub fn start_client(url: &str, name: &str, data: &Path, args: &[&str], dir: &Path) -> Result<Proc> {
    let key = crate::identities::key_file_for(url, name, dir)?;
    let mut command = Command::new(binary("fedtune-client")?);
    command
        .arg("run")
        .arg("--coordinator")
        .arg(url)
        .arg("--data")
        .arg(data)
        .arg("--name")
        .arg(name)
        .arg("--key")
        .arg(&key)
        .arg("--insecure")
        .args(args);
    Proc::spawn(command, &dir.join(format!("{name}.log")))
}

/// Polls the coordinator's status until `done` holds, tolerating the coordinator being down.
pub async fn wait_for_status(
    url: &str,
    timeout: Duration,
    mut done: impl FnMut(&StatusReport) -> bool,
) -> Result<StatusReport> {
    // The operator's full view (round records included), as `fedtune-coordinator status
    // --state-dir` reads it.
    let query = fedtune_coordinator::operator::StatusArgs::plaintext(
        url,
        64,
        Some(crate::identities::state_dir_of(url)?),
    );
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Ok(report) = fedtune_coordinator::operator::fetch_status(&query).await {
            if done(&report) {
                return Ok(report);
            }
            last = Some(report);
        }
        if Instant::now() > deadline {
            bail!("condition not reached within {timeout:?}; last status: {last:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rounds with a `completed` record in `report`, ascending.
pub fn completed_rounds(report: &StatusReport) -> Vec<u64> {
    let mut rounds: Vec<u64> =
        report.recent_rounds.iter().filter(|r| r.status == "completed").map(|r| r.id.round).collect();
    rounds.sort_unstable();
    rounds.dedup();
    rounds
}
