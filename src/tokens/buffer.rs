//! Caller buffers: taking the caller's fd, telling a dmabuf from a memfd,
//! and mapping it into the daemon once, at REGISTER.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use log::warn;

use super::TokenError;

/// `DMA_BUF_MAGIC` from linux/magic.h: the fs type of a dmabuf fd.
const DMA_BUF_MAGIC: i64 = 0x444d_4142;
/// `PIDFD_THREAD` (= O_EXCL): the pid names a thread, Linux 6.9+.
const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;
/// `DMA_BUF_IOCTL_SYNC` = _IOW('b', 0, struct dma_buf_sync { u64 flags }).
const DMA_BUF_IOCTL_SYNC: libc::c_ulong = 0x4008_6200;
const DMA_BUF_SYNC_READ: u64 = 1;
const DMA_BUF_SYNC_WRITE: u64 = 2;
const DMA_BUF_SYNC_END: u64 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufKind {
    Memfd,
    Dmabuf,
}

/// A caller's buffer mapped into the daemon; unmapped and closed on drop
/// (after the last in-flight I/O lets go of it).
pub struct MappedBuffer {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    pub kind: BufKind,
    pub writable: bool,
}

// SAFETY: the mapping is shared memory owned by this struct for its whole
// life; concurrent I/O touches it only through bounds-checked IoBuffers.
unsafe impl Send for MappedBuffer {}
// SAFETY: as above.
unsafe impl Sync for MappedBuffer {}

impl MappedBuffer {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Brackets CPU access to a dmabuf (a no-op for memfds). `device_read`
    /// means data flows from the device into the buffer.
    pub fn sync(&self, device_read: bool, end: bool) {
        if self.kind != BufKind::Dmabuf {
            return;
        }
        let mut flags = if device_read {
            DMA_BUF_SYNC_WRITE
        } else {
            DMA_BUF_SYNC_READ
        };
        if end {
            flags |= DMA_BUF_SYNC_END;
        }
        // SAFETY: DMA_BUF_IOCTL_SYNC reads one u64 from the pointer.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), DMA_BUF_IOCTL_SYNC, &flags) };
        if r != 0 {
            warn!(
                "DMA_BUF_IOCTL_SYNC failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

impl Drop for MappedBuffer {
    fn drop(&mut self) {
        // SAFETY: ptr/len is the mapping made in map(); nothing else
        // refers to it once the last Arc is gone.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Duplicates fd `fd` of thread `tid` into this process.
pub fn take_fd(tid: u32, fd: i32) -> Result<OwnedFd, TokenError> {
    if tid == 0 {
        warn!("REGISTER from a process in a pid namespace the daemon cannot see");
        return Err(TokenError::Permission);
    }
    if fd < 0 {
        return Err(TokenError::BadFile);
    }
    let pidfd = open_pidfd(tid)?;
    // SAFETY: pidfd_getfd(pidfd, targetfd, flags) returns a new fd or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(match errno() {
            libc::EBADF => TokenError::BadFile,
            e => {
                warn!("pidfd_getfd of fd {fd} of thread {tid}: errno {e}");
                TokenError::Permission
            }
        });
    }
    // SAFETY: r is a fresh fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// A pidfd for the caller: the thread itself (PIDFD_THREAD, 6.9+), or its
/// thread group found in /proc on older kernels.
fn open_pidfd(tid: u32) -> Result<OwnedFd, TokenError> {
    let open = |pid: u32, flags: libc::c_uint| {
        // SAFETY: pidfd_open(pid, flags) returns a new fd or -1.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, flags) };
        // SAFETY: r is a fresh fd that we own.
        (r >= 0).then(|| unsafe { OwnedFd::from_raw_fd(r as i32) })
    };
    if let Some(fd) = open(tid, PIDFD_THREAD) {
        return Ok(fd);
    }
    let tgid = std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
        })
        .ok_or(TokenError::Permission)?;
    open(tgid, 0).ok_or(TokenError::Permission)
}

/// Size in bytes of a buffer fd.
fn buffer_size(fd: &OwnedFd) -> Result<u64, TokenError> {
    // SAFETY: lseek on an fd we own.
    let end = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(TokenError::Invalid("buffer size unknown"));
    }
    Ok(end as u64)
}

/// Identifies the buffer and maps all of it.
pub fn map(fd: OwnedFd) -> Result<MappedBuffer, TokenError> {
    let kind = classify(&fd)?;
    let size = buffer_size(&fd)?;
    if size == 0 || size % 4096 != 0 {
        return Err(TokenError::Invalid(
            "buffer size is not a nonzero multiple of 4096",
        ));
    }
    let len = usize::try_from(size).map_err(|_| TokenError::Invalid("buffer too large"))?;
    let try_map = |prot| {
        // SAFETY: mapping a whole fd we own; the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        (p != libc::MAP_FAILED).then_some(p)
    };
    let (p, writable) = match try_map(libc::PROT_READ | libc::PROT_WRITE) {
        Some(p) => (p, true),
        // A write-sealed memfd maps read-only: WRITE works, READ does not.
        None => match try_map(libc::PROT_READ) {
            Some(p) => (p, false),
            None => {
                warn!(
                    "cannot map {kind:?} buffer: {}",
                    std::io::Error::last_os_error()
                );
                return Err(match kind {
                    BufKind::Dmabuf => TokenError::NotSupported,
                    BufKind::Memfd => TokenError::Invalid("buffer cannot be mapped"),
                });
            }
        },
    };
    Ok(MappedBuffer {
        fd,
        ptr: NonNull::new(p.cast()).expect("mmap returned null"),
        len,
        kind,
        writable,
    })
}

fn classify(fd: &OwnedFd) -> Result<BufKind, TokenError> {
    let mut sfs = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs fills the struct for an fd we own.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), sfs.as_mut_ptr()) } == 0 {
        // SAFETY: fstatfs succeeded and initialised it.
        let sfs = unsafe { sfs.assume_init() };
        // f_type's width differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        if sfs.f_type as i64 == DMA_BUF_MAGIC {
            return Ok(BufKind::Dmabuf);
        }
    }
    // Only memfds (shmem/hugetlbfs with sealing) answer F_GET_SEALS.
    // SAFETY: fcntl F_GET_SEALS on an fd we own.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(TokenError::Invalid(
            "buf_fd is neither a dmabuf nor a memfd",
        ));
    }
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err(TokenError::Invalid(
            "memfd is not sealed with F_SEAL_SHRINK",
        ));
    }
    Ok(BufKind::Memfd)
}
