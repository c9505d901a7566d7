//! A guest RAM file shared by clones of one template on a host (`faultd --shared-ram`).
//!
//! The VMM passes, as its memfd, a tmpfs file linked in a directory (a memfd is not) that
//! other VMMs map too, each *private*: clones of one snapshot restored on one host. Each
//! clone's faultd writes the pages it receives into the file's page cache, so a page one
//! clone placed is mapped into every other by the kernel, without a fault or a fetch, and
//! a guest's writes stay its own (copy on write). Every clone's faultd writes the same
//! bytes for a page (the template's), so writing a page another guest already maps changes
//! nothing it can see. Each faultd also looks at the file now and then (`mincore`) and
//! takes over the pages others placed before they arrived here: they count as done and
//! pagesrv is told to skip them (`Skip`), so a page is sent to the host about once, not
//! once per clone (for a template file, pagesrv starts the push of each restore whose
//! `Hello` says it shares at a different place). Those pages are verified by the restore
//! that received them, not again by this one.
//!
//! That holds only while every writer restores the same image. So the file is tied to one:
//! the first faultd records the image id in an extended attribute ([`IMAGE_XATTR`]) before
//! any page goes in, and a faultd restoring another image, or finding pages without that
//! record, refuses the file instead of mixing two images' pages. Precopy is refused too
//! (its pages are rewritten or dropped as the source changes them, which would reach every
//! clone). Before that, [`check_host`] and [`check_private`] refuse what would let a clone
//! see bytes no faultd wrote or write into the others' RAM: pages other than 4 KiB (a
//! write into a larger page leaves its other 4 KiB zero and present), tmpfs allowed to
//! use large pages for writes (the same), and a VMM that maps the file shared.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;

use common::xattr;

/// The extended attribute naming the image whose pages the file holds (16 hex digits).
pub const IMAGE_XATTR: &CStr = c"user.pagemig.image";

/// Why a shared guest RAM file cannot take this VM's pages.
#[derive(Debug, thiserror::Error)]
pub enum SharedRamError {
    /// The file holds another image's pages.
    #[error(
        "the VMM's guest RAM file is shared with VMs restoring image {theirs}, not this VM's image {ours:016x}: give each template its own file"
    )]
    OtherImage {
        /// The image the file is tied to.
        theirs: String,
        /// This VM's image.
        ours: u64,
    },
    /// The file holds pages but names no image.
    #[error(
        "the VMM's guest RAM file is shared (linked in a directory) and holds {bytes} bytes that no faultd wrote for a known image: give a new file (or a memfd)"
    )]
    UnknownPages {
        /// What it holds.
        bytes: u64,
    },
    /// pagesrv named no image.
    #[error(
        "pagesrv named no image, so the VM's pages cannot go into a guest RAM file other VMs share"
    )]
    NoImage,
    /// The host or the file cannot be shared safely.
    #[error("--shared-ram is not possible here: {0}")]
    Unsupported(String),
    /// The VMM maps the file shared.
    #[error(
        "the VMM maps its guest RAM shared ({at}): with --shared-ram each VMM must map the file private (MAP_PRIVATE), or its guest's writes reach every clone"
    )]
    MappedShared {
        /// The mapping.
        at: String,
    },
    /// The VMM passed a memfd, which no other VMM can map.
    #[error("--shared-ram needs the VMM to pass a file linked in a tmpfs directory, not a memfd")]
    NotLinked,
    /// Precopy would rewrite pages every clone maps.
    #[error(
        "pagesrv runs precopy rounds, whose pages are dropped or patched as the source writes them: not possible in a guest RAM file other VMs share (give this VM a memfd of its own)"
    )]
    Precopy,
    /// The VMM's mappings cannot be read.
    #[error(
        "cannot read the VMM's mappings (/proc/{pid}/maps) to check that it maps its guest RAM private"
    )]
    Maps {
        /// The VMM's process.
        pid: i32,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The file cannot be examined.
    #[error("cannot examine the VMM's guest RAM file")]
    Stat(#[source] io::Error),
    /// The attribute cannot be read or written.
    #[error("cannot {op} the image attribute of the VMM's guest RAM file")]
    Attribute {
        /// Read or write.
        op: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// Whether `file` can be mapped by other processes by name: it is linked in a directory
/// (a memfd never is).
pub fn is_linked(file: &File) -> io::Result<bool> {
    Ok(file.metadata()?.nlink() > 0)
}

/// Refuses what would let a guest see bytes no faultd wrote in a shared file of
/// `guest_page_size` pages: a page size other than 4 KiB (guest or host), a file not on
/// tmpfs or a memfd, and tmpfs that may put a 4 KiB write into a larger page (zero-filled
/// around it and present: another clone would map those zeros without a fault).
///
/// # Errors
/// [`SharedRamError::Unsupported`] naming the reason.
pub fn check_host(file: &File, guest_page_size: u64) -> Result<(), SharedRamError> {
    let unsupported = |why: String| Err(SharedRamError::Unsupported(why));
    if guest_page_size != 4096 {
        return unsupported(format!("its pages are {guest_page_size} bytes, not 4 KiB"));
    }
    let host_page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096);
    if host_page != 4096 {
        return unsupported(format!(
            "this host's pages are {host_page} bytes, not 4 KiB"
        ));
    }
    let meta = file.metadata().map_err(SharedRamError::Stat)?;
    if tmpfs_options(meta.dev()).is_none() {
        return unsupported("the file is not on a tmpfs".into());
    }
    if let Some(why) = writes_may_use_large_pages(file) {
        return unsupported(why);
    }
    Ok(())
}

/// Why a 4 KiB write into `file` (tmpfs, or a memfd: the kernel's internal tmpfs) may land
/// in a page larger than 4 KiB, its other parts zero and present in the page cache (a
/// guest mapping them would read zeros no faultd wrote), or `None`.
pub fn writes_may_use_large_pages(file: &File) -> Option<String> {
    let dev = file.metadata().ok()?.dev();
    let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage");
    let global = std::fs::read_to_string(thp.join("shmem_enabled")).unwrap_or_default();
    // A memfd's internal mount follows `shmem_enabled` itself.
    let mount = tmpfs_options(dev).unwrap_or_else(|| format!("huge={}", selected(&global)));
    large_pages_for_writes(&mount, &global, &per_size_settings(thp))
}

/// The selected value of a sysfs setting printed with it in brackets.
fn selected(text: &str) -> String {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or("never")
        .to_owned()
}

/// The super options of the tmpfs mounted from device `dev` (from /proc/self/mountinfo),
/// `None` if that device is no tmpfs.
fn tmpfs_options(dev: u64) -> Option<String> {
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let wanted = format!("{major}:{minor}");
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let mut fields = line.split(' ');
        (fields.nth(2) == Some(&wanted[..])).then_some(())?;
        let (_, after) = line.split_once(" - ")?;
        let mut rest = after.split(' ');
        (rest.next() == Some("tmpfs")).then_some(())?;
        rest.nth(1).map(str::to_owned)
    })
}

/// The selected value of each `hugepages-*/shmem_enabled` (multi-size large pages).
fn per_size_settings(thp: &std::path::Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(thp) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("hugepages-"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("shmem_enabled")).ok())
        .collect()
}

/// Why tmpfs may use pages larger than 4 KiB for a write into this mount (its super
/// options `mount`, the global `shmem_enabled` and the per-size settings, each as the
/// kernel prints them, the selected value in brackets), or `None`.
fn large_pages_for_writes(mount: &str, global: &str, per_size: &[String]) -> Option<String> {
    if selected(global) == "force" {
        return Some("shmem_enabled is 'force' (tmpfs writes may use huge pages)".into());
    }
    let huge = mount
        .split(',')
        .find_map(|o| o.strip_prefix("huge="))
        .unwrap_or("never");
    let writes_large = |policy: &str| matches!(policy, "always" | "within_size");
    if writes_large(huge) && selected(global) != "deny" {
        return Some(format!("the tmpfs is mounted huge={huge}"));
    }
    for setting in per_size {
        let p = selected(setting);
        if writes_large(&p) {
            return Some(format!(
                "a multi-size large page setting is '{p}' for tmpfs"
            ));
        }
    }
    None
}

/// Refuses a VMM (process `pid`) that maps any of `ranges` (host address, bytes) shared:
/// its guest's writes would go into every clone's RAM. Read from /proc/PID/maps.
///
/// # Errors
/// [`SharedRamError::MappedShared`], or the maps cannot be read.
pub fn check_private(pid: i32, ranges: &[(u64, u64)]) -> Result<(), SharedRamError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| SharedRamError::Maps { pid, source })?;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(span), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((start, end)) = span.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let overlaps = ranges
            .iter()
            .any(|&(at, len)| start < at.saturating_add(len) && at < end);
        if overlaps && !perms.ends_with('p') {
            return Err(SharedRamError::MappedShared {
                at: format!("{start:#x}-{end:#x}"),
            });
        }
    }
    Ok(())
}

/// Ties the shared `file` to image `image_id`, or checks that it is tied to it; refuses a
/// file of another image, one that holds pages but names no image, and precopy.
///
/// # Errors
/// See [`SharedRamError`].
pub fn bind(file: &File, image_id: u64, precopy: bool) -> Result<(), SharedRamError> {
    if precopy {
        return Err(SharedRamError::Precopy);
    }
    if image_id == 0 {
        return Err(SharedRamError::NoImage);
    }
    let ours = format!("{image_id:016x}");
    // Read before the attribute: pages written after it was set by another faultd are that
    // faultd's, of the image the attribute names.
    let bytes = file.metadata().map_err(SharedRamError::Stat)?.blocks() * 512;
    let check = |theirs: String| {
        if theirs == ours {
            Ok(())
        } else {
            Err(SharedRamError::OtherImage {
                theirs,
                ours: image_id,
            })
        }
    };
    if let Some(theirs) = read_image(file)? {
        return check(theirs);
    }
    if bytes > 0 {
        return Err(SharedRamError::UnknownPages { bytes });
    }
    match xattr::create(file, IMAGE_XATTR, ours.as_bytes()) {
        Ok(()) => Ok(()),
        // Another faultd tied it first: the same image, or a refusal.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            check(read_image(file)?.unwrap_or_default())
        }
        Err(source) => Err(SharedRamError::Attribute {
            op: "write",
            source,
        }),
    }
}

/// The image the file is tied to, if any.
fn read_image(file: &File) -> Result<Option<String>, SharedRamError> {
    let value = xattr::get(file, IMAGE_XATTR)
        .map_err(|source| SharedRamError::Attribute { op: "read", source })?;
    Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A new file in /dev/shm (tmpfs, where such files live), removed when dropped.
    struct ShmFile(std::path::PathBuf, File);

    impl ShmFile {
        fn new(tag: &str) -> Self {
            let path = std::path::PathBuf::from(format!(
                "/dev/shm/faultd-shared-ram-test-{}-{tag}",
                std::process::id()
            ));
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            file.set_len(1 << 20).unwrap();
            ShmFile(path, file)
        }
    }

    impl Drop for ShmFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_new_file_is_tied_to_the_first_image_and_refuses_another() {
        let f = ShmFile::new("tie");
        assert!(is_linked(&f.1).unwrap());
        bind(&f.1, 0xabc, false).unwrap();
        f.1.write_all_at(&[7; 4096], 0).unwrap();
        // A second clone of the same image shares it, pages and all.
        bind(&f.1, 0xabc, false).unwrap();
        let e = bind(&f.1, 0xdef, false).unwrap_err();
        assert!(
            matches!(&e, SharedRamError::OtherImage { theirs, ours: 0xdef } if theirs == "0000000000000abc"),
            "{e}"
        );
    }

    #[test]
    fn pages_without_an_image_precopy_and_no_image_are_refused() {
        let f = ShmFile::new("unknown");
        assert!(matches!(bind(&f.1, 1, true), Err(SharedRamError::Precopy)));
        assert!(matches!(bind(&f.1, 0, false), Err(SharedRamError::NoImage)));
        f.1.write_all_at(&[1; 4096], 8192).unwrap();
        let e = bind(&f.1, 1, false).unwrap_err();
        assert!(
            matches!(e, SharedRamError::UnknownPages { bytes } if bytes >= 4096),
            "{e}"
        );
    }

    #[test]
    fn a_memfd_is_not_shared() {
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .unwrap();
        assert!(!is_linked(&File::from(fd)).unwrap());
    }

    #[test]
    fn tmpfs_that_may_write_large_pages_is_refused() {
        let never = "always within_size advise [never] deny force";
        let sizes = |v: &str| vec![format!("always inherit within_size advise [{v}]")];
        assert_eq!(
            large_pages_for_writes("rw,size=1k", never, &sizes("never")),
            None
        );
        assert_eq!(
            large_pages_for_writes("rw,huge=advise", never, &sizes("inherit")),
            None
        );
        assert!(large_pages_for_writes("rw,huge=always", never, &[]).is_some());
        assert!(large_pages_for_writes("rw,huge=within_size", never, &[]).is_some());
        let deny = "always within_size advise never [deny] force";
        assert_eq!(large_pages_for_writes("rw,huge=always", deny, &[]), None);
        let force = "always within_size advise never deny [force]";
        assert!(large_pages_for_writes("rw", force, &[]).is_some());
        assert!(large_pages_for_writes("rw", never, &sizes("always")).is_some());
        // A memfd follows shmem_enabled: as a mount with huge= its selection.
        let always = "[always] within_size advise never deny force";
        let memfd = |g: &str| format!("huge={}", selected(g));
        assert!(large_pages_for_writes(&memfd(always), always, &[]).is_some());
        assert_eq!(large_pages_for_writes(&memfd(never), never, &[]), None);
    }

    #[test]
    fn this_test_file_passes_the_host_checks_and_a_shared_mapping_is_refused() {
        let f = ShmFile::new("host");
        // /dev/shm here is a tmpfs without large pages for writes (the test machines').
        check_host(&f.1, 4096).unwrap();
        assert!(matches!(
            check_host(&f.1, 2 << 20),
            Err(SharedRamError::Unsupported(_))
        ));
        // FileWindow maps shared: this process's own mapping of the file is refused.
        let window =
            common::mmap::FileWindow::new(std::os::fd::AsFd::as_fd(&f.1), 1 << 20).unwrap();
        let err = check_private(std::process::id() as i32, &[(window.addr(), 1 << 20)]);
        assert!(
            matches!(err, Err(SharedRamError::MappedShared { .. })),
            "{err:?}"
        );
        // A range nothing maps is not.
        check_private(std::process::id() as i32, &[(0x1000, 0x1000)]).unwrap();
        // A VMM whose mappings cannot be read is refused, saying so.
        let gone = check_private(i32::MAX, &[(0x1000, 0x1000)]).unwrap_err();
        assert!(gone.to_string().contains("/maps"), "{gone}");
    }
}
