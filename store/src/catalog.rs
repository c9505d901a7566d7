//! The snapshots in a store, and removing one: its manifest goes first, then every pack no
//! remaining manifest uses (index before pack, so an index never names a missing pack).
//!
//! Removal and upload must not run at once on one store: an upload may reuse pages of a pack
//! that a removal running meanwhile finds unused and deletes. Packs younger than the grace
//! period are kept, which covers the packs an upload writes before its manifest, not the
//! ones it reuses.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use common::error_chain;
use futures::StreamExt;

use crate::download::read_manifest;
use crate::layout::{self, Hash, PageRef};
use crate::{Store, StoreError, client};

/// Manifests read at once.
const MANIFEST_READS: usize = 8;

/// One snapshot in a store.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// Bytes of guest memory.
    pub size_bytes: u64,
    /// Pages that are not zero.
    pub data_pages: u64,
    /// Packs it uses.
    pub packs: u64,
    /// Pages in its recorded working set.
    pub working_set_pages: u64,
    /// When its manifest was written.
    pub written: SystemTime,
    /// Why its manifest cannot be read (damaged, or of a format this build does not read);
    /// the figures above are then zero.
    pub unreadable: Option<String>,
}

/// What a removal did.
#[derive(Debug, Clone, Copy, Default)]
pub struct RemoveReport {
    /// Packs deleted (no snapshot used them).
    pub packs_deleted: u64,
    /// Bytes they held (with their indexes).
    pub bytes_freed: u64,
    /// Packs kept: used by another snapshot.
    pub packs_in_use: u64,
    /// Packs kept: unused but younger than the grace period.
    pub packs_too_young: u64,
}

impl Store {
    /// Every snapshot in the store, by name; one whose manifest cannot be read is listed
    /// with the reason.
    ///
    /// # Errors
    /// A failed request.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        let objects = &*self.objects;
        self.runtime.block_on(async {
            let manifests = manifests(objects).await?;
            let mut infos: Vec<SnapshotInfo> = futures::stream::iter(manifests)
                .map(|(name, written)| async move {
                    let m = match read_manifest(objects, &name).await {
                        Ok((m, _)) => m,
                        Err(e @ StoreError::Format { .. }) => {
                            return Ok(SnapshotInfo {
                                name,
                                size_bytes: 0,
                                data_pages: 0,
                                packs: 0,
                                working_set_pages: 0,
                                written,
                                unreadable: Some(error_chain(&e)),
                            });
                        }
                        Err(e) => return Err(e),
                    };
                    Ok::<_, StoreError>(SnapshotInfo {
                        data_pages: m.pages.iter().filter(|p| **p != PageRef::Zero).count() as u64,
                        size_bytes: m.size_bytes,
                        packs: m.packs.len() as u64,
                        working_set_pages: m.working_set.len() as u64,
                        name,
                        written,
                        unreadable: None,
                    })
                })
                .buffer_unordered(MANIFEST_READS)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
            infos.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(infos)
        })
    }

    /// Removes snapshot `name`, then deletes every pack no remaining snapshot uses and that
    /// is older than `grace`.
    ///
    /// # Errors
    /// No such snapshot, a failed request, or another manifest cannot be read (then no pack
    /// is deleted).
    pub fn remove(&self, name: &str, grace: Duration) -> Result<RemoveReport, StoreError> {
        let objects = &*self.objects;
        self.runtime.block_on(async {
            let key = layout::manifest_key(name);
            // Read first: a name that is not a snapshot is an error, not a silent no-op.
            match client::get_object(objects, &key).await {
                Err(e) if e.is_not_found() => {
                    return Err(StoreError::NoSnapshot {
                        name: name.to_owned(),
                    });
                }
                other => other?,
            };
            client::delete_object(objects, &key).await?;
            collect_garbage(objects, grace).await
        })
    }
}

/// Every manifest's snapshot name and when it was written.
async fn manifests(
    objects: &dyn object_store::ObjectStore,
) -> Result<Vec<(String, SystemTime)>, StoreError> {
    Ok(client::list_objects(objects, "snapshots")
        .await?
        .into_iter()
        .filter_map(|meta| {
            let key = meta.location.to_string();
            let name = key.strip_prefix("snapshots/")?.strip_suffix(".manifest")?;
            Some((name.to_owned(), meta.last_modified.into()))
        })
        .collect())
}

/// Deletes the packs (and indexes) no manifest uses that are older than `grace`.
async fn collect_garbage(
    objects: &dyn object_store::ObjectStore,
    grace: Duration,
) -> Result<RemoveReport, StoreError> {
    let mut used: HashSet<Hash> = HashSet::new();
    for (name, _) in manifests(objects).await? {
        // A listed manifest that cannot be read (even one removed meanwhile, or one no `put`
        // wrote) stops the removal: deleting on a guess could lose its packs.
        match read_manifest(objects, &name).await {
            Ok((m, _)) => used.extend(m.packs),
            Err(e) => {
                return Err(StoreError::Unreadable {
                    key: layout::manifest_key(&name),
                    source: Box::new(e),
                });
            }
        }
    }
    let now = SystemTime::now();
    let mut report = RemoveReport::default();
    let mut doomed: Vec<(Hash, u64)> = Vec::new();
    let mut young: HashSet<Hash> = HashSet::new();
    for meta in client::list_objects(objects, "packs").await? {
        let key = meta.location.to_string();
        let Some(rest) = key.strip_prefix("packs/") else {
            continue;
        };
        let Some(id) = rest
            .strip_suffix(".pack")
            .or_else(|| rest.strip_suffix(".index"))
            .and_then(layout::parse_hex)
        else {
            continue;
        };
        let age = now
            .duration_since(meta.last_modified.into())
            .unwrap_or_default();
        if used.contains(&id) {
            report.packs_in_use += u64::from(rest.ends_with(".pack"));
        } else if age < grace {
            young.insert(id);
        } else {
            doomed.push((id, meta.size));
        }
    }
    report.packs_too_young = young.len() as u64;
    // A pack whose other object is young is kept whole.
    doomed.retain(|(id, _)| !young.contains(id));
    let mut ids: Vec<Hash> = doomed.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    for id in &ids {
        for key in [layout::index_key(id), layout::pack_key(id)] {
            match client::delete_object(objects, &key).await {
                Err(e) if !e.is_not_found() => return Err(e),
                _ => {}
            }
        }
    }
    report.packs_deleted = ids.len() as u64;
    report.bytes_freed = doomed.iter().map(|(_, size)| size).sum();
    Ok(report)
}
