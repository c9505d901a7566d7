//! A KVM virtual machine with one or more vCPUs over guest RAM mapped with vm-memory: create
//! it, boot the benchmark guest or restore saved vCPUs, run each vCPU report by report (on
//! a thread of its own: [`KvmVm::take_vcpus`]), and save their state.

use std::fs::File;

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::guest::{self, Counters, GuestParams};

const MSR_IA32_TSC: u32 = 0x10;
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// Paravirtual async page fault features (ASYNC_PF, ASYNC_PF_VMEXIT, ASYNC_PF_INT): hidden,
/// so a guest never expects the host to inject "page not present" events during postcopy.
const ASYNC_PF_BITS: u32 = (1 << 4) | (1 << 10) | (1 << 14);

/// Errors of the VM, each naming the step.
#[derive(Debug, Error)]
pub enum VmError {
    /// Opening /dev/kvm or creating the VM failed.
    #[error("failed to create the KVM VM")]
    Create(#[source] kvm_ioctls::Error),
    /// Mapping guest RAM failed.
    #[error("failed to map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// Registering guest RAM with KVM failed.
    #[error("failed to register guest RAM with KVM")]
    Memslot(#[source] kvm_ioctls::Error),
    /// Setting up the vCPU failed.
    #[error("failed to set up the vCPU ({step})")]
    Vcpu {
        /// Which ioctl.
        step: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Running the vCPU failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    /// The guest did something the VMM does not handle (a crash, a stray access).
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// Reading guest memory failed.
    #[error("failed to read guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// KVM_GET_DIRTY_LOG failed.
    #[error("failed to read KVM's dirty log")]
    DirtyLog(#[source] kvm_ioctls::Error),
    /// Reading guest RAM's file failed.
    #[error("failed to read guest RAM's file")]
    File(#[source] std::io::Error),
    /// The RAM size is unusable.
    #[error(transparent)]
    Guest(#[from] guest::GuestError),
}

/// What a vCPU needs to resume elsewhere.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// The guest's TSC when it was paused.
    pub tsc: u64,
    /// Guest RAM size, for a sanity check on restore.
    pub size_bytes: u64,
}

/// Why [`Vcpu::run_until_report`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunExit {
    /// The vCPU reported (its counters are in guest RAM: [`KvmVm::counters`]).
    Report,
    /// KVM_RUN was interrupted by a signal.
    Interrupted,
}

/// One vCPU: runs on whichever thread holds it.
pub struct Vcpu {
    fd: VcpuFd,
    index: u64,
    size_bytes: u64,
}

/// Reads KVM's log of the pages the guest wrote (slot 0, all of guest RAM).
pub struct DirtyLog {
    vm: std::sync::Arc<VmFd>,
    size_bytes: u64,
}

impl DirtyLog {
    /// The pages written since the previous call (bit `i % 8` of byte `i / 8` for page `i`);
    /// KVM clears its log as it is read.
    ///
    /// # Errors
    /// KVM_GET_DIRTY_LOG failed.
    pub fn take(&self) -> Result<Vec<u8>, VmError> {
        let words = self
            .vm
            .get_dirty_log(0, self.size_bytes as usize)
            .map_err(VmError::DirtyLog)?;
        let mut bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        bytes.truncate((self.size_bytes / 4096).div_ceil(8) as usize);
        Ok(bytes)
    }
}

/// The VM.
pub struct KvmVm {
    /// Taken out while threads run them ([`KvmVm::take_vcpus`]); dropped before the VM.
    vcpus: Vec<Vcpu>,
    vcpu_count: u64,
    _vm: std::sync::Arc<VmFd>,
    _kvm: Kvm,
    mem: GuestMemoryMmap,
    /// Guest RAM's file, read with pread for the counters: a page faultd has not placed yet
    /// reads as zero there, where the mapping would wait on a userfault.
    ram: File,
    size_bytes: u64,
    tsc_khz: u64,
}

impl KvmVm {
    /// Maps `file` (guest RAM, `size_bytes` long) shared and creates a VM with `vcpus` vCPUs
    /// over it. Nothing is written to guest RAM.
    ///
    /// # Errors
    /// Any creation step.
    pub fn create(file: File, size_bytes: u64, vcpus: u64) -> Result<Self, VmError> {
        Self::create_with(file, size_bytes, false, vcpus)
    }

    /// As [`KvmVm::create`]; with `dirty_log`, KVM records the pages the guest writes
    /// ([`KvmVm::dirty_log`]).
    ///
    /// # Errors
    /// Any creation step.
    pub fn create_with(
        file: File,
        size_bytes: u64,
        dirty_log: bool,
        vcpus: u64,
    ) -> Result<Self, VmError> {
        guest::check_size(size_bytes)?;
        if !(1..=guest::MAX_VCPUS).contains(&vcpus) {
            return Err(guest::GuestError::BadVcpus(vcpus).into());
        }
        let ram = file.try_clone().map_err(VmError::File)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            size_bytes as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(VmError::Map)?;
        let kvm = Kvm::new().map_err(VmError::Create)?;
        let vm = kvm.create_vm().map_err(VmError::Create)?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .expect("guest address 0 is mapped");
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: size_bytes,
            userspace_addr: host as u64,
            flags: if dirty_log {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the region is our mapping of guest RAM, which lives as long as `mem` in
        // this struct, which outlives the VM fd (fields drop in order, `_vm` first).
        unsafe { vm.set_user_memory_region(region) }.map_err(VmError::Memslot)?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Vcpu {
                step: "cpuid",
                source,
            })?;
        for entry in cpuid.as_mut_slice() {
            if entry.function == KVM_CPUID_FEATURES {
                entry.eax &= !ASYNC_PF_BITS;
            }
        }
        let mut fds = Vec::new();
        for index in 0..vcpus {
            let fd = vm.create_vcpu(index).map_err(|source| VmError::Vcpu {
                step: "create",
                source,
            })?;
            fd.set_cpuid2(&cpuid).map_err(|source| VmError::Vcpu {
                step: "set cpuid",
                source,
            })?;
            fds.push(Vcpu {
                fd,
                index,
                size_bytes,
            });
        }
        let tsc_khz = fds[0].fd.get_tsc_khz().map(u64::from).unwrap_or(2_000_000);
        Ok(KvmVm {
            vcpus: fds,
            vcpu_count: vcpus,
            _vm: std::sync::Arc::new(vm),
            _kvm: kvm,
            mem,
            ram,
            size_bytes,
            tsc_khz,
        })
    }

    /// vCPUs of the VM.
    pub fn vcpu_count(&self) -> u64 {
        self.vcpu_count
    }

    /// Takes the vCPUs out, each to run on a thread of its own (index order); guest memory
    /// stays readable through the VM meanwhile. Every taken vCPU must have stopped running
    /// before the VM drops (its guest RAM mapping goes with it).
    pub fn take_vcpus(&mut self) -> Vec<Vcpu> {
        std::mem::take(&mut self.vcpus)
    }

    /// The pages the guest writes, readable from another thread while the vCPU runs (the VM
    /// must have been created with `dirty_log`).
    pub fn dirty_log(&self) -> DirtyLog {
        DirtyLog {
            vm: self._vm.clone(),
            size_bytes: self.size_bytes,
        }
    }

    /// Guest TSC ticks per microsecond.
    pub fn tsc_per_us(&self) -> f64 {
        self.tsc_khz as f64 / 1000.0
    }

    /// Host address of guest-physical 0.
    pub fn host_base(&self) -> u64 {
        self.mem
            .get_host_address(GuestAddress(0))
            .expect("guest address 0 is mapped") as u64
    }

    /// Writes the guest's system area and points every vCPU at its entry, in ring 3 of long
    /// mode, with its own stack and block (`rbx`).
    ///
    /// # Errors
    /// Memory or vCPU setup failures.
    pub fn boot(&mut self, params: &GuestParams) -> Result<(), VmError> {
        let params = GuestParams {
            vcpus: self.vcpu_count,
            ..*params
        };
        let mut area = vec![0u8; guest::DATA_START_GPA as usize];
        guest::write_system_area(&mut area, &params);
        self.mem
            .write_slice(&area, GuestAddress(0))
            .map_err(VmError::Memory)?;
        for vcpu in &mut self.vcpus {
            vcpu.boot()?;
        }
        Ok(())
    }
}

impl Vcpu {
    fn boot(&mut self) -> Result<(), VmError> {
        let mut sregs = self.fd.get_sregs().map_err(|source| VmError::Vcpu {
            step: "get sregs",
            source,
        })?;
        sregs.cr3 = guest::CR3;
        sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
        sregs.cr0 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE
        sregs.efer = 0x500; // LME, LMA
        (sregs.gdt.base, sregs.gdt.limit) = guest::GDT_BASE_LIMIT;
        let segment = |selector: u16, type_: u8, code: bool| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 3,
            db: u8::from(!code),
            s: 1,
            l: u8::from(code),
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = segment(guest::USER_CS, 0xb, true);
        let data = segment(guest::USER_DS, 0x3, false);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        self.fd.set_sregs(&sregs).map_err(|source| VmError::Vcpu {
            step: "set sregs",
            source,
        })?;
        let regs = kvm_regs {
            rip: guest::CODE_GPA,
            rsp: guest::stack_top(self.index),
            rbx: guest::vcpu_block(self.index),
            rflags: 0x2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(|source| VmError::Vcpu {
            step: "set regs",
            source,
        })
    }

    /// Saves what the vCPU needs to resume elsewhere.
    ///
    /// # Errors
    /// vCPU ioctl failures.
    pub fn save(&self) -> Result<VcpuState, VmError> {
        let regs = self.fd.get_regs().map_err(|source| VmError::Vcpu {
            step: "get regs",
            source,
        })?;
        let sregs = self.fd.get_sregs().map_err(|source| VmError::Vcpu {
            step: "get sregs",
            source,
        })?;
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }])
        .expect("one MSR fits");
        self.fd
            .get_msrs(&mut msrs)
            .map_err(|source| VmError::Vcpu {
                step: "get tsc",
                source,
            })?;
        Ok(VcpuState {
            regs,
            sregs,
            tsc: msrs.as_slice()[0].data,
            size_bytes: self.size_bytes,
        })
    }

    /// Restores a saved vCPU (registers, special registers, TSC).
    ///
    /// # Errors
    /// A state for another RAM size, or vCPU ioctl failures.
    pub fn restore(&mut self, state: &VcpuState) -> Result<(), VmError> {
        if state.size_bytes != self.size_bytes {
            return Err(VmError::UnexpectedExit(format!(
                "saved state is for {} bytes of RAM, this VM has {}",
                state.size_bytes, self.size_bytes
            )));
        }
        self.fd
            .set_sregs(&state.sregs)
            .map_err(|source| VmError::Vcpu {
                step: "set sregs",
                source,
            })?;
        self.fd
            .set_regs(&state.regs)
            .map_err(|source| VmError::Vcpu {
                step: "set regs",
                source,
            })?;
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            data: state.tsc,
            ..Default::default()
        }])
        .expect("one MSR fits");
        self.fd.set_msrs(&msrs).map_err(|source| VmError::Vcpu {
            step: "set tsc",
            source,
        })?;
        Ok(())
    }

    /// Runs the vCPU until the guest reports (or a signal interrupts it).
    ///
    /// # Errors
    /// KVM failures and exits the guest should never cause.
    pub fn run_until_report(&mut self) -> Result<RunExit, VmError> {
        let report = guest::report_gpa(self.size_bytes);
        loop {
            match self.fd.run() {
                Ok(VcpuExit::MmioWrite(addr, _)) if addr == report => {
                    return Ok(RunExit::Report);
                }
                Ok(VcpuExit::Intr) => return Ok(RunExit::Interrupted),
                Ok(other) => {
                    return Err(VmError::UnexpectedExit(format!(
                        "vCPU {}: {other:?}",
                        self.index
                    )));
                }
                Err(e) if e.errno() == libc::EINTR => return Ok(RunExit::Interrupted),
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(VmError::Run(e)),
            }
        }
    }
}

impl KvmVm {
    /// Every vCPU's counters block, in vCPU order, read from the RAM file (on a destination
    /// a block faultd has not placed yet reads as zero; the mapping would wait for it, for
    /// ever if faultd died).
    ///
    /// # Errors
    /// A failed read of the RAM file.
    pub fn vcpu_counters(&self) -> Result<Vec<Counters>, VmError> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; Counters::BYTES];
        (0..self.vcpu_count)
            .map(|i| {
                self.ram
                    .read_exact_at(&mut buf, guest::vcpu_block(i) + guest::COUNTERS_GPA)
                    .map_err(VmError::File)?;
                Ok(Counters::from_bytes(&buf))
            })
            .collect()
    }
}

/// The guest's counters: every vCPU's added up ([`Counters::merge`]), and each one's
/// touches.
pub fn total_counters(per_vcpu: &[Counters]) -> (Counters, Vec<u64>) {
    let mut total = per_vcpu[0];
    for c in &per_vcpu[1..] {
        total.merge(c);
    }
    (total, per_vcpu.iter().map(|c| c.touches).collect())
}

impl KvmVm {
    /// Every vCPU's counters added up, and each vCPU's touches.
    ///
    /// # Errors
    /// A failed read of guest memory.
    pub fn counters(&self) -> Result<(Counters, Vec<u64>), VmError> {
        Ok(total_counters(&self.vcpu_counters()?))
    }
}
