//! Block device backends: where bytes finally go.
//!
//! Everything above talks to a device through [`BlockDevice::submit`]: a
//! direction, one buffer and a list of (device offset, buffer offset,
//! length) ranges, the shape of the kernel series' dmabuf iterator ranges.
//! [`file::FileDevice`] serves image files and block devices (O_DIRECT
//! where the device allows it); [`mem::MemDevice`] keeps everything in
//! memory and can simulate a crash, for tests; [`undo::UndoDevice`] lets
//! crash tests of a real daemon drop every write since the last flush, and
//! [`fault::FailingDevice`] makes it fail with EIO. [`uring`] carries
//! transfers on buffers registered with the kernel (io_uring fixed
//! buffers: user memory, or dmabufs on a kernel with the dmabuf series).

pub mod fault;
pub mod file;
pub mod mem;
pub mod record;
pub mod undo;
pub mod uring;

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

pub use file::{FileDevice, OpenMode};
pub use mem::MemDevice;
pub use uring::{FixedBuffer, FixedKind, FixedSource};

/// Which way data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device to buffer.
    Read,
    /// Buffer to device.
    Write,
}

/// One contiguous piece of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoRange {
    pub dev_offset: u64,
    pub buf_offset: usize,
    pub len: usize,
}

/// A borrowed span of memory a transfer reads from or writes into: a
/// slice the daemon owns, or (for tokens) a mapping of a caller's buffer.
pub struct IoBuffer<'a> {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    /// Ordinary pages O_DIRECT can target; false for dmabuf mappings
    /// (VM_PFNMAP), which backends must bounce.
    dma_safe: bool,
    /// Whether the CPU can reach the memory at all (false: a buffer known
    /// only by its registration, see [`IoBuffer::fixed_only`]).
    cpu: bool,
    /// The same memory registered with the device's rings, and the
    /// kernel address of byte 0 (user address or offset in the dmabuf).
    fixed: Option<(&'a FixedBuffer, u64)>,
    tally: Option<&'a Tally>,
    _borrow: PhantomData<&'a mut [u8]>,
}

/// How much of a transfer the backend did not move straight between
/// buffer and device: bytes that went through a CPU bounce, and bytes
/// that went as io_uring fixed-buffer I/O.
#[derive(Debug, Default)]
pub struct Tally {
    pub bounced: AtomicU64,
    pub fixed: AtomicU64,
}

impl Tally {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

// SAFETY: an IoBuffer is only a (pointer, length) view of memory that the
// creator guarantees stays valid for 'a; backends access disjoint ranges.
unsafe impl Send for IoBuffer<'_> {}
// SAFETY: as above; shared use only reads the pointer value.
unsafe impl Sync for IoBuffer<'_> {}

impl<'a> IoBuffer<'a> {
    /// A buffer data can be read into (and written from).
    pub fn from_mut(buf: &'a mut [u8]) -> Self {
        Self {
            ptr: NonNull::new(buf.as_mut_ptr()).unwrap_or(NonNull::dangling()),
            len: buf.len(),
            writable: true,
            dma_safe: true,
            cpu: true,
            fixed: None,
            tally: None,
            _borrow: PhantomData,
        }
    }

    /// A buffer that can only be the source of a write.
    pub fn from_ref(buf: &'a [u8]) -> Self {
        Self {
            ptr: NonNull::new(buf.as_ptr() as *mut u8).unwrap_or(NonNull::dangling()),
            len: buf.len(),
            writable: false,
            dma_safe: true,
            cpu: true,
            fixed: None,
            tally: None,
            _borrow: PhantomData,
        }
    }

    /// # Safety
    /// `ptr..ptr+len` must stay mapped for 'a, and be writable if
    /// `writable` is true.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize, writable: bool, dma_safe: bool) -> Self {
        Self {
            ptr,
            len,
            writable,
            dma_safe,
            cpu: true,
            fixed: None,
            tally: None,
            _borrow: PhantomData,
        }
    }

    /// A buffer known only by its registration `fixed` (byte 0 at kernel
    /// address `addr`), with no CPU mapping: a GPU dmabuf the CPU cannot
    /// map. Transfers that need the CPU (bounces, zeroing) fail with
    /// [`DeviceError::NoCpuAccess`].
    pub fn fixed_only(fixed: &'a FixedBuffer, addr: u64, len: usize, writable: bool) -> Self {
        Self {
            ptr: NonNull::dangling(),
            len,
            writable,
            dma_safe: false,
            cpu: false,
            fixed: Some((fixed, addr)),
            tally: None,
            _borrow: PhantomData,
        }
    }

    /// Says that this memory is also registered as `fixed`, with byte 0
    /// at kernel address `addr` there, so a backend that owns the
    /// registration can use fixed-buffer I/O.
    pub fn with_fixed(mut self, fixed: &'a FixedBuffer, addr: u64) -> Self {
        self.fixed = Some((fixed, addr));
        self
    }

    /// Has the backend count how the bytes moved.
    pub fn with_tally(mut self, tally: &'a Tally) -> Self {
        self.tally = Some(tally);
        self
    }

    fn count(&self, pick: impl Fn(&Tally) -> &AtomicU64, n: usize) {
        if let Some(t) = self.tally {
            Tally::add(pick(t), n);
        }
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn is_dma_safe(&self) -> bool {
        self.dma_safe
    }

    /// The view of `len` bytes at `offset`, or None if it does not fit.
    pub fn slice(&self, offset: usize, len: usize) -> Option<IoBuffer<'_>> {
        if offset.checked_add(len)? > self.len {
            return None;
        }
        Some(IoBuffer {
            // SAFETY: offset + len <= self.len.
            ptr: unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(offset)) },
            len,
            writable: self.writable,
            dma_safe: self.dma_safe,
            cpu: self.cpu,
            fixed: self.fixed.map(|(f, addr)| (f, addr + offset as u64)),
            tally: self.tally,
            _borrow: PhantomData,
        })
    }

    /// Copies `dst.len()` bytes at `offset` out of the buffer.
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), DeviceError> {
        let r = IoRange {
            dev_offset: 0,
            buf_offset: offset,
            len: dst.len(),
        };
        let p = self.range_ptr(Direction::Write, &r)?;
        // SAFETY: p is valid for dst.len() bytes (range_ptr); dst is ours.
        unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Zeroes `len` bytes at `offset` (holes read into the buffer).
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), DeviceError> {
        let r = IoRange {
            dev_offset: 0,
            buf_offset: offset,
            len,
        };
        let p = self.range_ptr(Direction::Read, &r)?;
        // SAFETY: p is valid and writable for len bytes (range_ptr).
        unsafe { std::ptr::write_bytes(p, 0, len) };
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `r` lies inside this buffer and that the buffer may be
    /// written when data is read into it; returns the range's address.
    fn range_ptr(&self, dir: Direction, r: &IoRange) -> Result<*mut u8, DeviceError> {
        if dir == Direction::Read && !self.writable {
            return Err(DeviceError::ReadOnlyBuffer);
        }
        if !self.cpu {
            return Err(DeviceError::NoCpuAccess);
        }
        let end = r.buf_offset.checked_add(r.len);
        if end.is_none_or(|e| e > self.len) {
            return Err(DeviceError::OutsideBuffer);
        }
        // SAFETY: buf_offset + len <= self.len, checked above.
        Ok(unsafe { self.ptr.as_ptr().add(r.buf_offset) })
    }
}

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("range {offset}+{len} lies outside the device ({size} bytes)")]
    OutsideDevice { offset: u64, len: u64, size: u64 },
    #[error("range lies outside the buffer")]
    OutsideBuffer,
    #[error("buffer is read-only")]
    ReadOnlyBuffer,
    #[error("device is busy: {0}")]
    Busy(String),
    #[error("this device cannot register buffers")]
    NoFixedBuffers,
    /// The caller's memory faulted (SIGBUS/EFAULT) while being copied or
    /// transferred: that transfer fails, the daemon goes on.
    #[error("buffer memory faulted")]
    Fault,
    /// The buffer has no CPU mapping (a dmabuf the CPU cannot map, such
    /// as GPU memory) and this transfer would need one (a bounce, zeroing).
    #[error("buffer has no CPU mapping")]
    NoCpuAccess,
    /// No memory for a bounce buffer.
    #[error("out of memory for a bounce buffer")]
    NoMemory,
    /// A registered buffer was detached by the kernel (the series since
    /// v6: NVMe reset, suspend or removal) and could not be registered
    /// again; the caller may move the data another way.
    #[error("registered buffer detached by the kernel")]
    Detached,
}

/// A device that stores bytes at offsets. Implementations must be safe to
/// call from many threads at once.
pub trait BlockDevice: Send + Sync {
    /// Usable size in bytes.
    fn size(&self) -> u64;

    /// Moves data between `buf` and the device for every range. All
    /// ranges complete (or the call fails) before it returns.
    fn submit(
        &self,
        dir: Direction,
        buf: &IoBuffer<'_>,
        ranges: &[IoRange],
    ) -> Result<(), DeviceError>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DeviceError>;

    /// Human-readable description for logs and INFO.
    fn describe(&self) -> String;

    /// Registers memory (or a dmabuf) for fixed-buffer transfers, where
    /// the backend has them.
    fn register_fixed(&self, _src: FixedSource<'_>) -> Result<FixedBuffer, DeviceError> {
        Err(DeviceError::NoFixedBuffers)
    }

    /// Moves data for several independent transfers at once, so the
    /// device sees them as one queue; one result per transfer, in order.
    fn submit_many(
        &self,
        dir: Direction,
        transfers: &[(&IoBuffer<'_>, &[IoRange])],
    ) -> Vec<Result<(), DeviceError>> {
        transfers
            .iter()
            .map(|(buf, ranges)| self.submit(dir, buf, ranges))
            .collect()
    }

    fn read_at(&self, dev_offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let len = buf.len();
        self.submit(
            Direction::Read,
            &IoBuffer::from_mut(buf),
            &[IoRange {
                dev_offset,
                buf_offset: 0,
                len,
            }],
        )
    }

    fn write_at(&self, dev_offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        self.submit(
            Direction::Write,
            &IoBuffer::from_ref(buf),
            &[IoRange {
                dev_offset,
                buf_offset: 0,
                len: buf.len(),
            }],
        )
    }
}

/// Alignment that O_DIRECT transfers need for memory, offsets and lengths.
pub const DIRECT_ALIGN: usize = 4096;

/// Zeroed heap memory aligned for O_DIRECT, so a transfer into it needs no
/// bounce buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let cap = len.max(1).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let layout = Layout::from_size_align(cap, DIRECT_ALIGN).expect("layout");
        // SAFETY: layout has nonzero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout);
        };
        Self { ptr, cap, len }
    }

    /// Shortens the visible length (the allocation stays).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the visible length, up to the capacity (the bytes are whatever
    /// the buffer last held, zero at first).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "AlignedBuf::set_len past capacity");
        self.len = len;
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, DIRECT_ALIGN).expect("layout");
        // SAFETY: allocated in new() with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// Rejects ranges that run past the end of a device of `size` bytes.
fn check_device_range(size: u64, r: &IoRange) -> Result<(), DeviceError> {
    let len = r.len as u64;
    if r.dev_offset.checked_add(len).is_none_or(|e| e > size) {
        return Err(DeviceError::OutsideDevice {
            offset: r.dev_offset,
            len,
            size,
        });
    }
    Ok(())
}
