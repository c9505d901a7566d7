//! What pagesrv serves: paused VMs' memory files (`--vm-mem`, `--vm-dir`), or running VMs'
//! RAM taken from their source VMMs (`--vmm-uds [NAME=]PATH`, repeatable: each VM its own
//! link and precopy engine); and the control socket over those engines.

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use common::control::{ControlServer, Handler};
use common::source_link::SourceVmm;
use serde_json::json;
use tracing::info;

use crate::fleet::{self, ServedVm, VmSpec};
use crate::precopy::{Precopy, Strategy};
use crate::source::MemorySource;
use crate::store_source::StoreSource;
use crate::vm_memory::VmMemory;

/// The command line's say on what to serve.
pub struct Sources<'a> {
    /// `--vm-dir`.
    pub vm_dir: Option<&'a Path>,
    /// `--vm-mem`, each.
    pub vm_mem: &'a [VmSpec],
    /// `--vmm-uds`, each.
    pub vmm_uds: &'a [String],
    /// `--strategy`.
    pub strategy: Strategy,
    /// `--max-downtime-ms`.
    pub max_downtime: Duration,
    /// `--store-cache`: where stored snapshots' caches go.
    pub store_cache: &'a Path,
    /// `--store-cache-mib`: how large each may grow.
    pub store_cache_mib: u64,
    /// `--template`: memory files are templates too (stored snapshots always are).
    pub templates: bool,
}

/// The memory to serve: paused VMs' files (`--vm-mem`, `--vm-dir`), or running VMs' RAM
/// from their VMMs, each with the link to it (paused at once for `--strategy postcopy`, or
/// handed to its precopy engine).
pub fn open_vms(cli: &Sources<'_>) -> Result<Vec<ServedVm>> {
    let mut specs = match cli.vm_dir {
        Some(dir) => fleet::scan_vm_dir(dir)?,
        None => cli.vm_mem.to_vec(),
    };
    if !specs.is_empty() {
        if cli.strategy != Strategy::Postcopy {
            bail!(
                "--strategy precopy and hybrid need a running VM: give --vmm-uds instead of --vm-mem or --vm-dir"
            );
        }
        fleet::resolve_names(&mut specs)?;
        fleet::check_unique(&specs)?;
        // One cache per stored snapshot, however many names serve it (clones of a
        // template): each frame is fetched once for all of them.
        let mut stores: HashMap<String, Arc<StoreSource>> = HashMap::new();
        let mut vms = Vec::with_capacity(specs.len());
        for spec in specs {
            let stored = spec.path.to_str().filter(|p| p.starts_with("s3://"));
            let template = cli.templates || stored.is_some();
            let source = match stored {
                Some(url) => {
                    let store = match stores.get(url) {
                        Some(store) => store.clone(),
                        None => {
                            let parsed: snapstore::StoreUrl =
                                url.parse().map_err(|e: String| anyhow::anyhow!(e))?;
                            let store =
                                StoreSource::open(&parsed, cli.store_cache, cli.store_cache_mib)
                                    .with_context(|| format!("cannot serve {parsed}"))?;
                            stores.insert(url.to_owned(), store.clone());
                            store
                        }
                    };
                    VmMemory::Store(store)
                }
                None => VmMemory::File(
                    MemorySource::open(&spec.path)
                        .with_context(|| format!("cannot serve {}", spec.path.display()))?,
                ),
            };
            vms.push(ServedVm {
                name: spec.name,
                source,
                source_vmm: None,
                template,
            });
        }
        return Ok(vms);
    }
    let sockets = vmm_sockets(cli.vmm_uds)?;
    // Every socket first (a VMM may connect to any), then each VMM in turn.
    let mut listeners = Vec::new();
    for (name, path) in &sockets {
        listeners.push(common::uds::bind_private(path)?);
        // One line on stdout per socket for scripts: that VMM may connect.
        println!("pagesrv waiting for the source VMM on {}", path.display());
        info!(uds = %path.display(), vm = %name, "waiting for the source VMM");
    }
    sockets
        .into_iter()
        .zip(listeners)
        .map(|((name, path), listener)| accept_source_vmm(cli, name, &path, &listener))
        .collect()
}

/// `--vmm-uds [NAME=]PATH`, each: its VM's name (`vm` for a lone unnamed one) and socket.
fn vmm_sockets(specs: &[String]) -> Result<Vec<(common::wire::VmName, PathBuf)>> {
    if specs.is_empty() {
        bail!("--vm-mem or --vmm-uds is required");
    }
    let mut sockets = Vec::new();
    for spec in specs {
        let (name, path) = match spec.split_once('=') {
            Some((name, path)) if !name.is_empty() && !path.is_empty() => (
                common::wire::VmName::new(name)
                    .map_err(|e| anyhow::anyhow!("--vmm-uds {spec:?}: {e}"))?,
                PathBuf::from(path),
            ),
            // One VM: destinations need not name it (`faultd --vm vm` also works).
            None if specs.len() == 1 => (fleet::lone_vm_name(), PathBuf::from(spec)),
            _ => bail!("--vmm-uds {spec:?}: with several source VMMs, name each: NAME=PATH"),
        };
        if sockets.iter().any(|(n, _)| *n == name) {
            bail!("--vmm-uds: VM {name} is named twice");
        }
        sockets.push((name, path));
    }
    Ok(sockets)
}

/// Accepts VM `name`'s source VMM on its socket and takes its RAM: paused at once for
/// `--strategy postcopy`, else under a precopy engine.
fn accept_source_vmm(
    cli: &Sources<'_>,
    name: common::wire::VmName,
    path: &Path,
    listener: &UnixListener,
) -> Result<ServedVm> {
    let (stream, _) = listener
        .accept()
        .with_context(|| format!("failed to accept VM {name}'s source VMM"))?;
    let _ = std::fs::remove_file(path);
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (link, fd) = SourceVmm::accept(stream.try_clone()?).context("the source VMM's hello")?;
    // Dirty bitmaps of a large guest take a while; the VMM answers between its own work.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    info!(
        vm = %name,
        pid = link.peer_pid,
        bytes = link.hello.size_bytes,
        page_size = link.hello.page_size,
        strategy = ?cli.strategy,
        "source VMM connected"
    );
    let source = MemorySource::running(std::fs::File::from(fd), path)
        .context("cannot serve the source VMM's RAM")?;
    let engine = Precopy::new(link, cli.strategy, cli.max_downtime);
    if cli.strategy == Strategy::Postcopy {
        engine.pause_now().context("the source VMM did not pause")?;
        source.paused();
        source.refresh_holes();
        if let Some(free) = engine.free_pages().context("the source VMM's free pages")? {
            let pages = source.hint_free(&free);
            info!(
                vm = %name,
                free_pages = pages,
                "free-page hints: those pages are served as zero"
            );
        }
        info!(vm = %name, "the source VM is paused; it is kept until the migration's outcome");
    }
    Ok(ServedVm {
        name,
        source: VmMemory::File(source),
        source_vmm: Some(Arc::new(engine)),
        template: false,
    })
}

/// The control socket: `status` (where precopy stands) and `start-postcopy`; with several
/// running VMs, `{"cmd":..., "vm": NAME}` names one (without it: `status` answers for each,
/// `start-postcopy` forces them all).
pub fn control_server(path: &Path, vms: &[ServedVm]) -> Result<Arc<ControlServer>> {
    let engines: Vec<(String, Arc<Precopy>)> = vms
        .iter()
        .filter_map(|vm| vm.precopy().map(|engine| (vm.name.to_string(), engine)))
        .collect();
    let handler: Arc<Handler> = Arc::new(move |name, request| {
        let wanted = request.get("vm").and_then(|v| v.as_str());
        let chosen: Vec<&(String, Arc<Precopy>)> = engines
            .iter()
            .filter(|(vm, _)| wanted.is_none_or(|w| w == vm))
            .collect();
        match (name, chosen.as_slice()) {
            (_, []) if wanted.is_some() => {
                json!({"error": format!("no precopy runs for VM {:?}", wanted.unwrap_or_default())})
            }
            ("status", []) => json!({"status": {"strategy": "postcopy", "phase": "postcopy"}}),
            ("status", [(_, engine)]) => json!({"status": engine.status()}),
            ("status", several) => json!({"status": several
                .iter()
                .map(|(vm, engine)| (vm.clone(), json!(engine.status())))
                .collect::<serde_json::Map<_, _>>()}),
            ("start-postcopy", []) => json!({"error": "no precopy runs (--strategy postcopy)"}),
            ("start-postcopy", several) => {
                for (_, engine) in several {
                    engine.force();
                }
                json!({"ok": "start-postcopy"})
            }
            (other, _) => json!({
                "error": format!("unknown command {other:?} (pagesrv knows: status, start-postcopy)")
            }),
        }
    });
    Ok(ControlServer::bind(path, handler)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(specs: &[&str]) -> Result<Vec<(String, String)>> {
        let specs: Vec<String> = specs.iter().map(|s| (*s).to_owned()).collect();
        Ok(vmm_sockets(&specs)?
            .into_iter()
            .map(|(name, path)| (name.to_string(), path.display().to_string()))
            .collect())
    }

    #[test]
    fn test_source_vmm_sockets_are_named_one_lone_or_each_of_several() {
        assert_eq!(
            names(&["/run/s.sock"]).unwrap(),
            [("vm".into(), "/run/s.sock".into())]
        );
        assert_eq!(
            names(&["a=/run/a.sock", "b=/run/b.sock"]).unwrap(),
            [
                ("a".into(), "/run/a.sock".into()),
                ("b".into(), "/run/b.sock".into())
            ]
        );
        let unnamed = names(&["a=/run/a.sock", "/run/b.sock"]).unwrap_err();
        assert!(unnamed.to_string().contains("name each"), "{unnamed}");
        let twice = names(&["a=/run/a.sock", "a=/run/b.sock"]).unwrap_err();
        assert!(twice.to_string().contains("named twice"), "{twice}");
        assert!(names(&[]).is_err());
    }
}
