//! Image-file and block-device backend: positional I/O on one fd.
//!
//! The fd is opened `O_DIRECT` where the underlying filesystem or device
//! accepts it (tmpfs does not), and kept so for the life of the mount.
//! Ranges whose memory, offset or length are not 4 KiB aligned go through
//! an aligned bounce buffer. The whole device is `flock`ed so that two
//! daemons (or a daemon and fsck) never share it.
//!
//! With [`FileDevice::enable_fixed_buffers`], buffers registered through
//! [`BlockDevice::register_fixed`] move by io_uring `READ_FIXED` /
//! `WRITE_FIXED`: the aligned middle of each range goes down as one
//! fixed-buffer op (all ranges of a call queued together), and unaligned
//! heads and tails through the bounce buffer.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::uring::{FixedOp, Rings};
use super::{
    check_device_range, AlignedBuf, BlockDevice, DeviceError, Direction, FixedBuffer, FixedKind,
    FixedSource, IoBuffer, IoRange, DIRECT_ALIGN,
};

const ALIGN: usize = DIRECT_ALIGN;

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
    rings: Option<Arc<Rings>>,
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
        Ok(Self {
            file,
            path: path.to_path_buf(),
            size,
            direct,
            block_device,
            rings: None,
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
        self.rings = Some(Arc::new(Rings::new(self.file.as_raw_fd())?));
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One positional transfer at a raw address, retrying short transfers.
    fn raw_io(&self, dir: Direction, ptr: *mut u8, len: usize, off: u64) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < len {
            // SAFETY: ptr..ptr+len is valid memory (checked by the caller
            // against the IoBuffer bounds or owned by the bounce buffer).
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
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "device returned no data",
                ));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// A transfer O_DIRECT cannot take as it is: go through aligned memory
    /// covering whole blocks, reading the partial edge blocks first when
    /// writing.
    fn bounced(&self, dir: Direction, ptr: *mut u8, len: usize, off: u64) -> std::io::Result<()> {
        let start = off & !(ALIGN as u64 - 1);
        let end = (off + len as u64).div_ceil(ALIGN as u64) * ALIGN as u64;
        let mut bounce = AlignedBuf::new((end - start) as usize);
        let head = (off - start) as usize;
        match dir {
            Direction::Read => {
                self.raw_io(Direction::Read, bounce.as_mut_ptr(), bounce.len(), start)?;
                // SAFETY: both ranges are valid for len bytes and disjoint.
                unsafe { std::ptr::copy_nonoverlapping(bounce.as_mut_ptr().add(head), ptr, len) };
            }
            Direction::Write => {
                let blen = bounce.len();
                if head != 0 {
                    self.raw_io(Direction::Read, bounce.as_mut_ptr(), ALIGN, start)?;
                }
                if (off + len as u64) % ALIGN as u64 != 0 && (head == 0 || blen > ALIGN) {
                    let last = blen - ALIGN;
                    // SAFETY: last + ALIGN == blen, inside the bounce buffer.
                    let p = unsafe { bounce.as_mut_ptr().add(last) };
                    self.raw_io(Direction::Read, p, ALIGN, end - ALIGN as u64)?;
                }
                // SAFETY: both ranges are valid for len bytes and disjoint.
                unsafe { std::ptr::copy_nonoverlapping(ptr, bounce.as_mut_ptr().add(head), len) };
                self.raw_io(Direction::Write, bounce.as_mut_ptr(), blen, start)?;
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
        let fixed = match (&self.rings, buf.fixed) {
            (Some(rings), Some((f, addr))) if f.belongs_to(rings) => {
                Some((rings, f.slot(), addr, f.kind() == FixedKind::Dmabuf))
            }
            _ => None,
        };
        let mut fixed_ops = Vec::new();
        for r in ranges {
            check_device_range(self.size, r)?;
            let ptr = buf.range_ptr(dir, r)?;
            if r.len == 0 {
                continue;
            }
            if let Some((_, slot, base, dmabuf)) = fixed {
                let addr = base + r.buf_offset as u64;
                // Buffer and device offsets that share their alignment
                // split into an aligned middle and unaligned edges.
                if addr % ALIGN as u64 == r.dev_offset % ALIGN as u64 {
                    let head =
                        ((ALIGN as u64 - r.dev_offset % ALIGN as u64) as usize % ALIGN).min(r.len);
                    let mid = (r.len - head) / ALIGN * ALIGN;
                    let tail = r.len - head - mid;
                    if head > 0 {
                        self.bounced(dir, ptr, head, r.dev_offset)?;
                    }
                    if mid > 0 {
                        fixed_ops.push(FixedOp {
                            slot,
                            addr: addr + head as u64,
                            dev_offset: r.dev_offset + head as u64,
                            len: mid,
                            dmabuf,
                        });
                    }
                    if tail > 0 {
                        // SAFETY: head + mid + tail == r.len, inside the range.
                        let p = unsafe { ptr.add(head + mid) };
                        self.bounced(dir, p, tail, r.dev_offset + (head + mid) as u64)?;
                    }
                    buf.count(|t| &t.bounced, head + tail);
                    buf.count(|t| &t.fixed, mid);
                    continue;
                }
            }
            let aligned = buf.is_dma_safe()
                && (ptr as usize) % ALIGN == 0
                && r.dev_offset % ALIGN as u64 == 0
                && r.len % ALIGN == 0;
            if !self.direct || aligned {
                self.raw_io(dir, ptr, r.len, r.dev_offset)?;
            } else {
                self.bounced(dir, ptr, r.len, r.dev_offset)?;
                buf.count(|t| &t.bounced, r.len);
            }
        }
        if let Some((rings, ..)) = fixed {
            if !fixed_ops.is_empty() {
                rings.transfer(dir, &fixed_ops)?;
            }
        }
        Ok(())
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
            if self.rings.is_some() {
                ", io_uring fixed buffers"
            } else {
                ""
            }
        )
    }

    fn register_fixed(&self, src: FixedSource<'_>) -> Result<FixedBuffer, DeviceError> {
        let rings = self.rings.as_ref().ok_or(DeviceError::NoFixedBuffers)?;
        Ok(rings.register(src)?)
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
