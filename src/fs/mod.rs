//! The filesystem proper: namespace, inodes, extent maps, xattrs and the
//! POSIX rules, on top of a [`BlockDevice`]. Knows nothing about FUSE.
//!
//! Metadata lives in memory ([`meta::Meta`]) and every change is a
//! [`Record`] applied there and queued in the [`journal`]; `fsync` and a
//! periodic commit make the queue durable (ordered mode: data blocks are
//! flushed before the records that point at them, and freed blocks are
//! reused only once the record freeing them is durable).
//!
//! Where things are: this file holds the types, mkfs and mount/unmount;
//! `commit` the transaction and commit layer, `journal` the log and
//! checkpoints on the device, `attr` stat/setattr/truncate, `namespace`
//! the directory operations, `handles` the open-handle table, `data` the
//! data path, `xattr` extended attributes, `meta` the in-memory metadata,
//! `alloc` free space, `check` fsck.
//!
//! Locking: `state` (metadata) is held briefly, never across data I/O or
//! access to a caller's memory (zeroing holes, copies); file data moves
//! under the inode's own `io` lock only, so a slow transfer or a faulting
//! buffer never blocks `ls`.
//! Order: `sync_lock`, the write-back cache's gate, inode io lock, the
//! cache's write-back lock, `state`, `journal` (see `cache`).
//!
//! `cache` holds `write()`s in memory until write-back (delayed
//! allocation; every commit writes everything back first).

mod alloc;
mod attr;
mod cache;
pub mod check;
mod commit;
mod data;
mod error;
mod handles;
mod journal;
mod meta;
mod namespace;
mod xattr;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::Duration;

use log::{error, info, warn};
use parking_lot::{Mutex, RwLock};

use crate::blockdev::{AlignedBuf, BlockDevice, Direction, IoBuffer, IoRange};
use crate::format::{
    self, Record, Superblock, BLOCK_SIZE, CHECKPOINT_HEADER_BLOCKS, LOG_START_BLOCK, MAX_FILE_SIZE,
    MAX_NAME_LEN, MIN_DEVICE_BLOCKS,
};

pub use crate::format::{InodeAttrs, Kind, Timespec, ROOT_INO};
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
    /// Most bytes of `write()` data held in memory before write-back; 0
    /// writes through to the device (see `cache`).
    pub dirty_limit: u64,
    /// A flusher thread writes back from an eighth of the dirty limit, so writers
    /// overlap the device. Off, only writers over the limit (and commits)
    /// write back: the same workload always makes the same device writes,
    /// which the crash-state explorer needs to replay a state.
    pub background_writeback: bool,
}

/// Default `dirty_limit`.
pub const DEFAULT_DIRTY_LIMIT: u64 = 256 << 20;

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            commit_interval: Duration::from_secs(5),
            atime: AtimeMode::Relative,
            nodiratime: false,
            dirty_limit: DEFAULT_DIRTY_LIMIT,
            background_writeback: true,
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

/// A written block copied to a new block with part of it zeroed, not yet
/// mapped (see `Fs::copy_zeroed`).
struct ZeroedCopy {
    file_block: u64,
    old_dev: u64,
    new_dev: u64,
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
    /// Blocks promised to cached writes into holes (delayed allocation).
    delalloc: u64,
}

impl State {
    /// Blocks a new allocation or reservation may take.
    fn room(&self) -> u64 {
        self.alloc
            .free_blocks()
            .saturating_sub(self.reserve + self.delalloc)
    }
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
    cache: cache::Cache,
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
                delalloc: 0,
            }),
            io_locks: (0..IO_LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            journal: Mutex::new(journal),
            sync_lock: Mutex::new(()),
            data_dirty: AtomicBool::new(false),
            committer: Mutex::new(None),
            broken: AtomicBool::new(false),
            cache: cache::Cache::new(if opts.read_only { 0 } else { opts.dirty_limit }),
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
            fs.start_flusher();
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
        self.stop_flusher();
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
}
