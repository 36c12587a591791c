//! `fedtune-coordinator simulate`: a whole federation on one machine.

pub mod partition;
pub mod report;
