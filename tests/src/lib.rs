//! Harness for fedtune's integration scenarios.
