//! The benchmark's KVM guest and VMM, shared by the `vmm` and `bench` binaries.
#![deny(missing_docs)]

pub mod guest;
pub mod kvm_vm;
