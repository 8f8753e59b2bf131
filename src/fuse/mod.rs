//! The FUSE adapter: kernel requests in, [`Fs`] and token [`Registry`]
//! calls, replies out.
//!
//! Deliberately thin. It converts types (fuser's to ours), picks each
//! errno (from `FsError::errno` / `TokenError::errno`), and owns nothing but the
//! mount session and the small pool of threads that invalidate the
//! kernel's page cache after token writes.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, MountOption, Notifier, OpenAccMode, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    Session, SessionACL, TimeOrNow, WriteFlags,
};
use log::{debug, warn};
use zerocopy::IntoBytes;

use crate::format::MAX_NAME_LEN;
use crate::fs::{
    Attr, Caller, FallocMode, Fs, FsError, Kind, RenameMode, SeekWhence, SetAttr, TimeSet,
    Timespec, XattrMode,
};
use crate::tokens::{Registry, TokenError, Written};
use crate::uapi::{self, DecodeError, Request as Ioctl};

/// Files open with FOPEN_KEEP_CACHE when the fs allows: every change
/// reaches the file through this mount and token writes invalidate what
/// they change, so the page cache stays valid across opens; only a due
/// atime update needs the next read to come here.
///
/// Always FOPEN_NOFLUSH: `flush` has nothing to do (writes reach the fs
/// at once; data is made durable by fsync and the periodic commit), so
/// close(2) need not wait for a round trip to the daemon.
///
/// Always FOPEN_PARALLEL_DIRECT_WRITES: O_DIRECT writes that do not grow
/// the file need not hold the inode lock alone; the fs orders writes to
/// one file itself (its io lock and the write-back cache's file lock).
fn cache_flags(keep_cache: bool) -> FopenFlags {
    let always = FopenFlags::FOPEN_NOFLUSH | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
    if keep_cache {
        FopenFlags::FOPEN_KEEP_CACHE | always
    } else {
        always
    }
}

/// How long the kernel may cache attributes and names, found or not.
/// The daemon is the only writer of its device and every change but a
/// few goes through this mount, so the kernel's own invalidation keeps
/// its cache right; the few (token WRITE and BATCH, fallocate) drop the
/// kernel's attributes with inval_inode before they reply. Reads that
/// move atime reach the daemon (no FOPEN_KEEP_CACHE then) and the
/// kernel marks atime stale after each read or readdir it sends.
const TTL: Duration = Duration::from_secs(3600);
const GENERATION: Generation = Generation(0);
/// Largest write the kernel may send in one request.
const MAX_WRITE: u32 = 1 << 20;

/// What the CLI decided about the mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Shown as the mount source (findmnt -S, df).
    pub fsname: String,
    pub read_only: bool,
    pub allow_other: bool,
    pub threads: usize,
    /// Extra kernel mount flags (nosuid, nodev, noexec, noatime, ...).
    pub flags: Vec<MountOption>,
}

/// Work that must talk to the kernel off the FUSE worker threads.
type Deferred = Box<dyn FnOnce(&Notifier) + Send>;

/// Threads that invalidate pages and then reply. Several, so one slow
/// invalidation does not hold up every other token WRITE's reply; jobs
/// of one inode always go to the same thread, so they run in order.
const INVALIDATORS: usize = 4;

/// Mounts `fs` at `mountpoint`; returns once the kernel handshake is done
/// (the mount is live). Serve it with `Session::run`.
pub fn mount(
    fs: Arc<Fs>,
    tokens: Arc<Registry>,
    mountpoint: &Path,
    cfg: &MountConfig,
) -> io::Result<Session<FuseFs>> {
    let mut opts = vec![
        // The source names the image (findmnt -S IMAGE). No subtype: the
        // type reads plain "fuse", which is what xfstests' FSTYP=fuse
        // compares df -T with; `mount -t fuse.dmabuf-fs` still finds the
        // helper by its name.
        MountOption::FSName(cfg.fsname.clone()),
        // The kernel checks permissions from mode/uid/gid, as on ext4.
        MountOption::DefaultPermissions,
        if cfg.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    opts.extend(cfg.flags.iter().cloned());
    let mut config = Config::default();
    config.mount_options = opts;
    config.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(cfg.threads.max(1));
    let (deferred, queues): (Vec<_>, Vec<_>) = (0..INVALIDATORS)
        .map(|_| mpsc::channel::<Deferred>())
        .unzip();
    let session = Session::new(
        FuseFs {
            fs,
            tokens,
            deferred,
        },
        mountpoint,
        &config,
    )?;
    // Page-cache invalidation can wait for pages that a pending read has
    // locked; that read needs a free worker. So invalidations (and the
    // replies that must follow them) run on their own threads.
    for (i, queue) in queues.into_iter().enumerate() {
        let notifier = session.notifier();
        std::thread::Builder::new()
            .name(format!("invalidate-{i}"))
            .spawn(move || {
                for job in queue {
                    job(&notifier);
                }
            })?;
    }
    Ok(session)
}

pub struct FuseFs {
    fs: Arc<Fs>,
    tokens: Arc<Registry>,
    /// One queue per invalidation thread.
    deferred: Vec<mpsc::Sender<Deferred>>,
}

fn token_fail(op: &str, e: TokenError) -> Errno {
    debug!("{op}: {e}");
    Errno::from_i32(e.errno())
}

fn fail(op: &str, e: FsError) -> Errno {
    match e {
        FsError::Io(_) | FsError::Corrupt(_) => log::error!("{op}: {e}"),
        _ => debug!("{op}: {e}"),
    }
    Errno::from_i32(e.errno())
}

fn system_time(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec as u64)
    }
}

fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timespec { sec, nsec }
        }
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.crtime),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

/// A negative entry: inode 0 tells the kernel "no such name, for TTL".
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn access(flags: OpenFlags) -> (bool, bool) {
    match flags.acc_mode() {
        OpenAccMode::O_RDONLY => (true, false),
        OpenAccMode::O_WRONLY => (false, true),
        _ => (true, true),
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(timespec(t)),
    }
}

fn reply_entry(reply: ReplyEntry, r: Result<Attr, FsError>, op: &str) {
    match r {
        Ok(a) => reply.entry(&TTL, &file_attr(&a), GENERATION),
        Err(e) => reply.error(fail(op, e)),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), FsError>, op: &str) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(fail(op, e)),
    }
}

/// Answers getxattr/listxattr: size probe, data, or ERANGE.
fn reply_xattr(reply: ReplyXattr, r: Result<Vec<u8>, FsError>, size: u32, op: &str) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(fail(op, e)),
    }
}

impl FuseFs {
    /// Drops the kernel's cached pages (and attributes) of each written
    /// range, then runs `then` (the reply), off this thread.
    fn invalidate_then(&self, ranges: &[Written], then: impl FnOnce() + Send + 'static) {
        let ranges = ranges.to_vec();
        let ino = ranges.first().map_or(0, |r| r.ino);
        let fs = self.fs.clone();
        let job: Deferred = Box::new(move |n: &Notifier| {
            for w in ranges {
                if let Err(e) = Self::invalidate(&fs, n, &w) {
                    // ENOENT: the kernel has nothing cached for it.
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        warn!("invalidating inode {}: {e}", w.ino);
                    }
                }
            }
            then();
        });
        self.defer(ino, job);
    }

    /// Hands `job` to the invalidation thread of inode `ino`. If it is
    /// gone (the session is ending), the job and the reply in it are
    /// dropped, and a dropped reply answers EIO rather than leaving the
    /// caller waiting.
    fn defer(&self, ino: u64, job: Deferred) {
        let queue = &self.deferred[(ino % self.deferred.len() as u64) as usize];
        let _ = queue.send(job);
    }

    /// Drops the kernel's cached attributes of `ino` (no pages), then
    /// runs `then`: for changes the kernel cannot see in a reply.
    fn invalidate_attrs_then(&self, ino: u64, then: impl FnOnce() + Send + 'static) {
        let job: Deferred = Box::new(move |n: &Notifier| {
            if let Err(e) = n.inval_inode(INodeNo(ino), -1, 0) {
                if e.raw_os_error() != Some(libc::ENOENT) {
                    warn!("invalidating the attributes of inode {ino}: {e}");
                }
            }
            then();
        });
        self.defer(ino, job);
    }

    fn invalidate(fs: &Fs, n: &Notifier, w: &Written) -> io::Result<()> {
        n.inval_inode(INodeNo(w.ino), w.offset as i64, w.len as i64)?;
        // A write that ended at EOF may have grown the file, and a page
        // fault past the kernel's old i_size would SIGBUS before the next
        // stat refreshes it. Storing the last byte moves i_size (an empty
        // store does not). The byte comes from the token's buffer, copied
        // right after the write, as long as the file's times say no write
        // came since; else (rare) it is read back from the device.
        let end = w.offset + w.len;
        let Some(last) = w.last_byte else {
            return Ok(());
        };
        let Ok(a) = fs.getattr(w.ino) else {
            return Ok(());
        };
        if a.size != end {
            return Ok(());
        }
        let unchanged = (a.mtime, a.ctime) == (last.mtime, last.ctime);
        if let (true, Some(byte)) = (unchanged, last.byte) {
            n.store(INodeNo(w.ino), end - 1, &[byte])?;
        } else if let Ok(byte) = fs.read(w.ino, end - 1, 1) {
            if byte.len() == 1 {
                n.store(INodeNo(w.ino), end - 1, &byte)?;
            }
        }
        Ok(())
    }
}

impl fuser::Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        // File handles (open_by_handle_at, NFS export): inode numbers are
        // never reused, and lookup(ino, ".") revalidates them.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_EXPORT_SUPPORT);
        // Lookups and readdirs of one directory may run at once: the fs
        // serialises them itself with its state lock.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        // READDIRPLUS (attributes with the names) when the kernel sees
        // the names being looked up after a readdir (ls -l, find -type).
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        // An asynchronous O_DIRECT request (libaio, io_uring) goes down as
        // background requests served at once by several workers, not one
        // after another inside io_submit.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        // fuser asks for max_pages from MAX_WRITE (256 pages = 1 MiB).
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // No such name can exist; ENOENT would be wrong (pjdfstest).
        if name.len() > MAX_NAME_LEN {
            return reply.error(Errno::from_i32(libc::ENAMETOOLONG));
        }
        // The kernel revalidates a file handle (open_by_handle_at, NFS
        // export) by looking up "." in any inode, not only in directories.
        let found = if name.as_bytes() == b"." {
            self.fs.getattr(parent.0)
        } else {
            self.fs.lookup(parent.0, name.as_bytes())
        };
        match found {
            // Cached as a negative dentry for TTL: a name appears only by
            // a create, mknod, link or rename sent through the kernel,
            // which replaces that dentry (a whiteout appears where the
            // kernel has just moved the dentry away).
            Err(FsError::NotFound) if name.as_bytes() != b"." => {
                reply.entry(&TTL, &negative_attr(), GENERATION)
            }
            r => reply_entry(reply, r, "lookup"),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(fail("getattr", e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(timespec),
        };
        match self.fs.setattr(ino.0, &set) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(fail("setattr", e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(fail("readlink", e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .fs
            .mknod(caller(req), parent.0, name.as_bytes(), mode & !umask, rdev);
        reply_entry(reply, r, "mknod");
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .fs
            .mkdir(caller(req), parent.0, name.as_bytes(), mode & !umask);
        reply_entry(reply, r, "mkdir");
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.fs.unlink(parent.0, name.as_bytes()), "unlink");
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.fs.rmdir(parent.0, name.as_bytes()), "rmdir");
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.fs.symlink(
            caller(req),
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        reply_entry(reply, r, "symlink");
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let known = RenameFlags::RENAME_EXCHANGE
            | RenameFlags::RENAME_NOREPLACE
            | RenameFlags::RENAME_WHITEOUT;
        if !known.contains(flags)
            || flags.contains(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_NOREPLACE)
            || flags.contains(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT)
        {
            return reply.error(Errno::EINVAL);
        }
        if flags.contains(RenameFlags::RENAME_WHITEOUT) {
            let r = self.fs.rename_whiteout(
                caller(req),
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.contains(RenameFlags::RENAME_NOREPLACE),
            );
            return reply_empty(reply, r, "rename");
        }
        let mode = if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            RenameMode::Exchange
        } else if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            RenameMode::NoReplace
        } else {
            RenameMode::Replace
        };
        let r = self.fs.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            mode,
        );
        reply_empty(reply, r, "rename");
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.fs.link(ino.0, newparent.0, newname.as_bytes()),
            "link",
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (r, w) = access(flags);
        match self.fs.open(ino.0, r, w) {
            // Cached reads never reach the daemon, so keep the kernel's
            // pages only when a read through this open need not move atime.
            Ok(fh) => reply.opened(
                FileHandle(fh),
                cache_flags(!(r && self.fs.read_updates_atime(ino.0))),
            ),
            Err(e) => reply.error(fail("open", e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // A handle keeps a removed directory alive until it is closed.
        match self.fs.open(ino.0, true, false) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(fail("opendir", e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.fs.release(fh.0), "releasedir");
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.fs
            .read_with(ino.0, offset, size as usize, |r| match r {
                Ok(d) => reply.data(d),
                Err(e) => reply.error(fail("read", e)),
            });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(ino.0, offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(fail("write", e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.tokens.release(fh.0);
        reply_empty(reply, self.fs.release(fh.0), "release");
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.fs.fsync(ino.0), "fsync");
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.fs.readdir(ino.0, offset, |e| {
            reply.add(
                INodeNo(e.ino),
                e.offset,
                file_type(e.kind),
                OsStr::from_bytes(e.name),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("readdir", e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let r = self.fs.readdir_plus(ino.0, offset, |e, a| {
            reply.add(
                INodeNo(e.ino),
                e.offset,
                OsStr::from_bytes(e.name),
                &TTL,
                &file_attr(a),
                GENERATION,
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("readdirplus", e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.fs.fsync(ino.0), "fsyncdir");
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let mode = match flags {
            0 => XattrMode::Any,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => return reply.error(Errno::EINVAL),
        };
        let r = self.fs.setxattr(ino.0, name.as_bytes(), value, mode);
        reply_empty(reply, r, "setxattr");
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(
            reply,
            self.fs.getxattr(ino.0, name.as_bytes()),
            size,
            "getxattr",
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, self.fs.listxattr(ino.0), size, "listxattr");
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            reply,
            self.fs.removexattr(ino.0, name.as_bytes()),
            "removexattr",
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions is always on: the kernel already checked.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (r, w) = access(OpenFlags(flags));
        match self
            .fs
            .create(caller(req), parent.0, name.as_bytes(), mode & !umask, r, w)
        {
            Ok((a, fh)) => reply.created(
                &TTL,
                &file_attr(&a),
                GENERATION,
                FileHandle(fh),
                cache_flags(true),
            ),
            Err(e) => reply.error(fail("create", e)),
        }
    }

    fn ioctl(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        let request = match uapi::decode(cmd, in_data) {
            Ok(r) => r,
            Err(DecodeError::UnknownCommand) => return reply.error(Errno::from_i32(libc::ENOTTY)),
            Err(DecodeError::BadSize) => return reply.error(Errno::EINVAL),
        };
        let (fs, tokens, fh) = (&self.fs, &self.tokens, fh.0);
        match request {
            Ioctl::Register(mut r) => match tokens.register(fs, fh, req.uid(), req.pid(), &r) {
                Ok(t) => {
                    r.token = t;
                    reply.ioctl(0, r.as_bytes());
                }
                Err(e) => reply.error(token_fail("REGISTER", e)),
            },
            Ioctl::Unregister(u) => match tokens.unregister(fh, &u) {
                Ok(()) => reply.ioctl(0, &[]),
                Err(e) => reply.error(token_fail("UNREGISTER", e)),
            },
            Ioctl::Read(mut io) | Ioctl::Write(mut io) => {
                let write = cmd == uapi::IOC_WRITE_CMD;
                let r = Registry::request(&io, write).and_then(|q| tokens.io(fs, fh, &q));
                match r {
                    Ok(m) => {
                        io.transferred = m.bytes;
                        let bytes = io.as_bytes().to_vec();
                        match m.written {
                            Some(w) => self.invalidate_then(&[w], move || reply.ioctl(0, &bytes)),
                            None => reply.ioctl(0, &bytes),
                        }
                    }
                    Err(e) => reply.error(token_fail(if write { "WRITE" } else { "READ" }, e)),
                }
            }
            Ioctl::Info => reply.ioctl(0, tokens.info().as_bytes()),
            Ioctl::Stats(s) => match tokens.stats(fs, fh, req.uid(), &s) {
                Ok(out) => reply.ioctl(0, out.as_bytes()),
                Err(e) => reply.error(token_fail("STATS", e)),
            },
            Ioctl::Batch(mut b) => match tokens.batch(fs, fh, &mut b) {
                Ok(written) => {
                    let bytes = b.as_bytes().to_vec();
                    self.invalidate_then(&written, move || reply.ioctl(0, &bytes));
                }
                Err(e) => reply.error(token_fail("BATCH", e)),
            },
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let m = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => FallocMode::Allocate { keep_size },
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => FallocMode::PunchHole,
            libc::FALLOC_FL_ZERO_RANGE => FallocMode::ZeroRange { keep_size },
            _ => return reply.error(Errno::from_i32(libc::EOPNOTSUPP)),
        };
        match self.fs.fallocate(caller(req), ino.0, offset, length, m) {
            // It may have dropped setuid/setgid and moved ctime, which the
            // kernel's cached attributes would otherwise hide for a while.
            Ok(()) => self.invalidate_attrs_then(ino.0, move || reply.ok()),
            Err(e) => reply.error(fail("fallocate", e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let w = match whence {
            libc::SEEK_DATA => SeekWhence::Data,
            libc::SEEK_HOLE => SeekWhence::Hole,
            _ => return reply.error(Errno::EINVAL),
        };
        if offset < 0 {
            return reply.error(Errno::ENXIO);
        }
        match self.fs.seek(ino.0, offset as u64, w) {
            Ok(o) => reply.offset(o as i64),
            Err(e) => reply.error(fail("lseek", e)),
        }
    }
}
