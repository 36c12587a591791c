//! The deployment files start the binaries with the flags the binaries have: every command line
//! in `deploy/` (compose services, Dockerfile entrypoints, systemd `ExecStart`, Kubernetes
//! container args) parses with the binaries' own clap definitions, so renaming or removing a
//! flag fails here rather than in someone's cluster.

use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::Parser;

/// A command line found in a deployment file.
#[derive(Debug)]
struct Found {
    file: String,
    binary: String,
    args: Vec<String>,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(deploy_dir().join(rel)).unwrap_or_else(|e| panic!("deploy/{rel}: {e}"))
}

const COORDINATOR_SUBCOMMANDS: [&str; 8] =
    ["serve", "status", "export", "simulate", "privacy", "calibrate", "clients", "certs"];

fn binary_for(args: &[String]) -> &'static str {
    match args.first() {
        Some(a) if COORDINATOR_SUBCOMMANDS.contains(&a.as_str()) => "fedtune-coordinator",
        _ => "fedtune-client",
    }
}

/// `key: [ "a", "b", … ]` (a JSON array, possibly over several lines) after each `key:`.
fn json_arrays(text: &str, key: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(key) {
        let after = &rest[at + key.len()..];
        let Some(open) = after.find('[') else { break };
        let close = after[open..].find(']').map(|c| open + c).expect("a closing bracket");
        let array: Vec<String> = serde_json::from_str(&after[open..=close])
            .unwrap_or_else(|e| panic!("`{}` is not a JSON array: {e}", &after[open..=close]));
        out.push(array);
        rest = &after[close..];
    }
    out
}

fn compose() -> Vec<Found> {
    json_arrays(&read("compose.yaml"), "command:")
        .into_iter()
        .map(|args| Found { file: "compose.yaml".into(), binary: binary_for(&args).into(), args })
        .collect()
}

fn dockerfiles() -> Vec<Found> {
    ["Dockerfile.coordinator", "Dockerfile.client"]
        .into_iter()
        .map(|file| {
            let text = read(file);
            let entrypoint = json_arrays(&text, "ENTRYPOINT");
            let cmd = json_arrays(&text, "CMD");
            assert_eq!((entrypoint.len(), cmd.len()), (1, 1), "{file}: one ENTRYPOINT and one CMD");
            let binary = entrypoint[0].first().cloned().expect("an ENTRYPOINT binary");
            Found { file: file.into(), binary, args: cmd[0].clone() }
        })
        .collect()
}

fn systemd() -> Vec<Found> {
    ["systemd/fedtune-coordinator.service", "systemd/fedtune-client.service"]
        .into_iter()
        .map(|file| {
            let text = read(file).replace("\\\n", " ");
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix("ExecStart="))
                .unwrap_or_else(|| panic!("{file}: no ExecStart"));
            let mut words = line.split_whitespace().map(str::to_string);
            let path = words.next().expect("a binary");
            let binary = path.rsplit('/').next().unwrap_or_default().to_string();
            Found { file: file.into(), binary, args: words.collect() }
        })
        .collect()
}

/// Each container's `args:` block list in a Kubernetes manifest, with the binary its `image:`
/// names.
fn kubernetes(file: &str) -> Vec<Found> {
    let text = read(file);
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut image = None;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        if let Some(name) = trimmed.strip_prefix("image:") {
            image = Some(name.trim().split(':').next().unwrap_or_default().to_string());
        }
        if trimmed != "args:" {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let args: Vec<String> = lines[i + 1..]
            .iter()
            .take_while(|l| l.len() - l.trim_start().len() >= indent && l.trim_start().starts_with("- "))
            .map(|l| l.trim_start()[2..].trim().trim_matches('"').to_string())
            .collect();
        out.push(Found { file: file.into(), binary: image.clone().expect("an image before args"), args });
    }
    out
}

fn parses(found: &Found) -> Result<(), String> {
    let argv = std::iter::once(found.binary.clone()).chain(found.args.iter().cloned());
    let parsed = match found.binary.as_str() {
        "fedtune-coordinator" => fedtune_coordinator::cli::Cli::try_parse_from(argv).map(drop),
        "fedtune-client" => fedtune_client::cli::Cli::try_parse_from(argv).map(drop),
        other => return Err(format!("unknown binary {other}")),
    };
    match parsed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::DisplayHelp => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn every_command_line_in_deploy_uses_only_flags_the_binaries_have() {
    let groups = [
        ("compose.yaml", compose(), 4),
        ("Dockerfiles", dockerfiles(), 2),
        ("systemd units", systemd(), 2),
        ("kubernetes/coordinator.yaml", kubernetes("kubernetes/coordinator.yaml"), 1),
        ("kubernetes/client-site.yaml", kubernetes("kubernetes/client-site.yaml"), 1),
        ("kubernetes/simulation-job.yaml", kubernetes("kubernetes/simulation-job.yaml"), 1),
    ];
    let mut failures = Vec::new();
    for (what, found, expected) in &groups {
        // The extraction itself must have seen every command line, or this test checks nothing.
        assert_eq!(found.len(), *expected, "{what}: {found:#?}");
        for f in found {
            assert!(!f.args.is_empty(), "{f:?}");
            if let Err(e) = parses(f) {
                failures.push(format!("deploy/{}: {} {}\n{e}", f.file, f.binary, f.args.join(" ")));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_renamed_flag_is_caught() {
    let mut found = kubernetes("kubernetes/coordinator.yaml").remove(0);
    assert!(parses(&found).is_ok());
    let flag = found.args.iter_mut().find(|a| *a == "--state-dir").expect("the StatefulSet sets --state-dir");
    *flag = "--state-directory".into();
    let err = parses(&found).unwrap_err();
    assert!(err.contains("--state-directory"), "{err}");
}
