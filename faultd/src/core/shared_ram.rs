//! A guest RAM file shared by clones of one template on a host.
//!
//! A VMM may pass, as its memfd, a file linked in a directory (a memfd is not) that other
//! VMMs map too, each *private*: clones of one snapshot restored on one host. Each clone's
//! faultd writes the pages it receives into the file's page cache, so a page one clone
//! placed is mapped into every other by the kernel, without a fault or a fetch, and a
//! guest's writes stay its own (copy on write). Every clone's faultd writes the same bytes
//! for a page (the template's), so writing a page another guest already maps changes
//! nothing it can see. Each faultd also looks at the file now and then (`mincore`) and
//! takes over the pages others placed before they arrived here: they count as done and
//! pagesrv is told to skip them (`Skip`), so a page is sent to the host about once, not
//! once per clone (pagesrv starts each restore's push of a template at a different place).
//! Those pages are verified by the restore that received them, not again by this one.
//!
//! That holds only while every writer restores the same image. So the file is tied to one:
//! the first faultd records the image id in an extended attribute ([`IMAGE_XATTR`]) before
//! any page goes in, and a faultd restoring another image, or finding pages without that
//! record, refuses the file instead of mixing two images' pages. Precopy is refused too
//! (its pages are rewritten or dropped as the source changes them, which would reach every
//! clone).

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
    /// Precopy would rewrite pages every clone maps.
    #[error(
        "pagesrv runs precopy rounds, whose pages are dropped or patched as the source writes them: not possible in a guest RAM file other VMs share (give this VM a memfd of its own)"
    )]
    Precopy,
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

/// Whether `file` may be mapped by other processes too: it is linked in a directory (a
/// memfd never is).
pub fn is_shared(file: &File) -> io::Result<bool> {
    Ok(file.metadata()?.nlink() > 0)
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
    let bytes = file
        .metadata()
        .map_err(|source| SharedRamError::Attribute { op: "read", source })?
        .blocks()
        * 512;
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
        assert!(is_shared(&f.1).unwrap());
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
        assert!(!is_shared(&File::from(fd)).unwrap());
    }
}
