//! `fedtune-client`: the agent that runs at an edge site.
//!
//! # Layout
//! (filled in as modules land)
