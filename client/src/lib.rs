//! `fedtune-client`: the agent that runs at an edge site.
//!
//! # Layout
//! - [`local_trainer`]: the `LocalTrainer` seam between the federated agent and the model.
//! - [`backoff`]: exponential backoff with jitter on tokio time, for every retry.
//! - [`update`]: the upload pipeline (delta, then ordered stages: check, clip, noise).
//! - `fake_trainer`: a deterministic `LocalTrainer` for tests and `run --fake-trainer`; only in
//!   builds with the `test-support` feature (which `fedtune-tests` enables), never in release.
//! - [`privacy_floor`]: the site's floor (`--require-privacy`, `--min-noise-multiplier`): which fit tasks it refuses.
//! - [`agent`]: the federated agent's state machine (join, poll, download, train, upload, evaluate).
//! - [`transport`]: `CoordinatorApi` (domain calls) and its gRPC implementation; the only module naming `pb`.
//! - [`identity`]: `keygen`, loading the Ed25519 key, signing upload trailers.
//! - [`settings`]: `run`'s configuration: TOML file, `FEDTUNE_CLIENT__…` variables, flags; validated once.
//! - [`run_cmd`]: the `run` subcommand: join a federation with the BERT (or fake) trainer, from settings.
//! - [`model`]: BERT for sequence classification on tch; module paths = Hugging Face weight names.
//! - [`tokenize`]: word-piece tokenization (`tokenizer.json` or `vocab.txt`), pad to longest.
//! - [`data`]: labelled CSV/JSONL loading, label sets, train/held-out split; errors name file:line.
//! - [`trainer`]: `BertTrainer` (runs on its owner's thread: the agent's trainer thread; implements `LocalTrainer`).
//! - [`device`]: `--device auto|cpu|cuda[:N]` and compute precision.
//! - [`cli`]: the command line behind `main.rs`: `train`/`eval`/`predict`, and `run`'s flags (the top layer).

// Every public item says what it is for (ARCHITECTURE principle 14); CI denies warnings.
#![warn(missing_docs)]

pub mod agent;
pub mod backoff;
pub mod cli;
pub mod data;
pub mod device;
#[cfg(any(test, feature = "test-support"))]
pub mod fake_trainer;
pub mod identity;
pub mod local_trainer;
pub mod model;
pub mod privacy_floor;
pub mod run_cmd;
pub mod settings;
pub mod tokenize;
pub mod trainer;
pub mod transport;
pub mod update;
