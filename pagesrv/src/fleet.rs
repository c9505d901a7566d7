//! The VMs one pagesrv serves: `--vm-mem [NAME=]PATH` (repeated) and `--vm-dir DIR`, each
//! under a name destinations ask for in their `Hello` (`faultd --vm NAME`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::wire::{ErrorCode, MAX_VM_NAME_BYTES, PROTOCOL_VERSION, SessionParams, VmName};
use thiserror::Error;

use crate::precopy::{Precopy, Strategy};
use crate::vm_memory::VmMemory;

/// Most VM names listed in an error before "and N more".
const NAMES_LISTED: usize = 8;

/// The name of a lone VM that has none of its own (`--vmm-uds`, or a file whose name cannot
/// be one).
pub fn lone_vm_name() -> VmName {
    VmName::new("vm").expect("a valid name")
}

/// A `--vm-mem` argument: a memory file and the name it is served under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// The name destinations ask for; empty until [`resolve_names`] when the file's name
    /// cannot be one (`unnamed` says why).
    pub name: VmName,
    /// The memory file.
    pub path: PathBuf,
    /// Why the file's name is not a VM name, if it is not.
    pub unnamed: Option<String>,
}

/// Parses `NAME=PATH` or `PATH` (named after its file name). `NAME=` is taken as a name only
/// when it is a valid [`VmName`] without `/`, so a path with `=` in it still works.
///
/// # Errors
/// An empty path, or a file name that cannot be a name (`NAME=PATH` fixes it).
pub fn parse_vm_spec(text: &str) -> Result<VmSpec, String> {
    if let Some((name, path)) = text.split_once('=')
        && !name.is_empty()
        && let Ok(name) = VmName::new(name)
    {
        if path.is_empty() {
            return Err(format!("--vm-mem {text:?}: no path after {name}="));
        }
        return Ok(VmSpec {
            name,
            path: PathBuf::from(path),
            unnamed: None,
        });
    }
    if text.is_empty() {
        return Err("--vm-mem needs a path".into());
    }
    let path = PathBuf::from(text);
    Ok(match name_of(&path) {
        Ok(name) => VmSpec {
            name,
            path,
            unnamed: None,
        },
        Err(why) => VmSpec {
            name: VmName::default(),
            path,
            unnamed: Some(why),
        },
    })
}

/// Names the VMs whose file names cannot be names: a lone VM is `vm` (destinations need not
/// name it); among several, that is an error (name it with `NAME=PATH`).
///
/// # Errors
/// [`FleetError::Name`] for an unnamed VM among several.
pub fn resolve_names(specs: &mut [VmSpec]) -> Result<(), FleetError> {
    let lone = specs.len() == 1;
    for spec in specs.iter_mut() {
        if let Some(why) = spec.unnamed.take() {
            if !lone {
                return Err(FleetError::Name(why));
            }
            spec.name = lone_vm_name();
        }
    }
    Ok(())
}

/// A file's name as a VM name.
fn name_of(path: &Path) -> Result<VmName, String> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} has no file name to name its VM by", path.display()))?;
    VmName::new(file_name).map_err(|why| {
        format!(
            "{why}; name the VM explicitly: --vm-mem NAME=PATH (NAME up to {MAX_VM_NAME_BYTES} letters, digits, '.', '_', '-')"
        )
    })
}

/// The memory files in `dir`, each named after its file name, sorted by name. Entries that
/// are not regular files (or links to them), hidden files and files whose name cannot be a
/// VM name are left out (the last with a warning).
///
/// # Errors
/// An unreadable directory, or one without a memory file.
pub fn scan_vm_dir(dir: &Path) -> Result<Vec<VmSpec>, FleetError> {
    let read_err = |source| FleetError::Dir {
        dir: dir.to_owned(),
        source,
    };
    let mut specs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."));
        if hidden || !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        match name_of(&path) {
            Ok(name) => specs.push(VmSpec {
                name,
                path,
                unnamed: None,
            }),
            Err(why) => tracing::warn!(file = %path.display(), %why, "--vm-dir: left out"),
        }
    }
    if specs.is_empty() {
        return Err(FleetError::EmptyDir(dir.to_owned()));
    }
    specs.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
    Ok(specs)
}

/// Errors setting up the VMs to serve.
#[derive(Debug, Error)]
pub enum FleetError {
    /// `--vm-dir` could not be read.
    #[error("cannot read --vm-dir {dir}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--vm-dir` holds no file it can serve.
    #[error(
        "--vm-dir {0} holds no memory file pagesrv can serve (hidden files and names outside letters, digits, '.', '_', '-' are left out)"
    )]
    EmptyDir(PathBuf),
    /// A file name that cannot be a VM name.
    #[error("{0}")]
    Name(String),
    /// Two VMs under one name.
    #[error(
        "two VMs are named {name:?} ({first} and {second}): name them apart with --vm-mem NAME=PATH"
    )]
    Duplicate {
        /// The name.
        name: VmName,
        /// One file.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
}

/// One VM pagesrv serves.
#[derive(Debug)]
pub struct ServedVm {
    /// The name destinations ask for.
    pub name: VmName,
    /// Its memory.
    pub source: VmMemory,
    /// The link to its source VMM (`--vmm-uds`: a running VM), kept in every strategy to
    /// tell the VMM the outcome; the precopy engine for precopy and hybrid.
    pub source_vmm: Option<Arc<Precopy>>,
    /// A template (a stored snapshot, or `--template`): restored by any number of
    /// destinations at once, each its own session, and never finished by one.
    pub template: bool,
}

impl ServedVm {
    /// The VM's precopy engine: its source VMM's link, when rounds run (not postcopy).
    pub fn precopy(&self) -> Option<Arc<Precopy>> {
        self.source_vmm
            .clone()
            .filter(|engine| engine.strategy != Strategy::Postcopy)
    }
}

/// Checks that no two specs share a name.
///
/// # Errors
/// [`FleetError::Duplicate`].
pub fn check_unique(specs: &[VmSpec]) -> Result<(), FleetError> {
    let mut sorted: Vec<&VmSpec> = specs.iter().collect();
    sorted.sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
    for pair in sorted.windows(2) {
        if pair[0].name == pair[1].name {
            return Err(FleetError::Duplicate {
                name: pair[0].name,
                first: pair[0].path.clone(),
                second: pair[1].path.clone(),
            });
        }
    }
    Ok(())
}

/// The VM a destination asked for: by name, or the only one when it named none. `Err` is the
/// text to refuse it with.
pub fn find(vms: &[ServedVm], asked: &VmName) -> Result<usize, String> {
    if asked.is_empty() {
        return match vms.len() {
            1 => Ok(0),
            n => Err(format!(
                "this pagesrv serves {n} VMs ({}): name one (faultd --vm NAME)",
                list_names(vms)
            )),
        };
    }
    vms.iter().position(|vm| vm.name == *asked).ok_or_else(|| {
        format!(
            "no VM named {:?} here (serving {})",
            asked.as_str(),
            list_names(vms)
        )
    })
}

fn list_names(vms: &[ServedVm]) -> String {
    let mut names: Vec<&str> = vms
        .iter()
        .take(NAMES_LISTED)
        .map(|vm| vm.name.as_str())
        .collect();
    let more = vms.len().saturating_sub(NAMES_LISTED);
    let more = format!("and {more} more");
    if vms.len() > NAMES_LISTED {
        names.push(&more);
    }
    names.join(", ")
}

/// Checks a destination's `Hello` against the memory file: the same protocol, a page size
/// the file is a whole number of (and the one `--page-size` requires, if given), the same
/// number of bytes, and the image it pinned. Returns the parameters to welcome it with
/// (session id still 0).
pub fn check_destination(
    theirs: &SessionParams,
    source: &VmMemory,
    required_page_size: Option<u64>,
) -> Result<SessionParams, (ErrorCode, String)> {
    if theirs.version != PROTOCOL_VERSION {
        return Err((
            ErrorCode::VersionMismatch,
            format!(
                "destination speaks protocol version {}, source speaks {PROTOCOL_VERSION}",
                theirs.version
            ),
        ));
    }
    let page_size = u64::from(theirs.page_size);
    let theirs_bytes = theirs.total_pages.saturating_mul(page_size);
    let layout_err = |why: String| {
        Err((
            ErrorCode::LayoutMismatch,
            format!(
                "destination expects {} pages of {} bytes ({} MiB): {why}",
                theirs.total_pages,
                page_size,
                theirs_bytes >> 20
            ),
        ))
    };
    if !common::layout::SUPPORTED_PAGE_SIZES.contains(&page_size) {
        return layout_err("page size not supported (4096 or 2097152)".into());
    }
    if let Some(required) = required_page_size.filter(|&r| r != page_size) {
        return layout_err(format!(
            "this source serves {required}-byte pages only (--page-size)"
        ));
    }
    let paged = match source.paged(page_size) {
        Ok(paged) => paged,
        Err(e) => return layout_err(e.to_string()),
    };
    if theirs_bytes != source.size_bytes() {
        return layout_err(format!(
            "the source memory file has {} pages of {page_size} bytes ({} MiB)",
            paged.total_pages(),
            source.size_bytes() >> 20
        ));
    }
    if theirs.image_id != 0 && theirs.image_id != source.image_id() {
        return Err((
            ErrorCode::ImageMismatch,
            format!(
                "the destination's session started from memory image {:016x}; this source serves image {:016x} (another memory file, or one that changed)",
                theirs.image_id,
                source.image_id()
            ),
        ));
    }
    Ok(SessionParams {
        version: PROTOCOL_VERSION,
        page_size: theirs.page_size,
        total_pages: paged.total_pages(),
        session_id: 0,
        image_id: source.image_id(),
        flags: 0,
        vm: VmName::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_take_a_name_or_the_file_name() {
        let named = parse_vm_spec("web-1=/dev/shm/a=b").unwrap();
        assert_eq!(named.name.as_str(), "web-1");
        assert_eq!(named.path, PathBuf::from("/dev/shm/a=b"));
        let plain = parse_vm_spec("/dev/shm/vm1").unwrap();
        assert_eq!(
            (plain.name.as_str(), plain.path.to_str()),
            ("vm1", Some("/dev/shm/vm1"))
        );
        // `=` inside a path is not a name.
        let odd = parse_vm_spec("/tmp/x=y/mem").unwrap();
        assert_eq!(
            (odd.name.as_str(), odd.path.to_str()),
            ("mem", Some("/tmp/x=y/mem"))
        );
        assert!(parse_vm_spec("").is_err());
        assert!(parse_vm_spec("a=").is_err());
        // A file name that cannot be a VM name: `vm` when it is the only VM, else an error.
        let mut lone = vec![parse_vm_spec("/tmp/my vm").unwrap()];
        resolve_names(&mut lone).unwrap();
        assert_eq!(lone[0].name.as_str(), "vm");
        let mut two = vec![
            parse_vm_spec("/tmp/my vm").unwrap(),
            parse_vm_spec("/a/b").unwrap(),
        ];
        let bad = resolve_names(&mut two).unwrap_err().to_string();
        assert!(bad.contains("NAME=PATH"), "{bad}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let specs = [
            parse_vm_spec("/a/vm").unwrap(),
            parse_vm_spec("x=/b/c").unwrap(),
            parse_vm_spec("/b/vm").unwrap(),
        ];
        let err = check_unique(&specs).unwrap_err().to_string();
        assert!(
            err.contains("\"vm\"") && err.contains("/a/vm") && err.contains("/b/vm"),
            "{err}"
        );
        assert!(check_unique(&specs[..2]).is_ok());
    }

    #[test]
    fn a_directory_serves_its_regular_files_by_name() {
        let dir = std::env::temp_dir().join(format!("pagesrv-fleet-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        for name in ["b", "aa", ".hidden", "bad name"] {
            std::fs::write(dir.join(name), [0u8; 4096]).unwrap();
        }
        let specs = scan_vm_dir(&dir).unwrap();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["aa", "b"],
            "by name; the subdirectory, hidden and unnameable files left out"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(scan_vm_dir(&dir), Err(FleetError::EmptyDir(_))));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(scan_vm_dir(&dir), Err(FleetError::Dir { .. })));
    }
}
