//! VM memory snapshots in an S3-compatible object store.
//!
//! A snapshot is a memory file (a paused VM's RAM, a Firecracker snapshot's memory file)
//! stored as deduplicated, compressed 4 KiB pages: [`layout`] describes the objects and their
//! formats. [`Store`] uploads a file ([`Store::put`]), downloads one back
//! ([`Store::get`]), lists the snapshots ([`Store::list`]) and removes one, deleting only
//! the packs no other snapshot uses ([`Store::remove`]). Every byte read from the store is
//! checked against a hash before it is used: a damaged object is an error, never wrong bytes.
//!
//! The client is the `object_store` crate's S3 backend; credentials and the endpoint come
//! from the standard `AWS_*` environment variables. Every request is bounded in time and
//! retried a few times: a store that goes away is an error within seconds, never a hang.
//!
//! Without the default feature `client`, only [`layout`] is built (the formats, for tools
//! and fuzzing, without the S3 client).

#[cfg(feature = "client")]
mod catalog;
#[cfg(feature = "client")]
mod client;
#[cfg(feature = "client")]
mod download;
#[cfg(feature = "client")]
mod error;
pub mod layout;
#[cfg(feature = "client")]
mod upload;

#[cfg(feature = "client")]
pub use catalog::{RemoveReport, SnapshotInfo};
#[cfg(feature = "client")]
pub use client::{Store, StoreUrl};
#[cfg(feature = "client")]
pub use download::{Fetched, GetReport, OnFrame};
#[cfg(feature = "client")]
pub use error::StoreError;
#[cfg(feature = "client")]
pub use upload::{Progress, PutOptions, PutReport};
