//! Image-file and block-device backend: positional I/O on one fd.
//!
//! The fd is opened `O_DIRECT` where the underlying filesystem or device
//! accepts it (tmpfs does not), and kept so for the life of the mount.
//! The whole device is `flock`ed so that two daemons (or a daemon and
//! fsck) never share it.
//!
//! On an `O_DIRECT` fd, every range is split where its memory and device
//! offset share their 4 KiB alignment: the aligned middle goes straight
//! between buffer and device through io_uring (plain `READ`/`WRITE`, or
//! `READ_FIXED`/`WRITE_FIXED` for buffers registered through
//! [`BlockDevice::register_fixed`] after [`FileDevice::enable_fixed_buffers`]),
//! all pieces of all transfers of a call in one submission; the partial
//! edge blocks, and whole ranges whose alignments differ or whose memory
//! O_DIRECT cannot target (dmabuf mappings), go through bounce chunks.
//! Bounce memory comes from a bounded per-device pool of fixed-size
//! chunks, so the daemon's memory does not grow with request size, and
//! every CPU copy to or from a caller's memory is fault-guarded
//! ([`super::usercopy`]). A buffered fd (tmpfs image) uses pread/pwrite.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use parking_lot::{Condvar, Mutex};

use super::uring::{OpTarget, RingOp, Rings};
use super::{
    check_device_range, AlignedBuf, BlockDevice, DeviceError, Direction, FixedBuffer, FixedKind,
    FixedSource, IoBuffer, IoRange, DIRECT_ALIGN,
};

const ALIGN: usize = DIRECT_ALIGN;
/// Size of one bounce chunk: large enough that a bounced range moves in
/// few device ops, small enough that many callers can bounce at once.
pub const BOUNCE_CHUNK: usize = 1 << 20;
/// Most bounce chunks one device ever holds (32 MiB); callers beyond
/// that wait for a free chunk rather than allocate.
pub const BOUNCE_CHUNKS: usize = 32;

/// How to open a device.
#[derive(Debug, Clone, Copy)]
pub struct OpenMode {
    pub read_only: bool,
    /// How long to wait for another user (an unmounting daemon) to let go.
    pub lock_wait: Duration,
    /// Try O_DIRECT (falls back to buffered I/O where refused).
    pub direct: bool,
}

impl Default for OpenMode {
    fn default() -> Self {
        Self {
            read_only: false,
            lock_wait: Duration::from_secs(10),
            direct: true,
        }
    }
}

pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    direct: bool,
    block_device: bool,
    /// io_uring rings on an O_DIRECT fd (with buffer tables once fixed
    /// buffers are enabled); None on a buffered fd or without io_uring.
    rings: Option<Arc<Rings>>,
    bounce: BouncePool,
}

impl FileDevice {
    pub fn open(path: &Path, mode: OpenMode) -> Result<Self, DeviceError> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!mode.read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = if mode.direct {
            match open(true) {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    info!(
                        "{}: O_DIRECT refused by the underlying filesystem; using buffered I/O",
                        path.display()
                    );
                    (open(false)?, false)
                }
                Err(e) => return Err(e.into()),
            }
        } else {
            (open(false)?, false)
        };
        lock(&file, path, mode)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            // SAFETY: lseek on an fd we own; SEEK_END gives the device size.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            end as u64
        } else {
            meta.len()
        };
        let rings = if direct {
            match Rings::new(file.as_raw_fd(), false) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    info!("{}: no io_uring ({e}); using pread/pwrite", path.display());
                    None
                }
            }
        } else {
            None
        };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
            direct,
            block_device,
            rings,
            bounce: BouncePool::new(BOUNCE_CHUNK, BOUNCE_CHUNKS),
        })
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Sets up io_uring rings with buffer tables on the device fd, so
    /// that [`BlockDevice::register_fixed`] works. Needs O_DIRECT.
    pub fn enable_fixed_buffers(&mut self) -> Result<(), DeviceError> {
        if !self.direct {
            return Err(DeviceError::NoFixedBuffers);
        }
        if self.rings.as_ref().is_some_and(|r| r.has_tables()) {
            return Ok(());
        }
        self.rings = Some(Arc::new(Rings::new(self.file.as_raw_fd(), true)?));
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bounce chunks allocated so far (never more than [`BOUNCE_CHUNKS`]).
    pub fn bounce_chunks_allocated(&self) -> usize {
        self.bounce.state.lock().made
    }

    /// One positional transfer at a raw address, retrying short transfers.
    fn raw_io(
        &self,
        dir: Direction,
        ptr: *mut u8,
        len: usize,
        off: u64,
    ) -> Result<(), DeviceError> {
        let mut done = 0usize;
        while done < len {
            // SAFETY: ptr..ptr+len is valid memory (checked by the caller
            // against the IoBuffer bounds or owned by the bounce buffer);
            // a caller's page that vanished is EFAULT, not a signal.
            let n = unsafe {
                let p = ptr.add(done);
                let o = (off + done as u64) as libc::off_t;
                match dir {
                    Direction::Read => libc::pread(self.file.as_raw_fd(), p.cast(), len - done, o),
                    Direction::Write => {
                        libc::pwrite(self.file.as_raw_fd(), p.cast(), len - done, o)
                    }
                }
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EFAULT) => return Err(DeviceError::Fault),
                    _ => return Err(e.into()),
                }
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "device returned no data",
                )
                .into());
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Moves `len` bytes at `buf_offset` of `buf` through bounce chunks
    /// covering whole blocks, one chunk at a time (so a caller holds at
    /// most one and the pool cannot deadlock); writes read the partial
    /// edge blocks first.
    fn bounced(
        &self,
        dir: Direction,
        buf: &IoBuffer<'_>,
        buf_offset: usize,
        len: usize,
        off: u64,
    ) -> Result<(), DeviceError> {
        if !buf.has_cpu_mapping() {
            // As the series answers misaligned I/O on a dmabuf.
            return Err(DeviceError::NoCpuAccess);
        }
        let a = ALIGN as u64;
        let end = off + len as u64;
        let mut chunk = self.bounce.take()?;
        let mut cs = off / a * a;
        let last = end.div_ceil(a) * a;
        while cs < last {
            let ce = (cs + chunk.capacity() as u64).min(last);
            let blen = (ce - cs) as usize;
            chunk.set_len(blen);
            // This chunk's share of the caller's bytes.
            let (ds, de) = (off.max(cs), end.min(ce));
            let at = (ds - cs) as usize;
            let n = (de - ds) as usize;
            let bo = buf_offset + (ds - off) as usize;
            match dir {
                Direction::Read => {
                    self.raw_io(Direction::Read, chunk.as_mut_ptr(), blen, cs)?;
                    buf.copy_in(bo, &chunk[at..at + n])?;
                }
                Direction::Write => {
                    if ds > cs {
                        self.raw_io(Direction::Read, chunk.as_mut_ptr(), ALIGN, cs)?;
                    }
                    if de < ce && (ds == cs || blen > ALIGN) {
                        // SAFETY: blen - ALIGN + ALIGN == blen, in the chunk.
                        let p = unsafe { chunk.as_mut_ptr().add(blen - ALIGN) };
                        self.raw_io(Direction::Read, p, ALIGN, ce - a)?;
                    }
                    buf.copy_out(bo, &mut chunk[at..at + n])?;
                    self.raw_io(Direction::Write, chunk.as_mut_ptr(), blen, cs)?;
                }
            }
            cs = ce;
        }
        buf.count(|t| &t.bounced, len);
        Ok(())
    }

    /// Checks one transfer, bounces what must be bounced, and appends the
    /// pieces that go straight between memory and device to `ops`.
    fn plan(
        &self,
        dir: Direction,
        buf: &IoBuffer<'_>,
        ranges: &[IoRange],
        tag: usize,
        ops: &mut Vec<RingOp>,
    ) -> Result<(), DeviceError> {
        let fixed = match (&self.rings, buf.fixed) {
            (Some(rings), Some((f, addr))) if f.belongs_to(rings) => Some((
                OpTarget::Fixed {
                    slot: f.slot(),
                    dmabuf: f.kind() == FixedKind::Dmabuf,
                },
                addr,
            )),
            _ => None,
        };
        for r in ranges {
            check_device_range(self.size, r)?;
            let ptr = buf.range_ptr(dir, r)?;
            if r.len == 0 {
                continue;
            }
            if !self.direct {
                // Buffered I/O takes any alignment.
                if !buf.has_cpu_mapping() {
                    return Err(DeviceError::NoCpuAccess);
                }
                ops.push(RingOp {
                    target: OpTarget::Plain,
                    addr: ptr as u64,
                    dev_offset: r.dev_offset,
                    len: r.len,
                    tag,
                });
                continue;
            }
            // Where the aligned middle can go without the CPU.
            let straight = match fixed {
                Some((target, base)) => Some((target, base + r.buf_offset as u64)),
                None if buf.is_dma_safe() && buf.has_cpu_mapping() => {
                    Some((OpTarget::Plain, ptr as u64))
                }
                None => None,
            };
            match straight {
                Some((target, addr)) if addr % ALIGN as u64 == r.dev_offset % ALIGN as u64 => {
                    let head =
                        ((ALIGN as u64 - r.dev_offset % ALIGN as u64) as usize % ALIGN).min(r.len);
                    let mid = (r.len - head) / ALIGN * ALIGN;
                    let tail = r.len - head - mid;
                    if head > 0 {
                        self.bounced(dir, buf, r.buf_offset, head, r.dev_offset)?;
                    }
                    if mid > 0 {
                        ops.push(RingOp {
                            target,
                            addr: addr + head as u64,
                            dev_offset: r.dev_offset + head as u64,
                            len: mid,
                            tag,
                        });
                        if target != OpTarget::Plain {
                            buf.count(|t| &t.fixed, mid);
                        }
                    }
                    if tail > 0 {
                        let at = head + mid;
                        self.bounced(dir, buf, r.buf_offset + at, tail, r.dev_offset + at as u64)?;
                    }
                }
                _ => self.bounced(dir, buf, r.buf_offset, r.len, r.dev_offset)?,
            }
        }
        Ok(())
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn submit(
        &self,
        dir: Direction,
        buf: &IoBuffer<'_>,
        ranges: &[IoRange],
    ) -> Result<(), DeviceError> {
        self.submit_many(dir, &[(buf, ranges)])
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Every transfer's straight pieces go to one ring in one submission
    /// (as many as the ring depth takes); bounced edges move first, chunk
    /// by chunk. One result per transfer: a failed one does not stop the
    /// others.
    fn submit_many(
        &self,
        dir: Direction,
        transfers: &[(&IoBuffer<'_>, &[IoRange])],
    ) -> Vec<Result<(), DeviceError>> {
        let mut results: Vec<Result<(), DeviceError>> = transfers.iter().map(|_| Ok(())).collect();
        let mut ops = Vec::new();
        for (tag, (buf, ranges)) in transfers.iter().enumerate() {
            let mark = ops.len();
            if let Err(e) = self.plan(dir, buf, ranges, tag, &mut ops) {
                ops.truncate(mark);
                results[tag] = Err(e);
            }
        }
        if ops.is_empty() {
            return results;
        }
        // Plain ops may go by pread/pwrite when every ring is busy, so
        // more callers than rings still reach the device in parallel.
        let need_ring = ops.iter().any(|op| op.target != OpTarget::Plain);
        let ring_results = self
            .rings
            .as_ref()
            .and_then(|rings| rings.run(dir, &ops, transfers.len(), need_ring));
        match ring_results {
            Some(ring_results) => {
                for (tag, r) in ring_results.into_iter().enumerate() {
                    if let (Err(e), Ok(())) = (r, &results[tag]) {
                        results[tag] = Err(e);
                    }
                }
            }
            None => {
                for op in &ops {
                    if results[op.tag].is_ok() {
                        if let Err(e) = self.raw_io(dir, op.addr as *mut u8, op.len, op.dev_offset)
                        {
                            results[op.tag] = Err(e);
                        }
                    }
                }
            }
        }
        results
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.file.sync_data()?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} I/O{})",
            self.path.display(),
            if self.direct { "O_DIRECT" } else { "buffered" },
            match &self.rings {
                Some(r) if r.has_tables() => ", io_uring fixed buffers",
                Some(_) => ", io_uring",
                None => "",
            }
        )
    }

    fn register_fixed(&self, src: FixedSource<'_>) -> Result<FixedBuffer, DeviceError> {
        match &self.rings {
            Some(rings) if rings.has_tables() => Ok(rings.register(src)?),
            _ => Err(DeviceError::NoFixedBuffers),
        }
    }
}

/// A bounded pool of aligned bounce chunks: at most `max` ever exist;
/// a caller that finds none free waits for one.
struct BouncePool {
    chunk: usize,
    max: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    free: Vec<AlignedBuf>,
    made: usize,
}

/// A chunk on loan from the pool; goes back when dropped.
struct Chunk<'a> {
    pool: &'a BouncePool,
    buf: Option<AlignedBuf>,
}

impl BouncePool {
    fn new(chunk: usize, max: usize) -> Self {
        Self {
            chunk,
            max,
            state: Mutex::new(PoolState {
                free: Vec::new(),
                made: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// A free chunk, a new one while under the limit, or (at the limit)
    /// the next one given back. Allocation failure is `NoMemory`.
    fn take(&self) -> Result<Chunk<'_>, DeviceError> {
        let mut st = self.state.lock();
        loop {
            if let Some(buf) = st.free.pop() {
                return Ok(Chunk {
                    pool: self,
                    buf: Some(buf),
                });
            }
            if st.made < self.max {
                st.made += 1;
                drop(st);
                return match AlignedBuf::try_new(self.chunk) {
                    Ok(buf) => Ok(Chunk {
                        pool: self,
                        buf: Some(buf),
                    }),
                    Err(e) => {
                        self.state.lock().made -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            self.freed.wait(&mut st);
        }
    }
}

impl std::ops::Deref for Chunk<'_> {
    type Target = AlignedBuf;
    fn deref(&self) -> &AlignedBuf {
        self.buf.as_ref().expect("chunk on loan")
    }
}

impl std::ops::DerefMut for Chunk<'_> {
    fn deref_mut(&mut self) -> &mut AlignedBuf {
        self.buf.as_mut().expect("chunk on loan")
    }
}

impl Drop for Chunk<'_> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.state.lock().free.push(buf);
            self.pool.freed.notify_one();
        }
    }
}

/// Takes an exclusive (read-write) or shared (read-only) flock, waiting up
/// to `mode.lock_wait` for a previous daemon to finish with the device.
fn lock(file: &File, path: &Path, mode: OpenMode) -> Result<(), DeviceError> {
    let op = if mode.read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    let deadline = Instant::now() + mode.lock_wait;
    let mut warned = false;
    loop {
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e.into());
        }
        if Instant::now() >= deadline {
            return Err(DeviceError::Busy(format!(
                "{} is in use by another dmabuf-fs process (mounted?)",
                path.display()
            )));
        }
        if !warned {
            warn!("{}: waiting for another user to release it", path.display());
            warned = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh sparse image file of `len` bytes in its own temp dir (removed
/// when the returned guard drops), for tests of the layers above too.
#[cfg(test)]
pub(crate) fn temp_image(len: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    File::create(&path).unwrap().set_len(len).unwrap();
    (dir, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_transfers_round_trip() {
        let (_dir, path) = temp_image(1 << 20);
        let dev = FileDevice::open(&path, OpenMode::default()).unwrap();
        let data: Vec<u8> = (0..10000u32).map(|i| (i * 7) as u8).collect();
        dev.write_at(4096 * 3 + 5, &data[1..]).unwrap();
        let mut back = vec![0u8; data.len() - 1];
        dev.read_at(4096 * 3 + 5, &mut back).unwrap();
        assert_eq!(back, &data[1..]);
        // Neighbouring bytes were preserved by the read-modify-write.
        let mut edge = [1u8; 5];
        dev.read_at(4096 * 3, &mut edge).unwrap();
        assert_eq!(edge, [0; 5]);
        assert!(matches!(
            dev.read_at((1 << 20) - 10, &mut [0u8; 20]),
            Err(DeviceError::OutsideDevice { .. })
        ));
    }

    #[test]
    fn second_writer_is_refused() {
        let (_dir, path) = temp_image(1 << 20);
        let _first = FileDevice::open(&path, OpenMode::default()).unwrap();
        let second = FileDevice::open(
            &path,
            OpenMode {
                lock_wait: Duration::from_millis(50),
                ..OpenMode::default()
            },
        );
        assert!(matches!(second, Err(DeviceError::Busy(_))));
    }

    #[test]
    fn fixed_buffers_move_data_and_split_unaligned_edges() {
        use crate::blockdev::Tally;
        use std::sync::atomic::Ordering;
        let (_dir, path) = temp_image(8 << 20);
        let mut dev = FileDevice::open(&path, OpenMode::default()).unwrap();
        if !dev.is_direct() {
            println!("SKIP: no O_DIRECT on the temp dir's filesystem");
            return;
        }
        dev.enable_fixed_buffers().unwrap();
        let mut src = AlignedBuf::new(1 << 20);
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let mut dst = AlignedBuf::new(1 << 20);
        let reg = |b: &mut AlignedBuf| {
            dev.register_fixed(FixedSource::User {
                addr: b.as_mut_ptr(),
                len: b.len(),
            })
            .unwrap()
        };
        let fsrc = reg(&mut src);
        let fdst = reg(&mut dst);
        let (src_addr, dst_addr) = (src.as_ptr() as u64, dst.as_ptr() as u64);

        // Aligned: everything goes down as fixed-buffer I/O.
        let t = Tally::default();
        let wbuf = IoBuffer::from_ref(&src)
            .with_fixed(&fsrc, src_addr)
            .with_tally(&t);
        let ranges = [
            IoRange {
                dev_offset: 1 << 20,
                buf_offset: 0,
                len: 512 << 10,
            },
            IoRange {
                dev_offset: 4 << 20,
                buf_offset: 512 << 10,
                len: 512 << 10,
            },
        ];
        dev.submit(Direction::Write, &wbuf, &ranges).unwrap();
        assert_eq!(t.fixed.load(Ordering::Relaxed), 1 << 20);
        assert_eq!(t.bounced.load(Ordering::Relaxed), 0);
        let t = Tally::default();
        let rbuf = IoBuffer::from_mut(&mut dst)
            .with_fixed(&fdst, dst_addr)
            .with_tally(&t);
        dev.submit(Direction::Read, &rbuf, &ranges).unwrap();
        assert_eq!(t.fixed.load(Ordering::Relaxed), 1 << 20);
        assert!(dst[..] == src[..]);
        let mut plain = vec![0u8; 512 << 10];
        dev.read_at(4 << 20, &mut plain).unwrap();
        assert!(plain[..] == src[512 << 10..]);

        // Unaligned but sharing alignment: edges bounced, middle fixed.
        let t = Tally::default();
        let r = IoRange {
            dev_offset: (2 << 20) + 100,
            buf_offset: 100,
            len: 3 * 4096,
        };
        let wbuf = IoBuffer::from_ref(&src)
            .with_fixed(&fsrc, src_addr)
            .with_tally(&t);
        dev.submit(Direction::Write, &wbuf, &[r]).unwrap();
        assert_eq!(t.fixed.load(Ordering::Relaxed), 2 * 4096);
        assert_eq!(t.bounced.load(Ordering::Relaxed), 4096);
        let mut back = vec![0u8; 3 * 4096];
        dev.read_at(r.dev_offset, &mut back).unwrap();
        assert!(back[..] == src[100..100 + 3 * 4096]);

        // Clearing O_DIRECT behind the device's back refuses fixed I/O
        // rather than trusting a kernel that may move nothing.
        let fd = dev.file.as_raw_fd();
        // SAFETY: fcntl on the device's own fd.
        unsafe {
            libc::fcntl(
                fd,
                libc::F_SETFL,
                libc::fcntl(fd, libc::F_GETFL) & !libc::O_DIRECT,
            )
        };
        let rbuf = IoBuffer::from_mut(&mut dst).with_fixed(&fdst, dst_addr);
        assert!(dev.submit(Direction::Read, &rbuf, &ranges).is_err());
    }
}

#[cfg(test)]
mod hardening_tests {
    use super::*;
    use crate::blockdev::usercopy;
    use std::ptr::NonNull;
    use std::sync::atomic::Ordering;

    /// A device on a temp image filled with a known pattern, and the
    /// model of its bytes; None where the temp dir refuses O_DIRECT.
    fn patterned_device(len: usize) -> Option<(tempfile::TempDir, FileDevice, Vec<u8>)> {
        let (dir, path) = temp_image(len as u64);
        let model: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8 ^ 0x5a).collect();
        std::fs::write(&path, &model).unwrap();
        let dev = FileDevice::open(&path, OpenMode::default()).unwrap();
        if !dev.is_direct() || dev.rings.is_none() {
            println!("SKIP: no O_DIRECT or io_uring on the temp dir's filesystem");
            return None;
        }
        Some((dir, dev, model))
    }

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len).map(|i| ((i + seed) * 31 % 251) as u8).collect()
    }

    /// A view of `mem` as memory O_DIRECT cannot target (like a dmabuf
    /// mapping), which the device must bounce whole.
    fn not_dma_safe(mem: &mut [u8]) -> IoBuffer<'_> {
        // SAFETY: mem is borrowed mutably for the buffer's life.
        unsafe {
            IoBuffer::from_raw(
                NonNull::new(mem.as_mut_ptr()).unwrap(),
                mem.len(),
                true,
                false,
            )
        }
    }

    #[test]
    fn bounce_round_trips_match_the_model_at_every_alignment() {
        const DEV: usize = 8 << 20;
        let Some((_dir, dev, mut model)) = patterned_device(DEV) else {
            return;
        };
        let lens = [
            1,
            511,
            4095,
            4096,
            4097,
            3 * 4096 + 7,
            BOUNCE_CHUNK + 4096 + 3,
            2 * BOUNCE_CHUNK + 100,
        ];
        let mut seed = 0;
        for &len in &lens {
            for &(buf_off, dev_off) in &[
                (0, 0),
                (0, 4096),
                (1, 1),
                (100, 4196),
                (4095, 3),
                (7, 8192 + 4095),
                (0, 4000),
            ] {
                for dma_safe in [true, false] {
                    let dev_off = dev_off as u64 + (seed as u64 % 5) * (1 << 20);
                    if dev_off as usize + len > DEV {
                        continue;
                    }
                    seed += 1;
                    let data = pattern(len, seed);
                    let mut mem = AlignedBuf::new(buf_off + len + 4096);
                    mem[buf_off..buf_off + len].copy_from_slice(&data);
                    let r = IoRange {
                        dev_offset: dev_off,
                        buf_offset: buf_off,
                        len,
                    };
                    let wbuf = if dma_safe {
                        IoBuffer::from_mut(&mut mem)
                    } else {
                        not_dma_safe(&mut mem)
                    };
                    dev.submit(Direction::Write, &wbuf, &[r]).unwrap();
                    model[dev_off as usize..dev_off as usize + len].copy_from_slice(&data);
                    // Read back into poisoned memory, at a buffer offset
                    // of the same or of another 4 KiB alignment.
                    let mut back = AlignedBuf::new(len + 8192);
                    back.fill(0xEE);
                    let rb = buf_off + if seed % 2 == 0 { 3 } else { 4096 };
                    let rbuf = if dma_safe {
                        IoBuffer::from_mut(&mut back)
                    } else {
                        not_dma_safe(&mut back)
                    };
                    let rr = IoRange {
                        buf_offset: rb,
                        ..r
                    };
                    dev.submit(Direction::Read, &rbuf, &[rr]).unwrap();
                    assert!(
                        back[rb..rb + len] == data[..],
                        "len {len} buf {buf_off} dev {dev_off} dma {dma_safe}"
                    );
                    assert!(back[..rb].iter().all(|&b| b == 0xEE));
                    assert!(back[rb + len..].iter().all(|&b| b == 0xEE));
                }
            }
        }
        // Every neighbouring byte was preserved by the read-modify-writes.
        let mut whole = AlignedBuf::new(DEV);
        dev.read_at(0, &mut whole).unwrap();
        assert!(whole[..] == model[..]);
        // Request sizes up to 2 MiB, all through one chunk at a time.
        assert_eq!(dev.bounce_chunks_allocated(), 1);
    }

    #[test]
    fn bounce_memory_does_not_grow_with_request_size() {
        const LEN: usize = 24 << 20;
        let Some((_dir, dev, model)) = patterned_device(LEN + (1 << 20)) else {
            return;
        };
        // A large unaligned read and write through memory that must be
        // bounced whole: the old backend allocated one bounce buffer as
        // large as the request.
        let mut mem = vec![0u8; LEN];
        let r = IoRange {
            dev_offset: 12345,
            buf_offset: 0,
            len: LEN - 1,
        };
        dev.submit(Direction::Read, &not_dma_safe(&mut mem), &[r])
            .unwrap();
        assert!(mem[..LEN - 1] == model[12345..12345 + LEN - 1]);
        dev.submit(
            Direction::Write,
            &not_dma_safe(&mut mem),
            &[IoRange { dev_offset: 7, ..r }],
        )
        .unwrap();
        assert_eq!(dev.bounce_chunks_allocated(), 1);
        // Many callers at once share at most BOUNCE_CHUNKS chunks.
        std::thread::scope(|s| {
            for t in 0..48 {
                let dev = &dev;
                s.spawn(move || {
                    let mut m = vec![0u8; (1 << 20) + 4096];
                    let r = IoRange {
                        dev_offset: 1 + t as u64 * 4096,
                        buf_offset: 0,
                        len: (1 << 20) + 4096,
                    };
                    dev.submit(Direction::Read, &not_dma_safe(&mut m), &[r])
                        .unwrap();
                });
            }
        });
        let made = dev.bounce_chunks_allocated();
        assert!((1..=BOUNCE_CHUNKS).contains(&made), "{made} chunks");
    }

    #[test]
    fn vanished_caller_memory_fails_the_transfer_not_the_daemon() {
        if !usercopy::GUARDED {
            println!("SKIP: no guarded copies on this architecture");
            return;
        }
        let Some((_dir, dev, model)) = patterned_device(4 << 20) else {
            return;
        };
        let len = 1 << 20;
        let (mfd, p) = usercopy::tests::shared_memfd(len);
        mfd.as_file().set_len(0).unwrap();
        for dma_safe in [true, false] {
            // SAFETY: the mapping stays for the test; its pages are gone.
            let buf = unsafe { IoBuffer::from_raw(NonNull::new(p).unwrap(), len, true, dma_safe) };
            for (dev_offset, buf_offset, n) in
                [(0, 0, 8192), (100, 100, 5000), (1, 0, 4096), (0, 0, len)]
            {
                let r = IoRange {
                    dev_offset,
                    buf_offset,
                    len: n,
                };
                for dir in [Direction::Read, Direction::Write] {
                    let e = dev.submit(dir, &buf, &[r]).unwrap_err();
                    assert!(
                        matches!(e, DeviceError::Fault),
                        "{dir:?} {r:?} dma {dma_safe}: {e}"
                    );
                }
            }
            assert!(matches!(buf.zero(10, 100), Err(DeviceError::Fault)));
            assert!(matches!(
                buf.copy_out(0, &mut [0u8; 16]),
                Err(DeviceError::Fault)
            ));
            assert!(matches!(
                buf.copy_in(0, &[1u8; 16]),
                Err(DeviceError::Fault)
            ));
        }
        // The device serves on, and no failed write touched it.
        let mut back = vec![0u8; 4 << 20];
        dev.read_at(0, &mut back).unwrap();
        assert!(back == model);
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(p.cast(), len) };
    }

    #[test]
    fn a_batch_goes_down_as_one_wave_with_one_result_per_transfer() {
        let Some((_dir, dev, model)) = patterned_device(4 << 20) else {
            return;
        };
        let rings = dev.rings.as_ref().unwrap();
        let mut bufs: Vec<AlignedBuf> = (0..128).map(|_| AlignedBuf::new(4096)).collect();
        let ranges: Vec<[IoRange; 1]> = (0..128)
            .map(|i| {
                [IoRange {
                    dev_offset: (i * 7919 % 1000) as u64 * 4096,
                    buf_offset: 0,
                    len: 4096,
                }]
            })
            .collect();
        let io: Vec<IoBuffer<'_>> = bufs.iter_mut().map(|b| IoBuffer::from_mut(b)).collect();
        let mut transfers: Vec<(&IoBuffer<'_>, &[IoRange])> =
            io.iter().zip(&ranges).map(|(b, r)| (b, &r[..])).collect();
        let bad = [IoRange {
            dev_offset: 4 << 20,
            buf_offset: 0,
            len: 4096,
        }];
        transfers[5].1 = &bad;
        let before = rings.counters.waves.load(Ordering::Relaxed);
        let results = dev.submit_many(Direction::Read, &transfers);
        assert_eq!(rings.counters.waves.load(Ordering::Relaxed) - before, 1);
        assert_eq!(results.len(), 128);
        drop(io);
        for (i, r) in results.iter().enumerate() {
            if i == 5 {
                assert!(matches!(r, Err(DeviceError::OutsideDevice { .. })));
                continue;
            }
            r.as_ref().unwrap();
            let at = ranges[i][0].dev_offset as usize;
            assert!(bufs[i][..] == model[at..at + 4096], "transfer {i}");
        }
    }

    /// A device with fixed buffers, a registered source and destination
    /// of `len` bytes each.
    struct Fixed {
        _dir: tempfile::TempDir,
        dev: FileDevice,
        src: AlignedBuf,
        dst: AlignedBuf,
    }

    fn fixed_device(len: usize) -> Option<Fixed> {
        let (dir, mut dev, _) = patterned_device(16 << 20)?;
        dev.enable_fixed_buffers().unwrap();
        let mut src = AlignedBuf::new(len);
        src.copy_from_slice(&pattern(len, 3));
        let dst = AlignedBuf::new(len);
        Some(Fixed {
            _dir: dir,
            dev,
            src,
            dst,
        })
    }

    impl Fixed {
        fn register(&self, b: &AlignedBuf) -> FixedBuffer {
            self.dev
                .register_fixed(FixedSource::User {
                    addr: b.as_ptr() as *mut u8,
                    len: b.len(),
                })
                .unwrap()
        }

        /// Writes all of src at `at` (in 8 ranges) with fixed I/O, reads it
        /// back the same way, and compares.
        fn round_trip(
            &mut self,
            fsrc: &FixedBuffer,
            fdst: &FixedBuffer,
            at: u64,
        ) -> Result<(), DeviceError> {
            let n = self.src.len();
            let ranges: Vec<IoRange> = (0..8)
                .map(|i| IoRange {
                    dev_offset: at + (i * n / 8) as u64,
                    buf_offset: i * n / 8,
                    len: n / 8,
                })
                .collect();
            let addr = self.src.as_ptr() as u64;
            let wbuf = IoBuffer::from_ref(&self.src).with_fixed(fsrc, addr);
            self.dev.submit(Direction::Write, &wbuf, &ranges)?;
            self.dst.fill(0);
            let addr = self.dst.as_ptr() as u64;
            let rbuf = IoBuffer::from_mut(&mut self.dst).with_fixed(fdst, addr);
            self.dev.submit(Direction::Read, &rbuf, &ranges)?;
            assert!(self.dst[..] == self.src[..], "bytes at {at}");
            Ok(())
        }
    }

    #[test]
    fn a_ring_that_could_not_be_drained_is_replaced_not_reused() {
        let Some(mut f) = fixed_device(1 << 20) else {
            return;
        };
        let fsrc = f.register(&f.src);
        let fdst = f.register(&f.dst);
        let rings = Arc::clone(f.dev.rings.as_ref().unwrap());
        // The SQ push fails after 2 of 8 entries: the old code returned
        // with those 2 queued, and the next call on that ring submitted
        // them with its own, counting their completions as its ops'.
        rings.inject.lock().fail_push_after = Some(2);
        f.round_trip(&fsrc, &fdst, 0).unwrap();
        assert_eq!(rings.counters.replaced.load(Ordering::Relaxed), 1);
        // io_uring_enter fails for a wave: that transfer fails, the ring
        // is retired.
        rings.inject.lock().fail_enter = true;
        assert!(f.round_trip(&fsrc, &fdst, 2 << 20).is_err());
        assert_eq!(rings.counters.replaced.load(Ordering::Relaxed), 2);
        // The same with the ops already in flight: the call waits for
        // them to land before it hands the caller's memory back.
        let n = f.src.len();
        let ranges: Vec<IoRange> = (0..8)
            .map(|i| IoRange {
                dev_offset: (3 << 20) + (i * n / 8) as u64,
                buf_offset: i * n / 8,
                len: n / 8,
            })
            .collect();
        let addr = f.src.as_ptr() as u64;
        let wbuf = IoBuffer::from_ref(&f.src).with_fixed(&fsrc, addr);
        f.dev.submit(Direction::Write, &wbuf, &ranges).unwrap();
        f.dst.fill(0);
        rings.inject.lock().fail_enter_in_flight = true;
        let addr = f.dst.as_ptr() as u64;
        let rbuf = IoBuffer::from_mut(&mut f.dst).with_fixed(&fdst, addr);
        assert!(f.dev.submit(Direction::Read, &rbuf, &ranges).is_err());
        assert!(
            f.dst[..] == f.src[..],
            "in-flight reads landed before the call returned"
        );
        assert_eq!(rings.counters.replaced.load(Ordering::Relaxed), 3);
        // Retired rings hold no registrations: they would keep memfd
        // windows pinned and dmabufs attached after UNREGISTER.
        assert_eq!(rings.retired_rings_holding_buffers(), 0);
        // Every ring of the pool (replacements included, whose tables
        // got the live slots again) moves the right bytes.
        for i in 0..2 * RINGS_IN_POOL {
            f.round_trip(&fsrc, &fdst, (4 + i as u64) << 20).unwrap();
        }
        // Plain (unregistered) I/O on the replaced rings too.
        let data = pattern(1 << 20, 9);
        f.dev.write_at(3 << 20, &data).unwrap();
        let mut back = AlignedBuf::new(1 << 20);
        for _ in 0..RINGS_IN_POOL {
            back.fill(0);
            f.dev.read_at(3 << 20, &mut back).unwrap();
            assert!(back[..] == data[..]);
        }
    }

    const RINGS_IN_POOL: usize = 4;

    #[test]
    fn a_ring_that_cannot_be_made_again_is_passed_over() {
        let Some(mut f) = fixed_device(1 << 20) else {
            return;
        };
        let fsrc = f.register(&f.src);
        let fdst = f.register(&f.dst);
        let rings = Arc::clone(f.dev.rings.as_ref().unwrap());
        // One ring breaks and no fresh one can be made: the old pool kept
        // choosing it in turn and failed every fourth transfer with EIO.
        rings.inject.lock().fail_new_ring = true;
        rings.inject.lock().fail_enter = true;
        assert!(f.round_trip(&fsrc, &fdst, 0).is_err());
        for i in 0..4 * RINGS_IN_POOL {
            f.round_trip(&fsrc, &fdst, (1 + i as u64 % 6) << 20)
                .unwrap_or_else(|e| panic!("transfer {i} with one ring gone: {e}"));
        }
        // Once rings can be made again, the pool is whole.
        rings.inject.lock().fail_new_ring = false;
        for i in 0..2 * RINGS_IN_POOL {
            f.round_trip(&fsrc, &fdst, (1 + i as u64 % 6) << 20)
                .unwrap();
        }
    }

    #[test]
    fn detached_slots_are_registered_again_once_then_reported() {
        let Some(mut f) = fixed_device(256 << 10) else {
            return;
        };
        let fsrc = f.register(&f.src);
        let fdst = f.register(&f.dst);
        let rings = Arc::clone(f.dev.rings.as_ref().unwrap());
        // One op answered ENOENT (an NVMe reset detached the buffer):
        // registered again, retried, right bytes.
        rings.inject.lock().enoent = 1;
        f.round_trip(&fsrc, &fdst, 0).unwrap();
        assert_eq!(rings.counters.reregistered.load(Ordering::Relaxed), 1);
        // ENOENT again after re-registration: Detached, for the caller
        // to move the data another way.
        rings.inject.lock().enoent = 1000;
        let e = f.round_trip(&fsrc, &fdst, 0).unwrap_err();
        assert!(matches!(e, DeviceError::Detached), "{e}");
        rings.inject.lock().enoent = 0;
        f.round_trip(&fsrc, &fdst, 1 << 20).unwrap();
    }

    #[test]
    fn buffers_without_a_cpu_mapping_move_only_by_fixed_io() {
        let Some(f) = fixed_device(64 << 10) else {
            return;
        };
        let fsrc = f.register(&f.src);
        let fdst = f.register(&f.dst);
        let (src_addr, dst_addr) = (f.src.as_ptr() as u64, f.dst.as_ptr() as u64);
        let aligned = IoRange {
            dev_offset: 1 << 20,
            buf_offset: 4096,
            len: 32 << 10,
        };
        // As a VRAM dmabuf: the device reaches it only through its slot.
        let wbuf = IoBuffer::without_cpu_mapping(64 << 10, false, &fsrc, src_addr);
        f.dev.submit(Direction::Write, &wbuf, &[aligned]).unwrap();
        let rbuf = IoBuffer::without_cpu_mapping(64 << 10, true, &fdst, dst_addr);
        f.dev.submit(Direction::Read, &rbuf, &[aligned]).unwrap();
        assert!(f.dst[4096..36 << 10] == f.src[4096..36 << 10]);
        // Anything that needs the CPU is refused, and nothing moved.
        let unaligned = IoRange {
            dev_offset: (2 << 20) + 10,
            buf_offset: 10,
            len: 8192,
        };
        for dir in [Direction::Read, Direction::Write] {
            let buf = if dir == Direction::Read { &rbuf } else { &wbuf };
            let e = f.dev.submit(dir, buf, &[unaligned]).unwrap_err();
            assert!(matches!(e, DeviceError::NoCpuAccess), "{e}");
        }
        assert!(matches!(rbuf.zero(0, 10), Err(DeviceError::NoCpuAccess)));
        assert!(matches!(
            wbuf.copy_out(0, &mut [0u8; 4]),
            Err(DeviceError::NoCpuAccess)
        ));
        let mut back = vec![0u8; 8192];
        f.dev.read_at(unaligned.dev_offset, &mut back).unwrap();
        let start = unaligned.dev_offset as usize;
        let model: Vec<u8> = (start..start + 8192)
            .map(|i| (i * 7 % 253) as u8 ^ 0x5a)
            .collect();
        assert!(back == model);
    }

    #[test]
    fn more_callers_than_rings_all_move_the_right_bytes() {
        let Some((_dir, dev, model)) = patterned_device(8 << 20) else {
            return;
        };
        std::thread::scope(|s| {
            for t in 0..12u64 {
                let (dev, model) = (&dev, &model);
                s.spawn(move || {
                    let at = t * (512 << 10);
                    let data = pattern(256 << 10, t as usize);
                    let mut buf = AlignedBuf::new(256 << 10);
                    for round in 0..20 {
                        if round % 2 == 0 {
                            dev.write_at(at, &data).unwrap();
                        } else {
                            dev.read_at(at + (256 << 10), &mut buf).unwrap();
                            let m = (at + (256 << 10)) as usize;
                            assert!(buf[..] == model[m..m + (256 << 10)]);
                            dev.read_at(at, &mut buf).unwrap();
                            assert!(buf[..] == data[..]);
                        }
                    }
                });
            }
        });
    }
}
