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
#[cfg(test)]
pub mod hold;
pub mod mem;
pub mod record;
pub mod undo;
pub mod uring;
pub mod usercopy;

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
    /// The CPU can reach the memory at `ptr`; false for a registered
    /// dmabuf without a CPU mapping (VRAM), which only fixed I/O reaches.
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
// creator guarantees stays valid for 'a, like the `&mut [u8]` it stands
// for. It is deliberately not Sync: it writes through `&self` (reads
// into it, zero, copy_in), so sharing one between threads would race.
unsafe impl Send for IoBuffer<'_> {}

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

    /// A registered buffer of `len` bytes that the CPU cannot map (a
    /// dmabuf of GPU memory): only fixed-buffer I/O reaches it, at kernel
    /// address `addr` for byte 0. Transfers that would need the CPU (an
    /// unaligned edge, zeroing a hole, a backend without fixed I/O) fail
    /// with [`DeviceError::NoCpuAccess`].
    pub fn without_cpu_mapping(
        len: usize,
        writable: bool,
        fixed: &'a FixedBuffer,
        addr: u64,
    ) -> Self {
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

    /// Whether the CPU can reach this memory (see [`Self::without_cpu_mapping`]).
    pub fn has_cpu_mapping(&self) -> bool {
        self.cpu
    }

    /// The view of `len` bytes at `offset`, or None if it does not fit.
    pub fn slice(&self, offset: usize, len: usize) -> Option<IoBuffer<'_>> {
        if offset.checked_add(len)? > self.len {
            return None;
        }
        Some(IoBuffer {
            // SAFETY: offset + len <= self.len (without a CPU mapping the
            // pointer is never dereferenced, and wrapping_add keeps it
            // free of provenance claims).
            ptr: unsafe { NonNull::new_unchecked(self.ptr.as_ptr().wrapping_add(offset)) },
            len,
            writable: self.writable,
            dma_safe: self.dma_safe,
            cpu: self.cpu,
            fixed: self.fixed.map(|(f, addr)| (f, addr + offset as u64)),
            tally: self.tally,
            _borrow: PhantomData,
        })
    }

    /// Copies `dst.len()` bytes at `offset` out of the buffer; a fault
    /// on the buffer's memory is [`DeviceError::Fault`].
    pub fn copy_out(&self, offset: usize, dst: &mut [u8]) -> Result<(), DeviceError> {
        let p = self.cpu_ptr(Direction::Write, offset, dst.len())?;
        // SAFETY: p is valid for dst.len() bytes of the buffer (cpu_ptr),
        // which cannot overlap dst (we hold it mutably).
        unsafe { usercopy::copy(dst.as_mut_ptr(), p, dst.len()) }
    }

    /// Copies `src` into the buffer at `offset`; a fault on the buffer's
    /// memory is [`DeviceError::Fault`].
    pub fn copy_in(&self, offset: usize, src: &[u8]) -> Result<(), DeviceError> {
        let p = self.cpu_ptr(Direction::Read, offset, src.len())?;
        // SAFETY: p is valid and writable for src.len() bytes (cpu_ptr);
        // src is a shared borrow that a writable buffer cannot alias.
        unsafe { usercopy::copy(p, src.as_ptr(), src.len()) }
    }

    /// Zeroes `len` bytes at `offset` (holes read into the buffer).
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), DeviceError> {
        let p = self.cpu_ptr(Direction::Read, offset, len)?;
        // SAFETY: p is valid and writable for len bytes (cpu_ptr).
        unsafe { usercopy::zero(p, len) }
    }

    /// [`Self::range_ptr`] for memory the CPU is about to touch.
    fn cpu_ptr(&self, dir: Direction, offset: usize, len: usize) -> Result<*mut u8, DeviceError> {
        let r = IoRange {
            dev_offset: 0,
            buf_offset: offset,
            len,
        };
        let p = self.range_ptr(dir, &r)?;
        if !self.cpu && len > 0 {
            return Err(DeviceError::NoCpuAccess);
        }
        Ok(p)
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
        let end = r.buf_offset.checked_add(r.len);
        if end.is_none_or(|e| e > self.len) {
            return Err(DeviceError::OutsideBuffer);
        }
        // In bounds (checked above); wrapping_add because a buffer without
        // a CPU mapping has a dangling base that is never dereferenced.
        Ok(self.ptr.as_ptr().wrapping_add(r.buf_offset))
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
    /// Aborts the process if memory runs out: for the daemon's own,
    /// bounded buffers. Anything sized by a caller uses [`Self::try_new`].
    pub fn new(len: usize) -> Self {
        match Self::try_new(len) {
            Ok(b) => b,
            Err(_) => std::alloc::handle_alloc_error(Self::layout(len)),
        }
    }

    /// As [`Self::new`], but running out of memory (or a size no layout
    /// can describe) is [`DeviceError::NoMemory`].
    pub fn try_new(len: usize) -> Result<Self, DeviceError> {
        let cap = len
            .max(1)
            .checked_next_multiple_of(DIRECT_ALIGN)
            .ok_or(DeviceError::NoMemory)?;
        let layout =
            Layout::from_size_align(cap, DIRECT_ALIGN).map_err(|_| DeviceError::NoMemory)?;
        // SAFETY: layout has nonzero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(DeviceError::NoMemory)?;
        Ok(Self { ptr, cap, len })
    }

    fn layout(len: usize) -> Layout {
        let cap = len.max(1).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        Layout::from_size_align(cap, DIRECT_ALIGN).expect("layout")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Tells at run time whether `T` is `Sync`: the inherent method exists
    /// only when it is; otherwise the trait's fallback answers.
    struct SyncProbe<T: ?Sized>(PhantomData<T>);
    trait NotSyncFallback {
        fn is_sync(&self) -> bool {
            false
        }
    }
    impl<T: ?Sized> NotSyncFallback for SyncProbe<T> {}
    impl<T: ?Sized + Sync> SyncProbe<T> {
        fn is_sync(&self) -> bool {
            true
        }
    }

    #[test]
    fn io_buffer_is_send_but_not_sync() {
        // It writes through `&self` (reads land in it, holes are zeroed):
        // shared between threads that would be a data race from safe code.
        assert!(!SyncProbe::<IoBuffer<'static>>(PhantomData).is_sync());
        assert!(SyncProbe::<AlignedBuf>(PhantomData).is_sync());
        fn send<T: Send>() {}
        send::<IoBuffer<'static>>();
    }

    #[test]
    fn allocation_failure_is_an_error_not_an_abort() {
        assert!(matches!(
            AlignedBuf::try_new(usize::MAX - 10),
            Err(DeviceError::NoMemory)
        ));
        // More than any machine has (and more than overcommit allows).
        assert!(matches!(
            AlignedBuf::try_new(1 << 52),
            Err(DeviceError::NoMemory)
        ));
        let b = AlignedBuf::try_new(5000).unwrap();
        assert_eq!((b.len(), b.capacity()), (5000, 8192));
        assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
    }

    #[test]
    fn buffer_copies_check_bounds_and_direction() {
        let mut mem = vec![0u8; 100];
        let buf = IoBuffer::from_mut(&mut mem);
        buf.copy_in(90, &[7; 10]).unwrap();
        assert!(matches!(
            buf.copy_in(91, &[7; 10]),
            Err(DeviceError::OutsideBuffer)
        ));
        assert!(matches!(
            buf.zero(usize::MAX, 2),
            Err(DeviceError::OutsideBuffer)
        ));
        buf.zero(95, 2).unwrap();
        let mut out = [0u8; 10];
        buf.copy_out(90, &mut out).unwrap();
        assert_eq!(out, [7, 7, 7, 7, 7, 0, 0, 7, 7, 7]);
        let ro = [1u8; 10];
        let rbuf = IoBuffer::from_ref(&ro);
        assert!(matches!(
            rbuf.copy_in(0, &[0]),
            Err(DeviceError::ReadOnlyBuffer)
        ));
        assert!(matches!(rbuf.zero(0, 1), Err(DeviceError::ReadOnlyBuffer)));
    }
}
