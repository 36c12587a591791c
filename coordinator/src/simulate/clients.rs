//! The simulation's client processes: real `fedtune-client run` binaries, one per shard.
//!
//! Separate processes rather than tasks: each client owns its libtorch (which the coordinator
//! must never link), and the federation is exercised exactly as deployed, over gRPC.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};

/// Errors starting or supervising clients.
#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    /// The client binary was not found.
    #[error(
        "cannot find the fedtune-client binary (looked for {looked}); build it (`cargo build -p fedtune-client`) or \
         set FEDTUNE_CLIENT_BIN"
    )]
    BinaryNotFound {
        /// Paths tried.
        looked: String,
    },
    /// A process could not be started or its log file created.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Name of the client binary on this platform.
fn binary_name() -> String {
    format!("fedtune-client{}", std::env::consts::EXE_SUFFIX)
}

/// Finds `fedtune-client`: `$FEDTUNE_CLIENT_BIN`, else next to the running executable, else one
/// folder up (test binaries live in `target/<profile>/deps/`, the client in `target/<profile>/`).
pub fn locate_client_binary() -> Result<PathBuf, ClientsError> {
    if let Some(path) = std::env::var_os("FEDTUNE_CLIENT_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(ClientsError::BinaryNotFound { looked: format!("FEDTUNE_CLIENT_BIN={}", path.display()) })
        };
    }
    let exe =
        std::env::current_exe().map_err(|source| ClientsError::Io { what: "current_exe".into(), source })?;
    let candidates: Vec<PathBuf> =
        exe.ancestors().skip(1).take(2).map(|dir| dir.join(binary_name())).collect();
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| ClientsError::BinaryNotFound {
        looked: candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

/// How to start each client.
#[derive(Debug, Clone)]
pub struct ClientLaunch {
    /// The `fedtune-client` binary.
    pub binary: PathBuf,
    /// `http://127.0.0.1:PORT`.
    pub coordinator_url: String,
    /// Arguments after `run --coordinator URL --data SHARD --name NAME` (model, columns, …).
    pub args: Vec<String>,
    /// Per client (in shard order): its key file, and a one-time enrollment token passed in
    /// the environment (`FEDTUNE_ENROLL_TOKEN`), not on the command line other users can read.
    pub identities: Vec<ClientIdentity>,
    /// Folder for each client's log (`<name>.log`, stdout and stderr).
    pub log_dir: PathBuf,
}

/// A simulated client's credentials.
#[derive(Clone)]
pub struct ClientIdentity {
    /// `--key` file.
    pub key: PathBuf,
    /// One-time enrollment token, if the key is not allowlisted yet.
    pub enroll_token: Option<String>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("key", &self.key)
            .field("enroll_token", &self.enroll_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// One running client.
#[derive(Debug)]
pub struct ClientProcess {
    /// Its name in the federation.
    pub name: String,
    /// Its log file.
    pub log: PathBuf,
    child: Child,
    exit: Option<ExitStatus>,
}

/// The clients of one simulation.
#[derive(Debug, Default)]
pub struct Fleet {
    clients: Vec<ClientProcess>,
}

impl Fleet {
    /// Starts one client per shard, named `client-<k>`.
    pub fn spawn(launch: &ClientLaunch, shards: &[PathBuf]) -> Result<Self, ClientsError> {
        std::fs::create_dir_all(&launch.log_dir)
            .map_err(|source| ClientsError::Io { what: launch.log_dir.display().to_string(), source })?;
        let mut fleet = Fleet::default();
        for (k, shard) in shards.iter().enumerate() {
            let name = format!("client-{k}");
            fleet.clients.push(spawn_one(launch, &name, shard, launch.identities.get(k))?);
        }
        Ok(fleet)
    }

    /// The clients.
    pub fn clients(&self) -> &[ClientProcess] {
        &self.clients
    }

    /// Collects exits since the last call: `(name, status, log)` of each client that ended.
    pub fn reap(&mut self) -> Vec<(String, ExitStatus, PathBuf)> {
        let mut ended = Vec::new();
        for c in &mut self.clients {
            if c.exit.is_none() {
                if let Ok(Some(status)) = c.child.try_wait() {
                    c.exit = Some(status);
                    ended.push((c.name.clone(), status, c.log.clone()));
                }
            }
        }
        ended
    }

    /// Clients still running.
    pub fn running(&self) -> usize {
        self.clients.iter().filter(|c| c.exit.is_none()).count()
    }

    /// Waits up to `grace` for every client to exit (they do once the federation is finished),
    /// then kills the rest.
    pub async fn stop(mut self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        for c in &mut self.clients {
            if c.exit.is_some() {
                continue;
            }
            match tokio::time::timeout_at(deadline, c.child.wait()).await {
                Ok(Ok(status)) => c.exit = Some(status),
                _ => {
                    tracing::warn!(client = %c.name, "client did not exit in time; killing it");
                    let _ = c.child.start_kill();
                    let _ = c.child.wait().await;
                }
            }
        }
    }
}

fn spawn_one(
    launch: &ClientLaunch,
    name: &str,
    shard: &Path,
    identity: Option<&ClientIdentity>,
) -> Result<ClientProcess, ClientsError> {
    let log = launch.log_dir.join(format!("{name}.log"));
    let io = |what: &str| {
        let what = format!("{what} {}", log.display());
        move |source| ClientsError::Io { what, source }
    };
    let file = std::fs::File::create(&log).map_err(io("creating"))?;
    let err = file.try_clone().map_err(io("opening"))?;
    let mut command = Command::new(&launch.binary);
    if let Some(id) = identity {
        command.arg("run").arg("--key").arg(&id.key);
        if let Some(token) = &id.enroll_token {
            command.env("FEDTUNE_ENROLL_TOKEN", token);
        }
    } else {
        command.arg("run");
    }
    let child = command
        .arg("--coordinator")
        .arg(&launch.coordinator_url)
        .arg("--data")
        .arg(shard)
        .arg("--name")
        .arg(name)
        .args(&launch.args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        // If the simulation itself dies, its clients must not linger.
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ClientsError::Io {
            what: format!("starting {}", launch.binary.display()),
            source,
        })?;
    tracing::info!(client = name, pid = child.id(), shard = %shard.display(), "client started");
    Ok(ClientProcess { name: name.to_string(), log, child, exit: None })
}

/// The last `lines` lines of a log, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
