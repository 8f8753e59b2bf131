//! io_uring I/O on the device fd (plain and fixed-buffer), and the probe
//! for the kernel series' dmabuf registered buffers.
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
//! cleared (since v5 registration refuses such a target and later I/O
//! fails with EOPNOTSUPP). So the device fd is checked before every
//! fixed transfer. Rings are never IOPOLL (v5+ answers EOPNOTSUPP) and
//! descriptors carry `flags = 0` (v5+ answers anything else EINVAL).
//!
//! Robustness: a ring that returns with ops possibly queued or in flight
//! is poisoned, kept alive until the pool drops, and replaced by a fresh
//! ring given every live slot again (the pool remembers each slot's
//! source); completions carry a per-wave tag so none can count for a
//! later wave. Since v6 the kernel detaches every registered dmabuf on
//! an NVMe reset, suspend or removal and fixed I/O on the slot answers
//! ENOENT: the slot is registered again on every ring and the op retried
//! once, then reported as [`DeviceError::Detached`].

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use log::debug;
use parking_lot::Mutex;

use super::{DeviceError, Direction};

const SYS_IO_URING_REGISTER: libc::c_long = 427;
const IORING_REGISTER_BUFFERS_UPDATE: libc::c_uint = 16;
/// v3 UAPI: flag in `io_uring_rsrc_update2.flags` (formerly `resv`).
const IORING_RSRC_UPDATE_EXTENDED: u32 = 1 << 1;
const IO_REGBUF_TYPE_DMABUF: u32 = 2;

/// Rings in a pool: enough for the FUSE threads to keep the device queue
/// busy without waiting for each other.
const RINGS: usize = 4;
/// Submission queue depth of each ring: a 128-op BATCH, even with a few
/// ops split at the SQE length limit, goes down in one submission.
const RING_DEPTH: u32 = 256;
/// Slots in each ring's buffer table: the most buffers registered at once
/// on a mount (the kernel's limit, `IORING_MAX_REG_BUFFERS`), so that
/// several users at their token quota still fit.
const SLOTS: u32 = 1 << 14;
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

/// `struct io_uring_regbuf_desc` of the v3 series (80 bytes, unchanged
/// through v7; since v5 `flags` must be 0).
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
    /// The v3 UAPI (unchanged through v7) answered as a patched kernel
    /// would; [`probe_generation`] tells v3/v4 from v5+.
    Present,
    /// Not there, with the reason.
    Absent(String),
}

/// Probes for the series without a dmabuf: in a one-slot sparse table, an
/// extended update of type dmabuf with `target_fd = -1`. A kernel without
/// the series rejects the flag (EINVAL); one with it gets as far as
/// looking up the target file (EBADF). [`probe_generation`] says which
/// generation of the series answered.
pub fn probe_dmabuf_support() -> KernelSupport {
    match probe_with_flags(0) {
        Ok(Err(e)) => match e.raw_os_error() {
            Some(libc::EBADF) => KernelSupport::Present,
            // Short: the reason travels in INFO's 88-byte field.
            Some(libc::EOPNOTSUPP) => KernelSupport::Absent(
                "series UAPI present but no CONFIG_DMA_SHARED_BUFFER (v4+; CONFIG_DMABUF_TOKEN on v3)"
                    .into(),
            ),
            Some(n) => KernelSupport::Absent(format!(
                "no io_uring dmabuf buffers (errno {n}): needs the series, CONFIG_DMA_SHARED_BUFFER"
            )),
            None => KernelSupport::Absent(format!("probe failed: {e}")),
        },
        Ok(Ok(())) => KernelSupport::Absent("unexpected success of the probe".into()),
        Err(why) => KernelSupport::Absent(why),
    }
}

/// Which generation of the series the running kernel has, where a probe
/// can tell: `"v5+"` (a nonzero `desc.flags` is EINVAL since v5, which
/// also refuses IOPOLL rings and non-O_DIRECT targets) or `"v3/v4"` (the
/// same descriptor gets as far as the target lookup, EBADF). None without
/// the series or when the answer is neither.
pub fn probe_generation() -> Option<&'static str> {
    if probe_dmabuf_support() != KernelSupport::Present {
        return None;
    }
    match probe_with_flags(1) {
        Ok(Err(e)) => match e.raw_os_error() {
            Some(libc::EINVAL) => Some("v5+"),
            Some(libc::EBADF) => Some("v3/v4"),
            _ => None,
        },
        _ => None,
    }
}

/// One extended dmabuf update with `target_fd = -1` and `flags` in the
/// descriptor on a fresh one-slot ring: the kernel's answer, or why no
/// ring could be set up.
fn probe_with_flags(flags: u32) -> Result<io::Result<()>, String> {
    let ring = IoUring::new(1).map_err(|e| format!("io_uring unavailable ({e})"))?;
    ring.submitter()
        .register_buffers_sparse(1)
        .map_err(|e| format!("no io_uring sparse buffer tables ({e})"))?;
    let desc = RegbufDesc {
        kind: IO_REGBUF_TYPE_DMABUF,
        flags,
        dmabuf_fd: -1,
        target_fd: -1,
        ..Default::default()
    };
    Ok(update_extended(ring.as_raw_fd(), 0, &desc))
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

/// Where the memory of one ring op is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OpTarget {
    /// Plain `READ`/`WRITE` into memory the daemon can address (the
    /// buffer's own pages, O_DIRECT straight into them).
    Plain,
    /// `READ_FIXED`/`WRITE_FIXED` on a registered slot; dmabuf ops are
    /// issued from io-wq (`IOSQE_ASYNC`), see [`Rings::run`].
    Fixed { slot: u16, dmabuf: bool },
}

/// One piece of a transfer that goes down the ring.
#[derive(Debug, Clone, Copy)]
pub(super) struct RingOp {
    pub target: OpTarget,
    /// User address (plain, fixed user memory) or offset in the dmabuf.
    pub addr: u64,
    pub dev_offset: u64,
    pub len: usize,
    /// The transfer this piece belongs to: results are per tag.
    pub tag: usize,
}

/// What a registered slot was made from, so that a replacement ring (or
/// the same slot after the kernel detached it) can be given it again.
enum SlotSource {
    User {
        addr: usize,
        len: usize,
    },
    /// Our own dup of the dmabuf fd, kept for as long as the slot lives.
    Dmabuf(OwnedFd),
}

/// The slot numbering shared by all rings, and the rings' current fds
/// (registration goes to every ring without taking their locks).
struct Registry {
    sources: HashMap<u16, SlotSource>,
    free_slots: Vec<u16>,
    ring_fds: Vec<RawFd>,
}

/// One ring of the pool. `uring` is None only between a ring being
/// poisoned and a replacement being made (which failed so far).
struct Ring {
    uring: Option<IoUring>,
    /// Bumped per wave and carried in `user_data`, so a completion left
    /// over from an earlier wave can never count for a current op.
    wave: u32,
}

/// Fault injection for tests: make the pool fail the ways the kernel or
/// a bug could.
#[cfg(test)]
#[derive(Default)]
pub(super) struct Inject {
    /// The SQ push after this many pushed entries fails (once).
    pub fail_push_after: Option<usize>,
    /// The next wave's `io_uring_enter` fails with EIO (once), leaving
    /// its entries in the queue.
    pub fail_enter: bool,
    /// As `fail_enter`, but after the kernel took the entries: the ops
    /// are in flight when the error comes.
    pub fail_enter_in_flight: bool,
    /// The next this many fixed completions say ENOENT (a detached slot).
    pub enoent: usize,
    /// Making a fresh ring fails (a ring that is gone stays gone).
    pub fail_new_ring: bool,
}

/// Counters a test or a report can read.
#[derive(Debug, Default)]
pub struct RingCounters {
    /// Rings poisoned (left with ops possibly in flight) and replaced.
    pub replaced: AtomicU64,
    /// Slots registered again after the kernel answered ENOENT.
    pub reregistered: AtomicU64,
    /// Submissions of a first round of ops (one per wave).
    pub waves: AtomicU64,
}

pub(super) struct Rings {
    rings: Vec<Mutex<Ring>>,
    registry: Mutex<Registry>,
    /// Poisoned rings: never used again, never dropped before the pool,
    /// so ops still in flight on them never target freed ring memory.
    graveyard: Mutex<Vec<IoUring>>,
    /// Whether the rings have buffer tables (fixed buffers enabled).
    tables: bool,
    dev_fd: RawFd,
    next: AtomicUsize,
    pub counters: RingCounters,
    #[cfg(test)]
    pub inject: Mutex<Inject>,
}

/// How many waves one call may lose to poisoned rings before it gives up.
const MAX_RING_REPLACEMENTS: usize = 2;

impl Rings {
    /// Rings for I/O on `dev_fd`, which must be `O_DIRECT` and outlive
    /// the rings; with buffer tables when `tables` (fixed buffers).
    pub fn new(dev_fd: RawFd, tables: bool) -> io::Result<Self> {
        check_direct(dev_fd)?;
        let mut rings = Vec::with_capacity(RINGS);
        for _ in 0..RINGS {
            rings.push(new_ring(tables)?);
        }
        let ring_fds = rings.iter().map(|r| r.as_raw_fd()).collect();
        Ok(Self {
            rings: rings
                .into_iter()
                .map(|r| {
                    Mutex::new(Ring {
                        uring: Some(r),
                        wave: 0,
                    })
                })
                .collect(),
            registry: Mutex::new(Registry {
                sources: HashMap::new(),
                free_slots: (0..SLOTS as u16).rev().collect(),
                ring_fds,
            }),
            graveyard: Mutex::new(Vec::new()),
            tables,
            dev_fd,
            next: AtomicUsize::new(0),
            counters: RingCounters::default(),
            #[cfg(test)]
            inject: Mutex::new(Inject::default()),
        })
    }

    pub fn has_tables(&self) -> bool {
        self.tables
    }

    /// Puts `src` into a free slot of every ring.
    pub fn register(self: &Arc<Self>, src: FixedSource<'_>) -> io::Result<FixedBuffer> {
        if !self.tables {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        // Since v5 the series refuses a target that is not O_DIRECT.
        check_direct(self.dev_fd)?;
        let (kind, source) = match &src {
            FixedSource::User { len, .. } if *len > MAX_USER_BUFFER || *len == 0 => {
                return Err(io::Error::from_raw_os_error(libc::E2BIG))
            }
            FixedSource::User { addr, len } => (
                FixedKind::User,
                SlotSource::User {
                    addr: *addr as usize,
                    len: *len,
                },
            ),
            FixedSource::Dmabuf(fd) => (
                FixedKind::Dmabuf,
                SlotSource::Dmabuf(fd.try_clone_to_owned()?),
            ),
        };
        let mut reg = self.registry.lock();
        let slot = reg
            .free_slots
            .pop()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
        for (i, &ring_fd) in reg.ring_fds.iter().enumerate() {
            if let Err(e) = set_slot(ring_fd, slot, &source, self.dev_fd) {
                for &done in &reg.ring_fds[..i] {
                    let _ = set_user_slot(done, slot, std::ptr::null_mut(), 0);
                }
                reg.free_slots.push(slot);
                return Err(e);
            }
        }
        reg.sources.insert(slot, source);
        debug!("fixed buffer slot {slot}: {kind:?}");
        Ok(FixedBuffer {
            rings: Arc::clone(self),
            slot,
            kind,
        })
    }

    fn release(&self, slot: u16) {
        let mut reg = self.registry.lock();
        for &ring_fd in &reg.ring_fds {
            if let Err(e) = set_user_slot(ring_fd, slot, std::ptr::null_mut(), 0) {
                log::warn!("clearing fixed buffer slot {slot}: {e}");
            }
        }
        reg.sources.remove(&slot);
        reg.free_slots.push(slot);
    }

    /// Registers `slot` again on every ring from what it was made of
    /// (the kernel detached it: series v6+, NVMe reset or suspend).
    fn reregister(&self, slot: u16) -> io::Result<()> {
        let reg = self.registry.lock();
        let source = reg
            .sources
            .get(&slot)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        for &ring_fd in &reg.ring_fds {
            set_slot(ring_fd, slot, source, self.dev_fd)?;
        }
        self.counters.reregistered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Retires ring `index` (held in `ring`): it may have ops in flight
    /// or entries queued, so it goes to the graveyard, never to be used
    /// or freed before the pool; a fresh ring with every live slot
    /// registered takes its place.
    fn poison(&self, index: usize, ring: &mut Ring, why: &io::Error) {
        log::warn!("io_uring ring {index} could not be drained ({why}); replacing it");
        if let Some(old) = ring.uring.take() {
            // Nothing of it is in flight any more (the wave settled); its
            // buffer table would keep every memfd window pinned and every
            // dmabuf attached after UNREGISTER, so it is emptied now.
            if let Err(e) = old.submitter().unregister_buffers() {
                log::warn!("emptying the buffer table of retired ring {index}: {e}");
            }
            self.graveyard.lock().push(old);
        }
        self.counters.replaced.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.revive(index, ring) {
            log::warn!("replacing io_uring ring {index}: {e} (will retry)");
        }
    }

    /// Retired rings whose buffer table is still there (emptying it
    /// again succeeds only then).
    #[cfg(test)]
    pub(super) fn retired_rings_holding_buffers(&self) -> usize {
        self.graveyard
            .lock()
            .iter()
            .filter(|r| r.submitter().unregister_buffers().is_ok())
            .count()
    }

    /// Makes a ring for slot `index` of the pool if it has none.
    fn revive(&self, index: usize, ring: &mut Ring) -> io::Result<()> {
        if ring.uring.is_some() {
            return Ok(());
        }
        #[cfg(test)]
        if self.inject.lock().fail_new_ring {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let fresh = new_ring(self.tables)?;
        let mut reg = self.registry.lock();
        for (&slot, source) in &reg.sources {
            set_slot(fresh.as_raw_fd(), slot, source, self.dev_fd)?;
        }
        reg.ring_fds[index] = fresh.as_raw_fd();
        ring.uring = Some(fresh);
        Ok(())
    }

    /// Runs every op, as few submissions as the ring depth allows, and
    /// waits for all of them; short transfers are continued. Returns one
    /// result per tag (`0..tags`): the first error of any of its ops.
    /// No op of this call is left in flight on a ring that is used again;
    /// when a ring breaks, the ops the kernel already took are waited for
    /// (polling its completion queue, for as long as it takes) so they do
    /// not land in the caller's memory after the call returned.
    ///
    /// Ops on dmabufs are issued with `IOSQE_ASYNC`. In v3 an inline issue
    /// takes a reference on the dmabuf's device mapping and, when the block
    /// layer answers -EAGAIN and io-wq issues the request again, takes a
    /// second one and loses the first: the mapping then never goes away,
    /// its fence never signals, and unregistering the buffer (or any
    /// `DMA_BUF_IOCTL_SYNC` on it) waits forever (fixed in v4). Issued
    /// from io-wq the request blocks instead of failing with -EAGAIN.
    ///
    /// A fixed op answered ENOENT (the series since v6: the kernel
    /// detached the buffer) has its slot registered again on every ring
    /// and is retried once; a second ENOENT is [`DeviceError::Detached`].
    ///
    /// With `wait` false and every ring busy, returns None at once (the
    /// caller moves plain ops another way rather than queue behind them).
    pub fn run(
        &self,
        dir: Direction,
        ops: &[RingOp],
        tags: usize,
        wait: bool,
    ) -> Option<Vec<Result<(), DeviceError>>> {
        let (index, ring) = match self.try_pick() {
            Some(picked) => picked,
            None if wait => self.pick(),
            None => return None,
        };
        Some(self.run_on(index, ring, dir, ops, tags))
    }

    fn run_on(
        &self,
        index: usize,
        mut ring: parking_lot::MutexGuard<'_, Ring>,
        dir: Direction,
        ops: &[RingOp],
        tags: usize,
    ) -> Vec<Result<(), DeviceError>> {
        let mut results: Vec<Result<(), DeviceError>> = (0..tags).map(|_| Ok(())).collect();
        if ops
            .iter()
            .any(|op| matches!(op.target, OpTarget::Fixed { .. }))
        {
            if let Err(e) = check_direct(self.dev_fd) {
                // Only the transfers that need fixed I/O are refused.
                for op in ops.iter().filter(|op| op.target != OpTarget::Plain) {
                    fail(
                        &mut results,
                        op.tag,
                        DeviceError::Io(io::Error::new(e.kind(), e.to_string())),
                    );
                }
            }
        }
        // (op, retried after ENOENT)
        let mut todo: Vec<(RingOp, bool)> = ops
            .iter()
            .filter(|op| results[op.tag].is_ok())
            .flat_map(|op| {
                (0..op.len).step_by(MAX_SQE_LEN).map(move |at| {
                    let piece = RingOp {
                        addr: op.addr + at as u64,
                        dev_offset: op.dev_offset + at as u64,
                        len: (op.len - at).min(MAX_SQE_LEN),
                        ..*op
                    };
                    (piece, false)
                })
            })
            .collect();
        let mut replacements = 0;
        while !todo.is_empty() {
            todo.retain(|(op, _)| results[op.tag].is_ok());
            let wave: Vec<(RingOp, bool)> =
                todo.drain(..todo.len().min(RING_DEPTH as usize)).collect();
            if wave.is_empty() {
                break;
            }
            if let Err(e) = self.revive(index, &mut ring) {
                for (op, _) in &wave {
                    fail(
                        &mut results,
                        op.tag,
                        DeviceError::Io(io::Error::new(e.kind(), e.to_string())),
                    );
                }
                continue;
            }
            match self.wave(dir, &mut ring, &wave, &mut results) {
                WaveEnd::Done { detached } => {
                    // Each detached slot is registered again once per
                    // wave; an op that already had its retry is done.
                    let mut registered: HashMap<u16, bool> = HashMap::new();
                    for (op, retried) in detached {
                        let again = !retried
                            && op.target_slot().is_some_and(|slot| {
                                *registered.entry(slot).or_insert_with(|| {
                                    self.reregister(slot)
                                        .inspect_err(|e| {
                                            log::warn!("registering slot {slot} again: {e}")
                                        })
                                        .is_ok()
                                })
                            });
                        if again {
                            todo.push((op, true));
                        } else {
                            fail(&mut results, op.tag, DeviceError::Detached);
                        }
                    }
                }
                WaveEnd::NotQueued { redo, error: e } => {
                    // Nothing is in flight: poison the ring (entries sit
                    // in its queue) and redo what is left on a fresh one.
                    self.poison(index, &mut ring, &e);
                    replacements += 1;
                    if replacements > MAX_RING_REPLACEMENTS {
                        for (op, _) in &redo {
                            fail(
                                &mut results,
                                op.tag,
                                DeviceError::Io(io::Error::new(e.kind(), e.to_string())),
                            );
                        }
                    } else {
                        todo.splice(0..0, redo);
                    }
                }
                WaveEnd::Broken { unfinished, error } => {
                    // Ops may still be in flight: their transfers fail,
                    // and the ring is never used again.
                    self.poison(index, &mut ring, &error);
                    replacements += 1;
                    for op in unfinished {
                        fail(
                            &mut results,
                            op.tag,
                            DeviceError::Io(io::Error::new(error.kind(), error.to_string())),
                        );
                    }
                }
            }
        }
        results
    }

    /// Queues `wave` (at most the ring depth), submits it once and reaps
    /// every completion. Ops that need another go (short, EAGAIN) are
    /// re-queued in the same wave loop; errors land in `results`.
    fn wave(
        &self,
        dir: Direction,
        ring: &mut Ring,
        wave: &[(RingOp, bool)],
        results: &mut [Result<(), DeviceError>],
    ) -> WaveEnd {
        ring.wave = ring.wave.wrapping_add(1);
        self.counters.waves.fetch_add(1, Ordering::Relaxed);
        let wave_id = ring.wave as u64;
        let Some(uring) = ring.uring.as_mut() else {
            return WaveEnd::NotQueued {
                redo: wave.to_vec(),
                error: io::Error::other("no ring"),
            };
        };
        // The ops in the kernel now, by index; None once completed.
        let mut live: Vec<Option<(RingOp, bool)>> = wave.iter().map(|&w| Some(w)).collect();
        let mut detached = Vec::new();
        let mut pending = 0usize;
        let mut queue: Vec<usize> = (0..wave.len()).collect();
        while !queue.is_empty() || pending > 0 {
            let mut queued_now = 0;
            for (n, i) in queue.drain(..).enumerate() {
                let (op, _) = live[i].expect("queued op is live");
                let sqe = build_sqe(dir, self.dev_fd, &op).user_data((wave_id << 32) | i as u64);
                #[cfg(test)]
                let injected = {
                    let mut inj = self.inject.lock();
                    if inj.fail_push_after == Some(n) {
                        inj.fail_push_after = None;
                        true
                    } else {
                        false
                    }
                };
                #[cfg(not(test))]
                let injected = {
                    let _ = n;
                    false
                };
                // SAFETY: the memory behind each op (the caller's buffer,
                // pinned by the kernel for fixed slots that the caller's
                // FixedBuffer keeps registered) stays valid until this
                // call returns, and it returns only when every op pushed
                // here completed or the ring was retired for good.
                let pushed = !injected && unsafe { uring.submission().push(&sqe) }.is_ok();
                if !pushed {
                    let error = io::Error::other("io_uring submission queue full");
                    // What has not completed (answered ENOENT included).
                    let mut left: Vec<(RingOp, bool)> = live.iter().flatten().copied().collect();
                    left.extend(detached);
                    if pending == 0 {
                        // Nothing in flight: what this round pushed was
                        // never submitted, so it can all be done again.
                        return WaveEnd::NotQueued { redo: left, error };
                    }
                    // Ops of earlier rounds are in flight: let them land
                    // before the caller's memory is handed back.
                    settle(uring, wave_id, pending, &mut live);
                    return WaveEnd::Broken {
                        unfinished: left.into_iter().map(|(op, _)| op).collect(),
                        error,
                    };
                }
                queued_now += 1;
            }
            pending += queued_now;
            #[cfg(test)]
            let injected = {
                let mut inj = self.inject.lock();
                if std::mem::take(&mut inj.fail_enter_in_flight) {
                    let _ = uring.submit();
                    true
                } else {
                    std::mem::take(&mut inj.fail_enter)
                }
            };
            #[cfg(not(test))]
            let injected = false;
            let entered = if injected {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                uring.submit_and_wait(pending)
            };
            match entered {
                Ok(_) => {}
                // Interrupted, or the completion queue is full: reap what
                // is there and wait again.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                // A broken ring: what it holds cannot be waited for.
                Err(error) => {
                    let unfinished: Vec<(RingOp, bool)> =
                        live.iter().flatten().chain(&detached).copied().collect();
                    // The kernel took what left the SQ; wait for those.
                    let unconsumed = uring.submission().len();
                    settle(
                        uring,
                        wave_id,
                        pending.saturating_sub(unconsumed),
                        &mut live,
                    );
                    let unfinished = unfinished.iter();
                    return WaveEnd::Broken {
                        unfinished: unfinished.map(|(op, _)| *op).collect(),
                        error,
                    };
                }
            }
            for cqe in uring.completion() {
                let data = cqe.user_data();
                let i = (data & 0xffff_ffff) as usize;
                if data >> 32 != wave_id || i >= live.len() || live[i].is_none() {
                    log::warn!("io_uring: stale completion {data:#x} ignored");
                    continue;
                }
                pending -= 1;
                let (op, retried) = live[i].take().expect("checked above");
                #[allow(unused_mut)]
                let mut res = cqe.result();
                #[cfg(test)]
                if op.target != OpTarget::Plain && res >= 0 {
                    let mut inj = self.inject.lock();
                    if inj.enoent > 0 {
                        inj.enoent -= 1;
                        res = -libc::ENOENT;
                    }
                }
                if res == -libc::EAGAIN || res == -libc::EINTR {
                    live[i] = Some((op, retried));
                    queue.push(i);
                } else if res == -libc::ENOENT && op.target != OpTarget::Plain {
                    detached.push((op, retried));
                } else if res < 0 {
                    fail(results, op.tag, errno_error(-res));
                } else if res == 0 {
                    fail(
                        results,
                        op.tag,
                        DeviceError::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "device returned no data",
                        )),
                    );
                } else if (res as usize) < op.len {
                    let n = res as usize;
                    live[i] = Some((
                        RingOp {
                            addr: op.addr + n as u64,
                            dev_offset: op.dev_offset + n as u64,
                            len: op.len - n,
                            ..op
                        },
                        retried,
                    ));
                    queue.push(i);
                }
            }
        }
        WaveEnd::Done { detached }
    }

    /// A ring nobody is using, starting with the next one in turn.
    fn try_pick(&self) -> Option<(usize, parking_lot::MutexGuard<'_, Ring>)> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.rings.len();
        (0..n).find_map(|i| {
            let at = (start + i) % n;
            self.rings[at]
                .try_lock()
                .filter(|g| g.uring.is_some())
                .map(|g| (at, g))
        })
    }

    /// The next ring in turn, waiting for it; a ring that is gone and
    /// cannot be made again is passed over while another one works.
    fn pick(&self) -> (usize, parking_lot::MutexGuard<'_, Ring>) {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.rings.len();
        for i in 0..n {
            let at = (start + i) % n;
            let mut ring = self.rings[at].lock();
            if self.revive(at, &mut ring).is_ok() {
                return (at, ring);
            }
        }
        let at = start % n;
        (at, self.rings[at].lock())
    }
}

impl Drop for Rings {
    fn drop(&mut self) {
        let dead = self.graveyard.get_mut().len();
        if dead > 0 {
            debug!("dropping {dead} retired io_uring ring(s)");
        }
    }
}

/// How a wave ended.
enum WaveEnd {
    /// Every op completed; these fixed ops were answered ENOENT.
    Done { detached: Vec<(RingOp, bool)> },
    /// Nothing is in flight, but entries may sit in the queue; these ops
    /// are still to do.
    NotQueued {
        redo: Vec<(RingOp, bool)>,
        error: io::Error,
    },
    /// Ops may be in flight; these had not completed.
    Broken {
        unfinished: Vec<RingOp>,
        error: io::Error,
    },
}

impl RingOp {
    fn target_slot(&self) -> Option<u16> {
        match self.target {
            OpTarget::Plain => None,
            OpTarget::Fixed { slot, .. } => Some(slot),
        }
    }
}

/// How often a wait for a broken ring's in-flight ops says it still waits.
const SETTLE_REPORT: std::time::Duration = std::time::Duration::from_secs(5);

/// On a ring that cannot be entered any more: waits, by polling its
/// completion queue (the kernel posts there without being entered), for
/// `in_flight` ops of wave `wave_id` to complete, so that none still
/// writes into a caller's memory once the call returns. Their results
/// are dropped: the transfers fail anyway.
fn settle(
    uring: &mut IoUring,
    wave_id: u64,
    in_flight: usize,
    live: &mut [Option<(RingOp, bool)>],
) {
    // Never give up: an op still in flight would write into memory the
    // caller may free once this returns (an NVMe reset can hold I/O for
    // the whole 30 s timeout and more).
    let mut report = std::time::Instant::now() + SETTLE_REPORT;
    let mut left = in_flight;
    while left > 0 {
        for cqe in uring.completion() {
            let data = cqe.user_data();
            let i = (data & 0xffff_ffff) as usize;
            if data >> 32 == wave_id && live.get(i).is_some_and(|l| l.is_some()) {
                live[i] = None;
                left = left.saturating_sub(1);
            }
        }
        if left == 0 {
            break;
        }
        if std::time::Instant::now() >= report {
            log::error!("io_uring: still waiting for {left} op(s) in flight on a retired ring");
            report += SETTLE_REPORT;
        }
        // A syscall: completions posted as task work run on the way back.
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Records `e` for `tag` unless it already failed.
fn fail(results: &mut [Result<(), DeviceError>], tag: usize, e: DeviceError) {
    if results[tag].is_ok() {
        results[tag] = Err(e);
    }
}

/// A negative completion result as the error it means: EFAULT is the
/// caller's memory, anything else the device's.
fn errno_error(errno: i32) -> DeviceError {
    match errno {
        libc::EFAULT => DeviceError::Fault,
        n => DeviceError::Io(io::Error::from_raw_os_error(n)),
    }
}

fn build_sqe(dir: Direction, dev_fd: RawFd, op: &RingOp) -> squeue::Entry {
    let fd = types::Fd(dev_fd);
    let len = op.len as u32;
    let (sqe, dmabuf) = match (op.target, dir) {
        (OpTarget::Plain, Direction::Read) => (
            opcode::Read::new(fd, op.addr as *mut u8, len)
                .offset(op.dev_offset)
                .build(),
            false,
        ),
        (OpTarget::Plain, Direction::Write) => (
            opcode::Write::new(fd, op.addr as *const u8, len)
                .offset(op.dev_offset)
                .build(),
            false,
        ),
        (OpTarget::Fixed { slot, dmabuf }, Direction::Read) => (
            opcode::ReadFixed::new(fd, op.addr as *mut u8, len, slot)
                .offset(op.dev_offset)
                .build(),
            dmabuf,
        ),
        (OpTarget::Fixed { slot, dmabuf }, Direction::Write) => (
            opcode::WriteFixed::new(fd, op.addr as *const u8, len, slot)
                .offset(op.dev_offset)
                .build(),
            dmabuf,
        ),
    };
    sqe.flags(if dmabuf {
        squeue::Flags::ASYNC
    } else {
        squeue::Flags::empty()
    })
}

/// A ring of the pool's depth, never IOPOLL (the series refuses it since
/// v5), with a sparse buffer table when `tables`.
fn new_ring(tables: bool) -> io::Result<IoUring> {
    let ring = IoUring::new(RING_DEPTH)?;
    if tables {
        ring.submitter().register_buffers_sparse(SLOTS)?;
    }
    Ok(ring)
}

/// Puts `source` into `slot` of ring `ring_fd`.
fn set_slot(ring_fd: RawFd, slot: u16, source: &SlotSource, dev_fd: RawFd) -> io::Result<()> {
    match source {
        SlotSource::User { addr, len } => set_user_slot(ring_fd, slot, *addr as *mut u8, *len),
        SlotSource::Dmabuf(fd) => set_dmabuf_slot(ring_fd, slot as u32, fd.as_raw_fd(), dev_fd),
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
        let generation = probe_generation();
        match probe_dmabuf_support() {
            KernelSupport::Present => {
                println!("kernel has dmabuf registered buffers, series {generation:?}")
            }
            KernelSupport::Absent(why) => {
                assert!(!why.is_empty() && why.len() < 88, "{why}");
                println!("no dmabuf registered buffers here: {why}");
                assert_eq!(generation, None);
            }
        }
    }
}
