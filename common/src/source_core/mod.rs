//! The source's session decisions, sans IO: what pagesrv does with each frame on the
//! urgent connection ([`urgent::UrgentCore`]), the order of the bulk connection's steps
//! ([`bulk_plan::BulkPlan`]), which pages a destination may hold at an older version during
//! precopy ([`stale::StaleMaps`]) and how a session ends ([`Outcome`]). pagesrv's threads carry
//! the decisions out on sockets; the destination's simulation drives the same cores over
//! in-memory pipes.

pub mod bulk_plan;
pub mod precopy_plan;
pub mod stale;
pub mod urgent;

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The destination verified every page and said goodbye: the source's job is done.
    Completed,
    /// The destination failed or its pages differ from the source: keep the source VM.
    Failed(String),
    /// The session broke off (or was replaced by a reconnect); the text says why.
    Aborted(String),
}
