//! `fedtune-coordinator`: one per federation.
//!
//! # Layout
//! (filled in as modules land)
