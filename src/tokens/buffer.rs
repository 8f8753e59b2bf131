//! Caller buffers: taking the caller's fd (and checking the caller is
//! still the process that asked), telling a dmabuf from a memfd, and
//! mapping it into the daemon: a memfd at REGISTER, a dmabuf only once
//! something needs the CPU on it (the kernel backend moves it without;
//! GPU memory often cannot be mapped at all).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::OnceLock;

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

/// Test-only switch: the daemon treats every dmabuf as one the CPU cannot
/// map (as most GPU VRAM exports), to test that path without a GPU.
const UNMAPPABLE_ENV: &str = "DMABUF_FS_TEST_UNMAPPABLE_DMABUFS";
/// Test-only switch: REGISTER takes memfds without `F_SEAL_SHRINK`, so a
/// test can truncate one under a running transfer and prove that a fault
/// on caller memory fails that op, not the daemon.
const ALLOW_UNSEALED_ENV: &str = "DMABUF_FS_TEST_ALLOW_UNSEALED";

/// A caller's buffer: its fd, and the daemon's mapping of it once made;
/// unmapped and closed on drop (after the last in-flight I/O lets go).
pub struct MappedBuffer {
    fd: OwnedFd,
    len: usize,
    pub kind: BufKind,
    /// Whether data may be read into it (a write-sealed memfd may not).
    pub writable: bool,
    /// Made on first need; None inside when the buffer cannot be mapped.
    mapping: OnceLock<Option<Mapping>>,
}

/// A shared mapping of a whole buffer.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is shared memory owned by this struct for its whole
// life; concurrent I/O touches it only through bounds-checked IoBuffers.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len is a mapping made by map_fd(); nothing refers
        // to it once its buffer is dropped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl MappedBuffer {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The address of the daemon's mapping, mapping it now if it is not
    /// yet; None when the buffer cannot be mapped.
    pub(super) fn ptr(&self) -> Option<NonNull<u8>> {
        self.mapping
            .get_or_init(|| {
                let unmappable = self.kind == BufKind::Dmabuf
                    && std::env::var_os(UNMAPPABLE_ENV).is_some_and(|v| v == "1");
                if unmappable {
                    warn!("{UNMAPPABLE_ENV}=1: dmabuf not mapped");
                    return None;
                }
                map_fd(&self.fd, self.len, self.writable).map(|ptr| Mapping { ptr, len: self.len })
            })
            .as_ref()
            .map(|m| m.ptr)
    }

    /// Whether the daemon has mapped it (so CPU access needs no mmap).
    pub(super) fn is_mapped(&self) -> bool {
        self.mapping.get().is_some_and(|m| m.is_some())
    }

    /// Brackets CPU access to a mapped dmabuf (a no-op for memfds and
    /// for dmabufs the CPU never touched). `device_read` means data flows
    /// from the device into the buffer.
    pub fn sync(&self, device_read: bool, end: bool) {
        if self.kind != BufKind::Dmabuf || !self.is_mapped() {
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

/// Maps all `len` bytes of `fd` shared, read-write or read-only.
fn map_fd(fd: &OwnedFd, len: usize, writable: bool) -> Option<NonNull<u8>> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
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
    if p == libc::MAP_FAILED {
        warn!("cannot map buffer: {}", std::io::Error::last_os_error());
        return None;
    }
    NonNull::new(p.cast())
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The file a REGISTER came through: the caller must still hold it when
/// its fd is taken (see [`take_fd`]).
#[derive(Debug, Clone, Copy)]
pub struct Holder {
    /// The mount's device number (`major << 32 | minor`, as in
    /// mountinfo); 0 when unknown, which skips the check.
    pub dev: u64,
    pub ino: u64,
}

/// EMFILE/ENFILE are the daemon's own fd limit, not the caller's fault.
fn fd_error(e: i32) -> Option<TokenError> {
    matches!(e, libc::EMFILE | libc::ENFILE).then(|| {
        warn!("the daemon is out of file descriptors");
        TokenError::NoFds
    })
}

/// Duplicates fd `fd` of thread `tid` into this process. Between the
/// FUSE request and `pidfd_open` the caller may die and its tid be
/// reused; so afterwards the task behind the pidfd must still hold the
/// file the request came through (`holder`), or the fd is refused.
pub fn take_fd(tid: u32, fd: i32, holder: &Holder) -> Result<OwnedFd, TokenError> {
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
        let e = errno();
        return Err(match e {
            libc::EBADF => TokenError::BadFile,
            e => fd_error(e).unwrap_or_else(|| {
                warn!("pidfd_getfd of fd {fd} of thread {tid}: errno {e}");
                TokenError::Permission
            }),
        });
    }
    // SAFETY: r is a fresh fd that we own.
    let taken = unsafe { OwnedFd::from_raw_fd(r as i32) };
    if holder.dev != 0 {
        // /proc/<tid> is the pidfd's task only if that task is still
        // alive after the scan (a dead one's tid may name another).
        let holds = holds_file(tid, holder.dev, holder.ino).map_err(|e| {
            let errno = e.raw_os_error().unwrap_or(0);
            fd_error(errno).unwrap_or_else(|| {
                warn!("REGISTER: cannot read /proc/{tid}: {e}");
                TokenError::Permission
            })
        })?;
        if !(holds && pidfd_alive(&pidfd)) {
            warn!(
                "REGISTER: thread {tid} no longer holds the file it asked through (exited, tid reused?); fd refused"
            );
            return Err(TokenError::Permission);
        }
    }
    Ok(taken)
}

/// Whether the process behind `pidfd` still runs (signal 0).
fn pidfd_alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal(pidfd, 0, NULL, 0) only checks.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0
}

/// Major and minor of a `major:minor` mountinfo field, as one number.
fn parse_dev(s: &str) -> Option<u64> {
    let (ma, mi) = s.split_once(':')?;
    Some((ma.parse::<u64>().ok()? << 32) | mi.parse::<u64>().ok()?)
}

/// The device number of the mount at `mountpoint` (the newest one there)
/// from /proc/self/mountinfo, so nothing has to stat the mount point
/// (which, from inside the daemon, would wait for the daemon).
pub fn mount_dev_of(mountpoint: &std::path::Path) -> Option<u64> {
    let mp = mountpoint.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mountpoint options ...
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 4 && std::path::Path::new(&f[4].replace("\\040", " ")) == mp)
            .then(|| parse_dev(f[2]))
            .flatten()
    })
}

/// Whether task `tid` has an fd open on inode `ino` of a mount with
/// device number `dev` (through any of its mounts: the caller may sit in
/// another mount namespace, where the same filesystem has other ids).
/// A task that is gone holds nothing; an error is the daemon's own (out
/// of fds).
pub fn holds_file(tid: u32, dev: u64, ino: u64) -> std::io::Result<bool> {
    let gone = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::ENOENT | libc::ESRCH | libc::EACCES)
        )
    };
    let info = match std::fs::read_to_string(format!("/proc/{tid}/mountinfo")) {
        Ok(i) => i,
        Err(e) if gone(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    let mount_ids: Vec<&str> = info
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let id = f.next()?;
            let _parent = f.next()?;
            (parse_dev(f.next()?) == Some(dev)).then_some(id)
        })
        .collect();
    let dir = match std::fs::read_dir(format!("/proc/{tid}/fdinfo")) {
        Ok(d) => d,
        Err(e) if gone(&e) => return Ok(false),
        Err(e) => return Err(e),
    };
    for entry in dir {
        let text = match entry.and_then(|e| std::fs::read_to_string(e.path())) {
            Ok(t) => t,
            // That fd was closed meanwhile.
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(e),
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let on_mount = field("mnt_id:").is_some_and(|m| mount_ids.contains(&m));
        // Older kernels do not show the inode; the mount alone then.
        let same_inode = field("ino:").is_none_or(|i| i.parse() == Ok(ino));
        if on_mount && same_inode {
            return Ok(true);
        }
    }
    Ok(false)
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
    let out_of_fds = || fd_error(errno());
    if let Some(fd) = open(tid, PIDFD_THREAD) {
        return Ok(fd);
    }
    if let Some(e) = out_of_fds() {
        return Err(e);
    }
    let tgid = std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
        })
        .ok_or(TokenError::Permission)?;
    open(tgid, 0).ok_or_else(|| out_of_fds().unwrap_or(TokenError::Permission))
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

/// Identifies the buffer; a memfd is mapped now (its READ/WRITE access
/// is found that way), a dmabuf only when first needed.
pub fn open(fd: OwnedFd) -> Result<MappedBuffer, TokenError> {
    let kind = classify(&fd)?;
    let size = buffer_size(&fd)?;
    if size == 0 || size % 4096 != 0 {
        return Err(TokenError::Invalid(
            "buffer size is not a nonzero multiple of 4096",
        ));
    }
    let len = usize::try_from(size).map_err(|_| TokenError::Invalid("buffer too large"))?;
    let (writable, mapping) = match kind {
        BufKind::Memfd => {
            // A write-sealed memfd maps read-only: WRITE works, READ does not.
            let (ptr, writable) = match map_fd(&fd, len, true) {
                Some(p) => (Some(p), true),
                None => (map_fd(&fd, len, false), false),
            };
            let ptr = ptr.ok_or(TokenError::Invalid("buffer cannot be mapped"))?;
            (writable, OnceLock::from(Some(Mapping { ptr, len })))
        }
        BufKind::Dmabuf => {
            // SAFETY: F_GETFL on an fd we own.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
            let writable = flags >= 0 && flags & libc::O_ACCMODE != libc::O_RDONLY;
            (writable, OnceLock::new())
        }
    };
    Ok(MappedBuffer {
        fd,
        len,
        kind,
        writable,
        mapping,
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
    if seals & libc::F_SEAL_SHRINK == 0
        && std::env::var_os(ALLOW_UNSEALED_ENV).is_none_or(|v| v != "1")
    {
        return Err(TokenError::Invalid(
            "memfd is not sealed with F_SEAL_SHRINK",
        ));
    }
    Ok(BufKind::Memfd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// The device number of the mount holding `f`, as mountinfo shows it.
    fn mount_dev(f: &std::fs::File) -> u64 {
        let md = f.metadata().unwrap();
        let dev = md.dev();
        let (ma, mi) = (libc::major(dev), libc::minor(dev));
        ((ma as u64) << 32) | mi as u64
    }

    #[test]
    fn holder_check_sees_who_holds_the_file() {
        let f = tempfile::tempfile().unwrap();
        let dev = mount_dev(&f);
        let ino = f.metadata().unwrap().ino();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        assert!(
            holds_file(tid, dev, ino).unwrap(),
            "this thread holds the file"
        );
        assert!(
            !holds_file(tid, dev, ino + 1_000_000).unwrap(),
            "another inode"
        );
        // A child that closes every fd above stderr holds nothing of ours.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let held = holds_file(child.id(), dev, ino).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(!held, "a process without the file");
        assert!(!holds_file(u32::MAX - 1, dev, ino).unwrap(), "no such task");
    }
}
