//! The filesystem proper: namespace, inodes, extent maps, xattrs and the
//! POSIX rules, on top of a [`BlockDevice`]. Knows nothing about FUSE.
//!
//! Metadata lives in memory ([`meta::Meta`]) and every change is a
//! [`Record`] applied there and queued in the [`journal`]; `fsync` and a
//! periodic commit make the queue durable (ordered mode: data blocks are
//! flushed before the records that point at them, and freed blocks are
//! reused only once the record freeing them is durable).
//!
//! Locking: `state` (metadata) is held briefly; file data moves under the
//! inode's own `io` lock only, so a slow transfer never blocks `ls`.
//! Order: inode io lock, then `sync_lock`, then `state`, then `journal`.

mod alloc;
pub mod check;
mod error;
mod journal;
mod meta;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::Duration;

use log::{error, info, warn};
use parking_lot::{Mutex, RwLock};

use crate::blockdev::{AlignedBuf, BlockDevice, Direction, IoBuffer, IoRange};
use crate::format::{
    self, InodeAttrs, Record, Superblock, BLOCK_SIZE, CHECKPOINT_HEADER_BLOCKS, LOG_START_BLOCK,
    MAX_FILE_SIZE, MAX_NAME_LEN, MIN_DEVICE_BLOCKS,
};

pub use crate::format::{Kind, Timespec, ROOT_INO};
pub use error::{FsError, Result};

use alloc::Allocator;
use journal::Journal;
use meta::{runs, Meta, Run, FIRST_COOKIE};

const BS: u64 = BLOCK_SIZE;
/// Largest xattr value, as Linux (XATTR_SIZE_MAX).
pub const MAX_XATTR_VALUE: usize = 65536;
const MAX_LINKS: u32 = 65000;
/// Data I/O locks shared by all inodes (see `Fs::io_lock`).
const IO_LOCK_STRIPES: usize = 1024;

/// What `stat` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// 512-byte units, as st_blocks.
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub crtime: Timespec,
    pub rdev: u32,
    pub blksize: u32,
}

/// Who is asking: new inodes take these ids.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy)]
pub enum TimeSet {
    Now,
    At(Timespec),
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timespec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    Replace,
    NoReplace,
    Exchange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrMode {
    Any,
    Create,
    Replace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekWhence {
    Data,
    Hole,
}

/// fallocate(2) modes this filesystem implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallocMode {
    /// Allocate (zeroed, unwritten) blocks; grow the size unless keep_size.
    Allocate { keep_size: bool },
    /// Deallocate; the size never changes.
    PunchHole,
    /// Make the range read as zeros, keeping it allocated.
    ZeroRange { keep_size: bool },
}

/// When reads update the access time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtimeMode {
    /// relatime: when atime is older than mtime or ctime, or than a day.
    Relative,
    /// strictatime: on every access.
    Strict,
    /// noatime: never.
    Never,
}

#[derive(Debug, Clone, Copy)]
pub struct MountOptions {
    pub read_only: bool,
    /// How often queued metadata is committed without an fsync.
    pub commit_interval: Duration,
    pub atime: AtimeMode,
    /// Directories never get atime updates.
    pub nodiratime: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            commit_interval: Duration::from_secs(5),
            atime: AtimeMode::Relative,
            nodiratime: false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// One readdir entry; `offset` resumes after it.
pub struct DirEntry<'a> {
    pub ino: u64,
    pub offset: u64,
    pub kind: Kind,
    pub name: &'a [u8],
}

/// An open file: what the handle may do.
#[derive(Debug, Clone, Copy)]
pub struct OpenFile {
    pub ino: u64,
    pub readable: bool,
    pub writable: bool,
}

/// What kind of inode to create, with its mode and device number.
struct NewNode {
    kind: Kind,
    mode: u32,
    rdev: u32,
}

struct State {
    meta: Meta,
    alloc: Allocator,
    /// (lsn of the freeing record, start, len): reusable once it is durable.
    pending_free: Vec<(u64, u64, u64)>,
    handles: HashMap<u64, OpenFile>,
    next_fh: u64,
    /// Blocks held back from data so a checkpoint always fits.
    reserve: u64,
}

pub struct Fs {
    dev: Arc<dyn BlockDevice>,
    sb: Superblock,
    opts: MountOptions,
    state: RwLock<State>,
    io_locks: Vec<RwLock<()>>,
    journal: Mutex<Journal>,
    sync_lock: Mutex<()>,
    /// Data written since the last device flush.
    data_dirty: AtomicBool,
    committer: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    /// Set after a failed commit: the mount no longer accepts changes.
    broken: AtomicBool,
}

/// Summary of a freshly formatted device.
#[derive(Debug, Clone)]
pub struct FormatSummary {
    pub superblock: Superblock,
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    // SAFETY: getrandom writes at most u.len() bytes into u.
    let n = unsafe { libc::getrandom(u.as_mut_ptr().cast(), u.len(), 0) };
    if n != u.len() as isize {
        let t = Timespec::now();
        u[..8].copy_from_slice(&t.sec.to_le_bytes());
        u[8..12].copy_from_slice(&t.nsec.to_le_bytes());
        u[12..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    u
}

/// Writes a new, empty filesystem (root owned by `root_owner`) over the
/// whole device.
pub fn format(dev: &dyn BlockDevice, root_owner: Caller) -> Result<FormatSummary> {
    let total_blocks = dev.size() / BS;
    if total_blocks < MIN_DEVICE_BLOCKS {
        return Err(FsError::Invalid("device too small (minimum 4 MiB)"));
    }
    let now = Timespec::now();
    let sb = Superblock::new(total_blocks, random_uuid(), now.sec);
    // Zero the headers and the log so nothing old can validate.
    let zeros = vec![0u8; (64 * BS) as usize];
    for blk in CHECKPOINT_HEADER_BLOCKS {
        dev.write_at(blk * BS, &zeros[..BS as usize])?;
    }
    let mut b = 0;
    while b < sb.log_blocks {
        let n = (sb.log_blocks - b).min(64);
        dev.write_at((LOG_START_BLOCK + b) * BS, &zeros[..(n * BS) as usize])?;
        b += n;
    }
    let mut meta = Meta::default();
    let root = InodeAttrs {
        ino: ROOT_INO,
        kind: Kind::Dir,
        perm: 0o755,
        uid: root_owner.uid,
        gid: root_owner.gid,
        nlink: 2,
        size: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        rdev: 0,
        parent: ROOT_INO,
    };
    meta.apply(&Record::Inode(root))
        .map_err(|e| FsError::Corrupt(e.to_string()))?;
    meta.next_ino = ROOT_INO + 1;
    let (blob, count) = journal::encode_snapshot(&meta);
    let blocks = (blob.len() as u64).div_ceil(BS);
    let extents = vec![(sb.data_start(), blocks)];
    journal::write_checkpoint(dev, sb.salt(), 1, &blob, count, extents)?;
    let block = sb.encode();
    dev.write_at(sb.backup_block() * BS, &block)?;
    dev.write_at(0, &block)?;
    dev.flush()?;
    Ok(FormatSummary { superblock: sb })
}

/// Reads and checks the superblock, falling back to the copy in the last
/// block; refuses a device shorter than the superblock says.
pub fn read_superblock(dev: &dyn BlockDevice) -> Result<Superblock> {
    let size = dev.size();
    if size < BS {
        return Err(FsError::Corrupt(format!(
            "device is {size} bytes: too small to hold a superblock"
        )));
    }
    let mut block = vec![0u8; BS as usize];
    dev.read_at(0, &mut block)?;
    let sb = match Superblock::decode(&block) {
        Ok(sb) => sb,
        Err(primary) => {
            let backup_at = (size / BS - 1) * BS;
            dev.read_at(backup_at, &mut block)?;
            match Superblock::decode(&block) {
                Ok(sb) => {
                    warn!("primary superblock unusable ({primary}); using the backup copy");
                    sb
                }
                Err(_) => return Err(FsError::Corrupt(format!("superblock: {primary}"))),
            }
        }
    };
    if sb.total_blocks * BS > size {
        return Err(FsError::Corrupt(format!(
            "device is truncated: the superblock says {} bytes, the device has {size}",
            sb.total_blocks * BS
        )));
    }
    Ok(sb)
}

impl Fs {
    /// Mounts the filesystem on `dev`: loads the newest checkpoint, replays
    /// the log, checks the metadata and reclaims orphans.
    pub fn mount(dev: Arc<dyn BlockDevice>, opts: MountOptions) -> Result<Arc<Fs>> {
        let sb = read_superblock(dev.as_ref())?;
        let loaded = journal::load(dev.as_ref(), &sb, false)?;
        for s in &loaded.skipped {
            info!("{s}");
        }
        let problems = check::verify(&sb, &loaded.meta, &loaded.checkpoint);
        if let Some(p) = problems.iter().find(|p| !p.is_orphan()) {
            return Err(FsError::Corrupt(format!(
                "{p} ({} problem(s) in all; run `dmabuf-fs fsck --repair`)",
                problems.iter().filter(|p| !p.is_orphan()).count()
            )));
        }
        let alloc = check::build_allocator(&sb, &loaded.meta, &loaded.checkpoint).0;
        let replayed = loaded.replayed;
        let journal = Journal::new(&sb, loaded.checkpoint);
        let fs = Arc::new(Fs {
            dev,
            sb,
            opts,
            state: RwLock::new(State {
                meta: loaded.meta,
                alloc,
                pending_free: Vec::new(),
                handles: HashMap::new(),
                next_fh: 1,
                reserve: 0,
            }),
            io_locks: (0..IO_LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            journal: Mutex::new(journal),
            sync_lock: Mutex::new(()),
            data_dirty: AtomicBool::new(false),
            committer: Mutex::new(None),
            broken: AtomicBool::new(false),
        });
        fs.update_reserve(&mut fs.state.write());
        info!(
            "mounted {} ({} blocks, checkpoint {}, {} log records replayed)",
            fs.dev.describe(),
            fs.sb.total_blocks,
            fs.journal.lock().epoch,
            replayed
        );
        if !opts.read_only {
            let orphans = fs.reclaim_orphans()?;
            if orphans > 0 {
                info!("reclaimed {orphans} orphaned inode(s)");
            }
            // Every writable mount starts a fresh log epoch, so its commits
            // never follow (or sit before) a tail an earlier mount left,
            // torn or not.
            fs.checkpoint()?;
            fs.start_committer();
        }
        Ok(fs)
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    pub fn is_read_only(&self) -> bool {
        self.opts.read_only
    }

    /// Final commit and checkpoint; the device is consistent afterwards.
    pub fn unmount(&self) -> Result<()> {
        if let Some((tx, handle)) = self.committer.lock().take() {
            drop(tx);
            let _ = handle.join();
        }
        if self.opts.read_only || self.broken.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.checkpoint()?;
        info!("unmounted cleanly");
        Ok(())
    }

    fn start_committer(self: &Arc<Self>) {
        let (tx, rx) = mpsc::channel::<()>();
        let weak: Weak<Fs> = Arc::downgrade(self);
        let interval = self.opts.commit_interval;
        let handle = std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || loop {
                match rx.recv_timeout(interval) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let Some(fs) = weak.upgrade() else { return };
                        if let Err(e) = fs.commit() {
                            error!("periodic commit failed: {e}");
                        }
                    }
                    _ => return,
                }
            })
            .expect("spawn commit thread");
        *self.committer.lock() = Some((tx, handle));
    }

    // ----- durability -------------------------------------------------

    fn writable(&self) -> Result<()> {
        if self.opts.read_only || self.broken.load(Ordering::SeqCst) {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }

    /// Applies a record to the metadata and queues it for the log.
    fn log(&self, st: &mut State, rec: Record) {
        let freed = match st.meta.apply(&rec) {
            Ok(f) => f,
            Err(e) => {
                // Live records are built from the state they change.
                error!("internal error applying {rec:?}: {e}");
                return;
            }
        };
        let lsn = self.journal.lock().push(&rec);
        st.pending_free
            .extend(freed.into_iter().map(|(s, l)| (lsn, s, l)));
    }

    /// Makes every change made so far durable: one log commit holding
    /// every queued operation, written after a flush of the data they
    /// point at and followed by a flush of its own.
    ///
    /// A failed commit breaks the mount: the records it carried are gone
    /// from memory, so every later `commit`/`fsync` reports
    /// [`FsError::CommitFailed`] (EIO) rather than pretending, and every
    /// change gets EROFS. Keeping the records queued for a retry was the
    /// other choice; a device that failed a write or flush is not trusted
    /// with the next one (Linux's errseq rule makes the same promise: once
    /// write-back failed, fsync says so).
    pub fn commit(&self) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let _sync = self.sync_lock.lock();
        self.fail_if_broken()?;
        let (queued, upto) = {
            // Under the state lock no operation is half-queued.
            let _st = self.state.read();
            let mut j = self.journal.lock();
            (std::mem::take(&mut j.queued), j.next_lsn - 1)
        };
        let dirty = self.data_dirty.swap(false, Ordering::SeqCst);
        if queued.is_empty() {
            if dirty {
                self.dev.flush().inspect_err(|_| self.fail("flush"))?;
            }
            return Ok(());
        }
        let framed = self.journal.lock().frame(&queued);
        let Some(bytes) = framed else {
            // The log is full: a checkpoint covers these records.
            self.journal.lock().queued.splice(0..0, queued);
            return self.checkpoint_locked();
        };
        // Ordered mode: the data the records point at goes first.
        self.dev.flush().inspect_err(|_| self.fail("flush"))?;
        let at = self.journal.lock().tail();
        self.dev
            .write_at(at, &bytes)
            .and_then(|_| self.dev.flush())
            .inspect_err(|_| self.fail("log write"))?;
        self.journal.lock().advance(bytes.len() as u64);
        self.release_durable(upto);
        Ok(())
    }

    /// Writes a full snapshot and empties the log.
    pub fn checkpoint(&self) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let _sync = self.sync_lock.lock();
        self.checkpoint_locked()
    }

    fn checkpoint_locked(&self) -> Result<()> {
        self.fail_if_broken()?;
        self.dev.flush().inspect_err(|_| self.fail("flush"))?;
        self.data_dirty.store(false, Ordering::SeqCst);
        let (blob, count, extents, upto, seq, salt) = {
            let mut st = self.state.write();
            let (blob, count) = journal::encode_snapshot(&st.meta);
            let blocks = (blob.len() as u64).div_ceil(BS);
            let extents = st.alloc.allocate(blocks, None);
            let got: u64 = extents.iter().map(|e| e.1).sum();
            if got < blocks || extents.len() > format::CheckpointHeader::MAX_EXTENTS {
                for &(s, l) in &extents {
                    st.alloc.release(s, l);
                }
                error!("no room for a checkpoint of {blocks} blocks");
                return Err(FsError::NoSpace);
            }
            let mut j = self.journal.lock();
            let upto = j.next_lsn - 1;
            j.queued.clear();
            (blob, count, extents, upto, j.checkpoint.seq + 1, j.salt)
        };
        let header = match journal::write_checkpoint(
            self.dev.as_ref(),
            salt,
            seq,
            &blob,
            count,
            extents.clone(),
        ) {
            Ok(h) => h,
            Err(e) => {
                self.fail("checkpoint write");
                return Err(e);
            }
        };
        let old = self.journal.lock().restart(header);
        {
            let mut st = self.state.write();
            for (s, l) in old.extents {
                st.alloc.release(s, l);
            }
        }
        self.release_durable(upto);
        self.update_reserve(&mut self.state.write());
        Ok(())
    }

    /// Frees the blocks whose freeing records are now durable.
    fn release_durable(&self, upto: u64) {
        let mut st = self.state.write();
        let pending = std::mem::take(&mut st.pending_free);
        for (lsn, s, l) in pending {
            if lsn <= upto {
                st.alloc.release(s, l);
            } else {
                st.pending_free.push((lsn, s, l));
            }
        }
    }

    fn update_reserve(&self, st: &mut State) {
        let ckpt_blocks: u64 = self
            .journal
            .lock()
            .checkpoint
            .extents
            .iter()
            .map(|e| e.1)
            .sum();
        let estimate = (st.meta.inodes.len() as u64 * 256).div_ceil(BS);
        st.reserve = 2 * ckpt_blocks.max(estimate) + 64;
    }

    fn fail_if_broken(&self) -> Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(FsError::CommitFailed);
        }
        Ok(())
    }

    fn fail(&self, what: &str) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            error!("device error during {what}: the filesystem no longer accepts changes (remount after fixing the device)");
        }
    }

    fn reclaim_orphans(&self) -> Result<usize> {
        let mut st = self.state.write();
        let orphans: Vec<u64> = st
            .meta
            .inodes
            .values()
            .filter(|i| i.attrs.nlink == 0 && i.open_count == 0)
            .map(|i| i.attrs.ino)
            .collect();
        for &ino in &orphans {
            self.log(&mut st, Record::DropInode { ino });
        }
        Ok(orphans.len())
    }

    // ----- attributes ---------------------------------------------------

    fn attr_of(i: &meta::Inode) -> Attr {
        let a = &i.attrs;
        Attr {
            ino: a.ino,
            kind: a.kind,
            perm: a.perm,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            size: match a.kind {
                Kind::Symlink => i.target.len() as u64,
                _ => a.size,
            },
            blocks: i.allocated_blocks * (BS / 512),
            atime: a.atime,
            mtime: a.mtime,
            ctime: a.ctime,
            crtime: a.crtime,
            rdev: a.rdev,
            blksize: BS as u32,
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let st = self.state.read();
        st.meta.get(ino).map(Self::attr_of).ok_or(FsError::NotFound)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        let st = self.state.read();
        let ino = Self::child(&st.meta, parent, name)?;
        st.meta.get(ino).map(Self::attr_of).ok_or(FsError::NotFound)
    }

    fn child(meta: &Meta, parent: u64, name: &[u8]) -> Result<u64> {
        let p = meta.get(parent).ok_or(FsError::NotFound)?;
        if name == b"." {
            // Any inode: the kernel revalidates file handles this way.
            return Ok(parent);
        }
        let d = p.dir.as_ref().ok_or(FsError::NotDir)?;
        match name {
            b".." => Ok(p.attrs.parent),
            _ => d.get(name).ok_or(FsError::NotFound),
        }
    }

    pub fn setattr(&self, ino: u64, set: &SetAttr) -> Result<Attr> {
        self.writable()?;
        let io = self.io_lock(ino);
        let _io = io.write();
        let mut st = self.state.write();
        let now = Timespec::now();
        let inode = st.meta.get(ino).ok_or(FsError::NotFound)?;
        let mut a = inode.attrs.clone();
        if let Some(size) = set.size {
            match a.kind {
                Kind::File => {}
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid("truncate of a special file")),
            }
            if size > MAX_FILE_SIZE {
                return Err(FsError::FileTooBig);
            }
            if size < a.size {
                self.shrink(&mut st, ino, size)?;
            }
            a.size = size;
            a.mtime = now;
        }
        if let Some(mode) = set.mode {
            a.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = set.uid {
            a.uid = uid;
        }
        if let Some(gid) = set.gid {
            a.gid = gid;
        }
        let resolve = |t: TimeSet| match t {
            TimeSet::Now => now,
            TimeSet::At(t) => t,
        };
        if let Some(t) = set.atime {
            a.atime = resolve(t);
        }
        if let Some(t) = set.mtime {
            a.mtime = resolve(t);
        }
        a.ctime = set.ctime.unwrap_or(now);
        self.log(&mut st, Record::Inode(a));
        Ok(Self::attr_of(st.meta.get(ino).unwrap()))
    }

    /// Drops blocks past `size` and zeroes the tail of the last block, so
    /// a later extension reads zeros there.
    fn shrink(&self, st: &mut State, ino: u64, size: u64) -> Result<()> {
        let keep = size.div_ceil(BS);
        if size % BS != 0 {
            self.zero_by_copy(st, ino, size, keep * BS - size)?;
        }
        self.log(
            st,
            Record::Unmap {
                ino,
                file_block: keep,
                len: u64::MAX - keep,
            },
        );
        Ok(())
    }

    /// Zeroes `len` bytes at file offset `off` where written blocks back
    /// them (holes and unwritten extents already read as zero), never in
    /// place: each such block is copied, zeroed, written to a new block and
    /// remapped by a record of the same operation. Until that operation
    /// commits, a crash brings back the old block with its bytes intact,
    /// which zeroing in place would have destroyed (the old size, or the
    /// range before a punch, still makes them part of the file). The old
    /// block is freed once the remap is durable.
    fn zero_by_copy(&self, st: &mut State, ino: u64, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = off + len;
        let (first, last) = (off / BS, (end - 1) / BS);
        let inode = st.meta.get(ino).ok_or(FsError::NotFound)?;
        let written: Vec<(u64, u64)> = runs(inode, first, last + 1 - first)
            .into_iter()
            .flat_map(|r| match r {
                Run::Mapped { file_block, ext } if !ext.unwritten => (0..ext.len)
                    .map(|k| (file_block + k, ext.dev + k))
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        for (fb, old_dev) in written {
            let mut block = AlignedBuf::new(BS as usize);
            self.dev.read_at(old_dev * BS, &mut block)?;
            let s = off.max(fb * BS) - fb * BS;
            let e = end.min((fb + 1) * BS) - fb * BS;
            block[s as usize..e as usize].fill(0);
            let avail = st.alloc.free_blocks().saturating_sub(st.reserve);
            let new = match (avail > 0).then(|| st.alloc.allocate(1, Some(old_dev))) {
                Some(got) if got.len() == 1 => got[0].0,
                Some(got) => {
                    for (s, l) in got {
                        st.alloc.release(s, l);
                    }
                    return Err(FsError::NoSpace);
                }
                None => return Err(FsError::NoSpace),
            };
            if let Err(e) = self.dev.write_at(new * BS, &block) {
                st.alloc.release(new, 1);
                return Err(e.into());
            }
            self.data_dirty.store(true, Ordering::SeqCst);
            self.log(
                st,
                Record::Map {
                    ino,
                    file_block: fb,
                    dev_block: new,
                    len: 1,
                    unwritten: false,
                },
            );
        }
        Ok(())
    }

    /// The lock that serialises data I/O of `ino` against its truncation
    /// and reallocation. Striped: inodes share a fixed set of locks rather
    /// than each carrying one. Never hold two at once.
    fn io_lock(&self, ino: u64) -> &RwLock<()> {
        &self.io_locks[(ino.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as usize % IO_LOCK_STRIPES]
    }

    // ----- namespace ------------------------------------------------------

    fn check_name(name: &[u8]) -> Result<()> {
        if name.len() > MAX_NAME_LEN {
            return Err(FsError::NameTooLong);
        }
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Err(FsError::Invalid("bad file name"));
        }
        Ok(())
    }

    /// Creates an inode of `kind` named `name` in `parent`.
    fn create_node(
        &self,
        st: &mut State,
        caller: Caller,
        parent: u64,
        name: &[u8],
        node: NewNode,
    ) -> Result<u64> {
        let NewNode { kind, mode, rdev } = node;
        Self::check_name(name)?;
        let p = st.meta.get(parent).ok_or(FsError::NotFound)?;
        let dir = p.dir.as_ref().ok_or(FsError::NotDir)?;
        if p.attrs.nlink == 0 {
            // Removed while open: nothing can be created in it.
            return Err(FsError::NotFound);
        }
        if dir.get(name).is_some() {
            return Err(FsError::Exists);
        }
        if kind == Kind::Dir && p.attrs.nlink >= MAX_LINKS {
            return Err(FsError::TooManyLinks);
        }
        if st.alloc.free_blocks() <= st.reserve / 2 {
            return Err(FsError::NoSpace);
        }
        let mut perm = (mode & 0o7777) as u16;
        let mut gid = caller.gid;
        let parent_attrs = p.attrs.clone();
        if parent_attrs.perm & libc::S_ISGID as u16 != 0 {
            // BSD group semantics in setgid directories.
            gid = parent_attrs.gid;
            if kind == Kind::Dir {
                perm |= libc::S_ISGID as u16;
            }
        }
        let ino = st.meta.next_ino;
        let now = Timespec::now();
        let attrs = InodeAttrs {
            ino,
            kind,
            perm,
            uid: caller.uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev,
            parent: if kind == Kind::Dir { parent } else { 0 },
        };
        self.log(st, Record::Inode(attrs));
        self.log(
            st,
            Record::DirAdd {
                parent,
                name: name.to_vec(),
                ino,
            },
        );
        let mut pa = parent_attrs;
        if kind == Kind::Dir {
            pa.nlink += 1;
        }
        pa.mtime = now;
        pa.ctime = now;
        self.log(st, Record::Inode(pa));
        Ok(ino)
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> Result<Attr> {
        self.writable()?;
        let kind = Kind::from_mode(mode).ok_or(FsError::Invalid("bad file type"))?;
        if kind == Kind::Dir || kind == Kind::Symlink {
            return Err(FsError::Invalid("mknod of a directory or symlink"));
        }
        let mut st = self.state.write();
        let node = NewNode { kind, mode, rdev };
        let ino = self.create_node(&mut st, caller, parent, name, node)?;
        Ok(Self::attr_of(st.meta.get(ino).unwrap()))
    }

    pub fn mkdir(&self, caller: Caller, parent: u64, name: &[u8], mode: u32) -> Result<Attr> {
        self.writable()?;
        let mut st = self.state.write();
        let ino = self.create_node(
            &mut st,
            caller,
            parent,
            name,
            NewNode {
                kind: Kind::Dir,
                mode,
                rdev: 0,
            },
        )?;
        Ok(Self::attr_of(st.meta.get(ino).unwrap()))
    }

    pub fn symlink(&self, caller: Caller, parent: u64, name: &[u8], target: &[u8]) -> Result<Attr> {
        self.writable()?;
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        if target.len() >= BS as usize {
            return Err(FsError::NameTooLong);
        }
        let mut st = self.state.write();
        let ino = self.create_node(
            &mut st,
            caller,
            parent,
            name,
            NewNode {
                kind: Kind::Symlink,
                mode: 0o777,
                rdev: 0,
            },
        )?;
        self.log(
            &mut st,
            Record::SymlinkTarget {
                ino,
                target: target.to_vec(),
            },
        );
        Ok(Self::attr_of(st.meta.get(ino).unwrap()))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.state.read();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        if i.attrs.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink"));
        }
        Ok(i.target.clone())
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        readable: bool,
        writable: bool,
    ) -> Result<(Attr, u64)> {
        self.writable()?;
        let mut st = self.state.write();
        let ino = self.create_node(
            &mut st,
            caller,
            parent,
            name,
            NewNode {
                kind: Kind::File,
                mode,
                rdev: 0,
            },
        )?;
        let fh = Self::new_handle(&mut st, ino, readable, writable);
        Ok((Self::attr_of(st.meta.get(ino).unwrap()), fh))
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr> {
        self.writable()?;
        Self::check_name(name)?;
        let mut st = self.state.write();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        if i.attrs.kind == Kind::Dir {
            return Err(FsError::NotPermitted);
        }
        if i.attrs.nlink >= MAX_LINKS {
            return Err(FsError::TooManyLinks);
        }
        let mut a = i.attrs.clone();
        let p = st.meta.get(parent).ok_or(FsError::NotFound)?;
        if p.dir.as_ref().ok_or(FsError::NotDir)?.get(name).is_some() {
            return Err(FsError::Exists);
        }
        let mut pa = p.attrs.clone();
        let now = Timespec::now();
        a.nlink += 1;
        a.ctime = now;
        pa.mtime = now;
        pa.ctime = now;
        self.log(&mut st, Record::Inode(a));
        self.log(
            &mut st,
            Record::DirAdd {
                parent,
                name: name.to_vec(),
                ino,
            },
        );
        self.log(&mut st, Record::Inode(pa));
        Ok(Self::attr_of(st.meta.get(ino).unwrap()))
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<()> {
        self.writable()?;
        if name == b"." {
            return Err(FsError::Invalid("cannot remove ."));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        let mut st = self.state.write();
        let ino = Self::child(&st.meta, parent, name)?;
        let kind = st.meta.get(ino).ok_or(FsError::NotFound)?.attrs.kind;
        match (dir, kind == Kind::Dir) {
            (true, false) => return Err(FsError::NotDir),
            (false, true) => return Err(FsError::IsDir),
            _ => {}
        }
        if dir && !st.meta.get(ino).unwrap().dir.as_ref().unwrap().is_empty() {
            return Err(FsError::NotEmpty);
        }
        let now = Timespec::now();
        self.log(
            &mut st,
            Record::DirRemove {
                parent,
                name: name.to_vec(),
            },
        );
        let mut pa = st.meta.get(parent).unwrap().attrs.clone();
        if dir {
            pa.nlink -= 1;
        }
        pa.mtime = now;
        pa.ctime = now;
        self.log(&mut st, Record::Inode(pa));
        self.drop_link(&mut st, ino, now);
        Ok(())
    }

    /// One name of `ino` is gone: lower its link count and destroy it when
    /// nothing refers to it any more.
    fn drop_link(&self, st: &mut State, ino: u64, now: Timespec) {
        let i = st.meta.get(ino).unwrap();
        let mut a = i.attrs.clone();
        a.nlink = if a.kind == Kind::Dir {
            0
        } else {
            a.nlink.saturating_sub(1)
        };
        a.ctime = now;
        let open = i.open_count;
        if a.nlink == 0 && open == 0 {
            self.log(st, Record::DropInode { ino });
        } else {
            self.log(st, Record::Inode(a));
        }
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<()> {
        self.writable()?;
        Self::check_name(new_name)?;
        let mut st = self.state.write();
        let src = Self::child(&st.meta, parent, name)?;
        let np = st.meta.get(new_parent).ok_or(FsError::NotFound)?;
        let dst = np.dir.as_ref().ok_or(FsError::NotDir)?.get(new_name);
        let src_kind = st.meta.get(src).unwrap().attrs.kind;
        if src_kind == Kind::Dir && Self::is_ancestor(&st.meta, src, new_parent) {
            return Err(FsError::Invalid("cannot move a directory into itself"));
        }
        let now = Timespec::now();
        match (mode, dst) {
            (RenameMode::Exchange, None) => return Err(FsError::NotFound),
            (RenameMode::NoReplace, Some(_)) => return Err(FsError::Exists),
            (RenameMode::Exchange, Some(dst)) => {
                let dst_kind = st.meta.get(dst).unwrap().attrs.kind;
                if dst_kind == Kind::Dir && Self::is_ancestor(&st.meta, dst, parent) {
                    return Err(FsError::Invalid("cannot move a directory into itself"));
                }
                self.log(
                    &mut st,
                    Record::DirAdd {
                        parent,
                        name: name.to_vec(),
                        ino: dst,
                    },
                );
                self.log(
                    &mut st,
                    Record::DirAdd {
                        parent: new_parent,
                        name: new_name.to_vec(),
                        ino: src,
                    },
                );
                self.reparent(&mut st, src, parent, new_parent, now);
                self.reparent(&mut st, dst, new_parent, parent, now);
                self.touch_dirs(&mut st, &[parent, new_parent], now);
                return Ok(());
            }
            (_, Some(dst)) if dst == src => return Ok(()),
            (_, Some(dst)) => {
                let d = st.meta.get(dst).unwrap();
                match (src_kind == Kind::Dir, d.attrs.kind == Kind::Dir) {
                    (true, false) => return Err(FsError::NotDir),
                    (false, true) => return Err(FsError::IsDir),
                    (true, true) if !d.dir.as_ref().unwrap().is_empty() => {
                        return Err(FsError::NotEmpty)
                    }
                    _ => {}
                }
                if d.attrs.kind == Kind::Dir {
                    let mut pa = st.meta.get(new_parent).unwrap().attrs.clone();
                    pa.nlink -= 1;
                    self.log(&mut st, Record::Inode(pa));
                }
                self.drop_link(&mut st, dst, now);
            }
            (_, None) => {}
        }
        let position = st
            .meta
            .get(parent)
            .and_then(|p| p.dir.as_ref()?.cookie(name));
        self.log(
            &mut st,
            Record::DirRemove {
                parent,
                name: name.to_vec(),
            },
        );
        self.log(
            &mut st,
            Record::DirAdd {
                parent: new_parent,
                name: new_name.to_vec(),
                ino: src,
            },
        );
        if let (true, Some(cookie)) = (parent == new_parent, position) {
            if let Some(d) = st.meta.get_mut(parent).and_then(|p| p.dir.as_mut()) {
                d.move_to_cookie(new_name, cookie);
            }
        }
        self.reparent(&mut st, src, parent, new_parent, now);
        self.touch_dirs(&mut st, &[parent, new_parent], now);
        Ok(())
    }

    /// `ino` moved from directory `from` to `to`: fix a directory's ".."
    /// and the parents' link counts, and touch its ctime.
    fn reparent(&self, st: &mut State, ino: u64, from: u64, to: u64, now: Timespec) {
        let mut a = st.meta.get(ino).unwrap().attrs.clone();
        a.ctime = now;
        if a.kind == Kind::Dir && from != to {
            a.parent = to;
            for (dir, delta) in [(from, -1i64), (to, 1)] {
                let mut pa = st.meta.get(dir).unwrap().attrs.clone();
                pa.nlink = (pa.nlink as i64 + delta) as u32;
                self.log(st, Record::Inode(pa));
            }
        }
        self.log(st, Record::Inode(a));
    }

    fn touch_dirs(&self, st: &mut State, dirs: &[u64], now: Timespec) {
        for (i, &d) in dirs.iter().enumerate() {
            if dirs[..i].contains(&d) {
                continue;
            }
            if let Some(inode) = st.meta.get(d) {
                let mut a = inode.attrs.clone();
                a.mtime = now;
                a.ctime = now;
                self.log(st, Record::Inode(a));
            }
        }
    }

    /// Whether `dir` is `ino` or below it.
    fn is_ancestor(meta: &Meta, ino: u64, mut dir: u64) -> bool {
        // Bounded: mount refuses parent cycles, but never spin on one.
        for _ in 0..=meta.inodes.len() {
            if dir == ino {
                return true;
            }
            if dir == ROOT_INO {
                return false;
            }
            match meta.get(dir) {
                Some(i) if i.attrs.parent != dir => dir = i.attrs.parent,
                _ => return false,
            }
        }
        false
    }

    /// Calls `f` for each entry after `offset` until it returns true
    /// ("buffer full").
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        f: impl FnMut(DirEntry<'_>) -> bool,
    ) -> Result<()> {
        let touch = self.list_dir(ino, offset, f)?;
        if touch {
            self.touch_atime(ino);
        }
        Ok(())
    }

    /// readdir's walk; returns whether the directory's atime is due.
    fn list_dir(
        &self,
        ino: u64,
        offset: u64,
        mut f: impl FnMut(DirEntry<'_>) -> bool,
    ) -> Result<bool> {
        let st = self.state.read();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        let d = i.dir.as_ref().ok_or(FsError::NotDir)?;
        let parent = i.attrs.parent;
        let due = self.atime_due(&i.attrs);
        if offset < 1
            && f(DirEntry {
                ino,
                offset: 1,
                kind: Kind::Dir,
                name: b".",
            })
        {
            return Ok(due);
        }
        if offset < 2
            && f(DirEntry {
                ino: parent,
                offset: 2,
                kind: Kind::Dir,
                name: b"..",
            })
        {
            return Ok(due);
        }
        for (&cookie, name) in d.by_cookie.range(offset.max(FIRST_COOKIE - 1) + 1..) {
            let child = d.entries[name].0;
            let kind = st
                .meta
                .get(child)
                .map(|c| c.attrs.kind)
                .unwrap_or(Kind::File);
            if f(DirEntry {
                ino: child,
                offset: cookie,
                kind,
                name,
            }) {
                break;
            }
        }
        Ok(due)
    }

    pub fn statfs(&self) -> StatFs {
        let st = self.state.read();
        let blocks = self.sb.data_end() - self.sb.data_start();
        let held: u64 = st.pending_free.iter().map(|p| p.2).sum();
        let free = (st.alloc.free_blocks() + held).saturating_sub(st.reserve);
        let used_inodes = st.meta.inodes.len() as u64;
        // Inodes cost memory and checkpoint space, not blocks: report room
        // for as many more as there are free blocks.
        StatFs {
            blocks,
            bfree: free,
            bavail: free,
            files: used_inodes + free,
            ffree: free,
            bsize: BS as u32,
            namelen: MAX_NAME_LEN as u32,
        }
    }

    // ----- open files ---------------------------------------------------

    fn new_handle(st: &mut State, ino: u64, readable: bool, writable: bool) -> u64 {
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(
            fh,
            OpenFile {
                ino,
                readable,
                writable,
            },
        );
        st.meta.get_mut(ino).unwrap().open_count += 1;
        fh
    }

    /// Opens `ino` (a file or a directory). Returns the handle and whether
    /// the kernel may keep its cached pages: not when a read through this
    /// open should update the atime, since cached reads never reach here.
    pub fn open(&self, ino: u64, readable: bool, writable: bool) -> Result<(u64, bool)> {
        if writable {
            self.writable()?;
        }
        let mut st = self.state.write();
        let attrs = &st.meta.get(ino).ok_or(FsError::NotFound)?.attrs;
        if attrs.kind == Kind::Dir && writable {
            return Err(FsError::IsDir);
        }
        let keep_cache = !(readable && self.atime_due(attrs));
        Ok((
            Self::new_handle(&mut st, ino, readable, writable),
            keep_cache,
        ))
    }

    pub fn handle(&self, fh: u64) -> Result<OpenFile> {
        self.state
            .read()
            .handles
            .get(&fh)
            .copied()
            .ok_or(FsError::BadHandle)
    }

    /// The last close of an open file: an unlinked inode dies here.
    pub fn release(&self, fh: u64) -> Result<()> {
        let mut st = self.state.write();
        let of = st.handles.remove(&fh).ok_or(FsError::BadHandle)?;
        let Some(i) = st.meta.get_mut(of.ino) else {
            return Ok(());
        };
        i.open_count -= 1;
        if i.open_count == 0 && i.attrs.nlink == 0 && !self.opts.read_only {
            self.log(&mut st, Record::DropInode { ino: of.ino });
        }
        Ok(())
    }

    // ----- data -----------------------------------------------------------

    /// Reads up to `buf.len()` bytes at `offset` into `buf`; short only at
    /// EOF. Holes and unwritten extents read as zeros.
    pub fn read_buf(&self, ino: u64, offset: u64, buf: &IoBuffer<'_>) -> Result<usize> {
        let io = self.io_lock(ino);
        let _io = io.read();
        let (n, ranges, touch) = {
            let st = self.state.read();
            let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
            match i.attrs.kind {
                Kind::File => {}
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid("read of a special file")),
            }
            let size = i.attrs.size;
            if offset >= size || buf.is_empty() {
                return Ok(0);
            }
            let n = (size - offset).min(buf.len() as u64);
            let end = offset + n;
            let mut ranges = Vec::new();
            let fb = offset / BS;
            for r in runs(i, fb, (end - 1) / BS + 1 - fb) {
                let (file_block, len, ext) = match r {
                    Run::Hole { file_block, len } => (file_block, len, None),
                    Run::Mapped { file_block, ext } => (file_block, ext.len, Some(ext)),
                };
                let s = offset.max(file_block * BS);
                let e = end.min((file_block + len) * BS);
                match ext {
                    Some(ext) if !ext.unwritten => ranges.push(IoRange {
                        dev_offset: ext.dev * BS + (s - file_block * BS),
                        buf_offset: (s - offset) as usize,
                        len: (e - s) as usize,
                    }),
                    _ => buf.zero((s - offset) as usize, (e - s) as usize)?,
                }
            }
            (n as usize, ranges, self.atime_due(&i.attrs))
        };
        self.dev.submit(Direction::Read, buf, &ranges)?;
        if touch {
            self.touch_atime(ino);
        }
        Ok(n)
    }

    /// Whether an access now should update the atime (per the mount's
    /// atime mode; relatime: atime not newer than mtime/ctime, or a day old).
    fn atime_due(&self, a: &InodeAttrs) -> bool {
        if self.opts.read_only
            || (a.kind == Kind::Dir && self.opts.nodiratime)
            || self.broken.load(Ordering::SeqCst)
        {
            return false;
        }
        match self.opts.atime {
            AtimeMode::Never => false,
            AtimeMode::Strict => true,
            AtimeMode::Relative => {
                a.atime <= a.mtime
                    || a.atime <= a.ctime
                    || Timespec::now().sec - a.atime.sec > 24 * 3600
            }
        }
    }

    fn touch_atime(&self, ino: u64) {
        let mut st = self.state.write();
        if let Some(i) = st.meta.get(ino) {
            let mut a = i.attrs.clone();
            a.atime = Timespec::now();
            self.log(&mut st, Record::Inode(a));
        }
    }

    /// Reads up to `size` bytes at `offset` and hands them (or the error)
    /// to `f`, from a per-thread buffer that is reused: no allocation or
    /// zeroing per request (`read_buf` writes every byte it returns).
    pub fn read_with<T>(
        &self,
        ino: u64,
        offset: u64,
        size: usize,
        f: impl FnOnce(Result<&[u8]>) -> T,
    ) -> T {
        thread_local! {
            static SCRATCH: std::cell::RefCell<AlignedBuf> =
                std::cell::RefCell::new(AlignedBuf::new(0));
        }
        SCRATCH.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.capacity() < size {
                *buf = AlignedBuf::new(size);
            }
            buf.set_len(size);
            match self.read_buf(ino, offset, &IoBuffer::from_mut(&mut buf)) {
                Ok(n) => f(Ok(&buf[..n])),
                Err(e) => f(Err(e)),
            }
        })
    }

    /// Reads up to `size` bytes at `offset` into a new buffer, aligned so
    /// the device can fill it without a bounce.
    pub fn read(&self, ino: u64, offset: u64, size: usize) -> Result<AlignedBuf> {
        let mut buf = AlignedBuf::new(size);
        let n = self.read_buf(ino, offset, &IoBuffer::from_mut(&mut buf))?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Writes `data` at `offset`, allocating blocks as needed.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<usize> {
        self.write_buf(ino, offset, &IoBuffer::from_ref(data))
    }

    /// Writes all of `data` at `offset`, allocating blocks as needed.
    pub fn write_buf(&self, ino: u64, offset: u64, data: &IoBuffer<'_>) -> Result<usize> {
        self.retry_when_full(|| self.write_once(ino, offset, data))
    }

    /// Runs `op`; if the device was full but blocks freed since the last
    /// commit are waiting for their records to be durable, commits (which
    /// releases them) and runs it once more.
    fn retry_when_full<T>(&self, op: impl Fn() -> Result<T>) -> Result<T> {
        match op() {
            Err(FsError::NoSpace) if !self.state.read().pending_free.is_empty() => {
                self.commit()?;
                op()
            }
            r => r,
        }
    }

    fn write_once(&self, ino: u64, offset: u64, data: &IoBuffer<'_>) -> Result<usize> {
        self.writable()?;
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        let io = self.io_lock(ino);
        let _io = io.write();
        let fb = offset / BS;
        let nblocks = (end - 1) / BS + 1 - fb;
        // Plan: which blocks exist, which are new (allocated now).
        let plan: Vec<(u64, u64, u64, bool)> = {
            let mut st = self.state.write();
            let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
            match i.attrs.kind {
                Kind::File => {}
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid("write to a special file")),
            }
            let existing = runs(i, fb, nblocks);
            let mut hint = i
                .extents
                .range(..fb)
                .next_back()
                .map(|(&s, e)| e.dev + (fb - s).min(e.len));
            let mut plan = Vec::new();
            let mut new_runs = Vec::new();
            for r in existing {
                match r {
                    Run::Mapped { file_block, ext } => {
                        plan.push((file_block, ext.len, ext.dev, ext.unwritten));
                        hint = Some(ext.dev + ext.len);
                    }
                    Run::Hole { file_block, len } => {
                        let avail = st.alloc.free_blocks().saturating_sub(st.reserve);
                        let got = if avail >= len {
                            st.alloc.allocate(len, hint)
                        } else {
                            Vec::new()
                        };
                        if got.iter().map(|g| g.1).sum::<u64>() < len {
                            for &(s, l) in got.iter().chain(new_runs.iter()) {
                                st.alloc.release(s, l);
                            }
                            return Err(FsError::NoSpace);
                        }
                        let mut f = file_block;
                        for (s, l) in got {
                            plan.push((f, l, s, true));
                            new_runs.push((s, l));
                            f += l;
                            hint = Some(s + l);
                        }
                    }
                }
            }
            plan
        };
        if let Err(e) = self.write_planned(offset, data, &plan) {
            let mut st = self.state.write();
            for &(_, l, dev, fresh) in &plan {
                // `fresh` here means "allocated for this write or unwritten":
                // only blocks allocated now go back.
                if fresh && st.meta.get(ino).is_some_and(|i| !Self::maps(i, dev)) {
                    st.alloc.release(dev, l);
                }
            }
            return Err(e);
        }
        self.data_dirty.store(true, Ordering::SeqCst);
        let mut st = self.state.write();
        for &(f, l, dev, fresh) in &plan {
            if fresh {
                self.log(
                    &mut st,
                    Record::Map {
                        ino,
                        file_block: f,
                        dev_block: dev,
                        len: l,
                        unwritten: false,
                    },
                );
            }
        }
        let Some(i) = st.meta.get(ino) else {
            return Ok(data.len());
        };
        let mut a = i.attrs.clone();
        let now = Timespec::now();
        a.size = a.size.max(end);
        a.mtime = now;
        a.ctime = now;
        self.log(&mut st, Record::Inode(a));
        Ok(data.len())
    }

    fn maps(i: &meta::Inode, dev: u64) -> bool {
        i.extents
            .values()
            .any(|e| dev >= e.dev && dev < e.dev + e.len)
    }

    /// Sends a planned write down. Blocks that held no data of this file
    /// (new or unwritten) are written whole, zero-filled around `data`, so
    /// stale device bytes never become file content.
    fn write_planned(
        &self,
        offset: u64,
        data: &IoBuffer<'_>,
        plan: &[(u64, u64, u64, bool)],
    ) -> Result<()> {
        let end = offset + data.len() as u64;
        let mut ranges = Vec::new();
        let mut edges: Vec<(u64, Vec<u8>)> = Vec::new();
        for &(f, l, dev, fresh) in plan {
            let s = offset.max(f * BS);
            let e = end.min((f + l) * BS);
            if !fresh {
                ranges.push(IoRange {
                    dev_offset: dev * BS + (s - f * BS),
                    buf_offset: (s - offset) as usize,
                    len: (e - s) as usize,
                });
                continue;
            }
            // Whole blocks in the middle straight from `data`; partial
            // first/last blocks through a zeroed block.
            let first_full = s.div_ceil(BS) * BS;
            let last_full = e / BS * BS;
            if first_full < last_full {
                ranges.push(IoRange {
                    dev_offset: dev * BS + (first_full - f * BS),
                    buf_offset: (first_full - offset) as usize,
                    len: (last_full - first_full) as usize,
                });
            }
            let mut partial = |from: u64, to: u64| -> Result<()> {
                if from >= to {
                    return Ok(());
                }
                let blk = from / BS * BS;
                let mut b = vec![0u8; BS as usize];
                data.copy_out(
                    (from - offset) as usize,
                    &mut b[(from - blk) as usize..(to - blk) as usize],
                )?;
                edges.push((dev * BS + (blk - f * BS), b));
                Ok(())
            };
            if first_full >= last_full {
                // Within one or two blocks with no full block between.
                let mid = (s / BS + 1) * BS;
                partial(s, e.min(mid))?;
                if e > mid {
                    partial(mid, e)?;
                }
            } else {
                partial(s, first_full)?;
                partial(last_full, e)?;
            }
        }
        self.dev.submit(Direction::Write, data, &ranges)?;
        for (at, block) in edges {
            self.dev.write_at(at, &block)?;
        }
        Ok(())
    }

    /// fsync/fdatasync of a file or directory: commits everything (see
    /// [`Fs::commit`] for what a failure means).
    pub fn fsync(&self, _ino: u64) -> Result<()> {
        self.commit()
    }

    /// fallocate(2). Like a write, it drops setuid (and setgid, see below)
    /// when the caller is not root.
    pub fn fallocate(
        &self,
        caller: Caller,
        ino: u64,
        offset: u64,
        len: u64,
        mode: FallocMode,
    ) -> Result<()> {
        self.retry_when_full(|| self.fallocate_once(caller, ino, offset, len, mode))
    }

    fn fallocate_once(
        &self,
        caller: Caller,
        ino: u64,
        offset: u64,
        len: u64,
        mode: FallocMode,
    ) -> Result<()> {
        self.writable()?;
        if len == 0 {
            return Err(FsError::Invalid("zero length"));
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        let io = self.io_lock(ino);
        let _io = io.write();
        let mut st = self.state.write();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        match i.attrs.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::NotSupported),
        }
        let mut a = i.attrs.clone();
        let now = Timespec::now();
        let (full_start, full_end) = (offset.div_ceil(BS), end / BS);
        match mode {
            FallocMode::Allocate { keep_size } => {
                self.allocate_unwritten(&mut st, ino, offset / BS, end.div_ceil(BS))?;
                if !keep_size && end > a.size {
                    a.size = end;
                }
            }
            FallocMode::PunchHole => {
                let (head_end, tail_start) = Self::edges(end, full_start, full_end);
                self.zero_by_copy(&mut st, ino, offset, head_end - offset)?;
                self.zero_by_copy(&mut st, ino, tail_start, end - tail_start)?;
                if full_end > full_start {
                    self.log(
                        &mut st,
                        Record::Unmap {
                            ino,
                            file_block: full_start,
                            len: full_end - full_start,
                        },
                    );
                }
                a.mtime = now;
            }
            FallocMode::ZeroRange { keep_size } => {
                let (head_end, tail_start) = Self::edges(end, full_start, full_end);
                self.zero_by_copy(&mut st, ino, offset, head_end - offset)?;
                self.zero_by_copy(&mut st, ino, tail_start, end - tail_start)?;
                if full_end > full_start {
                    // Written blocks become unwritten (read as zeros) in place.
                    let i = st.meta.get(ino).unwrap();
                    let mapped: Vec<(u64, meta::Extent)> =
                        runs(i, full_start, full_end - full_start)
                            .into_iter()
                            .filter_map(|r| match r {
                                Run::Mapped { file_block, ext } if !ext.unwritten => {
                                    Some((file_block, ext))
                                }
                                _ => None,
                            })
                            .collect();
                    for (fb, ext) in mapped {
                        self.log(
                            &mut st,
                            Record::Map {
                                ino,
                                file_block: fb,
                                dev_block: ext.dev,
                                len: ext.len,
                                unwritten: true,
                            },
                        );
                    }
                    self.allocate_unwritten(&mut st, ino, full_start, full_end)?;
                }
                if !keep_size && end > a.size {
                    a.size = end;
                }
                a.mtime = now;
            }
        }
        a.ctime = now;
        if caller.uid != 0 {
            // As setattr_should_drop_sgid: setgid goes when group-exec is
            // set or the caller is not in the file's group (FUSE tells us
            // only the primary group).
            a.perm &= !(libc::S_ISUID as u16);
            if a.perm & libc::S_IXGRP as u16 != 0 || caller.gid != a.gid {
                a.perm &= !(libc::S_ISGID as u16);
            }
        }
        self.log(&mut st, Record::Inode(a));
        Ok(())
    }

    /// Partial-block edges of a byte range: (end of head, start of tail).
    fn edges(end: u64, full_start: u64, full_end: u64) -> (u64, u64) {
        if full_start >= full_end {
            // No whole block inside: treat everything as head.
            (end, end)
        } else {
            (full_start * BS, full_end * BS)
        }
    }

    /// Maps unwritten blocks over every hole in file blocks `from..to`.
    fn allocate_unwritten(&self, st: &mut State, ino: u64, from: u64, to: u64) -> Result<()> {
        let holes: Vec<(u64, u64)> = runs(st.meta.get(ino).unwrap(), from, to - from)
            .into_iter()
            .filter_map(|r| match r {
                Run::Hole { file_block, len } => Some((file_block, len)),
                _ => None,
            })
            .collect();
        let need: u64 = holes.iter().map(|h| h.1).sum();
        if need > st.alloc.free_blocks().saturating_sub(st.reserve) {
            return Err(FsError::NoSpace);
        }
        for (fb, len) in holes {
            let mut f = fb;
            for (s, l) in st.alloc.allocate(len, None) {
                self.log(
                    st,
                    Record::Map {
                        ino,
                        file_block: f,
                        dev_block: s,
                        len: l,
                        unwritten: true,
                    },
                );
                f += l;
            }
        }
        Ok(())
    }

    /// SEEK_DATA / SEEK_HOLE. Unwritten extents count as data.
    pub fn seek(&self, ino: u64, offset: u64, whence: SeekWhence) -> Result<u64> {
        let st = self.state.read();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        let size = i.attrs.size;
        if offset >= size {
            return Err(FsError::NoData);
        }
        let fb = offset / BS;
        let blocks = size.div_ceil(BS) - fb;
        for r in runs(i, fb, blocks) {
            let (file_block, is_data) = match r {
                Run::Hole { file_block, .. } => (file_block, false),
                Run::Mapped { file_block, .. } => (file_block, true),
            };
            if is_data == (whence == SeekWhence::Data) {
                return Ok(offset.max(file_block * BS).min(size));
            }
        }
        match whence {
            SeekWhence::Data => Err(FsError::NoData),
            SeekWhence::Hole => Ok(size),
        }
    }

    // ----- xattrs ---------------------------------------------------------

    fn check_xattr_name(kind: Kind, name: &[u8]) -> Result<()> {
        if name.is_empty() || name.len() > 255 {
            return Err(FsError::Invalid("bad attribute name"));
        }
        if name.starts_with(b"user.") {
            // Linux allows user.* only on regular files and directories.
            if !matches!(kind, Kind::File | Kind::Dir) {
                return Err(FsError::NotPermitted);
            }
            return Ok(());
        }
        if name.starts_with(b"trusted.") || name.starts_with(b"security.") {
            return Ok(());
        }
        Err(FsError::NotSupported)
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()> {
        self.writable()?;
        if value.len() > MAX_XATTR_VALUE {
            return Err(FsError::AttrTooBig);
        }
        let mut st = self.state.write();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        Self::check_xattr_name(i.attrs.kind, name)?;
        let exists = i.xattrs.contains_key(name);
        match (mode, exists) {
            (XattrMode::Create, true) => return Err(FsError::Exists),
            (XattrMode::Replace, false) => return Err(FsError::NoAttr),
            _ => {}
        }
        let mut a = i.attrs.clone();
        a.ctime = Timespec::now();
        self.log(
            &mut st,
            Record::XattrSet {
                ino,
                name: name.to_vec(),
                value: value.to_vec(),
            },
        );
        self.log(&mut st, Record::Inode(a));
        Ok(())
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let st = self.state.read();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        if !(name.starts_with(b"user.")
            || name.starts_with(b"trusted.")
            || name.starts_with(b"security."))
        {
            return Err(FsError::NotSupported);
        }
        i.xattrs.get(name).cloned().ok_or(FsError::NoAttr)
    }

    /// Attribute names, each NUL-terminated, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.state.read();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        let mut out = Vec::new();
        for name in i.xattrs.keys() {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.writable()?;
        let mut st = self.state.write();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        Self::check_xattr_name(i.attrs.kind, name)?;
        if !i.xattrs.contains_key(name) {
            return Err(FsError::NoAttr);
        }
        let mut a = i.attrs.clone();
        a.ctime = Timespec::now();
        self.log(
            &mut st,
            Record::XattrRemove {
                ino,
                name: name.to_vec(),
            },
        );
        self.log(&mut st, Record::Inode(a));
        Ok(())
    }
}
