//! Client identities for scenarios: one Ed25519 key per (state directory, client name),
//! allowlisted in that state directory the first time it is asked for.
//!
//! Coordinators started by the harness register their URL with their state directory
//! ([`register`]), so the raw [`crate::grpc::TestClient`] and client processes can join any
//! harness coordinator by URL and name alone, through the real allowlist + challenge + signed
//! update path. Keys live in memory (in-process clients) or in files under the scenario's
//! directory (client processes), and are reused across restarts of the same federation.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Context, Result};
use fedtune_coordinator::auth::{Allowlist, Standing};
use fedtune_shared::crypto::{generate_keypair_file, load_keypair, KeyPair};
use fedtune_shared::ids::ClientId;

type Keys = HashMap<(PathBuf, String), Arc<KeyPair>>;

fn urls() -> &'static Mutex<HashMap<String, PathBuf>> {
    static URLS: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    URLS.get_or_init(Default::default)
}

fn keys() -> &'static Mutex<Keys> {
    static KEYS: OnceLock<Mutex<Keys>> = OnceLock::new();
    KEYS.get_or_init(Default::default)
}

/// Records that the coordinator at `url` keeps its state in `state_dir`.
pub fn register(url: &str, state_dir: &Path) {
    urls().lock().unwrap_or_else(|p| p.into_inner()).insert(url.to_string(), state_dir.to_path_buf());
}

/// The state directory of the harness coordinator at `url`.
pub fn state_dir_of(url: &str) -> Result<PathBuf> {
    match urls().lock().unwrap_or_else(|p| p.into_inner()).get(url) {
        Some(d) => Ok(d.clone()),
        None => bail!("no harness coordinator registered at {url}"),
    }
}

/// Puts `key` on the allowlist of `state_dir` for `name` unless that name is already allowed.
pub fn allowlist(state_dir: &Path, name: &str, key: &KeyPair) -> Result<()> {
    let list = Allowlist::open(state_dir)?;
    let id = ClientId::parse(name)?;
    match list.standing(&id)? {
        Standing::Allowed(k) if k == key.public_key() => Ok(()),
        Standing::Allowed(_) => bail!("`{name}` is allowlisted with another key in {}", state_dir.display()),
        _ => Ok(list.add(&id, &key.public_key())?),
    }
}

/// The key of `name` for the coordinator at `url` (made and allowlisted on first use).
pub fn key_for(url: &str, name: &str) -> Result<Arc<KeyPair>> {
    let state = state_dir_of(url)?;
    let mut map = keys().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = map.get(&(state.clone(), name.to_string())) {
        return Ok(k.clone());
    }
    let key = Arc::new(KeyPair::generate_ephemeral()?);
    allowlist(&state, name, &key)?;
    map.insert((state, name.to_string()), key.clone());
    Ok(key)
}

/// A key file for client process `name` in `dir` (created on first use, 0600), allowlisted at
/// the coordinator at `url`; returns its path for `--key`.
pub fn key_file_for(url: &str, name: &str, dir: &Path) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.identity.pem"));
    let key = if path.exists() {
        load_keypair(&path).with_context(|| format!("loading {}", path.display()))?
    } else {
        generate_keypair_file(&path)?
    };
    allowlist(&state_dir_of(url)?, name, &key)?;
    Ok(path)
}
