//! The data path: read, write (allocation and the zero-filled edges of
//! new blocks), fsync, fallocate and SEEK_DATA/SEEK_HOLE.

use super::*;

impl Fs {
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

    /// Several independent reads (a token BATCH): each `(ino, offset,
    /// buf)` as [`Fs::read_buf`] would do it, one result per read.
    pub fn read_many(&self, reads: &[(u64, u64, &IoBuffer<'_>)]) -> Vec<Result<usize>> {
        reads
            .iter()
            .map(|&(ino, offset, buf)| self.read_buf(ino, offset, buf))
            .collect()
    }

    /// Whether an access now should update the atime (per the mount's
    /// atime mode; relatime: atime not newer than mtime/ctime, or a day old).
    pub(super) fn atime_due(&self, a: &InodeAttrs) -> bool {
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

    pub(super) fn touch_atime(&self, ino: u64) {
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
    pub(super) fn retry_when_full<T>(&self, op: impl Fn() -> Result<T>) -> Result<T> {
        match op() {
            Err(FsError::NoSpace) if !self.state.read().pending_free.is_empty() => {
                self.commit()?;
                op()
            }
            r => r,
        }
    }

    pub(super) fn write_once(&self, ino: u64, offset: u64, data: &IoBuffer<'_>) -> Result<usize> {
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

    pub(super) fn maps(i: &meta::Inode, dev: u64) -> bool {
        i.extents
            .values()
            .any(|e| dev >= e.dev && dev < e.dev + e.len)
    }

    /// Sends a planned write down. Blocks that held no data of this file
    /// (new or unwritten) are written whole, zero-filled around `data`, so
    /// stale device bytes never become file content.
    pub(super) fn write_planned(
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

    pub(super) fn fallocate_once(
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
    pub(super) fn edges(end: u64, full_start: u64, full_end: u64) -> (u64, u64) {
        if full_start >= full_end {
            // No whole block inside: treat everything as head.
            (end, end)
        } else {
            (full_start * BS, full_end * BS)
        }
    }

    /// Maps unwritten blocks over every hole in file blocks `from..to`.
    pub(super) fn allocate_unwritten(
        &self,
        st: &mut State,
        ino: u64,
        from: u64,
        to: u64,
    ) -> Result<()> {
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
}
