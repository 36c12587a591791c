//! Harness for fedtune's integration scenarios.
//!
//! # Layout
//! - [`process`]: the real binaries as child processes (start, `kill -9`, restart, status polling).
//! - [`agents`]: client agents in this process with fake trainers.
//! - [`grpc`]: an in-process coordinator and a raw protocol test client (exact messages,
//!   exact statuses).
//! - [`fixtures`]: tiny models, synthetic data and quick coordinator settings.
//! - [`http`]: a minimal HTTP/1.0 client (the operator port, Prometheus's API).
//! - [`chromium`]: headless Chromium over the DevTools pipe (load, fill, read the DOM, screenshot).
//! - [`identities`]: per-name client keys, allowlisted in the coordinator's state directory.
//! - [`netns`]: hosts as Linux network namespaces on a bridge, with links to cut and shape.

// Every public item says what it is for (ARCHITECTURE principle 14); CI denies warnings.
#![warn(missing_docs)]

pub mod agents;
pub mod chromium;
pub mod fixtures;
pub mod grpc;
pub mod http;
pub mod identities;
pub mod netns;
pub mod process;
