//! io_uring fixed-buffer I/O on the device fd, and the probe for the
//! kernel series' dmabuf registered buffers.
//!
//! A [`Rings`] is a small pool of rings that share one slot numbering:
//! every registered buffer sits in the same slot of every ring, so any
//! thread can take any free ring. A slot holds either user memory
//! (`IO_REGBUF_TYPE_UADDR`, any kernel with io_uring) or, on a kernel
//! with the series, a dmabuf bound to the device fd
//! (`IO_REGBUF_TYPE_DMABUF` through `IORING_RSRC_UPDATE_EXTENDED`).
//! Transfers are `READ_FIXED`/`WRITE_FIXED` whose `addr` is the user
//! address, or the offset inside the dmabuf.
//!
//! The series trusts the target file to be `O_DIRECT`: a backport was seen
//! to report full-length transfers that moved nothing once `O_DIRECT` was
//! cleared. So the device fd is checked before every transfer.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use log::debug;
use parking_lot::Mutex;

use super::Direction;

const SYS_IO_URING_REGISTER: libc::c_long = 427;
const IORING_REGISTER_BUFFERS_UPDATE: libc::c_uint = 16;
/// v3 UAPI: flag in `io_uring_rsrc_update2.flags` (formerly `resv`).
const IORING_RSRC_UPDATE_EXTENDED: u32 = 1 << 1;
const IO_REGBUF_TYPE_DMABUF: u32 = 2;

/// Rings in a pool: enough for the FUSE threads and BATCH workers to
/// keep the device queue busy without waiting for each other.
const RINGS: usize = 4;
/// Submission queue depth of each ring.
const RING_DEPTH: u32 = 64;
/// Slots in each ring's buffer table: the most buffers registered at once.
const SLOTS: u32 = 1024;
/// The largest piece one SQE carries (`len` is 32 bits).
const MAX_SQE_LEN: usize = 64 << 20;
/// `io_uring_register` refuses user buffers above this.
const MAX_USER_BUFFER: usize = 1 << 30;

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

/// `struct io_uring_regbuf_desc` of the v3 series (80 bytes).
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

/// Probes for the series without a dmabuf: in a one-slot sparse table, an
/// extended update of type dmabuf with `target_fd = -1`. A kernel without
/// the series rejects the flag (EINVAL); one with it gets as far as
/// looking up the target file (EBADF).
pub fn probe_dmabuf_support() -> KernelSupport {
    let ring = match IoUring::new(1) {
        Ok(r) => r,
        Err(e) => return KernelSupport::Absent(format!("io_uring unavailable ({e})")),
    };
    if let Err(e) = ring.submitter().register_buffers_sparse(1) {
        return KernelSupport::Absent(format!("no io_uring sparse buffer tables ({e})"));
    }
    let desc = RegbufDesc {
        kind: IO_REGBUF_TYPE_DMABUF,
        dmabuf_fd: -1,
        target_fd: -1,
        ..Default::default()
    };
    match update_extended(ring.as_raw_fd(), 0, &desc) {
        Ok(()) => KernelSupport::Absent("unexpected success of the probe".into()),
        Err(e) => match e.raw_os_error() {
            Some(libc::EBADF) => KernelSupport::Present,
            Some(libc::EOPNOTSUPP) => {
                KernelSupport::Absent("kernel has the dmabuf UAPI but no DMABUF_TOKEN".into())
            }
            Some(n) => KernelSupport::Absent(format!(
                "no io_uring dmabuf registered buffers (probe: errno {n})"
            )),
            None => KernelSupport::Absent(format!("probe failed: {e}")),
        },
    }
}

/// One extended buffer-table update of slot `slot`.
fn update_extended(ring_fd: RawFd, slot: u32, desc: &RegbufDesc) -> io::Result<()> {
    update_slot(
        ring_fd,
        slot,
        IORING_RSRC_UPDATE_EXTENDED,
        desc as *const RegbufDesc as u64,
    )
}

/// `IORING_REGISTER_BUFFERS_UPDATE` of one slot; `data` points at one
/// iovec, or (with `IORING_RSRC_UPDATE_EXTENDED`) one descriptor, that
/// the caller keeps alive for the call.
fn update_slot(ring_fd: RawFd, slot: u32, flags: u32, data: u64) -> io::Result<()> {
    let up = RsrcUpdate2 {
        offset: slot,
        flags,
        data,
        nr: 1,
        ..Default::default()
    };
    // SAFETY: io_uring_register reads `up` and the one entry it points
    // at, both alive for the call; the kernel pins the memory an iovec
    // describes (or clears the slot).
    let r = unsafe {
        libc::syscall(
            SYS_IO_URING_REGISTER,
            ring_fd,
            IORING_REGISTER_BUFFERS_UPDATE,
            &up as *const RsrcUpdate2,
            size_of::<RsrcUpdate2>() as u32,
        )
    };
    match r {
        1 => Ok(()),
        r if r < 0 => Err(io::Error::last_os_error()),
        r => Err(io::Error::other(format!("buffer update did {r} of 1"))),
    }
}

/// Puts dmabuf `dmabuf_fd` into slot `slot` of ring `ring_fd`'s sparse
/// buffer table, bound to `target_fd` (v3: `IO_REGBUF_TYPE_DMABUF`).
pub fn set_dmabuf_slot(
    ring_fd: RawFd,
    slot: u32,
    dmabuf_fd: RawFd,
    target_fd: RawFd,
) -> io::Result<()> {
    update_extended(
        ring_fd,
        slot,
        &RegbufDesc {
            kind: IO_REGBUF_TYPE_DMABUF,
            dmabuf_fd,
            target_fd,
            ..Default::default()
        },
    )
}

/// Memory to register for fixed-buffer I/O.
pub enum FixedSource<'a> {
    /// User memory the daemon has mapped (pinned by the kernel while
    /// registered).
    User { addr: *mut u8, len: usize },
    /// A dmabuf, bound to the device fd (needs the kernel series).
    Dmabuf(BorrowedFd<'a>),
}

/// One piece of a fixed-buffer transfer.
#[derive(Debug, Clone, Copy)]
pub(super) struct FixedOp {
    pub slot: u16,
    /// User address, or offset in the dmabuf.
    pub addr: u64,
    pub dev_offset: u64,
    pub len: usize,
    /// Issue from io-wq (`IOSQE_ASYNC`), never inline; see [`Rings::transfer`].
    pub dmabuf: bool,
}

pub(super) struct Rings {
    rings: Vec<Mutex<IoUring>>,
    /// The rings' fds, for registration while a ring is in use.
    ring_fds: Vec<RawFd>,
    free_slots: Mutex<Vec<u16>>,
    dev_fd: RawFd,
    next: AtomicUsize,
}

impl Rings {
    /// Rings for I/O on `dev_fd`, which must be `O_DIRECT` and outlive
    /// the rings.
    pub fn new(dev_fd: RawFd) -> io::Result<Self> {
        check_direct(dev_fd)?;
        let mut rings = Vec::with_capacity(RINGS);
        for _ in 0..RINGS {
            let ring = IoUring::new(RING_DEPTH)?;
            ring.submitter().register_buffers_sparse(SLOTS)?;
            rings.push(ring);
        }
        let ring_fds = rings.iter().map(|r| r.as_raw_fd()).collect();
        Ok(Self {
            rings: rings.into_iter().map(Mutex::new).collect(),
            ring_fds,
            free_slots: Mutex::new((0..SLOTS as u16).rev().collect()),
            dev_fd,
            next: AtomicUsize::new(0),
        })
    }

    /// Puts `src` into a free slot of every ring.
    pub fn register(self: &Arc<Self>, src: FixedSource<'_>) -> io::Result<FixedBuffer> {
        check_direct(self.dev_fd)?;
        let kind = match &src {
            FixedSource::User { len, .. } if *len > MAX_USER_BUFFER || *len == 0 => {
                return Err(io::Error::from_raw_os_error(libc::E2BIG))
            }
            FixedSource::User { .. } => FixedKind::User,
            FixedSource::Dmabuf(_) => FixedKind::Dmabuf,
        };
        let slot = self
            .free_slots
            .lock()
            .pop()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
        for (i, &ring_fd) in self.ring_fds.iter().enumerate() {
            let r = match &src {
                FixedSource::User { addr, len } => set_user_slot(ring_fd, slot, *addr, *len),
                FixedSource::Dmabuf(fd) => {
                    set_dmabuf_slot(ring_fd, slot as u32, fd.as_raw_fd(), self.dev_fd)
                }
            };
            if let Err(e) = r {
                for &done in &self.ring_fds[..i] {
                    let _ = set_user_slot(done, slot, std::ptr::null_mut(), 0);
                }
                self.free_slots.lock().push(slot);
                return Err(e);
            }
        }
        debug!("fixed buffer slot {slot}: {kind:?}");
        Ok(FixedBuffer {
            rings: Arc::clone(self),
            slot,
            kind,
        })
    }

    fn release(&self, slot: u16) {
        for &ring_fd in &self.ring_fds {
            if let Err(e) = set_user_slot(ring_fd, slot, std::ptr::null_mut(), 0) {
                log::warn!("clearing fixed buffer slot {slot}: {e}");
            }
        }
        self.free_slots.lock().push(slot);
    }

    /// Runs every op and waits for all of them; short transfers are
    /// continued, and no op is left in flight when this returns.
    ///
    /// Ops on dmabufs are issued with `IOSQE_ASYNC`. In v3 an inline issue
    /// takes a reference on the dmabuf's device mapping and, when the block
    /// layer answers -EAGAIN and io-wq issues the request again, takes a
    /// second one and loses the first: the mapping then never goes away,
    /// its fence never signals, and unregistering the buffer (or any
    /// `DMA_BUF_IOCTL_SYNC` on it) waits forever. Issued from io-wq the
    /// request blocks instead of failing with -EAGAIN, and imports once.
    pub fn transfer(&self, dir: Direction, ops: &[FixedOp]) -> io::Result<()> {
        check_direct(self.dev_fd)?;
        let mut todo: Vec<FixedOp> = ops
            .iter()
            .flat_map(|op| {
                (0..op.len).step_by(MAX_SQE_LEN).map(move |at| FixedOp {
                    addr: op.addr + at as u64,
                    dev_offset: op.dev_offset + at as u64,
                    len: (op.len - at).min(MAX_SQE_LEN),
                    ..*op
                })
            })
            .collect();
        let mut ring = self.pick();
        let mut first_error = None;
        while !todo.is_empty() {
            let wave: Vec<FixedOp> = todo.drain(..todo.len().min(RING_DEPTH as usize)).collect();
            for (i, op) in wave.iter().enumerate() {
                let fd = types::Fd(self.dev_fd);
                let sqe = match dir {
                    Direction::Read => {
                        opcode::ReadFixed::new(fd, op.addr as *mut u8, op.len as u32, op.slot)
                            .offset(op.dev_offset)
                            .build()
                    }
                    Direction::Write => {
                        opcode::WriteFixed::new(fd, op.addr as *const u8, op.len as u32, op.slot)
                            .offset(op.dev_offset)
                            .build()
                    }
                }
                .user_data(i as u64)
                .flags(if op.dmabuf {
                    squeue::Flags::ASYNC
                } else {
                    squeue::Flags::empty()
                });
                // SAFETY: the buffer behind the slot stays registered (its
                // FixedBuffer is borrowed by the caller) until every
                // completion is reaped below. The queue is empty at the
                // start of a wave and a wave is at most RING_DEPTH long,
                // so the push cannot fail and leave SQEs behind.
                unsafe { ring.submission().push(&sqe) }
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            }
            let mut pending = wave.len();
            while pending > 0 {
                match ring.submit_and_wait(1) {
                    Ok(_) => {}
                    // Interrupted, or the completion queue is full: reap
                    // what is there and wait again.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                        ) => {}
                    // Only a broken ring (a bug) fails otherwise; its
                    // ops cannot be waited for.
                    Err(e) => return Err(e),
                }
                for cqe in ring.completion() {
                    pending -= 1;
                    let op = wave[cqe.user_data() as usize];
                    let res = cqe.result();
                    if res == -libc::EAGAIN || res == -libc::EINTR {
                        todo.push(op);
                    } else if res < 0 {
                        first_error.get_or_insert(io::Error::from_raw_os_error(-res));
                    } else if res == 0 {
                        first_error.get_or_insert(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "device returned no data",
                        ));
                    } else if (res as usize) < op.len {
                        let n = res as usize;
                        todo.push(FixedOp {
                            addr: op.addr + n as u64,
                            dev_offset: op.dev_offset + n as u64,
                            len: op.len - n,
                            ..op
                        });
                    }
                }
            }
            if first_error.is_some() {
                break;
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A ring nobody is using, or (all busy) the next one in turn.
    fn pick(&self) -> parking_lot::MutexGuard<'_, IoUring> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.rings.len();
        (0..n)
            .find_map(|i| self.rings[(start + i) % n].try_lock())
            .unwrap_or_else(|| self.rings[start % n].lock())
    }
}

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixedKind {
    User,
    Dmabuf,
}

/// A registered buffer; its slot is cleared when this is dropped.
pub struct FixedBuffer {
    rings: Arc<Rings>,
    slot: u16,
    kind: FixedKind,
}

impl FixedBuffer {
    pub fn kind(&self) -> FixedKind {
        self.kind
    }

    pub(super) fn slot(&self) -> u16 {
        self.slot
    }

    pub(super) fn belongs_to(&self, rings: &Arc<Rings>) -> bool {
        Arc::ptr_eq(&self.rings, rings)
    }
}

impl Drop for FixedBuffer {
    fn drop(&mut self) {
        self.rings.release(self.slot);
    }
}

/// Sets slot `slot` to user memory, or clears it (null address, length 0).
fn set_user_slot(ring_fd: RawFd, slot: u16, addr: *mut u8, len: usize) -> io::Result<()> {
    let iov = libc::iovec {
        iov_base: addr.cast(),
        iov_len: len,
    };
    update_slot(ring_fd, slot as u32, 0, &iov as *const libc::iovec as u64)
}

/// Refuses a device fd that is not (or no longer) `O_DIRECT`.
fn check_direct(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an fd the caller keeps open.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        return Err(io::Error::last_os_error());
    }
    if fl & libc::O_DIRECT == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "device fd is not O_DIRECT: fixed-buffer I/O refused",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uapi_struct_sizes_match_v3() {
        assert_eq!(size_of::<RegbufDesc>(), 80);
        assert_eq!(size_of::<RsrcUpdate2>(), 32);
    }

    #[test]
    fn probe_answers() {
        match probe_dmabuf_support() {
            KernelSupport::Present => println!("kernel has dmabuf registered buffers"),
            KernelSupport::Absent(why) => {
                assert!(!why.is_empty());
                println!("no dmabuf registered buffers here: {why}");
            }
        }
    }
}
