//! Guest RAM layout: the regions a VMM hands over, checked, with lookups between the VMM's
//! host-virtual addresses and page indices of the memory file.
//!
//! The memory file is the regions concatenated in list order (`offset` is cumulative, no
//! holes); the page index is `file_offset / page_size`. Regions may be listed in any
//! host-address order; lookups by address use a table sorted by address.

use serde::Deserialize;
use thiserror::Error;

/// Most regions one VMM may declare.
pub const MAX_REGIONS: usize = 1024;
/// Page sizes faultd and pagesrv support: 4 KiB, and 2 MiB for hugetlbfs.
pub const SUPPORTED_PAGE_SIZES: [u64; 2] = [4096, 2 << 20];

/// A host-virtual address in the VMM's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostAddr(pub u64);

/// A byte offset into the guest memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileOffset(pub u64);

/// Errors in a region layout. Each names the region (by list position) and the rule broken.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The handshake text is not the expected JSON.
    #[error("region list is not valid JSON: {0}")]
    Json(String),
    /// No regions at all.
    #[error("region list is empty")]
    Empty,
    /// More regions than [`MAX_REGIONS`].
    #[error("{count} regions exceed the limit of {MAX_REGIONS}")]
    TooMany {
        /// Regions declared.
        count: usize,
    },
    /// Neither `page_size` nor `page_size_kib`, or both with different values.
    #[error("region {index}: page size missing or contradictory")]
    PageSizeMissing {
        /// Position in the list.
        index: usize,
    },
    /// A page size other than 4 KiB or 2 MiB.
    #[error("region {index}: page size {page_size} is not supported (4096 or 2097152)")]
    UnsupportedPageSize {
        /// Position in the list.
        index: usize,
        /// The declared page size.
        page_size: u64,
    },
    /// Regions with different page sizes.
    #[error("region {index}: page size {page_size} differs from region 0's {first}")]
    MixedPageSizes {
        /// Position in the list.
        index: usize,
        /// The declared page size.
        page_size: u64,
        /// Region 0's page size.
        first: u64,
    },
    /// An address or size that is not a multiple of the page size, or a zero size.
    #[error(
        "region {index}: base {base:#x} and size {size:#x} must be non-zero multiples of the page size"
    )]
    Misaligned {
        /// Position in the list.
        index: usize,
        /// Declared base address.
        base: u64,
        /// Declared size.
        size: u64,
    },
    /// An offset that is not the sum of the previous regions' sizes.
    #[error(
        "region {index}: offset {offset:#x} should be {expected:#x} (regions are concatenated in list order)"
    )]
    NotContiguous {
        /// Position in the list.
        index: usize,
        /// Declared offset.
        offset: u64,
        /// Where the region should start in the file.
        expected: u64,
    },
    /// A region that wraps around the address space.
    #[error("region {index}: range overflows the address space")]
    Overflow {
        /// Position in the list.
        index: usize,
    },
    /// Two regions sharing host addresses.
    #[error("regions {a} and {b} overlap in host memory")]
    Overlap {
        /// Position of the first region.
        a: usize,
        /// Position of the second region.
        b: usize,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: Option<u64>,
    /// Deprecated Firecracker field; holds bytes despite its name.
    page_size_kib: Option<u64>,
}

/// One checked region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Where the region starts in the VMM.
    pub host_base: HostAddr,
    /// Length in bytes.
    pub size_bytes: u64,
    /// Where the region starts in the memory file.
    pub file_offset: FileOffset,
}

impl Region {
    fn host_end(&self) -> u64 {
        self.host_base.0 + self.size_bytes
    }
}

/// A checked layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    regions: Vec<Region>,
    by_host: Vec<usize>,
    page_size: u64,
    total_bytes: u64,
}

impl Layout {
    /// Parses and checks the Firecracker-style JSON region list.
    ///
    /// # Errors
    /// Malformed JSON or any broken rule of [`LayoutError`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, LayoutError> {
        let raw: Vec<RawRegion> =
            serde_json::from_slice(bytes).map_err(|e| LayoutError::Json(e.to_string()))?;
        Self::from_raw(&raw)
    }

    fn from_raw(raw: &[RawRegion]) -> Result<Self, LayoutError> {
        if raw.is_empty() {
            return Err(LayoutError::Empty);
        }
        if raw.len() > MAX_REGIONS {
            return Err(LayoutError::TooMany { count: raw.len() });
        }
        let mut regions = Vec::with_capacity(raw.len());
        let mut page_size = 0;
        let mut expected_offset = 0u64;
        for (index, r) in raw.iter().enumerate() {
            let ps = match (r.page_size, r.page_size_kib) {
                (Some(a), Some(b)) if a != b => return Err(LayoutError::PageSizeMissing { index }),
                (Some(a), _) | (None, Some(a)) => a,
                (None, None) => return Err(LayoutError::PageSizeMissing { index }),
            };
            if !SUPPORTED_PAGE_SIZES.contains(&ps) {
                return Err(LayoutError::UnsupportedPageSize {
                    index,
                    page_size: ps,
                });
            }
            if index == 0 {
                page_size = ps;
            } else if ps != page_size {
                return Err(LayoutError::MixedPageSizes {
                    index,
                    page_size: ps,
                    first: page_size,
                });
            }
            if r.size == 0 || r.size % ps != 0 || r.base_host_virt_addr % ps != 0 {
                return Err(LayoutError::Misaligned {
                    index,
                    base: r.base_host_virt_addr,
                    size: r.size,
                });
            }
            if r.base_host_virt_addr.checked_add(r.size).is_none() {
                return Err(LayoutError::Overflow { index });
            }
            if r.offset != expected_offset {
                return Err(LayoutError::NotContiguous {
                    index,
                    offset: r.offset,
                    expected: expected_offset,
                });
            }
            expected_offset = expected_offset
                .checked_add(r.size)
                .ok_or(LayoutError::Overflow { index })?;
            regions.push(Region {
                host_base: HostAddr(r.base_host_virt_addr),
                size_bytes: r.size,
                file_offset: FileOffset(r.offset),
            });
        }
        let mut by_host: Vec<usize> = (0..regions.len()).collect();
        by_host.sort_by_key(|&i| regions[i].host_base);
        for pair in by_host.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if regions[a].host_end() > regions[b].host_base.0 {
                return Err(LayoutError::Overlap {
                    a: a.min(b),
                    b: a.max(b),
                });
            }
        }
        Ok(Layout {
            regions,
            by_host,
            page_size,
            total_bytes: expected_offset,
        })
    }

    /// The regions in list (file) order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Page size in bytes, the same for every region.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Bytes of guest RAM: the memory file's size.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Pages of guest RAM.
    pub fn total_pages(&self) -> u64 {
        self.total_bytes / self.page_size
    }

    /// The page index (in the memory file) holding host address `addr`, if any region holds
    /// it.
    pub fn locate(&self, addr: HostAddr) -> Option<u64> {
        let pos = self
            .by_host
            .partition_point(|&i| self.regions[i].host_base <= addr);
        let region = *self.by_host.get(pos.checked_sub(1)?)?;
        let r = &self.regions[region];
        if addr.0 >= r.host_end() {
            return None;
        }
        let file_offset = r.file_offset.0 + (addr.0 - r.host_base.0);
        Some(file_offset / self.page_size)
    }

    /// The host address of `page` and how many pages from it on are contiguous in host memory
    /// (up to the end of its region), or `None` for a page past the end.
    pub fn host_run(&self, page: u64) -> Option<(HostAddr, u64)> {
        let offset = page.checked_mul(self.page_size)?;
        let pos = self
            .regions
            .partition_point(|r| r.file_offset.0 <= offset)
            .checked_sub(1)?;
        let r = &self.regions[pos];
        let within = offset - r.file_offset.0;
        if within >= r.size_bytes {
            return None;
        }
        Some((
            HostAddr(r.host_base.0 + within),
            (r.size_bytes - within) / self.page_size,
        ))
    }

    /// Splits the page range `first..first+count` into host-contiguous pieces
    /// `(host address, first page, pages)`. Pages past the end are left out.
    pub fn host_pieces(&self, first: u64, count: u64) -> Vec<(HostAddr, u64, u64)> {
        let mut pieces = Vec::new();
        let (mut page, end) = (first, first.saturating_add(count));
        while page < end {
            let Some((addr, run)) = self.host_run(page) else {
                break;
            };
            let n = run.min(end - page);
            pieces.push((addr, page, n));
            page += n;
        }
        pieces
    }

    /// Page indices wholly or partly covered by host range `start..end`, split per region, as
    /// `(first page, pages)`. Partial pages at the edges are included.
    pub fn pages_in_host_range(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for &i in &self.by_host {
            let r = &self.regions[i];
            let lo = start.max(r.host_base.0);
            let hi = end.min(r.host_end());
            if lo >= hi {
                continue;
            }
            let first = (r.file_offset.0 + (lo - r.host_base.0)) / self.page_size;
            let last = (r.file_offset.0 + (hi - r.host_base.0)).div_ceil(self.page_size);
            out.push((first, last - first));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json(regions: &[(u64, u64, u64)]) -> String {
        let items: Vec<String> = regions
            .iter()
            .map(|(base, size, offset)| {
                format!(
                    r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":4096}}"#
                )
            })
            .collect();
        format!("[{}]", items.join(","))
    }

    #[test]
    fn test_accepts_firecracker_layout_in_any_host_order() {
        let l =
            Layout::from_json(json(&[(0x20000, 0x2000, 0), (0x10000, 0x3000, 0x2000)]).as_bytes())
                .unwrap();
        assert_eq!(l.total_pages(), 5);
        assert_eq!(l.locate(HostAddr(0x20fff)).unwrap(), 0);
        assert_eq!(l.locate(HostAddr(0x21000)).unwrap(), 1);
        assert_eq!(l.locate(HostAddr(0x10000)).unwrap(), 2);
        assert_eq!(l.locate(HostAddr(0x12fff)).unwrap(), 4);
        assert_eq!(l.locate(HostAddr(0x13000)), None);
        assert_eq!(l.locate(HostAddr(0x1f000)), None);
        assert_eq!(l.locate(HostAddr(0x0)), None);
        assert_eq!(l.host_run(1), Some((HostAddr(0x21000), 1)));
        assert_eq!(l.host_run(2), Some((HostAddr(0x10000), 3)));
        assert_eq!(l.host_run(5), None);
        assert_eq!(
            l.host_pieces(1, 3),
            vec![(HostAddr(0x21000), 1, 1), (HostAddr(0x10000), 2, 2)]
        );
    }

    #[test]
    fn test_accepts_deprecated_page_size_kib_in_bytes() {
        let l = Layout::from_json(
            br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096}]"#,
        )
        .unwrap();
        assert_eq!(l.page_size(), 4096);
    }

    #[test]
    fn test_rejects_broken_layouts() {
        type Check = fn(&LayoutError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            ("[]".into(), |e| matches!(e, LayoutError::Empty)),
            ("{".into(), |e| matches!(e, LayoutError::Json(_))),
            (json(&[(0x1000, 0x1001, 0)]), |e| matches!(e, LayoutError::Misaligned { .. })),
            (json(&[(0x1001, 0x1000, 0)]), |e| matches!(e, LayoutError::Misaligned { .. })),
            (json(&[(0x1000, 0, 0)]), |e| matches!(e, LayoutError::Misaligned { .. })),
            (json(&[(0x1000, 0x1000, 0x1000)]), |e| matches!(e, LayoutError::NotContiguous { .. })),
            (json(&[(0x1000, 0x2000, 0), (0x2000, 0x1000, 0x2000)]), |e| matches!(e, LayoutError::Overlap { a: 0, b: 1 })),
            (json(&[(u64::MAX - 0xfff, 0x2000, 0)]), |e| matches!(e, LayoutError::Overflow { .. })),
            (r#"[{"base_host_virt_addr":0,"size":4096,"offset":0}]"#.into(), |e| matches!(e, LayoutError::PageSizeMissing { .. })),
            (r#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]"#.into(), |e| matches!(e, LayoutError::PageSizeMissing { .. })),
            (r#"[{"base_host_virt_addr":0,"size":8192,"offset":0,"page_size":8192}]"#.into(), |e| matches!(e, LayoutError::UnsupportedPageSize { .. })),
            (r#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096,"bogus":1}]"#.into(), |e| matches!(e, LayoutError::Json(_))),
        ];
        for (text, check) in cases {
            let err = Layout::from_json(text.as_bytes()).unwrap_err();
            assert!(check(&err), "{text}: {err}");
        }
        let many = json(&vec![(0, 4096, 0); MAX_REGIONS + 1]);
        assert!(matches!(
            Layout::from_json(many.as_bytes()),
            Err(LayoutError::TooMany { .. })
        ));
    }

    #[test]
    fn test_pages_in_host_range_covers_partial_pages() {
        let l =
            Layout::from_json(json(&[(0x20000, 0x4000, 0), (0x10000, 0x3000, 0x4000)]).as_bytes())
                .unwrap();
        assert_eq!(l.pages_in_host_range(0x20800, 0x21800), vec![(0, 2)]);
        assert_eq!(l.pages_in_host_range(0x0, u64::MAX), vec![(4, 3), (0, 4)]);
        assert!(l.pages_in_host_range(0x30000, 0x40000).is_empty());
    }

    proptest! {
        #[test]
        fn prop_locate_inverts_host_run(sizes in proptest::collection::vec(1u64..8, 1..6), gap in 0u64..4) {
            let mut regions = Vec::new();
            let (mut base, mut offset) = (0x100_0000u64, 0);
            for s in &sizes {
                regions.push((base, s * 4096, offset));
                base += (s + gap) * 4096;
                offset += s * 4096;
            }
            regions.reverse();
            let mut off = 0;
            for r in regions.iter_mut() { r.2 = off; off += r.1; }
            let l = Layout::from_json(json(&regions).as_bytes()).unwrap();
            for page in 0..l.total_pages() {
                let (addr, run) = l.host_run(page).unwrap();
                prop_assert!(run >= 1);
                prop_assert_eq!(l.locate(addr).unwrap(), page);
            }
        }
    }
}
