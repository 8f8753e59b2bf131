//! The Rust client API for token I/O: open a file on a dmabuf-fs mount,
//! register a buffer, move bytes, unregister (RAII).
//!
//! ```no_run
//! use dmabuf_fs::client::{sealed_memfd, TokenFile};
//! let f = TokenFile::open("/mnt/data.bin".as_ref(), false)?;
//! let buf = sealed_memfd("staging", 1 << 20)?;
//! let token = f.register(&buf, 0, 0)?;
//! let n = token.read(0, 0, 1 << 20)?; // file offset 0 -> buffer offset 0
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zerocopy::{FromBytes, IntoBytes};

use crate::uapi::{self, BatchOp, Info, Io, Register, Stats, Unregister};

/// A file on a dmabuf-fs mount, opened for token I/O.
pub struct TokenFile {
    file: File,
}

fn ioctl<T: IntoBytes + FromBytes>(file: &File, cmd: u32, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a plain repr(C) struct of exactly the size encoded
    // in `cmd`; the kernel reads and writes only those bytes.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            cmd as libc::c_ulong,
            arg.as_mut_bytes().as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl TokenFile {
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Self { file })
    }

    pub fn from_file(file: File) -> Self {
        Self { file }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn info(&self) -> io::Result<Info> {
        let mut info = Info::default();
        ioctl(&self.file, uapi::IOC_INFO, &mut info)?;
        Ok(info)
    }

    /// Counters of the file (token 0) or of one token of this open file.
    pub fn stats(&self, token: u64) -> io::Result<Stats> {
        let mut s = Stats {
            token,
            ..Default::default()
        };
        ioctl(&self.file, uapi::IOC_STATS, &mut s)?;
        Ok(s)
    }

    /// Registers `size` bytes (0 = to the end) of `buf` from `offset`.
    pub fn register(&self, buf: &impl AsFd, offset: u64, size: u64) -> io::Result<Token<'_>> {
        let mut r = Register {
            buf_fd: buf.as_fd().as_raw_fd(),
            buf_offset: offset,
            size,
            ..Default::default()
        };
        ioctl(&self.file, uapi::IOC_REGISTER, &mut r)?;
        Ok(Token {
            file: self,
            id: r.token,
        })
    }

    /// One READ (file -> buffer) or WRITE (buffer -> file) by token id.
    pub fn transfer(
        &self,
        token: u64,
        write: bool,
        file_offset: u64,
        buf_offset: u64,
        len: u64,
    ) -> io::Result<u64> {
        let mut io = Io {
            token,
            file_offset,
            buf_offset,
            len,
            ..Default::default()
        };
        let cmd = if write {
            uapi::IOC_WRITE_CMD
        } else {
            uapi::IOC_READ_CMD
        };
        ioctl(&self.file, cmd, &mut io)?;
        Ok(io.transferred)
    }

    /// Runs up to [`uapi::MAX_BATCH`] ops; each gets its own `result`.
    pub fn batch(&self, ops: &mut [BatchOp]) -> io::Result<()> {
        if ops.is_empty() || ops.len() > uapi::MAX_BATCH {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut b = Box::<uapi::Batch>::default();
        b.count = ops.len() as u32;
        b.ops[..ops.len()].copy_from_slice(ops);
        ioctl(&self.file, uapi::IOC_BATCH, b.as_mut())?;
        ops.copy_from_slice(&b.ops[..ops.len()]);
        Ok(())
    }

    pub fn unregister(&self, token: u64) -> io::Result<()> {
        let mut u = Unregister {
            token,
            ..Default::default()
        };
        ioctl(&self.file, uapi::IOC_UNREGISTER, &mut u)
    }
}

/// A registered buffer; unregistered when dropped.
pub struct Token<'f> {
    file: &'f TokenFile,
    id: u64,
}

impl Token<'_> {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// File -> buffer. Short only at EOF.
    pub fn read(&self, file_offset: u64, buf_offset: u64, len: u64) -> io::Result<u64> {
        self.file
            .transfer(self.id, false, file_offset, buf_offset, len)
    }

    /// Buffer -> file. Short only when the device is full.
    pub fn write(&self, file_offset: u64, buf_offset: u64, len: u64) -> io::Result<u64> {
        self.file
            .transfer(self.id, true, file_offset, buf_offset, len)
    }

    pub fn stats(&self) -> io::Result<Stats> {
        self.file.stats(self.id)
    }

    /// Keeps the token registered past this handle (until the file's last
    /// close); returns its id.
    pub fn leak(self) -> u64 {
        let id = self.id;
        std::mem::forget(self);
        id
    }
}

impl Drop for Token<'_> {
    fn drop(&mut self) {
        let _ = self.file.unregister(self.id);
    }
}

/// A memfd of `len` bytes (rounded up to 4 KiB) sealed against shrinking,
/// as REGISTER requires.
pub fn sealed_memfd(name: &str, len: u64) -> io::Result<File> {
    let mfd = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create(name)
        .map_err(|e| io::Error::other(e.to_string()))?;
    mfd.as_file().set_len(len.div_ceil(4096).max(1) * 4096)?;
    mfd.add_seal(memfd::FileSeal::SealShrink)
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok(mfd.into_file())
}

/// A dmabuf over all of `memfd` from the kernel's udmabuf driver
/// (`/dev/udmabuf`; the memfd must be sealed against shrinking and a
/// multiple of 4 KiB): the stand-in for a GPU buffer on machines without
/// one. NotFound where the driver is absent.
pub fn udmabuf_from_memfd(memfd: &File) -> io::Result<File> {
    #[repr(C)]
    struct UdmabufCreate {
        memfd: u32,
        flags: u32,
        offset: u64,
        size: u64,
    }
    /// `UDMABUF_CREATE` = _IOW('u', 0x42, struct udmabuf_create).
    const UDMABUF_CREATE: libc::c_ulong = 0x4018_7542;
    const UDMABUF_FLAGS_CLOEXEC: u32 = 1;
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/udmabuf")?;
    let create = UdmabufCreate {
        memfd: memfd.as_raw_fd() as u32,
        flags: UDMABUF_FLAGS_CLOEXEC,
        offset: 0,
        size: memfd.metadata()?.len(),
    };
    // SAFETY: UDMABUF_CREATE reads one struct udmabuf_create.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), UDMABUF_CREATE, &create) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}
