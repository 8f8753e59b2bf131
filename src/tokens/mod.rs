//! The token registry: token -> {mapped buffer, bound open file, inode,
//! counters}, and token I/O turned into `fs` reads and writes straight
//! into the mapping.
//!
//! A token belongs to the open file (FUSE file handle) it was registered
//! on, as the kernel series binds a dmabuf to one `struct file`: `dup` and
//! `fork` share it, another `open()` does not. In-flight I/O holds an
//! `Arc` of the token, so UNREGISTER (or the last close) during I/O only
//! unlinks it; the mapping goes away when the I/O finishes.

mod backend;
mod buffer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::{debug, info, warn};
use parking_lot::Mutex;
use thiserror::Error;

use crate::blockdev::{FixedBuffer, FixedKind, FixedSource, IoBuffer, Tally};
use crate::fs::{Fs, FsError, Kind};
use crate::uapi::{self, Counters};

pub use backend::{choose, Backend, Choice};
pub use buffer::BufKind;
use buffer::MappedBuffer;

const ALIGN: u64 = 4096;
/// Token WRITEs go down in pieces this big, so a full device gives a
/// short count instead of losing the whole call.
const WRITE_CHUNK: u64 = 8 << 20;
/// Threads one BATCH call spreads its ops over.
const BATCH_WORKERS: usize = 8;

#[derive(Debug, Error)]
pub enum TokenError {
    /// Malformed request or unusable buffer (EINVAL).
    #[error("invalid: {0}")]
    Invalid(&'static str),
    /// Not a token of this open file, or the wrong open mode (EBADF).
    #[error("token not registered on this open file")]
    BadFile,
    /// Outside the token's window, or zero length (EFAULT).
    #[error("range outside the token window")]
    Fault,
    /// READ into a buffer mapped read-only (EACCES).
    #[error("buffer is read-only")]
    ReadOnlyBuffer,
    /// The backend cannot reach this buffer (EOPNOTSUPP).
    #[error("buffer not supported by the active backend")]
    NotSupported,
    /// The daemon may not take the caller's fd (EPERM).
    #[error("cannot take the caller's fd")]
    Permission,
    #[error(transparent)]
    Fs(#[from] FsError),
}

impl TokenError {
    /// The errno a caller sees (the kernel series' choices where it has
    /// one); BATCH reports it per op as `-errno`.
    pub fn errno(&self) -> i32 {
        match self {
            TokenError::Invalid(_) => libc::EINVAL,
            TokenError::BadFile => libc::EBADF,
            TokenError::Fault => libc::EFAULT,
            TokenError::ReadOnlyBuffer => libc::EACCES,
            TokenError::NotSupported => libc::EOPNOTSUPP,
            TokenError::Permission => libc::EPERM,
            TokenError::Fs(e) => e.errno(),
        }
    }
}

struct Token {
    fh: u64,
    ino: u64,
    /// The buffer registered with the device (kernel backend); dropped
    /// before the mapping.
    fixed: Option<FixedBuffer>,
    buffer: Arc<MappedBuffer>,
    window_off: usize,
    window_len: usize,
    counters: Mutex<Counters>,
}

#[derive(Default)]
struct Inner {
    tokens: HashMap<u64, Arc<Token>>,
    /// Counters per inode since mount.
    files: HashMap<u64, Counters>,
}

pub struct Registry {
    next: AtomicU64,
    inner: Mutex<Inner>,
    backend: Backend,
}

/// What a READ or WRITE did: bytes moved, and the inode they moved in
/// or out of (for the page-cache invalidation that must follow a WRITE).
#[derive(Debug, Clone, Copy)]
pub struct Moved {
    pub bytes: u64,
    pub ino: u64,
}

/// One READ or WRITE as the caller asked for it.
#[derive(Debug, Clone, Copy)]
pub struct IoRequest {
    pub token: u64,
    pub file_offset: u64,
    pub buf_offset: u64,
    pub len: u64,
    pub write: bool,
}

impl Registry {
    pub fn new(backend: Backend) -> Self {
        info!(
            "token backend: {} ({})",
            if backend.kind == uapi::BACKEND_KERNEL {
                "kernel"
            } else {
                "mapped"
            },
            backend.reason
        );
        Self {
            next: AtomicU64::new(1),
            inner: Mutex::new(Inner::default()),
            backend,
        }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// REGISTER: maps the caller's `buf_fd` (taken from thread `tid`) and
    /// binds a new token to open file `fh`.
    pub fn register(
        &self,
        fs: &Fs,
        fh: u64,
        tid: u32,
        req: &uapi::Register,
    ) -> Result<u64, TokenError> {
        if req.flags != 0 || req.resv != [0; 4] {
            return Err(TokenError::Invalid("nonzero flags or reserved fields"));
        }
        if req.buf_offset % ALIGN != 0 || req.size % ALIGN != 0 {
            return Err(TokenError::Invalid(
                "buf_offset and size must be multiples of 4096",
            ));
        }
        let of = fs.handle(fh).map_err(|_| TokenError::BadFile)?;
        if fs.getattr(of.ino)?.kind != Kind::File {
            // As the kernel series answers for a file without dmabuf
            // support: only regular files move data.
            return Err(TokenError::NotSupported);
        }
        let fd = buffer::take_fd(tid, req.buf_fd)?;
        let buf = buffer::map(fd)?;
        let total = buf.len() as u64;
        let len = if req.size == 0 {
            total.saturating_sub(req.buf_offset)
        } else {
            req.size
        };
        if len == 0 || req.buf_offset.checked_add(len).is_none_or(|e| e > total) {
            return Err(TokenError::Invalid(
                "window empty or past the end of the buffer",
            ));
        }
        let fixed = self.register_fixed(fs, &buf, req.buf_offset as usize, len as usize)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = Arc::new(Token {
            fh,
            ino: of.ino,
            fixed,
            buffer: Arc::new(buf),
            window_off: req.buf_offset as usize,
            window_len: len as usize,
            counters: Mutex::new(Counters::default()),
        });
        debug!(
            "token {id}: {:?} window {}+{len} on fh {fh} (ino {})",
            token.buffer.kind, req.buf_offset, of.ino
        );
        self.inner.lock().tokens.insert(id, token);
        Ok(id)
    }

    /// Under the kernel backend, registers the token's buffer with the
    /// device: a dmabuf whole, a memfd's window as user memory. What the
    /// kernel will not take goes the mapped way (a dmabuf bounced, a memfd
    /// straight into the mapping), except a dmabuf under tokens=kernel:
    /// EOPNOTSUPP, so that a missing kernel feature is loud.
    fn register_fixed(
        &self,
        fs: &Fs,
        buf: &MappedBuffer,
        window_off: usize,
        window_len: usize,
    ) -> Result<Option<FixedBuffer>, TokenError> {
        if !self.backend.is_kernel() {
            return Ok(None);
        }
        match buf.kind {
            BufKind::Dmabuf if !self.backend.dmabufs => Err(TokenError::NotSupported),
            BufKind::Dmabuf => match fs.device().register_fixed(FixedSource::Dmabuf(buf.fd())) {
                Ok(f) => Ok(Some(f)),
                Err(e) if self.backend.strict => {
                    warn!("the kernel refused to register a dmabuf for the device: {e}");
                    Err(TokenError::NotSupported)
                }
                Err(e) => {
                    info!("dmabuf not registered with the device ({e}); bounce path");
                    Ok(None)
                }
            },
            BufKind::Memfd => {
                // SAFETY: window_off + window_len <= the mapping's length
                // (checked by the caller).
                let addr = unsafe { buf.ptr().as_ptr().add(window_off) };
                match fs.device().register_fixed(FixedSource::User {
                    addr,
                    len: window_len,
                }) {
                    Ok(f) => Ok(Some(f)),
                    Err(e) => {
                        debug!("memfd window not registered ({e}); mapped path");
                        Ok(None)
                    }
                }
            }
        }
    }

    /// UNREGISTER: only tokens of this open file.
    pub fn unregister(&self, fh: u64, req: &uapi::Unregister) -> Result<(), TokenError> {
        if req.resv != [0; 3] {
            return Err(TokenError::Invalid("nonzero reserved fields"));
        }
        let mut inner = self.inner.lock();
        match inner.tokens.get(&req.token) {
            Some(t) if t.fh == fh => {
                inner.tokens.remove(&req.token);
                Ok(())
            }
            _ => Err(TokenError::BadFile),
        }
    }

    /// The last close of open file `fh`: its tokens die.
    pub fn release(&self, fh: u64) {
        self.inner.lock().tokens.retain(|_, t| t.fh != fh);
    }

    /// Checks an `Io` struct's own fields (EINVAL cases).
    pub fn request(io: &uapi::Io, write: bool) -> Result<IoRequest, TokenError> {
        if io.flags != 0 || io.resv0 != 0 || io.resv != [0; 2] {
            return Err(TokenError::Invalid("nonzero flags or reserved fields"));
        }
        if io.file_offset.checked_add(io.len).is_none() {
            return Err(TokenError::Invalid("file_offset + len overflows"));
        }
        Ok(IoRequest {
            token: io.token,
            file_offset: io.file_offset,
            buf_offset: io.buf_offset,
            len: io.len,
            write,
        })
    }

    /// READ or WRITE through a token of open file `fh`.
    pub fn io(&self, fs: &Fs, fh: u64, req: &IoRequest) -> Result<Moved, TokenError> {
        let token = self
            .inner
            .lock()
            .tokens
            .get(&req.token)
            .filter(|t| t.fh == fh)
            .cloned()
            .ok_or(TokenError::BadFile)?;
        let tally = Tally::default();
        let r = self.io_with(fs, fh, &token, req, &tally);
        let unaligned = (req.file_offset | req.buf_offset | req.len) % ALIGN != 0;
        let bounced = unaligned || tally.bounced.load(Ordering::Relaxed) > 0;
        let kernel = tally.fixed.load(Ordering::Relaxed) > 0;
        let count = |c: &mut Counters| match &r {
            Ok(n) => {
                if req.write {
                    c.write_ops += 1;
                    c.write_bytes += n;
                } else {
                    c.read_ops += 1;
                    c.read_bytes += n;
                }
                c.unaligned_ops += unaligned as u64;
                c.fallback_ops += bounced as u64;
                c.kernel_ops += kernel as u64;
            }
            Err(_) => c.errors += 1,
        };
        count(&mut token.counters.lock());
        count(self.inner.lock().files.entry(token.ino).or_default());
        r.map(|bytes| Moved {
            bytes,
            ino: token.ino,
        })
    }

    fn io_with(
        &self,
        fs: &Fs,
        fh: u64,
        token: &Token,
        req: &IoRequest,
        tally: &Tally,
    ) -> Result<u64, TokenError> {
        let of = fs.handle(fh).map_err(|_| TokenError::BadFile)?;
        if (req.write && !of.writable) || (!req.write && !of.readable) {
            return Err(TokenError::BadFile);
        }
        if req.len == 0
            || req
                .buf_offset
                .checked_add(req.len)
                .is_none_or(|e| e > token.window_len as u64)
        {
            return Err(TokenError::Fault);
        }
        let buf = &token.buffer;
        if !req.write && !buf.writable {
            return Err(TokenError::ReadOnlyBuffer);
        }
        let at = token.window_off + req.buf_offset as usize;
        // SAFETY: window_off + buf_offset + len <= buffer length (checked
        // at REGISTER and above); the mapping lives as long as `token`.
        let mut io_buf = unsafe {
            IoBuffer::from_raw(
                buf.ptr().add(at),
                req.len as usize,
                buf.writable,
                buf.kind == BufKind::Memfd,
            )
        }
        .with_tally(tally);
        if let Some(fixed) = &token.fixed {
            // The kernel addresses a user buffer by its address, a dmabuf
            // by the offset inside it.
            let addr = match fixed.kind() {
                FixedKind::User => buf.ptr().as_ptr() as u64 + at as u64,
                FixedKind::Dmabuf => at as u64,
            };
            io_buf = io_buf.with_fixed(fixed, addr);
        }
        buf.sync(!req.write, false);
        let r = if req.write {
            write_chunked(fs, token.ino, req.file_offset, &io_buf)
        } else {
            fs.read_buf(token.ino, req.file_offset, &io_buf)
                .map(|n| n as u64)
                .map_err(TokenError::from)
        };
        buf.sync(!req.write, true);
        r
    }

    /// BATCH: runs every op (in parallel when there are several), writing
    /// each op's result; returns the (inode, offset, len) ranges written,
    /// for the caller to invalidate before replying.
    pub fn batch(
        &self,
        fs: &Fs,
        fh: u64,
        batch: &mut uapi::Batch,
    ) -> Result<Vec<(u64, u64, u64)>, TokenError> {
        if batch.flags != 0 || batch.resv != 0 {
            return Err(TokenError::Invalid("nonzero flags or reserved fields"));
        }
        let count = batch.count as usize;
        if count == 0 || count > uapi::MAX_BATCH {
            return Err(TokenError::Invalid("batch count out of range"));
        }
        let ops = &mut batch.ops[..count];
        let run = |op: &mut uapi::BatchOp| -> Option<(u64, u64, u64)> {
            let write = op.op == uapi::OP_WRITE;
            let r = if op.flags != 0 || !(write || op.op == uapi::OP_READ) {
                Err(TokenError::Invalid("bad op or flags"))
            } else if op.file_offset.checked_add(op.len).is_none() {
                Err(TokenError::Invalid("file_offset + len overflows"))
            } else {
                let req = IoRequest {
                    token: op.token,
                    file_offset: op.file_offset,
                    buf_offset: op.buf_offset,
                    len: op.len,
                    write,
                };
                self.io(fs, fh, &req)
            };
            match r {
                Ok(m) => {
                    op.result = m.bytes as i64;
                    (write && m.bytes > 0).then_some((m.ino, op.file_offset, m.bytes))
                }
                Err(e) => {
                    op.result = -(e.errno() as i64);
                    None
                }
            }
        };
        // Independent ops go down together, so the device sees a queue.
        let workers = BATCH_WORKERS.min(count.div_ceil(4));
        let per = count.div_ceil(workers);
        let written = std::thread::scope(|s| {
            let handles: Vec<_> = ops
                .chunks_mut(per)
                .map(|chunk| s.spawn(move || chunk.iter_mut().filter_map(run).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        Ok(written)
    }

    /// STATS: the file's totals (token 0) or one token of this open file.
    pub fn stats(&self, fs: &Fs, fh: u64, req: &uapi::Stats) -> Result<uapi::Stats, TokenError> {
        if req.flags != 0 || req.resv != [0; 4] {
            return Err(TokenError::Invalid("nonzero flags or reserved fields"));
        }
        let ino = fs.handle(fh).map_err(|_| TokenError::BadFile)?.ino;
        let inner = self.inner.lock();
        let live = inner.tokens.values().filter(|t| t.ino == ino).count() as u32;
        let mut out = uapi::Stats {
            token: req.token,
            live_tokens: live,
            ..Default::default()
        };
        if req.token == 0 {
            out.c = inner.files.get(&ino).copied().unwrap_or_default();
            return Ok(out);
        }
        let t = inner
            .tokens
            .get(&req.token)
            .filter(|t| t.fh == fh)
            .ok_or(TokenError::BadFile)?;
        out.window_size = t.window_len as u64;
        out.buf_kind = match t.buffer.kind {
            BufKind::Memfd => uapi::BUF_MEMFD,
            BufKind::Dmabuf => uapi::BUF_DMABUF,
        };
        out.path = match (&t.fixed, t.buffer.kind) {
            (Some(_), _) => uapi::PATH_KERNEL,
            (None, BufKind::Memfd) => uapi::PATH_DIRECT,
            (None, BufKind::Dmabuf) => uapi::PATH_BOUNCE,
        };
        out.c = *t.counters.lock();
        Ok(out)
    }

    /// INFO: what this mount offers.
    pub fn info(&self) -> uapi::Info {
        let mut info = uapi::Info {
            abi_version: uapi::ABI_VERSION,
            backend: self.backend.kind,
            fast_align: ALIGN as u32,
            max_batch: uapi::MAX_BATCH as u32,
            features: uapi::FEAT_BATCH
                | uapi::FEAT_STATS
                | uapi::FEAT_UNALIGNED
                | uapi::FEAT_MEMFD
                | if self.backend.dmabufs {
                    uapi::FEAT_DMABUF
                } else {
                    0
                },
            max_io: 1 << 40,
            ..Default::default()
        };
        info.set_reason(&self.backend.reason);
        info
    }

    /// Live tokens (for tests and logs).
    pub fn live_tokens(&self) -> usize {
        self.inner.lock().tokens.len()
    }
}

/// Writes in chunks; a full device after some progress is a short count.
fn write_chunked(fs: &Fs, ino: u64, offset: u64, buf: &IoBuffer<'_>) -> Result<u64, TokenError> {
    let total = buf.len() as u64;
    let mut done = 0u64;
    while done < total {
        let n = (total - done).min(WRITE_CHUNK);
        let piece = buf
            .slice(done as usize, n as usize)
            .expect("chunk within buffer");
        match fs.write_buf(ino, offset + done, &piece) {
            Ok(_) => done += n,
            Err(FsError::NoSpace) if done > 0 => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(done)
}
