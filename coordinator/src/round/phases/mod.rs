//! One file per phase of the round state machine (see the parent module's diagram).

pub(crate) mod aggregating;
pub(crate) mod evaluating;
pub(crate) mod failure;
pub(crate) mod finished;
pub(crate) mod idle;
pub(crate) mod publishing;
pub(crate) mod secure;
pub(crate) mod selecting;
pub(crate) mod shutdown;
pub(crate) mod training;
pub(crate) mod unmasking;
