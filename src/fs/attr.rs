//! Attributes: stat, lookup and setattr, including truncation (which
//! zeroes the kept partial block by copy, never in place).

use super::*;

impl Fs {
    pub(super) fn attr_of(i: &meta::Inode) -> Attr {
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

    pub(super) fn child(meta: &Meta, parent: u64, name: &[u8]) -> Result<u64> {
        let p = meta.get(parent).ok_or(FsError::NotFound)?;
        let d = p.dir.as_ref().ok_or(FsError::NotDir)?;
        match name {
            b"." => Ok(parent),
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
    pub(super) fn shrink(&self, st: &mut State, ino: u64, size: u64) -> Result<()> {
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
    pub(super) fn zero_by_copy(&self, st: &mut State, ino: u64, off: u64, len: u64) -> Result<()> {
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
            if st.alloc.free_blocks() <= st.reserve {
                return Err(FsError::NoSpace);
            }
            let Some(&(new, _)) = st.alloc.allocate(1, Some(old_dev)).first() else {
                return Err(FsError::NoSpace);
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
    /// than each carrying one. Hold one at a time, except for read locks
    /// taken each stripe once in index order (as `read_many` does).
    pub(super) fn io_lock(&self, ino: u64) -> &RwLock<()> {
        &self.io_locks[self.io_stripe(ino)]
    }

    /// Index of `ino`'s lock in `io_locks`.
    pub(super) fn io_stripe(&self, ino: u64) -> usize {
        (ino.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as usize % IO_LOCK_STRIPES
    }
}
