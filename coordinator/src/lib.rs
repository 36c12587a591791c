//! `fedtune-coordinator`: one per federation.
//!
//! # Layout
//! (filled in as modules land)
//! - [`certs`]: development PKI (CA, server and client certificates via rcgen) and the server's
//!   tonic TLS / mutual-TLS configuration.
//! - [`simulate`]: `simulate`: a local federation (coordinator + client processes), sharded data, per-round report.

pub mod certs;
pub mod simulate;
