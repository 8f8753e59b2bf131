//! Choosing the token backend: the kernel series' io_uring dmabuf
//! registered buffers where the running kernel has them, else the mapped
//! backend (O_DIRECT into the daemon's mapping of the buffer).
//!
//! The probe needs no dmabuf: it registers a one-slot sparse buffer table
//! and asks for an extended update of type dmabuf with `target_fd = -1`.
//! A kernel without the series rejects the flag (EINVAL); one with it gets
//! as far as looking up the target file (EBADF).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::Backend;
use crate::uapi;

const SYS_IO_URING_SETUP: libc::c_long = 425;
const SYS_IO_URING_REGISTER: libc::c_long = 427;
const IORING_REGISTER_BUFFERS2: libc::c_uint = 15;
const IORING_REGISTER_BUFFERS_UPDATE: libc::c_uint = 16;
const IORING_RSRC_REGISTER_SPARSE: u32 = 1;
/// v3 UAPI: flag in `io_uring_rsrc_update2.flags` (formerly `resv`).
const IORING_RSRC_UPDATE_EXTENDED: u32 = 1 << 1;
const IO_REGBUF_TYPE_DMABUF: u32 = 2;

#[repr(C)]
#[derive(Default)]
struct RsrcRegister {
    nr: u32,
    flags: u32,
    resv2: u64,
    data: u64,
    tags: u64,
}

#[repr(C)]
#[derive(Default)]
struct RsrcUpdate2 {
    offset: u32,
    flags: u32,
    data: u64,
    tags: u64,
    nr: u32,
    resv2: u32,
}

#[repr(C)]
#[derive(Default)]
struct RegbufDesc {
    kind: u32,
    flags: u32,
    size: u64,
    uaddr: u64,
    dmabuf_fd: i32,
    target_fd: i32,
    resv: [u64; 6],
}

/// What the running kernel offers for dmabuf registered buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSupport {
    /// The v3 UAPI answered as a patched kernel would.
    Present,
    /// Not there, with the reason.
    Absent(String),
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Probes the running kernel for the series' dmabuf registered buffers.
pub fn probe_kernel() -> KernelSupport {
    let mut params = [0u8; 120]; // struct io_uring_params
                                 // SAFETY: io_uring_setup(entries, params) writes into params only.
    let fd = unsafe { libc::syscall(SYS_IO_URING_SETUP, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return KernelSupport::Absent(format!("io_uring unavailable (errno {})", last_errno()));
    }
    // SAFETY: fd is a fresh io_uring fd we own.
    let ring = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let reg = RsrcRegister {
        nr: 1,
        flags: IORING_RSRC_REGISTER_SPARSE,
        ..Default::default()
    };
    // SAFETY: io_uring_register reads `reg` (size given) only.
    let r = unsafe {
        libc::syscall(
            SYS_IO_URING_REGISTER,
            ring.as_raw_fd(),
            IORING_REGISTER_BUFFERS2,
            &reg as *const RsrcRegister,
            size_of::<RsrcRegister>() as u32,
        )
    };
    if r < 0 {
        return KernelSupport::Absent(format!(
            "io_uring sparse buffer tables unavailable (errno {})",
            last_errno()
        ));
    }
    let desc = RegbufDesc {
        kind: IO_REGBUF_TYPE_DMABUF,
        dmabuf_fd: -1,
        target_fd: -1,
        ..Default::default()
    };
    let up = RsrcUpdate2 {
        flags: IORING_RSRC_UPDATE_EXTENDED,
        data: &desc as *const RegbufDesc as u64,
        nr: 1,
        ..Default::default()
    };
    // SAFETY: io_uring_register reads `up` and the one descriptor it
    // points at, both alive for the call.
    let r = unsafe {
        libc::syscall(
            SYS_IO_URING_REGISTER,
            ring.as_raw_fd(),
            IORING_REGISTER_BUFFERS_UPDATE,
            &up as *const RsrcUpdate2,
            size_of::<RsrcUpdate2>() as u32,
        )
    };
    match (r, last_errno()) {
        (r, _) if r >= 0 => KernelSupport::Absent("unexpected success of the probe".into()),
        (_, libc::EBADF) => KernelSupport::Present,
        (_, libc::EOPNOTSUPP) => {
            KernelSupport::Absent("kernel has the dmabuf UAPI but no DMABUF_TOKEN support".into())
        }
        (_, e) => KernelSupport::Absent(format!(
            "kernel lacks io_uring dmabuf registered buffers (probe: errno {e})"
        )),
    }
}

/// Picks the backend for a mount whose device fd is (or is not) O_DIRECT.
pub fn probe(device_direct: bool) -> Backend {
    let mapped = |reason: String| Backend {
        kind: uapi::BACKEND_MAPPED,
        reason,
    };
    match probe_kernel() {
        KernelSupport::Absent(why) => mapped(why),
        KernelSupport::Present if !device_direct => {
            mapped("device cannot do O_DIRECT, which the kernel backend needs".into())
        }
        // The io_uring READ_FIXED/WRITE_FIXED path is not wired up yet:
        // say so rather than pretend.
        KernelSupport::Present => {
            mapped("kernel backend detected but not driven by this build yet".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_answers_and_struct_sizes_match_v3() {
        assert_eq!(size_of::<RegbufDesc>(), 80);
        assert_eq!(size_of::<RsrcUpdate2>(), 32);
        assert_eq!(size_of::<RsrcRegister>(), 32);
        let b = probe(true);
        assert_eq!(b.kind, uapi::BACKEND_MAPPED);
        assert!(!b.reason.is_empty() && b.reason.len() < 88, "{}", b.reason);
        println!("token backend here: {}", b.reason);
    }
}
