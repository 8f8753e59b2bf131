//! The data path: read, write (allocation and the zero-filled edges of
//! new blocks), fsync, fallocate and SEEK_DATA/SEEK_HOLE.

use super::*;

/// What a read will do, worked out under the state lock and carried out
/// after it is released: device ranges to transfer, buffer ranges to zero
/// (holes and unwritten extents), the byte count, and whether atime is due.
struct ReadPlan {
    len: usize,
    ranges: Vec<IoRange>,
    zeros: Vec<(usize, usize)>,
    touch_atime: bool,
}

impl Fs {
    /// Plans a read of up to `want` bytes at `offset` of `ino`: short only
    /// at EOF. Only reads metadata: the caller holds the state lock (and
    /// the inode's io lock, so the plan stays true until it is carried out).
    fn plan_read(&self, st: &State, ino: u64, offset: u64, want: usize) -> Result<ReadPlan> {
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        match i.attrs.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid("read of a special file")),
        }
        let mut plan = ReadPlan {
            len: 0,
            ranges: Vec::new(),
            zeros: Vec::new(),
            touch_atime: false,
        };
        let size = i.attrs.size;
        if offset >= size || want == 0 {
            return Ok(plan);
        }
        let n = (size - offset).min(want as u64);
        let end = offset + n;
        let fb = offset / BS;
        for r in runs(i, fb, (end - 1) / BS + 1 - fb) {
            let (file_block, len, ext) = match r {
                Run::Hole { file_block, len } => (file_block, len, None),
                Run::Mapped { file_block, ext } => (file_block, ext.len, Some(ext)),
            };
            let s = offset.max(file_block * BS);
            let e = end.min((file_block + len) * BS);
            match ext {
                Some(ext) if !ext.unwritten => plan.ranges.push(IoRange {
                    dev_offset: ext.dev * BS + (s - file_block * BS),
                    buf_offset: (s - offset) as usize,
                    len: (e - s) as usize,
                }),
                _ => plan.zeros.push(((s - offset) as usize, (e - s) as usize)),
            }
        }
        plan.len = n as usize;
        plan.touch_atime = self.atime_due(&i.attrs);
        Ok(plan)
    }

    /// Reads up to `buf.len()` bytes at `offset` into `buf`; short only at
    /// EOF. Holes and unwritten extents read as zeros.
    pub fn read_buf(&self, ino: u64, offset: u64, buf: &IoBuffer<'_>) -> Result<usize> {
        let io = self.io_lock(ino);
        let _io = io.read();
        self.write_back_inode(ino)?;
        // The state lock only while planning: zeroing touches the caller's
        // memory (slow, or faulting) and the transfer waits on the device;
        // neither may stall metadata operations of other users.
        let plan = self.plan_read(&self.state.read(), ino, offset, buf.len())?;
        for &(at, len) in &plan.zeros {
            buf.zero(at, len)?;
        }
        self.dev.submit(Direction::Read, buf, &plan.ranges)?;
        if plan.touch_atime {
            self.touch_atime(ino);
        }
        Ok(plan.len)
    }

    /// Several independent reads (a token BATCH): each `(ino, offset,
    /// buf)` with the semantics of [`Fs::read_buf`], one result per read,
    /// in order. Every read is planned under one hold of the state lock and
    /// every device range goes down in one [`BlockDevice::submit_many`], so
    /// the device sees the whole batch as one queue.
    pub fn read_many(&self, reads: &[(u64, u64, &IoBuffer<'_>)]) -> Vec<Result<usize>> {
        // Each io lock once (the locks are striped: two inodes may share
        // one, and taking a read lock twice can deadlock behind a waiting
        // writer), in index order so two batches never wait on each other.
        let mut stripes: Vec<usize> = reads.iter().map(|r| self.io_stripe(r.0)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _io: Vec<_> = stripes.iter().map(|&s| self.io_locks[s].read()).collect();
        let mut inos: Vec<u64> = reads.iter().map(|r| r.0).collect();
        inos.sort_unstable();
        inos.dedup();
        if let Some(e) = inos
            .into_iter()
            .find_map(|ino| self.write_back_inode(ino).err())
        {
            // A failed write-back broke the mount (EIO from now on).
            let mut first = Some(e);
            return reads
                .iter()
                .map(|_| Err(first.take().unwrap_or(FsError::CommitFailed)))
                .collect();
        }

        let mut plans: Vec<Result<ReadPlan>> = {
            let st = self.state.read();
            reads
                .iter()
                .map(|&(ino, offset, buf)| self.plan_read(&st, ino, offset, buf.len()))
                .collect()
        };
        for (plan, &(_, _, buf)) in plans.iter_mut().zip(reads) {
            let zeroed = match plan {
                Ok(p) => p.zeros.iter().try_for_each(|&(at, len)| buf.zero(at, len)),
                Err(_) => Ok(()),
            };
            if let Err(e) = zeroed {
                *plan = Err(e.into());
            }
        }

        // One transfer per read that still has device ranges to move.
        let mut transfers: Vec<(&IoBuffer<'_>, &[IoRange])> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        for (k, (plan, &(_, _, buf))) in plans.iter().zip(reads).enumerate() {
            if let Ok(p) = plan {
                if !p.ranges.is_empty() {
                    transfers.push((buf, &p.ranges));
                    owner.push(k);
                }
            }
        }
        let outcomes = if transfers.is_empty() {
            Vec::new()
        } else {
            self.dev.submit_many(Direction::Read, &transfers)
        };
        let mut failed: Vec<Option<FsError>> = reads.iter().map(|_| None).collect();
        for (k, outcome) in owner.into_iter().zip(outcomes) {
            if let Err(e) = outcome {
                failed[k] = Some(e.into());
            }
        }

        let mut results = Vec::with_capacity(reads.len());
        let mut touched: Vec<u64> = Vec::new();
        for ((plan, failure), &(ino, _, _)) in plans.into_iter().zip(failed).zip(reads) {
            results.push(match (plan, failure) {
                (Err(e), _) | (Ok(_), Some(e)) => Err(e),
                (Ok(p), None) => {
                    if p.touch_atime {
                        touched.push(ino);
                    }
                    Ok(p.len)
                }
            });
        }
        touched.sort_unstable();
        touched.dedup();
        for ino in touched {
            self.touch_atime(ino);
        }
        results
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

    /// `write()`: into the write-back cache when the mount has one (see
    /// `cache`), else straight to the device like [`Fs::write_buf`].
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<usize> {
        if self.cache.enabled() {
            self.retry_when_full(|| self.write_cached(ino, offset, data))
        } else {
            self.write_buf(ino, offset, &IoBuffer::from_ref(data))
        }
    }

    /// Writes all of `data` at `offset`, allocating blocks as needed.
    pub fn write_buf(&self, ino: u64, offset: u64, data: &IoBuffer<'_>) -> Result<usize> {
        self.write_buf_attrs(ino, offset, data).map(|(n, _)| n)
    }

    /// As [`Fs::write_buf`], and the inode's attributes as this write left
    /// them (taken in the same lock hold that logged it; None if the inode
    /// went away meanwhile), so that a caller can tell later whether
    /// anything changed the file since.
    pub fn write_buf_attrs(
        &self,
        ino: u64,
        offset: u64,
        data: &IoBuffer<'_>,
    ) -> Result<(usize, Option<InodeAttrs>)> {
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

    pub(super) fn write_once(
        &self,
        ino: u64,
        offset: u64,
        data: &IoBuffer<'_>,
    ) -> Result<(usize, Option<InodeAttrs>)> {
        self.writable()?;
        if data.is_empty() {
            return Ok((0, None));
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        let io = self.io_lock(ino);
        let _io = io.write();
        self.write_back_inode(ino)?;
        let fb = offset / BS;
        let nblocks = (end - 1) / BS + 1 - fb;
        // Plan: which blocks exist, which are new (allocated now).
        let plan: Vec<(u64, u64, u64, bool)> = {
            let mut st = self.state.write();
            let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
            Self::check_write_target(i)?;
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
                        let avail = st.room();
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
            return Ok((data.len(), None));
        };
        let mut a = i.attrs.clone();
        let now = Timespec::now();
        a.size = a.size.max(end);
        a.mtime = now;
        a.ctime = now;
        self.log(&mut st, Record::Inode(a.clone()));
        Ok((data.len(), Some(a)))
    }

    /// Only a regular file takes write(): EISDIR for a directory, EINVAL
    /// for the rest (the cached and the direct path alike).
    pub(super) fn check_write_target(i: &meta::Inode) -> Result<()> {
        match i.attrs.kind {
            Kind::File => Ok(()),
            Kind::Dir => Err(FsError::IsDir),
            _ => Err(FsError::Invalid("write to a special file")),
        }
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
        self.write_back_inode(ino)?;
        let (full_start, full_end) = (offset.div_ceil(BS), end / BS);
        let (head_end, tail_start) = Self::edges(end, full_start, full_end);
        // Partial blocks at the edges of a punch or zero range are zeroed
        // by copy, the device I/O before the state lock (the io lock keeps
        // the extents as they are until then). Only files have blocks.
        let zeroed = match mode {
            FallocMode::Allocate { .. } => Vec::new(),
            FallocMode::PunchHole | FallocMode::ZeroRange { .. } => self.copy_zeroed(
                ino,
                &[(offset, head_end - offset), (tail_start, end - tail_start)],
            )?,
        };
        let mut st = self.state.write();
        let Some(i) = st.meta.get(ino) else {
            Self::release_copies(&mut st, &zeroed);
            return Err(FsError::NotFound);
        };
        match i.attrs.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::NotSupported),
        }
        let mut a = i.attrs.clone();
        let now = Timespec::now();
        match mode {
            FallocMode::Allocate { keep_size } => {
                self.allocate_unwritten(&mut st, ino, offset / BS, end.div_ceil(BS))?;
                if !keep_size && end > a.size {
                    a.size = end;
                }
            }
            FallocMode::PunchHole => {
                self.remap_zeroed(&mut st, ino, zeroed)?;
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
                // Room for the holes is checked before anything is logged:
                // an ENOSPC must leave the file as it was, not with its
                // written blocks already turned to zeros.
                let holes = match self.holes_with_room(&st, ino, full_start, full_end) {
                    Ok(h) => h,
                    Err(e) => {
                        Self::release_copies(&mut st, &zeroed);
                        return Err(e);
                    }
                };
                self.remap_zeroed(&mut st, ino, zeroed)?;
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
                    self.map_unwritten(&mut st, ino, holes);
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
        let holes = self.holes_with_room(st, ino, from, to)?;
        self.map_unwritten(st, ino, holes);
        Ok(())
    }

    /// The holes of `ino` in blocks `from..to` as (file block, length),
    /// or NoSpace if the device cannot give them all blocks.
    fn holes_with_room(&self, st: &State, ino: u64, from: u64, to: u64) -> Result<Vec<(u64, u64)>> {
        let Some(i) = st.meta.get(ino) else {
            return Err(FsError::NotFound);
        };
        if to <= from {
            return Ok(Vec::new());
        }
        let holes: Vec<(u64, u64)> = runs(i, from, to - from)
            .into_iter()
            .filter_map(|r| match r {
                Run::Hole { file_block, len } => Some((file_block, len)),
                _ => None,
            })
            .collect();
        let need: u64 = holes.iter().map(|h| h.1).sum();
        if need > st.room() {
            return Err(FsError::NoSpace);
        }
        Ok(holes)
    }

    /// Maps each hole to newly allocated unwritten blocks (room checked
    /// by [`Fs::holes_with_room`] under the same lock hold).
    fn map_unwritten(&self, st: &mut State, ino: u64, holes: Vec<(u64, u64)>) {
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
    }

    /// SEEK_DATA / SEEK_HOLE. Unwritten extents count as data.
    pub fn seek(&self, ino: u64, offset: u64, whence: SeekWhence) -> Result<u64> {
        let io = self.io_lock(ino);
        let _io = io.read();
        self.write_back_inode(ino)?;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::blockdev::hold::HoldDevice;
    use crate::blockdev::MemDevice;

    const ROOT: Caller = Caller { uid: 0, gid: 0 };
    const MISSING: u64 = 999_999;

    #[test]
    fn zero_range_without_room_changes_nothing() {
        let dev = Arc::new(MemDevice::new(16 << 20));
        format(dev.as_ref(), ROOT).unwrap();
        let opts = MountOptions {
            commit_interval: Duration::from_secs(3600),
            ..MountOptions::default()
        };
        let fs = Fs::mount(dev.clone() as Arc<dyn BlockDevice>, opts).unwrap();
        let file = |name: &[u8]| {
            let (a, fh) = fs.create(ROOT, ROOT_INO, name, 0o644, true, true).unwrap();
            fs.release(fh).unwrap();
            a.ino
        };
        // Written data in block 0, then holes up to block 64.
        let victim = file(b"victim");
        let data = pattern(7, BS as usize);
        fs.write(victim, 0, &data).unwrap();
        let size = SetAttr {
            size: Some(64 * BS),
            ..SetAttr::default()
        };
        fs.setattr(victim, &size).unwrap();
        // Fill the device.
        let filler = file(b"filler");
        let mut at = 0;
        for chunk in [1 << 20, BS as usize] {
            let piece = vec![1u8; chunk];
            while fs.write(filler, at, &piece).is_ok() {
                at += chunk as u64;
            }
        }
        // Zeroing blocks 0..64 needs 63 new blocks for the holes: ENOSPC,
        // and block 0 must still hold its data (the old code had already
        // turned it unwritten, so it read as zeros).
        let zero = FallocMode::ZeroRange { keep_size: true };
        assert!(matches!(
            fs.fallocate(ROOT, victim, 0, 64 * BS, zero),
            Err(FsError::NoSpace)
        ));
        assert!(fs.read(victim, 0, BS as usize).unwrap()[..] == data[..]);
        fs.unmount().unwrap();
        let report = check::fsck(dev.as_ref(), false).unwrap();
        assert!(report.remaining.is_empty(), "{:?}", report.remaining);
    }

    /// A memory device that counts how reads reach it: one call per
    /// `submit` made directly, one per `submit_many` wave.
    struct CountingDevice {
        inner: MemDevice,
        direct_reads: AtomicUsize,
        waves: AtomicUsize,
    }

    impl BlockDevice for CountingDevice {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn submit(
            &self,
            dir: Direction,
            buf: &IoBuffer<'_>,
            ranges: &[IoRange],
        ) -> std::result::Result<(), crate::blockdev::DeviceError> {
            if dir == Direction::Read {
                self.direct_reads.fetch_add(1, Ordering::SeqCst);
            }
            self.inner.submit(dir, buf, ranges)
        }
        fn submit_many(
            &self,
            dir: Direction,
            transfers: &[(&IoBuffer<'_>, &[IoRange])],
        ) -> Vec<std::result::Result<(), crate::blockdev::DeviceError>> {
            self.waves.fetch_add(1, Ordering::SeqCst);
            transfers
                .iter()
                .map(|(buf, ranges)| self.inner.submit(dir, buf, ranges))
                .collect()
        }
        fn flush(&self) -> std::result::Result<(), crate::blockdev::DeviceError> {
            self.inner.flush()
        }
        fn describe(&self) -> String {
            "counting memory device".into()
        }
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A mounted filesystem with files of every shape a read meets, and
    /// what each file must read as.
    struct Fixture {
        fs: Arc<Fs>,
        dev: Arc<CountingDevice>,
        /// (ino, expected content).
        files: Vec<(u64, Vec<u8>)>,
        fifo: u64,
    }

    impl Fixture {
        fn new() -> Self {
            let dev = Arc::new(CountingDevice {
                inner: MemDevice::new(16 << 20),
                direct_reads: AtomicUsize::new(0),
                waves: AtomicUsize::new(0),
            });
            format(dev.as_ref(), ROOT).unwrap();
            let opts = MountOptions {
                commit_interval: Duration::from_secs(3600),
                atime: AtimeMode::Strict,
                ..MountOptions::default()
            };
            let fs = Fs::mount(dev.clone() as Arc<dyn BlockDevice>, opts).unwrap();
            let mut files = Vec::new();
            let new_file = |name: &[u8]| {
                let (a, fh) = fs.create(ROOT, ROOT_INO, name, 0o644, true, true).unwrap();
                fs.release(fh).unwrap();
                a.ino
            };
            // Data, a two-block hole, data again, EOF inside a block, and
            // unwritten blocks past EOF (kept size).
            let ino = new_file(b"holey");
            let mut want = vec![0u8; 5 * BS as usize + 7 + 5000];
            let head = pattern(1, 3 * BS as usize);
            let tail = pattern(2, 5000);
            fs.write(ino, 0, &head).unwrap();
            fs.write(ino, 5 * BS + 7, &tail).unwrap();
            want[..head.len()].copy_from_slice(&head);
            want[5 * BS as usize + 7..].copy_from_slice(&tail);
            let keep = FallocMode::Allocate { keep_size: true };
            fs.fallocate(ROOT, ino, 8 * BS, 2 * BS, keep).unwrap();
            files.push((ino, want));
            // Unwritten extents (read as zeros) around a little data.
            let ino = new_file(b"unwritten");
            let grow = FallocMode::Allocate { keep_size: false };
            fs.fallocate(ROOT, ino, 0, 4 * BS, grow).unwrap();
            let mid = pattern(3, 100);
            fs.write(ino, BS + 50, &mid).unwrap();
            let mut want = vec![0u8; 4 * BS as usize];
            want[BS as usize + 50..BS as usize + 150].copy_from_slice(&mid);
            files.push((ino, want));
            // Exactly one block, and an empty file.
            let ino = new_file(b"block");
            let one = pattern(4, BS as usize);
            fs.write(ino, 0, &one).unwrap();
            files.push((ino, one));
            files.push((new_file(b"empty"), Vec::new()));
            let fifo = fs
                .mknod(ROOT, ROOT_INO, b"fifo", libc::S_IFIFO | 0o644, 0)
                .unwrap()
                .ino;
            // On the device, so the tests count reads, not the write-back.
            fs.fsync(ROOT_INO).unwrap();
            Fixture {
                fs,
                dev,
                files,
                fifo,
            }
        }
    }

    fn outcome(r: &Result<usize>) -> std::result::Result<usize, i32> {
        r.as_ref().map(|&n| n).map_err(|e| e.errno())
    }

    /// read_many gives, read for read, what read_buf gives (result and
    /// every byte of the buffer), and read_buf gives the file's content.
    #[test]
    fn read_many_matches_read_buf_byte_for_byte() {
        let fx = Fixture::new();
        let mut inos: Vec<u64> = fx.files.iter().map(|f| f.0).collect();
        inos.extend([ROOT_INO, MISSING, fx.fifo]);
        let mut rng = pattern(42, 4096).into_iter().cycle();
        let mut next = move |n: u64| -> u64 {
            let r = u64::from_le_bytes(std::array::from_fn(|_| rng.next().unwrap()));
            r % n.max(1)
        };
        let mut checked = 0;
        for round in 0..150 {
            let count = 1 + next(16) as usize;
            let mut reads: Vec<(u64, u64, usize)> = Vec::new();
            for _ in 0..count {
                let ino = inos[next(inos.len() as u64) as usize];
                // Offsets past EOF and lengths from 0 to a few blocks.
                let offset = next(8 * BS);
                let len = match next(4) {
                    0 => next(16) as usize,
                    1 => BS as usize,
                    _ => next(4 * BS) as usize,
                };
                reads.push((ino, offset, len));
            }
            let fill = round as u8 | 0x80;
            let mut single: Vec<Vec<u8>> = reads.iter().map(|r| vec![fill; r.2]).collect();
            let mut batch = single.clone();
            let single_results: Vec<_> = reads
                .iter()
                .zip(single.iter_mut())
                .map(|(&(ino, off, _), b)| fx.fs.read_buf(ino, off, &IoBuffer::from_mut(b)))
                .collect();
            let bufs: Vec<IoBuffer<'_>> = batch.iter_mut().map(|b| IoBuffer::from_mut(b)).collect();
            let many: Vec<(u64, u64, &IoBuffer<'_>)> = reads
                .iter()
                .zip(&bufs)
                .map(|(&(ino, off, _), b)| (ino, off, b))
                .collect();
            let batch_results = fx.fs.read_many(&many);
            drop(many);
            drop(bufs);
            assert_eq!(batch_results.len(), reads.len());
            for (k, &(ino, off, len)) in reads.iter().enumerate() {
                let what = format!("round {round} read {k}: ino {ino} offset {off} len {len}");
                let got = outcome(&batch_results[k]);
                assert_eq!(got, outcome(&single_results[k]), "{what}");
                assert!(batch[k] == single[k], "{what}: bytes differ");
                match fx.files.iter().find(|f| f.0 == ino) {
                    Some((_, want)) => {
                        let start = (off as usize).min(want.len());
                        let end = (start + len).min(want.len());
                        assert_eq!(got, Ok(end - start), "{what}");
                        assert!(single[k][..end - start] == want[start..end], "{what}");
                        assert!(
                            single[k][end - start..].iter().all(|&b| b == fill),
                            "{what}"
                        );
                        checked += 1;
                    }
                    None if ino == ROOT_INO => assert_eq!(got, Err(libc::EISDIR), "{what}"),
                    None if ino == MISSING => assert_eq!(got, Err(libc::ENOENT), "{what}"),
                    None => assert_eq!(got, Err(libc::EINVAL), "{what}"),
                }
            }
        }
        assert!(checked > 500, "only {checked} reads of files");
        fx.fs.unmount().unwrap();
    }

    /// A batch goes to the device as one wave, whatever its files, and
    /// updates each file's atime (strictatime) once.
    #[test]
    fn read_many_sends_one_wave() {
        let fx = Fixture::new();
        let (holey, block) = (fx.files[0].0, fx.files[2].0);
        let mut bufs = [[0u8; 100]; 6];
        let io: Vec<IoBuffer<'_>> = bufs.iter_mut().map(|b| IoBuffer::from_mut(b)).collect();
        let reads = [
            (holey, 0, &io[0]),
            (block, 10, &io[1]),
            (MISSING, 0, &io[2]),
            (holey, 3 * BS + 10, &io[3]), // all hole: nothing for the device
            (holey, 5 * BS + 7, &io[4]),
            (block, 2000, &io[5]),
        ];
        let before = fx.fs.getattr(holey).unwrap().atime;
        std::thread::sleep(Duration::from_millis(20));
        fx.dev.direct_reads.store(0, Ordering::SeqCst);
        fx.dev.waves.store(0, Ordering::SeqCst);
        let results: Vec<_> = fx.fs.read_many(&reads).iter().map(outcome).collect();
        assert_eq!(
            results,
            [
                Ok(100),
                Ok(100),
                Err(libc::ENOENT),
                Ok(100),
                Ok(100),
                Ok(100)
            ]
        );
        assert_eq!(fx.dev.waves.load(Ordering::SeqCst), 1, "one submit_many");
        assert_eq!(
            fx.dev.direct_reads.load(Ordering::SeqCst),
            0,
            "no lone submits"
        );
        assert!(
            fx.fs.getattr(holey).unwrap().atime > before,
            "atime updated"
        );
        drop(io);
        assert_eq!(bufs[0][..], fx.files[0].1[..100]);
        assert_eq!(bufs[3], [0u8; 100]);
        assert_eq!(bufs[5][..], fx.files[2].1[2000..2100]);
        fx.fs.unmount().unwrap();
    }

    /// Batches that name one inode (one io lock) many times, against a
    /// writer of that inode: no deadlock (a read lock taken twice waits
    /// behind the writer forever), and every block read is whole, never
    /// half old, half new.
    #[test]
    fn read_many_with_repeated_inodes_against_a_writer() {
        let fx = Fixture::new();
        let ino = fx.files[2].0;
        let fs = fx.fs.clone();
        fs.write(ino, 0, &[0u8; BS as usize]).unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (fs, stop) = (fs.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut v = 0u8;
                while !stop.load(Ordering::SeqCst) {
                    v = v.wrapping_add(1);
                    fs.write(ino, 0, &[v; BS as usize]).unwrap();
                }
            })
        };
        let reader = std::thread::spawn(move || {
            for _ in 0..2000 {
                let mut bufs = [[0u8; BS as usize]; 4];
                let io: Vec<IoBuffer<'_>> =
                    bufs.iter_mut().map(|b| IoBuffer::from_mut(b)).collect();
                let reads: Vec<_> = io.iter().map(|b| (ino, 0, b)).collect();
                for r in fs.read_many(&reads) {
                    assert_eq!(r.unwrap(), BS as usize);
                }
                drop(reads);
                drop(io);
                for b in &bufs {
                    assert!(b.iter().all(|&x| x == b[0]), "a torn block");
                }
            }
            done_tx.send(()).unwrap();
        });
        let finished = done_rx.recv_timeout(Duration::from_secs(30));
        stop.store(true, Ordering::SeqCst);
        assert!(
            !matches!(finished, Err(mpsc::RecvTimeoutError::Timeout)),
            "read_many deadlocked against a writer"
        );
        reader.join().unwrap();
        writer.join().unwrap();
        fx.fs.unmount().unwrap();
    }

    /// Truncation to mid-block and a punch hole zero partial blocks by
    /// copy, which reads the device: while that read is stuck, metadata
    /// operations of other files (stat, create) still go through, and the
    /// result is right once the read completes.
    #[test]
    fn zeroing_by_copy_holds_no_state_lock_across_device_io() {
        let dev = HoldDevice::new(Arc::new(MemDevice::new(16 << 20)));
        format(dev.as_ref(), ROOT).unwrap();
        let opts = MountOptions {
            commit_interval: Duration::from_secs(3600),
            ..MountOptions::default()
        };
        let fs = Fs::mount(dev.clone() as Arc<dyn BlockDevice>, opts).unwrap();
        let (a, fh) = fs.create(ROOT, ROOT_INO, b"f", 0o644, true, true).unwrap();
        fs.release(fh).unwrap();
        let data = pattern(5, 3 * BS as usize);
        fs.write(a.ino, 0, &data).unwrap();
        let punch = FallocMode::PunchHole;
        type Op = Box<dyn FnOnce(&Fs, u64) -> Result<()> + Send>;
        let ops: [(&str, Op); 2] = [
            (
                "punch",
                Box::new(move |fs, ino| fs.fallocate(ROOT, ino, BS + 10, 100, punch)),
            ),
            (
                "truncate",
                Box::new(|fs, ino| {
                    let set = SetAttr {
                        size: Some(2 * BS + 7),
                        ..SetAttr::default()
                    };
                    fs.setattr(ino, &set).map(|_| ())
                }),
            ),
        ];
        for (k, (what, op)) in ops.into_iter().enumerate() {
            dev.arm(Direction::Read);
            let worker = {
                let fs = fs.clone();
                std::thread::spawn(move || op(&fs, a.ino))
            };
            assert!(
                dev.wait_held(Duration::from_secs(10)),
                "{what}: no device read"
            );
            let (tx, rx) = mpsc::channel();
            let other = {
                let fs = fs.clone();
                std::thread::spawn(move || {
                    let name = format!("other{k}");
                    let r = fs.getattr(ROOT_INO).and_then(|_| {
                        fs.create(ROOT, ROOT_INO, name.as_bytes(), 0o644, true, false)
                    });
                    tx.send(r.map(|(_, fh)| fh)).unwrap();
                })
            };
            let served = rx.recv_timeout(Duration::from_secs(3));
            dev.release();
            worker.join().unwrap().unwrap();
            other.join().unwrap();
            let fh = served
                .unwrap_or_else(|_| panic!("{what}: stat and create waited for the device"))
                .unwrap();
            fs.release(fh).unwrap();
        }
        let mut want = data.clone();
        want[BS as usize + 10..BS as usize + 110].fill(0);
        want.truncate(2 * BS as usize + 7);
        assert!(fs.read(a.ino, 0, 3 * BS as usize).unwrap()[..] == want[..]);
        // The block cut by the truncation reads zeros past the new end.
        let grow = SetAttr {
            size: Some(3 * BS),
            ..SetAttr::default()
        };
        fs.setattr(a.ino, &grow).unwrap();
        want.resize(3 * BS as usize, 0);
        assert!(fs.read(a.ino, 0, 3 * BS as usize).unwrap()[..] == want[..]);
        fs.unmount().unwrap();
        let report = check::fsck(dev.as_ref(), false).unwrap();
        assert!(report.remaining.is_empty(), "{:?}", report.remaining);
    }
}
