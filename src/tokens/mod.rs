//! The token registry: per open file, token -> {caller's buffer, inode,
//! counters}, quotas per open file and per user, and token I/O turned
//! into `fs` reads and writes straight into the buffer.
//!
//! A token belongs to the open file (FUSE file handle) it was registered
//! on, as the kernel series binds a dmabuf to one `struct file`: `dup` and
//! `fork` share it, another `open()` does not. Tokens live in a table of
//! their open file, so an op looks only at the caller's file and the last
//! close drops only its own tokens. In-flight I/O holds an `Arc` of the
//! token, so UNREGISTER (or the last close) during I/O only unlinks it;
//! the buffer (and its quota charge) goes away when the I/O finishes.
//!
//! The registry touches the caller's memory only through `IoBuffer`
//! methods, which the device layer makes fault-safe.

mod backend;
mod buffer;
mod limits;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use log::{debug, info, warn};
use parking_lot::{Mutex, RwLock};
use thiserror::Error;

use crate::blockdev::{DeviceError, FixedBuffer, FixedKind, FixedSource, IoBuffer, Tally};
use crate::fs::{Fs, FsError, InodeAttrs, Kind, OpenFile, Timespec};
use crate::uapi::{self, Counters};

pub use backend::{choose, Backend, Choice};
use buffer::MappedBuffer;
pub use buffer::{holds_file, mount_dev_of, BufKind};
use limits::{Charge, Quotas};
pub use limits::{Exceeded, Limits, Usage};

const ALIGN: u64 = 4096;
/// Token WRITEs go down in pieces this big, so a full device gives a
/// short count instead of losing the whole call.
const WRITE_CHUNK: u64 = 8 << 20;

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
    /// A token quota is used up (EDQUOT): distinct from EPERM, so callers
    /// can tell "free some tokens" from "never allowed".
    #[error("token quota reached: {0}")]
    Quota(Exceeded),
    /// The daemon itself is out of file descriptors (ENFILE): not the
    /// caller's quota, the whole mount's limit.
    #[error("the daemon is out of file descriptors")]
    NoFds,
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
            TokenError::Quota(_) => libc::EDQUOT,
            TokenError::NoFds => libc::ENFILE,
            TokenError::Fs(e) => e.errno(),
        }
    }

    fn is_detached(&self) -> bool {
        matches!(self, TokenError::Fs(FsError::Io(DeviceError::Detached)))
    }

    fn needs_cpu(&self) -> bool {
        matches!(self, TokenError::Fs(FsError::Io(DeviceError::NoCpuAccess)))
    }
}

/// `Counters` as atomics, so an op counts without a lock.
#[derive(Default)]
struct AtomicCounters([AtomicU64; 8]);

impl AtomicCounters {
    fn add(&self, delta: &Counters) {
        let d: [u64; 8] = zerocopy::transmute!(*delta);
        for (c, d) in self.0.iter().zip(d) {
            if d != 0 {
                c.fetch_add(d, Ordering::Relaxed);
            }
        }
    }

    fn get(&self) -> Counters {
        let v: [u64; 8] = std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed));
        zerocopy::transmute!(v)
    }
}

/// Per inode, since mount: counters, and tokens registered on it now.
#[derive(Default)]
struct FileStats {
    counters: AtomicCounters,
    live: AtomicU32,
    detached: AtomicU64,
}

struct Token {
    ino: u64,
    /// The buffer registered with the device (kernel backend); dropped
    /// before the mapping. Taken away when the kernel detached it.
    fixed: RwLock<Option<Arc<FixedBuffer>>>,
    buffer: Arc<MappedBuffer>,
    window_off: usize,
    window_len: usize,
    counters: AtomicCounters,
    /// Ops that found the registration detached and went another way.
    detached: AtomicU64,
    file: Arc<FileStats>,
    _charge: Charge,
}

/// The tokens of one open file.
#[derive(Default)]
struct OpenTokens {
    tokens: Mutex<HashMap<u64, Arc<Token>>>,
}

pub struct Registry {
    next: AtomicU64,
    /// Open file handle -> its tokens.
    files: RwLock<HashMap<u64, Arc<OpenTokens>>>,
    /// Inode -> its counters since mount.
    inodes: Mutex<HashMap<u64, Arc<FileStats>>>,
    quotas: Arc<Quotas>,
    /// The mount's device number (/proc/self/mountinfo), to check that a
    /// caller whose fd the daemon took still holds a file of this mount.
    mount_dev: AtomicU64,
    backend: Backend,
}

/// What a READ or WRITE did: bytes moved, and for a WRITE that moved
/// any, the range it changed (for the page-cache invalidation that must
/// follow it).
#[derive(Debug, Clone, Copy)]
pub struct Moved {
    pub bytes: u64,
    pub written: Option<Written>,
}

/// The last byte of a file that a token WRITE ended at, copied from the
/// token's buffer, with the file's times just after that write: while
/// they are unchanged, no other write has touched the file since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastByte {
    /// None when the buffer has no CPU mapping to copy it from.
    pub byte: Option<u8>,
    pub mtime: Timespec,
    pub ctime: Timespec,
}

/// A range a token WRITE changed, for the invalidation before the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub ino: u64,
    pub offset: u64,
    pub len: u64,
    /// The byte at `offset + len - 1` when the write ended at EOF.
    pub last_byte: Option<LastByte>,
}

impl Written {
    /// The range op `req` on `token` changed, if it wrote any bytes.
    fn of(token: &Token, req: &IoRequest, bytes: u64, last_byte: Option<LastByte>) -> Option<Self> {
        (req.write && bytes > 0).then_some(Self {
            ino: token.ino,
            offset: req.file_offset,
            len: bytes,
            last_byte,
        })
    }
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

impl IoRequest {
    fn unaligned(&self) -> bool {
        (self.file_offset | self.buf_offset | self.len) % ALIGN != 0
    }
}

impl Registry {
    pub fn new(backend: Backend, limits: Limits) -> Self {
        info!(
            "token backend: {} ({}); limits: {} tokens per open file, {} per user, {} bytes registered per user",
            if backend.kind == uapi::BACKEND_KERNEL {
                "kernel"
            } else {
                "mapped"
            },
            backend.reason,
            limits.tokens_per_file,
            limits.tokens_per_user,
            limits.pinned_per_user,
        );
        Self {
            next: AtomicU64::new(1),
            files: RwLock::new(HashMap::new()),
            inodes: Mutex::new(HashMap::new()),
            quotas: Quotas::new(limits),
            mount_dev: AtomicU64::new(0),
            backend,
        }
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    pub fn limits(&self) -> Limits {
        self.quotas.limits()
    }

    /// What user `uid` holds now.
    pub fn usage(&self, uid: u32) -> Usage {
        self.quotas.usage(uid)
    }

    /// Tells the registry the mount's device number (see
    /// [`mount_dev_of`]), once mounted; until then (and where it cannot
    /// be found, 0) the check that a caller still holds a file of this
    /// mount is skipped.
    pub fn set_mount_dev(&self, dev: u64) {
        self.mount_dev.store(dev, Ordering::Relaxed);
    }

    fn table(&self, fh: u64) -> Option<Arc<OpenTokens>> {
        self.files.read().get(&fh).cloned()
    }

    fn token(&self, fh: u64, id: u64) -> Result<Arc<Token>, TokenError> {
        self.table(fh)
            .and_then(|t| t.tokens.lock().get(&id).cloned())
            .ok_or(TokenError::BadFile)
    }

    fn file_stats(&self, ino: u64) -> Arc<FileStats> {
        self.inodes.lock().entry(ino).or_default().clone()
    }

    fn file_quota_left(&self, fh: u64) -> Result<(), TokenError> {
        let limit = self.quotas.limits().tokens_per_file;
        let live = self.table(fh).map_or(0, |t| t.tokens.lock().len());
        if live >= limit as usize {
            debug!("REGISTER on fh {fh}: at the limit of {limit} tokens per open file");
            return Err(TokenError::Quota(Exceeded::FileTokens(limit)));
        }
        Ok(())
    }

    /// REGISTER: takes the caller's `buf_fd` (from thread `tid`, user
    /// `uid`), maps it and binds a new token to open file `fh`.
    pub fn register(
        &self,
        fs: &Fs,
        fh: u64,
        uid: u32,
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
        // Cheap refusal before taking an fd; checked again at insertion.
        self.file_quota_left(fh)?;
        let holder = buffer::Holder {
            dev: self.mount_dev.load(Ordering::Relaxed),
            ino: of.ino,
        };
        let fd = buffer::take_fd(tid, req.buf_fd, &holder)?;
        let buf = buffer::open(fd)?;
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
        let charge = self.quotas.charge(uid, len).map_err(|e| {
            debug!("REGISTER by uid {uid}: at the limit of {e}");
            TokenError::Quota(e)
        })?;
        // The mapped backend moves every buffer through the daemon's
        // mapping; the kernel backend maps a dmabuf only when the CPU
        // must touch it.
        if !self.backend.is_kernel() && buf.ptr().is_none() {
            return Err(TokenError::NotSupported);
        }
        let fixed = self.register_fixed(fs, &buf, req.buf_offset as usize, len as usize)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let file = self.file_stats(of.ino);
        let token = Arc::new(Token {
            ino: of.ino,
            fixed: RwLock::new(fixed.map(Arc::new)),
            buffer: Arc::new(buf),
            window_off: req.buf_offset as usize,
            window_len: len as usize,
            counters: AtomicCounters::default(),
            detached: AtomicU64::new(0),
            file: file.clone(),
            _charge: charge,
        });
        debug!(
            "token {id}: {:?} window {}+{len} on fh {fh} (ino {}, uid {uid})",
            token.buffer.kind, req.buf_offset, of.ino
        );
        let table = self.files.write().entry(fh).or_default().clone();
        let mut tokens = table.tokens.lock();
        let limit = self.quotas.limits().tokens_per_file;
        if tokens.len() >= limit as usize {
            debug!("REGISTER on fh {fh}: at the limit of {limit} tokens per open file");
            drop(tokens);
            return Err(TokenError::Quota(Exceeded::FileTokens(limit)));
        }
        tokens.insert(id, token);
        file.live.fetch_add(1, Ordering::Relaxed);
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
                // The daemon's own tables are full (its fds, or every
                // slot of the mount's buffer tables): not the buffer's fault.
                Err(e) if daemon_out_of_room(&e) => {
                    warn!("cannot register a dmabuf: {e}");
                    Err(TokenError::NoFds)
                }
                Err(e) if self.backend.strict => {
                    warn!("the kernel refused to register a dmabuf for the device: {e}");
                    Err(TokenError::NotSupported)
                }
                Err(e) => {
                    info!("dmabuf not registered with the device ({e}); bounce path");
                    if buf.ptr().is_none() {
                        // Neither the kernel nor the CPU can reach it.
                        return Err(TokenError::NotSupported);
                    }
                    Ok(None)
                }
            },
            BufKind::Memfd => {
                let Some(base) = buf.ptr() else {
                    return Err(TokenError::Invalid("buffer cannot be mapped"));
                };
                // SAFETY: window_off + window_len <= the mapping's length
                // (checked by the caller).
                let addr = unsafe { base.as_ptr().add(window_off) };
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
        let removed = self
            .table(fh)
            .and_then(|t| t.tokens.lock().remove(&req.token))
            .ok_or(TokenError::BadFile)?;
        removed.file.live.fetch_sub(1, Ordering::Relaxed);
        // Dropped here, outside every lock: the unmap and the device
        // unregistration happen now unless I/O still holds the token.
        drop(removed);
        Ok(())
    }

    /// The last close of open file `fh`: its tokens die.
    pub fn release(&self, fh: u64) {
        let Some(table) = self.files.write().remove(&fh) else {
            return;
        };
        let tokens: Vec<Arc<Token>> = table.tokens.lock().drain().map(|(_, t)| t).collect();
        for t in &tokens {
            t.file.live.fetch_sub(1, Ordering::Relaxed);
        }
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
        let token = self.token(fh, req.token)?;
        let of = fs.handle(fh).map_err(|_| TokenError::BadFile);
        let tally = Tally::default();
        let r = of.and_then(|of| {
            check(&of, &token, req)?;
            let fixed = token.fixed.read().clone();
            self.transfer_detaching(fs, &token, req, &tally, fixed.as_deref())
        });
        count(&token, req, &tally, r.as_ref().map(|m| m.0).map_err(|_| ()));
        r.map(|(bytes, last_byte)| Moved {
            bytes,
            written: Written::of(&token, req, bytes, last_byte),
        })
    }

    /// Moves one op's bytes with the token's registration `fixed`; if the
    /// kernel detached it, the op goes once more without it.
    fn transfer_detaching(
        &self,
        fs: &Fs,
        token: &Token,
        req: &IoRequest,
        tally: &Tally,
        fixed: Option<&FixedBuffer>,
    ) -> OpResult {
        match transfer(fs, token, req, tally, fixed) {
            Err(e) if fixed.is_some() && e.is_detached() => {
                self.retry_detached(fs, token, req, tally)
            }
            r => r,
        }
    }

    /// Drops the token's detached registration and runs the op again the
    /// mapped or bounce way.
    fn retry_detached(&self, fs: &Fs, token: &Token, req: &IoRequest, tally: &Tally) -> OpResult {
        self.detach(token);
        transfer(fs, token, req, tally, None)
    }

    /// The kernel detached the token's registered buffer and could not
    /// register it again: the token goes the mapped or bounce way from
    /// now on.
    fn detach(&self, token: &Token) {
        if token.fixed.write().take().is_some() {
            warn!(
                "registered buffer of a token on inode {} detached by the kernel; bouncing it from now on",
                token.ino
            );
        }
        token.detached.fetch_add(1, Ordering::Relaxed);
        token.file.detached.fetch_add(1, Ordering::Relaxed);
    }

    /// BATCH: validates every op and resolves its token, sends all READs
    /// to the device together (one submission where the device has
    /// io_uring), then runs the WRITEs in order; writes each op's result.
    /// Returns the ranges written, for the caller to invalidate before
    /// replying.
    pub fn batch(
        &self,
        fs: &Fs,
        fh: u64,
        batch: &mut uapi::Batch,
    ) -> Result<Vec<Written>, TokenError> {
        if batch.flags != 0 || batch.resv != 0 {
            return Err(TokenError::Invalid("nonzero flags or reserved fields"));
        }
        let count_ops = batch.count as usize;
        if count_ops == 0 || count_ops > uapi::MAX_BATCH {
            return Err(TokenError::Invalid("batch count out of range"));
        }
        let ops = &mut batch.ops[..count_ops];
        let of = fs.handle(fh).map_err(|_| TokenError::BadFile);
        let table = self.table(fh);
        // Resolve and check every op first: what fails here never reaches
        // the device.
        let plans: Vec<Result<Planned, TokenError>> = ops
            .iter()
            .map(|op| {
                let of = of.as_ref().map_err(|_| TokenError::BadFile)?;
                let req = batch_request(op)?;
                let token = table
                    .as_ref()
                    .and_then(|t| t.tokens.lock().get(&req.token).cloned())
                    .ok_or(TokenError::BadFile)?;
                check(of, &token, &req)?;
                let fixed = token.fixed.read().clone();
                Ok(Planned {
                    token,
                    req,
                    fixed,
                    tally: Tally::default(),
                })
            })
            .collect();
        let mut results: Vec<Option<OpResult>> = (0..count_ops).map(|_| None).collect();
        self.batch_reads(fs, &plans, &mut results);
        for (i, plan) in plans.iter().enumerate() {
            let r = match plan {
                Err(_) => continue,
                Ok(p) if !p.req.write => continue,
                Ok(p) => {
                    self.transfer_detaching(fs, &p.token, &p.req, &p.tally, p.fixed.as_deref())
                }
            };
            results[i] = Some(r);
        }
        let mut written = Vec::new();
        for ((op, plan), r) in ops.iter_mut().zip(plans).zip(results) {
            let r = match plan {
                Err(e) => Err(e),
                Ok(p) => {
                    let r = r.expect("every planned op ran");
                    count(
                        &p.token,
                        &p.req,
                        &p.tally,
                        r.as_ref().map(|m| m.0).map_err(|_| ()),
                    );
                    if let Ok((bytes, last_byte)) = &r {
                        written.extend(Written::of(&p.token, &p.req, *bytes, *last_byte));
                    }
                    r
                }
            };
            op.result = match r {
                Ok((bytes, _)) => bytes as i64,
                Err(e) => -(e.errno() as i64),
            };
        }
        Ok(written)
    }

    /// The READ ops of a batch as one `Fs::read_many` call; an op whose
    /// registration the kernel detached goes again on its own, unfixed.
    fn batch_reads(
        &self,
        fs: &Fs,
        plans: &[Result<Planned, TokenError>],
        results: &mut [Option<OpResult>],
    ) {
        let reads: Vec<(usize, &Planned)> = plans
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().ok().filter(|p| !p.req.write).map(|p| (i, p)))
            .collect();
        if reads.is_empty() {
            return;
        }
        let mut bufs: Vec<IoBuffer<'_>> = Vec::with_capacity(reads.len());
        let mut queued: Vec<(usize, &Planned, bool)> = Vec::with_capacity(reads.len());
        for &(i, p) in &reads {
            let cpu = wants_cpu(&p.token, &p.req, p.fixed.as_deref());
            match io_buffer(&p.token, &p.req, &p.tally, p.fixed.as_deref(), cpu) {
                Ok(b) => {
                    bufs.push(b);
                    queued.push((i, p, cpu));
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let many: Vec<(u64, u64, &IoBuffer<'_>)> = queued
            .iter()
            .zip(&bufs)
            .map(|((_, p, _), b)| (p.token.ino, p.req.file_offset, b))
            .collect();
        for (_, p, _) in &queued {
            p.token.buffer.sync(true, false);
        }
        let done = fs.read_many(&many);
        for (_, p, _) in &queued {
            p.token.buffer.sync(true, true);
        }
        drop(many);
        drop(bufs);
        for ((i, p, cpu), r) in queued.into_iter().zip(done) {
            let fixed = p.fixed.as_deref();
            let r = match r.map_err(TokenError::from) {
                Err(e) if fixed.is_some() && e.is_detached() => {
                    self.retry_detached(fs, &p.token, &p.req, &p.tally)
                }
                Err(e) if !cpu && e.needs_cpu() => {
                    transfer_with(fs, &p.token, &p.req, &p.tally, fixed, true)
                }
                r => r.map(|n| (n as u64, None)),
            };
            results[i] = Some(r);
        }
    }

    /// STATS: the file's totals (token 0) or one token of this open file,
    /// with the mount's limits and user `uid`'s usage.
    pub fn stats(
        &self,
        fs: &Fs,
        fh: u64,
        uid: u32,
        req: &uapi::Stats,
    ) -> Result<uapi::Stats, TokenError> {
        // The fields past the counters are output only and ignored on
        // input (like `transferred`), so a caller may pass back the struct
        // it got.
        if req.flags != 0 {
            return Err(TokenError::Invalid("nonzero flags"));
        }
        let ino = fs.handle(fh).map_err(|_| TokenError::BadFile)?.ino;
        let file = self.inodes.lock().get(&ino).cloned();
        let limits = self.quotas.limits();
        let usage = self.quotas.usage(uid);
        let mut out = uapi::Stats {
            token: req.token,
            live_tokens: file.as_ref().map_or(0, |f| f.live.load(Ordering::Relaxed)),
            max_tokens_per_file: limits.tokens_per_file,
            max_tokens_per_user: limits.tokens_per_user,
            max_pinned_per_user: limits.pinned_per_user,
            user_pinned: usage.pinned,
            user_tokens: usage.tokens,
            ..Default::default()
        };
        if req.token == 0 {
            if let Some(f) = file {
                out.c = f.counters.get();
                out.detached_ops = saturate(f.detached.load(Ordering::Relaxed));
            }
            return Ok(out);
        }
        let t = self.token(fh, req.token)?;
        out.window_size = t.window_len as u64;
        out.buf_kind = match t.buffer.kind {
            BufKind::Memfd => uapi::BUF_MEMFD,
            BufKind::Dmabuf => uapi::BUF_DMABUF,
        };
        out.path = match (t.fixed.read().is_some(), t.buffer.kind) {
            (true, _) => uapi::PATH_KERNEL,
            (false, BufKind::Memfd) => uapi::PATH_DIRECT,
            (false, BufKind::Dmabuf) => uapi::PATH_BOUNCE,
        };
        out.c = t.counters.get();
        out.detached_ops = saturate(t.detached.load(Ordering::Relaxed));
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
                | uapi::FEAT_LIMITS
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
        self.files
            .read()
            .values()
            .map(|t| t.tokens.lock().len())
            .sum()
    }
}

/// What one op did: bytes moved, and the file's last byte after a WRITE
/// that ended at EOF.
type OpResult = Result<(u64, Option<LastByte>), TokenError>;

/// A BATCH op resolved to its token, ready to go down.
struct Planned {
    // Dropped before `token`: the slot must be cleared before the last
    // reference to the mapping it points into can unmap it.
    fixed: Option<Arc<FixedBuffer>>,
    token: Arc<Token>,
    req: IoRequest,
    tally: Tally,
}

/// A BATCH op's own fields (EINVAL cases).
fn batch_request(op: &uapi::BatchOp) -> Result<IoRequest, TokenError> {
    let write = op.op == uapi::OP_WRITE;
    if op.flags != 0 || !(write || op.op == uapi::OP_READ) {
        return Err(TokenError::Invalid("bad op or flags"));
    }
    if op.file_offset.checked_add(op.len).is_none() {
        return Err(TokenError::Invalid("file_offset + len overflows"));
    }
    Ok(IoRequest {
        token: op.token,
        file_offset: op.file_offset,
        buf_offset: op.buf_offset,
        len: op.len,
        write,
    })
}

/// The checks every op passes before it moves data: open mode, window,
/// a buffer that can take a READ.
fn check(of: &OpenFile, token: &Token, req: &IoRequest) -> Result<(), TokenError> {
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
    if !req.write && !token.buffer.writable {
        return Err(TokenError::ReadOnlyBuffer);
    }
    Ok(())
}

/// Whether an op goes through the daemon's mapping of the buffer: always,
/// except a dmabuf registered with the device that the CPU has not
/// needed yet and an aligned range (the kernel moves all of it).
fn wants_cpu(token: &Token, req: &IoRequest, fixed: Option<&FixedBuffer>) -> bool {
    fixed.is_none_or(|f| f.kind() != FixedKind::Dmabuf)
        || token.buffer.is_mapped()
        || req.unaligned()
}

/// The part of the token's buffer an op moves, as the device layer sees
/// it (with the fixed registration, when the token has one). `cpu`: with
/// the daemon's mapping (made now if need be: EINVAL when the buffer
/// cannot be mapped), else by the registration alone.
fn io_buffer<'a>(
    token: &'a Token,
    req: &IoRequest,
    tally: &'a Tally,
    fixed: Option<&'a FixedBuffer>,
    cpu: bool,
) -> Result<IoBuffer<'a>, TokenError> {
    let buf = &token.buffer;
    let at = token.window_off + req.buf_offset as usize;
    let len = req.len as usize;
    if let (false, Some(f)) = (cpu, fixed) {
        // A dmabuf is addressed by the offset inside it.
        return Ok(
            IoBuffer::without_cpu_mapping(len, buf.writable, f, at as u64).with_tally(tally),
        );
    }
    let base = buf.ptr().ok_or(TokenError::Invalid(
        "the range needs CPU access (unaligned, a hole, EOF) to a buffer that cannot be mapped",
    ))?;
    // SAFETY: window_off + buf_offset + len <= buffer length (checked at
    // REGISTER and by check()); the mapping lives as long as `token`.
    let io_buf =
        unsafe { IoBuffer::from_raw(base.add(at), len, buf.writable, buf.kind == BufKind::Memfd) }
            .with_tally(tally);
    Ok(match fixed {
        Some(fixed) => {
            // The kernel addresses a user buffer by its address, a dmabuf
            // by the offset inside it.
            let addr = match fixed.kind() {
                FixedKind::User => base.as_ptr() as u64 + at as u64,
                FixedKind::Dmabuf => at as u64,
            };
            io_buf.with_fixed(fixed, addr)
        }
        None => io_buf,
    })
}

/// Moves one op's bytes; a WRITE that ended at EOF also returns the
/// file's last byte, copied from the buffer. An op tried without the CPU
/// that turns out to need it (a hole to zero) goes again with it.
fn transfer(
    fs: &Fs,
    token: &Token,
    req: &IoRequest,
    tally: &Tally,
    fixed: Option<&FixedBuffer>,
) -> OpResult {
    let cpu = wants_cpu(token, req, fixed);
    match transfer_with(fs, token, req, tally, fixed, cpu) {
        Err(e) if !cpu && e.needs_cpu() => transfer_with(fs, token, req, tally, fixed, true),
        r => r,
    }
}

fn transfer_with(
    fs: &Fs,
    token: &Token,
    req: &IoRequest,
    tally: &Tally,
    fixed: Option<&FixedBuffer>,
    cpu: bool,
) -> OpResult {
    let io_buf = io_buffer(token, req, tally, fixed, cpu)?;
    let buf = &token.buffer;
    buf.sync(!req.write, false);
    let r = if req.write {
        write_chunked(fs, token.ino, req.file_offset, &io_buf).map(|(n, attrs)| {
            let end = req.file_offset + n;
            // The times this write itself left: the invalidation stores
            // the byte only if no other write has moved them since.
            let attr = attrs.filter(|a| n > 0 && a.size == end);
            let mut last = [0u8];
            let last_byte = attr.map(|a| LastByte {
                byte: io_buf
                    .copy_out(n as usize - 1, &mut last)
                    .ok()
                    .map(|()| last[0]),
                mtime: a.mtime,
                ctime: a.ctime,
            });
            (n, last_byte)
        })
    } else {
        fs.read_buf(token.ino, req.file_offset, &io_buf)
            .map(|n| (n as u64, None))
            .map_err(TokenError::from)
    };
    buf.sync(!req.write, true);
    r
}

/// Counts an op on its token and its inode (no lock: atomics).
fn count(token: &Token, req: &IoRequest, tally: &Tally, r: Result<u64, ()>) {
    let mut c = Counters::default();
    match r {
        Ok(n) => {
            if req.write {
                c.write_ops = 1;
                c.write_bytes = n;
            } else {
                c.read_ops = 1;
                c.read_bytes = n;
            }
            let unaligned = req.unaligned();
            c.unaligned_ops = unaligned as u64;
            c.fallback_ops = (unaligned || tally.bounced.load(Ordering::Relaxed) > 0) as u64;
            c.kernel_ops = (tally.fixed.load(Ordering::Relaxed) > 0) as u64;
        }
        Err(()) => c.errors = 1,
    }
    token.counters.add(&c);
    token.file.counters.add(&c);
}

/// Writes in chunks; a full device after some progress is a short count.
/// A u64 counter in a u32 field of the ABI.
fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Whether a registration failed because the daemon ran out of fds or
/// buffer-table slots (ENFILE to the caller) rather than on the buffer.
fn daemon_out_of_room(e: &DeviceError) -> bool {
    matches!(e, DeviceError::Io(io) if matches!(io.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOSPC)))
}

/// Also returns the inode's attributes as the last chunk written left them.
fn write_chunked(
    fs: &Fs,
    ino: u64,
    offset: u64,
    buf: &IoBuffer<'_>,
) -> Result<(u64, Option<InodeAttrs>), TokenError> {
    let total = buf.len() as u64;
    let mut done = 0u64;
    let mut attrs = None;
    while done < total {
        let n = (total - done).min(WRITE_CHUNK);
        let piece = buf
            .slice(done as usize, n as usize)
            .expect("chunk within buffer");
        match fs.write_buf_attrs(ino, offset + done, &piece) {
            Ok((_, a)) => {
                done += n;
                attrs = a;
            }
            Err(FsError::NoSpace) if done > 0 => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok((done, attrs))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::blockdev::file::temp_image;
    use crate::blockdev::{BlockDevice, Direction, FileDevice, IoRange, OpenMode};
    use crate::fs::{format, Caller, MountOptions, ROOT_INO};

    /// A device whose next transfer fails as the series (v6+) fails fixed
    /// I/O on a buffer it detached after an NVMe reset.
    struct Detaching {
        inner: FileDevice,
        armed: AtomicBool,
    }

    impl BlockDevice for Detaching {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn submit(
            &self,
            dir: Direction,
            buf: &IoBuffer<'_>,
            ranges: &[IoRange],
        ) -> Result<(), DeviceError> {
            if self.armed.swap(false, Ordering::SeqCst) {
                return Err(DeviceError::Detached);
            }
            self.inner.submit(dir, buf, ranges)
        }
        fn flush(&self) -> Result<(), DeviceError> {
            self.inner.flush()
        }
        fn describe(&self) -> String {
            "detaching test device".into()
        }
        fn register_fixed(&self, src: FixedSource<'_>) -> Result<FixedBuffer, DeviceError> {
            self.inner.register_fixed(src)
        }
    }

    #[test]
    fn a_detached_registration_bounces_once_and_is_counted() {
        let (_dir, path) = temp_image(64 << 20);
        let mut inner = FileDevice::open(&path, OpenMode::default()).unwrap();
        if let Err(e) = inner.enable_fixed_buffers() {
            println!("SKIP: no io_uring fixed buffers here: {e}");
            return;
        }
        let root = Caller { uid: 0, gid: 0 };
        format(&inner, root).unwrap();
        let dev = Arc::new(Detaching {
            inner,
            armed: AtomicBool::new(false),
        });
        let fs = Fs::mount(dev.clone(), MountOptions::default()).unwrap();
        let (attr, fh) = fs.create(root, ROOT_INO, b"f", 0o644, true, true).unwrap();
        let data: Vec<u8> = (0..1 << 16).map(|i| (i * 7 + 3) as u8).collect();
        fs.write(attr.ino, 0, &data).unwrap();
        fs.fsync(attr.ino).unwrap();

        let backend = Backend {
            kind: uapi::BACKEND_KERNEL,
            dmabufs: false,
            strict: false,
            reason: "test".into(),
        };
        let reg = Registry::new(backend, Limits::default());
        let mut mem = crate::client::sealed_memfd("detach", 1 << 16).unwrap();
        mem.write_all(&[0xAA; 1 << 16]).unwrap();
        let req = uapi::Register {
            buf_fd: mem.as_raw_fd(),
            ..Default::default()
        };
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let token = reg.register(&fs, fh, 0, tid, &req).unwrap();
        let stats = |t| {
            reg.stats(
                &fs,
                fh,
                0,
                &uapi::Stats {
                    token: t,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        assert_eq!(stats(token).path, uapi::PATH_KERNEL);

        dev.armed.store(true, Ordering::SeqCst);
        let io = IoRequest {
            token,
            file_offset: 8192,
            buf_offset: 0,
            len: 16384,
            write: false,
        };
        let moved = reg.io(&fs, fh, &io).unwrap();
        assert_eq!(moved.bytes, 16384, "retried once, unfixed");
        let mut got = vec![0u8; 16384];
        mem.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, data[8192..8192 + 16384]);
        let s = stats(token);
        assert_eq!(s.path, uapi::PATH_DIRECT, "the token left the kernel path");
        assert_eq!(s.detached_ops, 1);
        assert_eq!(stats(0).detached_ops, 1, "file totals");
        // Later ops go the mapped way without another detach.
        assert_eq!(reg.io(&fs, fh, &io).unwrap().bytes, 16384);
        assert_eq!(stats(token).detached_ops, 1);
        assert_eq!(stats(token).c.errors, 0);
        reg.release(fh);
        assert_eq!(reg.live_tokens(), 0);
        assert_eq!(reg.usage(0), Usage::default(), "quota back at close");
    }
}
