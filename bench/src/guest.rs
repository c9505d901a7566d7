//! The benchmark guest's physical layout, its boot-time tables, and its counters.
//!
//! ```text
//!  guest-physical
//!  0x0000   GDT (null, code64/data ring 0, code64/data ring 3)
//!  0x0100   parameters (written by the VMM at boot)
//!  0x0200   counters (written by the guest before each report)
//!  0x1000   PML4        0x2000 PDPT      0x10000.. one PD per GiB (2 MiB user pages)
//!  0x60000  guest code (bench/guest/guest.S)
//!  0x100000 + (i-1) * 0x1000   vCPU i's parameters (+0x100) and counters (+0x200), i ≥ 1
//!           (vCPU 0's are the ones at 0x100 and 0x200)
//!  0x1ff000 - i * 0x2000       vCPU i's ring-3 stack top
//!  2 MiB .. size            data pages the guest patterns, verifies and rewrites
//!  size rounded up to 2 MiB the report page: mapped by the page tables, no memslot → MMIO exit
//! ```
//!
//! Everything runs in ring 3 of 64-bit long mode, entered directly through the vCPU's
//! special registers: no real-mode or ring-0 code, which kvm-pvm would have to emulate.

use serde::Serialize;
use thiserror::Error;

/// The assembled guest program.
pub const GUEST_CODE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));

/// Guest-physical address of the code.
pub const CODE_GPA: u64 = 0x60000;
/// First data page's address: everything below is the system area.
pub const DATA_START_GPA: u64 = 2 << 20;
const GDT_GPA: u64 = 0x0;
const PARAMS_GPA: u64 = 0x100;
/// Guest-physical address of the counters block.
pub const COUNTERS_GPA: u64 = 0x200;
const PML4_GPA: u64 = 0x1000;
const PDPT_GPA: u64 = 0x2000;
const PD_GPA: u64 = 0x10000;
const MAX_PDS: u64 = (CODE_GPA - PD_GPA) / 0x1000;
const STACK_TOP_GPA: u64 = 0x1ff000;
const HUGE_2M: u64 = 2 << 20;
/// Page-table entry bits: present, writable, user.
const PTE_PWU: u64 = 0b111;
const PTE_HUGE: u64 = 1 << 7;

/// GDT entries: null, ring-0 code64, ring-0 data, ring-3 code64, ring-3 data.
pub const GDT: [u64; 5] = [
    0,
    0x0020_9A00_0000_0000,
    0x0000_9200_0000_0000,
    0x0020_FA00_0000_0000,
    0x0000_F200_0000_0000,
];
/// Ring-3 code selector (GDT index 3, RPL 3).
pub const USER_CS: u16 = 0x1b;
/// Ring-3 data selector (GDT index 4, RPL 3).
pub const USER_DS: u16 = 0x23;
/// GDT base and limit for the special registers.
pub const GDT_BASE_LIMIT: (u64, u16) = (GDT_GPA, (GDT.len() * 8 - 1) as u16);
/// Page-table root for CR3.
pub const CR3: u64 = PML4_GPA;
/// Most vCPUs the guest layout has room for.
pub const MAX_VCPUS: u64 = 64;
const VCPU_BLOCKS_GPA: u64 = 0x100000;
const VCPU_STACK_BYTES: u64 = 0x2000;

/// Guest-physical base of vCPU `i`'s block: its parameters at +0x100, counters at +0x200
/// (the guest's `rbx`).
pub fn vcpu_block(i: u64) -> u64 {
    if i == 0 {
        0
    } else {
        VCPU_BLOCKS_GPA + (i - 1) * 0x1000
    }
}

/// vCPU `i`'s initial stack pointer.
pub fn stack_top(i: u64) -> u64 {
    STACK_TOP_GPA - i * VCPU_STACK_BYTES
}

const _: () = assert!(
    VCPU_BLOCKS_GPA + (MAX_VCPUS - 1) * 0x1000 <= STACK_TOP_GPA - MAX_VCPUS * VCPU_STACK_BYTES
);
const _: () = assert!(CODE_GPA + 0x10000 <= VCPU_BLOCKS_GPA, "room for the code");

/// The page size backing a destination guest's RAM (`--page-size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum PageSize {
    /// 4 KiB pages (a shmem memfd).
    #[value(name = "4k")]
    #[serde(rename = "4k")]
    Small,
    /// 2 MiB pages (a hugetlbfs memfd).
    #[value(name = "2m")]
    #[serde(rename = "2m")]
    Huge,
}

impl PageSize {
    /// Bytes per page.
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Small => 4096,
            PageSize::Huge => HUGE_2M,
        }
    }
}

/// Access pattern of the guest's touch loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Uniformly random pages.
    Random,
    /// Pages in order, wrapping around.
    Seq,
    /// 80% of touches to the first 10% of pages.
    Hot,
}

/// What the guest is told at boot.
#[derive(Debug, Clone, Copy)]
pub struct GuestParams {
    /// Guest RAM in bytes.
    pub size_bytes: u64,
    /// Pattern seed.
    pub seed: u64,
    /// Access pattern.
    pub workload: Workload,
    /// Rewrite one touched page in 2^write_shift (unless `write_interval_tsc` paces writes).
    pub write_shift: u64,
    /// If not 0: rewrite the touched page once this many TSC ticks passed since the last
    /// write (a dirty rate independent of the touch rate).
    pub write_interval_tsc: u64,
    /// Percent of the data pages the fill leaves free (old bytes, never touched, named in
    /// the free bitmap; see [`free_map`]).
    pub free_pct: u64,
    /// TSC ticks between reports.
    pub report_interval_tsc: u64,
    /// A touch at least this many TSC ticks long counts as a stall.
    pub stall_tsc: u64,
    /// vCPUs: each patterns, verifies and rewrites its own share of the data pages.
    pub vcpus: u64,
}

/// Layout errors.
#[derive(Debug, Error)]
pub enum GuestError {
    /// The RAM size is unusable.
    #[error(
        "guest RAM of {size_bytes} bytes must be a multiple of 2 MiB, at least 4 MiB and below {max_gib} GiB"
    )]
    BadSize {
        /// Requested size.
        size_bytes: u64,
        /// Largest supported size in GiB.
        max_gib: u64,
    },
    /// An unusable vCPU count.
    #[error("{0} vCPUs: the guest runs 1 to {MAX_VCPUS}, without free pages when more than one")]
    BadVcpus(u64),
}

/// Checks a vCPU count (free pages, indexed from the first data page, need one vCPU).
///
/// # Errors
/// [`GuestError::BadVcpus`].
pub fn check_vcpus(vcpus: u64, free_pct: u64) -> Result<(), GuestError> {
    if !(1..=MAX_VCPUS).contains(&vcpus) || (vcpus > 1 && free_pct > 0) {
        return Err(GuestError::BadVcpus(vcpus));
    }
    Ok(())
}

/// The address whose write is a report (the first 2 MiB page past RAM).
pub fn report_gpa(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(HUGE_2M) * HUGE_2M
}

/// Checks a RAM size.
///
/// # Errors
/// [`GuestError::BadSize`].
pub fn check_size(size_bytes: u64) -> Result<(), GuestError> {
    let max_bytes = MAX_PDS << 30;
    if !size_bytes.is_multiple_of(HUGE_2M)
        || size_bytes < 2 * HUGE_2M
        || size_bytes + HUGE_2M > max_bytes
    {
        return Err(GuestError::BadSize {
            size_bytes,
            max_gib: MAX_PDS,
        });
    }
    Ok(())
}

/// Where the guest keeps its free bitmap: one bit per data page (bit `i % 8` of byte `i / 8`
/// for data page `i`, the page at `DATA_START_GPA + i * 4096`), in the pages past the data
/// pages (RAM is shortened by them when pages may be free).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeMap {
    /// Guest-physical address of the bitmap (0: no page is ever free).
    pub gpa: u64,
    /// Data pages the guest fills and touches.
    pub data_pages: u64,
}

/// The free bitmap's place for a guest of `size_bytes` with `free_pct` % free.
pub fn free_map(size_bytes: u64, free_pct: u64) -> FreeMap {
    let pages = (size_bytes - DATA_START_GPA) >> 12;
    if free_pct == 0 {
        return FreeMap {
            gpa: 0,
            data_pages: pages,
        };
    }
    let map_pages = pages.div_ceil(8 * 4096);
    FreeMap {
        gpa: DATA_START_GPA + ((pages - map_pages) << 12),
        data_pages: pages - map_pages,
    }
}

/// The guest's free pages as a bitmap of its RAM in 4 KiB pages (bit `i % 8` of byte `i / 8`
/// for page `i`: what pagesrv takes as hints), read from the guest's own free bitmap in
/// `ram` (the guest RAM file).
///
/// # Errors
/// Reading the file failed.
pub fn free_page_bitmap(
    ram: &std::fs::File,
    size_bytes: u64,
    free_pct: u64,
) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let pages = size_bytes / 4096;
    let mut out = vec![0u8; pages.div_ceil(8) as usize];
    let map = free_map(size_bytes, free_pct);
    if map.gpa == 0 {
        return Ok(out);
    }
    let mut guest_bits = vec![0u8; map.data_pages.div_ceil(8) as usize];
    ram.read_exact_at(&mut guest_bits, map.gpa)?;
    let first = DATA_START_GPA / 4096;
    common::pagemap::PageMap::bitmap_runs(0, &guest_bits, |i, n| {
        for page in first + i..first + (i + n).min(map.data_pages) {
            out[(page / 8) as usize] |= 1 << (page % 8);
        }
    });
    Ok(out)
}

/// Writes the system area (GDT, page tables, parameters, code) into `ram` (guest-physical
/// address 0 at `ram[0]`).
pub fn write_system_area(ram: &mut [u8], p: &GuestParams) {
    let mut put = |gpa: u64, value: u64| {
        ram[gpa as usize..gpa as usize + 8].copy_from_slice(&value.to_le_bytes());
    };
    for (i, d) in GDT.iter().enumerate() {
        put(GDT_GPA + 8 * i as u64, *d);
    }
    // Identity map RAM plus the report page with 2 MiB user pages.
    let mapped = report_gpa(p.size_bytes) + HUGE_2M;
    let pds = mapped.div_ceil(1 << 30);
    put(PML4_GPA, PDPT_GPA | PTE_PWU);
    for pd in 0..pds {
        put(PDPT_GPA + 8 * pd, (PD_GPA + pd * 0x1000) | PTE_PWU);
    }
    for page in 0..mapped / HUGE_2M {
        put(PD_GPA + 8 * page, (page * HUGE_2M) | PTE_PWU | PTE_HUGE);
    }
    let map = free_map(p.size_bytes, p.free_pct);
    let vcpus = p.vcpus.max(1);
    let share = map.data_pages / vcpus;
    for i in 0..vcpus {
        // vCPU i's own pages; the last takes what the division leaves.
        let first = (DATA_START_GPA >> 12) + i * share;
        let pages = if i + 1 == vcpus {
            map.data_pages - i * share
        } else {
            share
        };
        let params = [
            first,
            pages,
            p.seed,
            match p.workload {
                Workload::Random => 0,
                Workload::Seq => 1,
                Workload::Hot => 2,
            },
            p.report_interval_tsc,
            report_gpa(p.size_bytes),
            p.write_shift,
            p.stall_tsc,
            1, // fill before touching
            p.write_interval_tsc,
            p.free_pct,
            map.gpa,
        ];
        for (j, v) in params.iter().enumerate() {
            put(vcpu_block(i) + PARAMS_GPA + 8 * j as u64, *v);
        }
    }
    let code = CODE_GPA as usize;
    ram[code..code + GUEST_CODE.len()].copy_from_slice(GUEST_CODE);
}

/// The guest's counters, as it stores them before each report.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Counters {
    /// 0 while filling, 1 while touching.
    pub phase: u64,
    /// Pages touched (each verified).
    pub touches: u64,
    /// Pages verified.
    pub pages_verified: u64,
    /// Pages that did not match their pattern.
    pub mismatches: u64,
    /// Longest touch, in TSC ticks.
    pub max_stall_tsc: u64,
    /// Sum of touches at least the stall threshold long, in TSC ticks.
    pub stall_tsc_sum: u64,
    /// Touches at least the stall threshold long.
    pub stalls: u64,
    /// The guest's TSC at the report.
    pub tsc: u64,
    /// Sum of all touch times, in TSC ticks.
    pub touch_tsc_sum: u64,
    /// Pages filled so far.
    pub filled: u64,
    /// Last page that failed verification.
    pub bad_page: u64,
    /// Longest touch since the previous report, in TSC ticks.
    pub window_max_tsc: u64,
    /// Touches by log2 of their TSC ticks.
    #[serde(skip)]
    pub hist: [u64; 64],
}

impl Counters {
    /// Bytes of the counters block to read.
    pub const BYTES: usize = 0x100 + 64 * 8;

    /// Adds another vCPU's counters: sums, maxima, the earliest phase; `tsc` stays ours.
    pub fn merge(&mut self, other: &Counters) {
        self.phase = self.phase.min(other.phase);
        self.touches += other.touches;
        self.pages_verified += other.pages_verified;
        self.mismatches += other.mismatches;
        self.max_stall_tsc = self.max_stall_tsc.max(other.max_stall_tsc);
        self.stall_tsc_sum += other.stall_tsc_sum;
        self.stalls += other.stalls;
        self.touch_tsc_sum += other.touch_tsc_sum;
        self.filled += other.filled;
        if other.mismatches > 0 {
            self.bad_page = other.bad_page;
        }
        self.window_max_tsc = self.window_max_tsc.max(other.window_max_tsc);
        for (h, o) in self.hist.iter_mut().zip(&other.hist) {
            *h += o;
        }
    }

    /// Decodes the counters block.
    pub fn from_bytes(b: &[u8]) -> Self {
        let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let mut hist = [0u64; 64];
        for (i, h) in hist.iter_mut().enumerate() {
            *h = word(32 + i);
        }
        Counters {
            phase: word(0),
            touches: word(1),
            pages_verified: word(2),
            mismatches: word(3),
            max_stall_tsc: word(4),
            stall_tsc_sum: word(5),
            stalls: word(6),
            tsc: word(7),
            touch_tsc_sum: word(8),
            filled: word(9),
            bad_page: word(10),
            window_max_tsc: word(11),
            hist,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_sizes_and_report_page() {
        assert!(check_size(64 << 20).is_ok());
        assert!(check_size(4 << 30).is_ok());
        assert!(check_size(3 << 20).is_err());
        assert!(check_size(2 << 20).is_err());
        assert!(check_size(80 << 30).is_err());
        assert!(check_size(64 << 30).is_ok());
        assert_eq!(report_gpa(64 << 20), 64 << 20);
    }

    #[test]
    fn test_free_map_sits_past_the_data_pages() {
        let size = 1u64 << 30;
        let pages = (size - DATA_START_GPA) >> 12;
        assert_eq!(
            free_map(size, 0),
            FreeMap {
                gpa: 0,
                data_pages: pages
            }
        );
        let m = free_map(size, 75);
        let map_pages = pages.div_ceil(8 * 4096);
        assert_eq!(m.data_pages + map_pages, pages);
        assert!(
            m.data_pages.div_ceil(8) <= map_pages * 4096,
            "one bit per data page fits"
        );
        assert_eq!(m.gpa, DATA_START_GPA + (m.data_pages << 12));
        assert!(m.gpa + (map_pages << 12) <= size);
    }

    #[test]
    fn test_system_area_maps_ram_and_report_page_as_user_pages() {
        let size = 6u64 << 30;
        let mut ram = vec![0u8; DATA_START_GPA as usize];
        let p = GuestParams {
            size_bytes: size,
            seed: 1,
            workload: Workload::Hot,
            write_shift: 4,
            write_interval_tsc: 7,
            free_pct: 0,
            report_interval_tsc: 100,
            stall_tsc: 10,
            vcpus: 1,
        };
        write_system_area(&mut ram, &p);
        let get =
            |gpa: u64| u64::from_le_bytes(ram[gpa as usize..gpa as usize + 8].try_into().unwrap());
        assert_eq!(get(PML4_GPA), PDPT_GPA | 7);
        // 6 GiB of RAM + the report page need 7 page directories.
        assert_eq!(get(PDPT_GPA + 8 * 6), (PD_GPA + 6 * 0x1000) | 7);
        assert_eq!(get(PDPT_GPA + 8 * 7), 0);
        let last = report_gpa(size) / HUGE_2M;
        assert_eq!(get(PD_GPA + 8 * last), (last * HUGE_2M) | 0x87);
        assert_eq!(get(PARAMS_GPA + 8), (size - DATA_START_GPA) >> 12);
        assert_eq!(get(PARAMS_GPA + 0x58), 0, "no free map without free pages");
        assert_eq!(get(PARAMS_GPA + 0x48), 7, "the write interval");
        assert_eq!(&ram[CODE_GPA as usize..][..GUEST_CODE.len()], GUEST_CODE);
        // Two vCPUs: the data pages split in two ranges, each in its vCPU's block.
        let two = GuestParams { vcpus: 2, ..p };
        write_system_area(&mut ram, &two);
        let get =
            |gpa: u64| u64::from_le_bytes(ram[gpa as usize..gpa as usize + 8].try_into().unwrap());
        let pages = (size - DATA_START_GPA) >> 12;
        let (b0, b1) = (vcpu_block(0) + PARAMS_GPA, vcpu_block(1) + PARAMS_GPA);
        assert_eq!((get(b0), get(b0 + 8)), (DATA_START_GPA >> 12, pages / 2));
        assert_eq!(get(b1), (DATA_START_GPA >> 12) + pages / 2);
        assert_eq!(get(b0 + 8) + get(b1 + 8), pages);
        assert_eq!(get(b1 + 0x10), 1, "the same seed");
        assert!(GUEST_CODE.len() < 0x10000);
        assert!(check_vcpus(2, 0).is_ok() && check_vcpus(2, 10).is_err());
        assert!(check_vcpus(0, 0).is_err() && check_vcpus(MAX_VCPUS + 1, 0).is_err());
    }
}
