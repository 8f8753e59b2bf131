//! Attributes: stat, lookup and setattr, including truncation (which
//! zeroes the kept partial block by copy, never in place), and that
//! zeroing by copy itself (truncate, punch hole, zero range).

use super::*;

impl Fs {
    /// What stat shows: the logged attributes, and for a file with
    /// cached writes the size, times and blocks those writes imply.
    pub(super) fn attr_of(&self, i: &meta::Inode) -> Attr {
        let mut attr = Self::logged_attr(i);
        if let Some((a, reserved)) = self.with_cached_writes(&i.attrs) {
            (attr.size, attr.mtime, attr.ctime) = (a.size, a.mtime, a.ctime);
            attr.blocks += reserved * (BS / 512);
        }
        attr
    }

    /// `a` as the file's cached writes left it (with the blocks they
    /// reserved); None if it has none.
    pub(super) fn with_cached_writes(&self, a: &InodeAttrs) -> Option<(InodeAttrs, u64)> {
        if a.kind != Kind::File {
            return None;
        }
        let o = self.cache.overlay(a.ino)?;
        let mut a = a.clone();
        a.size = a.size.max(o.size);
        a.mtime = o.mtime.unwrap_or(a.mtime);
        a.ctime = a.ctime.max(o.ctime);
        Some((a, o.reserved_blocks))
    }

    fn logged_attr(i: &meta::Inode) -> Attr {
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
        st.meta
            .get(ino)
            .map(|i| self.attr_of(i))
            .ok_or(FsError::NotFound)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        let st = self.state.read();
        let ino = Self::child(&st.meta, parent, name)?;
        st.meta
            .get(ino)
            .map(|i| self.attr_of(i))
            .ok_or(FsError::NotFound)
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
        // A shrink to the middle of a block zeroes the rest of it by copy:
        // the device I/O happens here, before the state lock (the io lock
        // keeps size and extents as they are until then).
        let mut zeroed = Vec::new();
        if let Some(size) = set.size {
            self.write_back_inode(ino)?;
            let tail = {
                let st = self.state.read();
                let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
                let shrinks = i.attrs.kind == Kind::File && size < i.attrs.size;
                (shrinks && size % BS != 0).then(|| (size, size.div_ceil(BS) * BS - size))
            };
            if let Some(range) = tail {
                zeroed = self.copy_zeroed(ino, &[range])?;
            }
        }
        let mut st = self.state.write();
        let now = Timespec::now();
        let Some(inode) = st.meta.get(ino) else {
            Self::release_copies(&mut st, &zeroed);
            return Err(FsError::NotFound);
        };
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
                self.shrink(&mut st, ino, size, zeroed)?;
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
            self.cache.forget_mtime(ino);
        }
        a.ctime = set.ctime.unwrap_or(now);
        self.log(&mut st, Record::Inode(a));
        Ok(self.attr_of(st.meta.get(ino).unwrap()))
    }

    /// Drops blocks past `size` and remaps the kept partial last block to
    /// its zeroed copy (`zeroed`, from [`Fs::copy_zeroed`] of the range
    /// `size..` to the block's end), so a later extension reads zeros there.
    pub(super) fn shrink(
        &self,
        st: &mut State,
        ino: u64,
        size: u64,
        zeroed: Vec<ZeroedCopy>,
    ) -> Result<()> {
        let keep = size.div_ceil(BS);
        self.remap_zeroed(st, ino, zeroed)?;
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

    /// Zeroing never happens in place: each written block under the byte
    /// ranges `(offset, len)` of `ino` is read, zeroed in memory and written
    /// to a newly allocated block; [`Fs::remap_zeroed`] then maps the
    /// copies in, by records of the same operation. Until that operation
    /// commits, a crash brings back the old block with its bytes intact,
    /// which zeroing in place would have destroyed (the old size, or the
    /// range before a punch, still makes them part of the file). The old
    /// block is freed once the remap is durable. Holes and unwritten
    /// extents already read as zero and need no copy.
    ///
    /// The state lock is held only to look up and to allocate, never across
    /// the device I/O; the caller holds the inode's io lock for writing, so
    /// the extents looked up stay true until the remap.
    pub(super) fn copy_zeroed(&self, ino: u64, ranges: &[(u64, u64)]) -> Result<Vec<ZeroedCopy>> {
        // (file block, old device block, zero from, zero to) per block,
        // offsets inside the block; one entry per block even when two
        // ranges touch it.
        let mut blocks: Vec<(u64, u64, u64, u64)> = Vec::new();
        {
            let st = self.state.read();
            let inode = st.meta.get(ino).ok_or(FsError::NotFound)?;
            for &(off, len) in ranges.iter().filter(|r| r.1 > 0) {
                let end = off + len;
                let (first, last) = (off / BS, (end - 1) / BS);
                for r in runs(inode, first, last + 1 - first) {
                    let Run::Mapped { file_block, ext } = r else {
                        continue;
                    };
                    if ext.unwritten {
                        continue;
                    }
                    for k in 0..ext.len {
                        let fb = file_block + k;
                        let s = off.max(fb * BS) - fb * BS;
                        let e = end.min((fb + 1) * BS) - fb * BS;
                        match blocks.iter_mut().find(|b| b.0 == fb) {
                            Some(b) => (b.2, b.3) = (b.2.min(s), b.3.max(e)),
                            None => blocks.push((fb, ext.dev + k, s, e)),
                        }
                    }
                }
            }
        }
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let mut data = Vec::with_capacity(blocks.len());
        for &(_, old_dev, s, e) in &blocks {
            let mut block = AlignedBuf::new(BS as usize);
            self.dev.read_at(old_dev * BS, &mut block)?;
            block[s as usize..e as usize].fill(0);
            data.push(block);
        }
        let copies: Vec<ZeroedCopy> = {
            let mut st = self.state.write();
            let need = blocks.len() as u64;
            if st.room() < need {
                return Err(FsError::NoSpace);
            }
            let mut copies = Vec::with_capacity(blocks.len());
            for &(fb, old_dev, _, _) in &blocks {
                let Some(&(new_dev, _)) = st.alloc.allocate(1, Some(old_dev)).first() else {
                    Self::release_copies(&mut st, &copies);
                    return Err(FsError::NoSpace);
                };
                copies.push(ZeroedCopy {
                    file_block: fb,
                    old_dev,
                    new_dev,
                });
            }
            copies
        };
        for (c, block) in copies.iter().zip(&data) {
            if let Err(e) = self.dev.write_at(c.new_dev * BS, block) {
                Self::release_copies(&mut self.state.write(), &copies);
                return Err(e.into());
            }
        }
        self.data_dirty.store(true, Ordering::SeqCst);
        Ok(copies)
    }

    /// Maps the zeroed copies in place of the blocks they copy. Should the
    /// file have changed since [`Fs::copy_zeroed`] looked (it went away),
    /// the copies are freed and nothing is mapped.
    pub(super) fn remap_zeroed(
        &self,
        st: &mut State,
        ino: u64,
        copies: Vec<ZeroedCopy>,
    ) -> Result<()> {
        let unchanged = st.meta.get(ino).is_some_and(|i| {
            copies.iter().all(|c| {
                runs(i, c.file_block, 1).first().is_some_and(|r| {
                    matches!(r, Run::Mapped { file_block, ext }
                        if !ext.unwritten && ext.dev + (c.file_block - file_block) == c.old_dev)
                })
            })
        });
        if !unchanged {
            Self::release_copies(st, &copies);
            return Err(FsError::NotFound);
        }
        for c in copies {
            self.log(
                st,
                Record::Map {
                    ino,
                    file_block: c.file_block,
                    dev_block: c.new_dev,
                    len: 1,
                    unwritten: false,
                },
            );
        }
        Ok(())
    }

    /// Frees copies that will not be mapped (no record ever named them).
    pub(super) fn release_copies(st: &mut State, copies: &[ZeroedCopy]) {
        for c in copies {
            st.alloc.release(c.new_dev, 1);
        }
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
