//! `fedtune-client run`'s configuration, through the real binary: file, then
//! `FEDTUNE_CLIENT__…` variables, then flags; anything invalid exits with status 64 (EX_USAGE)
//! naming the key, before the client loads data or dials the coordinator.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EX_USAGE: i32 = 64;

/// A file with every required key, pointing at nothing: `--print-config` never opens them.
const BASE: &str = r#"
[coordinator]
url = "http://127.0.0.1:9"
insecure = true
[identity]
key = "site.key"
[data]
path = "site.csv"
[model]
dir = "model"
"#;

struct Run {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Run {
    fn with_file(text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("client.toml"), text).unwrap();
        Self { dir, env: Vec::new() }
    }

    fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("client.toml")
    }

    /// `fedtune-client run --config FILE ARGS…` with only this test's client variables.
    fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fedtune-client"));
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("FEDTUNE_")) {
            command.env_remove(key);
        }
        command.arg("run").arg("--config").arg(self.config()).args(args).envs(self.env.iter().cloned());
        command.output().unwrap()
    }

    /// The effective settings, as printed by `--print-config`.
    fn effective(&self, args: &[&str]) -> toml::Table {
        let out = self.run(&[args, &["--print-config"]].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().parse().unwrap()
    }
}

fn assert_usage_error(out: &Output, names: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EX_USAGE), "{stderr}");
    for name in names {
        assert!(stderr.contains(name), "`{name}` not named in: {stderr}");
    }
}

fn value<'a>(t: &'a toml::Table, section: &str, key: &str) -> &'a toml::Value {
    &t[section][key]
}

#[test]
fn a_bad_value_in_the_file_exits_64_naming_the_key() {
    let out = Run::with_file(&format!("{BASE}max_len = \"long\"\n")).run(&["--print-config"]);
    assert_usage_error(&out, &["max_len"]);
    let out = Run::with_file(&format!("{BASE}[agent]\npoll_wait = \"0s\"\n")).run(&["--print-config"]);
    assert_usage_error(&out, &["agent.poll_wait"]);
    let out = Run::with_file(&format!("{BASE}[agent]\npoll_wiat = \"5s\"\n")).run(&["--print-config"]);
    assert_usage_error(&out, &["poll_wiat"]);
}

#[test]
fn a_bad_environment_variable_exits_64_naming_the_key() {
    let out = Run::with_file(BASE).env("FEDTUNE_CLIENT__DATA__EVAL_FRACTION", "1.5").run(&["--print-config"]);
    assert_usage_error(&out, &["data.eval_fraction"]);
    let out = Run::with_file(BASE).env("FEDTUNE_CLIENT__RUNTIME__DEVICE", "tpu").run(&["--print-config"]);
    assert_usage_error(&out, &["device", "tpu"]);
}

#[test]
fn a_bad_flag_exits_64_naming_it() {
    let out = Run::with_file(BASE).run(&["--max-len", "long"]);
    assert_usage_error(&out, &["--max-len"]);
    let out = Run::with_file(BASE).run(&["--poll-wait", "0s"]);
    assert_usage_error(&out, &["agent.poll_wait", "--poll-wait"]);
    let out = Run::with_file(BASE).run(&["--no-such-flag"]);
    assert_usage_error(&out, &["--no-such-flag"]);
}

#[test]
fn a_missing_required_key_exits_64_naming_it() {
    let out = Run::with_file(&BASE.replace("path = \"site.csv\"", "")).run(&[]);
    assert_usage_error(&out, &["data.path"]);
}

#[test]
fn the_environment_overrides_the_file_and_a_flag_overrides_the_environment() {
    let file = format!("{BASE}max_len = 256\n[agent]\npoll_wait = \"30s\"\n");
    let run = Run::with_file(&file);
    let t = run.effective(&[]);
    assert_eq!(value(&t, "model", "max_len").as_integer(), Some(256));
    assert_eq!(value(&t, "agent", "poll_wait").as_str(), Some("30s"));

    let run = run.env("FEDTUNE_CLIENT__MODEL__MAX_LEN", "64").env("FEDTUNE_CLIENT__AGENT__POLL_WAIT", "5s");
    let t = run.effective(&[]);
    assert_eq!(value(&t, "model", "max_len").as_integer(), Some(64));
    assert_eq!(value(&t, "agent", "poll_wait").as_str(), Some("5s"));

    let t = run.effective(&["--max-len", "32"]);
    assert_eq!(value(&t, "model", "max_len").as_integer(), Some(32));
    assert_eq!(value(&t, "agent", "poll_wait").as_str(), Some("5s"), "untouched by the flag");
}

#[test]
fn the_example_configuration_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/client.example.toml");
    let run = Run::with_file(&std::fs::read_to_string(example).unwrap());
    let t = run.effective(&[]);
    assert_eq!(value(&t, "coordinator", "url").as_str(), Some("https://coordinator.example:50051"));
}

/// `cargo build --release -p fedtune-client` has no test scaffolding (when this crate is built
/// alone; a workspace build unifies in `fedtune-tests`' `test-support`).
#[cfg(not(feature = "test-support"))]
#[test]
fn a_build_without_test_support_has_no_fake_trainer() {
    let run = Run::with_file(BASE);
    assert_usage_error(&run.run(&["--fake-trainer", "--print-config"]), &["--fake-trainer"]);
    let out = Run::with_file(&format!("{BASE}[fake_trainer]\nenabled = true\n")).run(&["--print-config"]);
    assert_usage_error(&out, &["fake_trainer"]);
}
