//! The servers a daemon runs for its operators: the control socket (status, commands,
//! events; `control`) and the Prometheus metrics endpoint (`metrics`). Each has threads of
//! its own; nothing on the page path depends on them.

pub mod control;
pub mod metrics;
