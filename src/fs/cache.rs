//! The write-back cache: `write()` lands here, in 4 KiB pages, and
//! returns; the data reaches the device later in large aligned writes,
//! with its blocks allocated only then (delayed allocation, so a file
//! written in small pieces still gets one extent).
//!
//! What it promises, and how:
//! - Room: blocks for new data are reserved at `write()` (ENOSPC there,
//!   never at write-back); `State::delalloc` counts them.
//! - Memory: at most `MountOptions::dirty_limit` bytes of pages, busy and
//!   pooled for reuse together (the pool holds only pages once busy, up to
//!   the limit's worth). A writer over the limit writes
//!   back before it adds more; the flusher thread starts at an eighth of
//!   the limit, so a streaming writer overlaps the device.
//! - Coherency: reads, token transfers, truncate, fallocate and SEEK_DATA
//!   write the inode back first, so below this layer the device is the
//!   file's only copy. Attributes shown while data is cached (size, mtime,
//!   st_blocks) come from the cache ([`Cache::overlay`]).
//! - Crash safety: nothing about cached data (size, mtime, maps) is logged
//!   before it is written back, and every commit first writes everything
//!   back behind a gate no `write()` passes until the commit has taken its
//!   queue. A commit so holds exactly the operations that returned before
//!   it, each whole; writes that were never fsynced may be lost in a crash,
//!   and new blocks only become part of a file once their data is written.
//!
//! Lock order: `gate`, the inode's io lock, `writeback`, `state`, one
//! file's `Dirty`; the map of files and the page pool are never held while
//! waiting for another lock.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use parking_lot::Condvar;

use super::*;

/// Most pages one write-back takes (8 MiB): large device writes for a
/// streaming writer, and a short wait for a reader behind it.
const CHUNK_PAGES: usize = 2048;

pub(super) struct Cache {
    /// Most bytes of dirty pages; 0 turns the cache off (write-through).
    limit: u64,
    files: Mutex<HashMap<u64, Arc<Mutex<Dirty>>>>,
    /// Bytes held in pages, counted until their write-back is done.
    bytes: AtomicU64,
    /// Writers hold it shared; a commit holds it alone while it takes its
    /// queue, so no write is half in a commit.
    pub(super) gate: RwLock<()>,
    /// One write-back at a time: who finds a file's pages gone waits here
    /// until they are on the device and mapped. It holds the buffer every
    /// write-back copies its pages into (one, reused: no allocation churn).
    writeback: Mutex<Option<AlignedBuf>>,
    /// Pages freed by write-back, for writers to reuse, up to the dirty
    /// limit's worth: pages are made and freed on different threads, and
    /// handed back to the allocator they would pile up in its per-thread
    /// arenas (a dirty limit's worth per thread: dd of 20000 MiB left the
    /// daemon at 1.4 GiB with a 256M limit, and at 488 MiB with 16 MiB
    /// pooled). So the daemon keeps at most the limit in pages, busy or
    /// pooled.
    pool: Mutex<Vec<Box<[u8]>>>,
    wake: Arc<Wake>,
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How writers and unmount reach the flusher thread.
struct Wake {
    stop: Mutex<bool>,
    work: Condvar,
}

/// One file's cached data and the attributes it implies.
struct Dirty {
    pages: BTreeMap<u64, Page>,
    /// The size `write()`s made; never below the logged size.
    size: u64,
    /// Time of the last cached write; None once setattr set mtime itself.
    mtime: Option<Timespec>,
    ctime: Timespec,
    /// Pages whose blocks are reserved (they were holes).
    reserved: u64,
    /// Pages of this file are being written back and their blocks are not
    /// mapped yet: a partial write must not start a page from zeros.
    writing: bool,
    /// Of those, the blocks that were holes: the write-back maps them, so
    /// a write to one reserves nothing, and `stat` still counts them.
    flight_holes: std::collections::BTreeSet<u64>,
    /// `write_back_inode` is writing the whole file back: writers wait.
    draining: bool,
}

struct Page {
    data: Box<[u8]>,
    /// A block is reserved for it: it was a hole when first written.
    reserved: bool,
}

/// What `stat` shows for a file with cached data.
pub(super) struct Overlay {
    pub size: u64,
    pub mtime: Option<Timespec>,
    pub ctime: Timespec,
    pub reserved_blocks: u64,
}

/// Pages taken from one file for a write-back: runs of consecutive
/// blocks, copied into the write-back buffer.
struct Taken {
    ino: u64,
    entry: Arc<Mutex<Dirty>>,
    runs: Vec<TakenRun>,
    reserved: u64,
    pages: u64,
}

/// Consecutive blocks from `first_block`, at byte `at` of the buffer.
struct TakenRun {
    first_block: u64,
    at: usize,
    blocks: u64,
}

/// Where a taken run goes: device ranges, and which of its blocks the
/// write-back newly maps (allocated now, or unwritten until now).
#[derive(Default)]
struct RunPlan {
    ranges: Vec<IoRange>,
    maps: Vec<(u64, u64, u64)>,
    allocated: Vec<(u64, u64)>,
}

impl Cache {
    pub(super) fn new(limit: u64) -> Self {
        Self {
            limit,
            files: Mutex::new(HashMap::new()),
            bytes: AtomicU64::new(0),
            gate: RwLock::new(()),
            writeback: Mutex::new(None),
            pool: Mutex::new(Vec::new()),
            wake: Arc::new(Wake {
                stop: Mutex::new(false),
                work: Condvar::new(),
            }),
            flusher: Mutex::new(None),
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.limit > 0
    }

    /// Where the flusher starts: an eighth of the limit, so a streaming
    /// writer's data is mostly on the device by the time it fsyncs.
    fn background(&self) -> u64 {
        self.limit / 8
    }

    /// Bytes of dirty pages now.
    pub fn dirty_bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    fn holds(&self, ino: u64) -> bool {
        self.enabled() && self.files.lock().contains_key(&ino)
    }

    pub(super) fn overlay(&self, ino: u64) -> Option<Overlay> {
        if !self.enabled() {
            return None;
        }
        let entry = self.files.lock().get(&ino).cloned()?;
        let d = entry.lock();
        Some(Overlay {
            size: d.size,
            mtime: d.mtime,
            ctime: d.ctime,
            reserved_blocks: d.reserved + d.flight_holes.len() as u64,
        })
    }

    /// A page holding `bytes` (a whole block), or zeros.
    fn page(&self, bytes: Option<&[u8]>, reserved: bool) -> Page {
        let reused = self.pool.lock().pop();
        let data = match (reused, bytes) {
            (Some(mut data), Some(b)) => {
                data.copy_from_slice(b);
                data
            }
            (Some(mut data), None) => {
                data.fill(0);
                data
            }
            (None, Some(b)) => b.into(),
            (None, None) => vec![0u8; BS as usize].into_boxed_slice(),
        };
        Page { data, reserved }
    }

    fn recycle(&self, pages: impl IntoIterator<Item = Page>) {
        let mut pool = self.pool.lock();
        for p in pages {
            if pool.len() as u64 >= self.limit / BS {
                break;
            }
            pool.push(p.data);
        }
    }

    /// After setattr set the mtime: it wins over the cached writes' time.
    pub(super) fn forget_mtime(&self, ino: u64) {
        if let Some(entry) = self.files.lock().get(&ino).cloned() {
            entry.lock().mtime = None;
        }
    }
}

impl Fs {
    /// `write()` into the cache: returns once the data is in memory (see
    /// the module doc). Blocks that were holes are reserved now.
    pub(super) fn write_cached(&self, ino: u64, offset: u64, data: &[u8]) -> Result<usize> {
        self.writable()?;
        if data.is_empty() {
            return Ok(0);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        self.throttle()?;
        let _gate = self.cache.gate.read();
        let io = self.io_lock(ino);
        let _io = io.read();
        let (fb, lb) = (offset / BS, (end - 1) / BS);
        // A partial write over written blocks that are not cached reads
        // them first; holding `writeback` meanwhile keeps them current.
        let mut wb = None;
        // Blocks read while no lock but `writeback` was held (it keeps
        // them current): never a device read under the file's lock.
        let mut prefetched: HashMap<u64, AlignedBuf> = HashMap::new();
        loop {
            let mut st = self.state.write();
            let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
            Self::check_write_target(i)?;
            let entry = self
                .cache
                .files
                .lock()
                .entry(ino)
                .or_insert_with(|| Arc::new(Mutex::new(Dirty::new(&i.attrs))))
                .clone();
            let mut d = entry.lock();
            if d.draining && wb.is_none() {
                // Wait for the drain (it holds `writeback`), then plan again.
                drop(d);
                drop(st);
                drop(self.cache.writeback.lock());
                continue;
            }
            let mut zeroed: Vec<(u64, bool)> = Vec::new();
            let mut fills: Vec<(u64, u64)> = Vec::new();
            for r in runs(i, fb, lb + 1 - fb) {
                match r {
                    Run::Hole { file_block, len } => {
                        for b in file_block..file_block + len {
                            let whole = offset <= b * BS && end >= (b + 1) * BS;
                            if d.pages.contains_key(&b) {
                            } else if d.flight_holes.contains(&b) && whole {
                                // Mapped by the write-back in flight.
                                zeroed.push((b, false));
                            } else if whole || !d.writing {
                                zeroed.push((b, true));
                            } else {
                                // Maybe in flight: wait for it (below),
                                // then this block is mapped or a hole.
                                fills.push((b, u64::MAX));
                            }
                        }
                    }
                    Run::Mapped { file_block, ext } => {
                        for b in file_block..file_block + ext.len {
                            let whole = offset <= b * BS && end >= (b + 1) * BS;
                            if d.pages.contains_key(&b) {
                            } else if ext.unwritten || whole {
                                zeroed.push((b, false));
                            } else {
                                fills.push((b, ext.dev + (b - file_block)));
                            }
                        }
                    }
                }
            }
            if !fills.is_empty() && wb.is_none() {
                // With `writeback` held nothing is in flight: the plan
                // made again then has only real blocks to read.
                drop(d);
                drop(st);
                wb = Some(self.cache.writeback.lock());
                continue;
            }
            debug_assert!(fills.iter().all(|f| f.1 != u64::MAX), "nothing in flight");
            let missing: Vec<(u64, u64)> = fills
                .iter()
                .filter(|f| !prefetched.contains_key(&f.0))
                .copied()
                .collect();
            if !missing.is_empty() {
                drop(d);
                drop(st);
                for (b, dev) in missing {
                    let mut block = AlignedBuf::new(BS as usize);
                    self.dev.read_at(dev * BS, &mut block)?;
                    prefetched.insert(b, block);
                }
                continue;
            }
            let holes = zeroed.iter().filter(|z| z.1).count() as u64;
            if holes > st.room() {
                return Err(FsError::NoSpace);
            }
            st.delalloc += holes;
            drop(st);
            let filled: Vec<(u64, Page)> = fills
                .iter()
                .map(|&(b, _)| (b, self.cache.page(Some(&prefetched[&b]), false)))
                .collect();
            d.reserved += holes;
            let added = zeroed.len() + filled.len();
            self.cache
                .bytes
                .fetch_add(added as u64 * BS, Ordering::SeqCst);
            // New pages the write covers whole are made from its bytes
            // (no zeroing first); `d` stays locked until the data is in, so
            // a write-back never sees a page planned but not yet filled.
            let mut made = vec![false; (lb + 1 - fb) as usize];
            for (b, reserved) in zeroed {
                let (from, to) = (b * BS, (b + 1) * BS);
                let page = if offset <= from && end >= to {
                    let at = (from - offset) as usize;
                    made[(b - fb) as usize] = true;
                    self.cache.page(Some(&data[at..at + BS as usize]), reserved)
                } else {
                    self.cache.page(None, reserved)
                };
                d.pages.insert(b, page);
            }
            d.pages.extend(filled);
            for b in (fb..=lb).filter(|b| !made[(b - fb) as usize]) {
                let (from, to) = (offset.max(b * BS), end.min((b + 1) * BS));
                let page = d.pages.get_mut(&b).expect("every block was planned");
                let at = (from - b * BS) as usize;
                page.data[at..at + (to - from) as usize]
                    .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            }
            let now = Timespec::now();
            d.size = d.size.max(end);
            d.mtime = Some(now);
            d.ctime = now;
            break;
        }
        if self.cache.dirty_bytes() >= self.cache.background() {
            self.cache.wake.work.notify_one();
        }
        Ok(data.len())
    }

    /// A writer over the dirty limit writes back before it adds more.
    fn throttle(&self) -> Result<()> {
        while self.cache.dirty_bytes() >= self.cache.limit {
            if self.write_back_some(CHUNK_PAGES)? == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Writes back up to `max_pages` pages of any files; returns how many.
    fn write_back_some(&self, max_pages: usize) -> Result<u64> {
        let mut wb = self.cache.writeback.lock();
        let buf = run_buffer(&mut wb);
        let taken = self.take(None, max_pages, buf);
        let pages = taken.iter().map(|t| t.pages).sum();
        self.write_back(taken, buf)?;
        Ok(pages)
    }

    /// Writes back everything `ino` has cached and drops its overlay; done
    /// before anything below the cache looks at the file.
    pub(super) fn write_back_inode(&self, ino: u64) -> Result<()> {
        if !self.cache.holds(ino) {
            return Ok(());
        }
        let mut wb = self.cache.writeback.lock();
        // New writes to the file wait while it drains (they wait on
        // `writeback`, held here): a reader must not chase a writer that
        // keeps adding pages.
        let entry = self.cache.files.lock().get(&ino).cloned();
        if let Some(e) = &entry {
            e.lock().draining = true;
        }
        let buf = run_buffer(&mut wb);
        let mut result = Ok(());
        while self.cache.holds(ino) {
            let taken = self.take(Some(ino), CHUNK_PAGES, buf);
            if taken.is_empty() {
                break;
            }
            if let Err(e) = self.write_back(taken, buf) {
                result = Err(e);
                break;
            }
        }
        if let Some(e) = &entry {
            e.lock().draining = false;
        }
        result
    }

    /// Writes back every file. `bounded`: at most what is cached now (a
    /// commit's first pass, while writers go on); otherwise until nothing
    /// is left (under the gate, where no writer adds more).
    pub(super) fn write_back_all(&self, bounded: bool) -> Result<()> {
        if !self.cache.enabled() {
            return Ok(());
        }
        let mut budget = self.cache.dirty_bytes() / BS + self.cache.files.lock().len() as u64 + 1;
        let mut wb = self.cache.writeback.lock();
        let buf = run_buffer(&mut wb);
        loop {
            let taken = self.take(None, CHUNK_PAGES, buf);
            if taken.is_empty() {
                return Ok(());
            }
            let cost: u64 = taken.iter().map(|t| t.pages + 1).sum();
            self.write_back(taken, buf)?;
            if bounded {
                budget = budget.saturating_sub(cost);
                if budget == 0 {
                    return Ok(());
                }
            }
        }
    }

    /// Takes up to `max_pages` pages (of `only`, or of any files, lowest
    /// blocks first), copied into runs; files with no pages left are
    /// taken too, so that their attributes get logged and they leave the
    /// map. The caller holds `writeback`.
    fn take(&self, only: Option<u64>, max_pages: usize, buf: &mut AlignedBuf) -> Vec<Taken> {
        let entries: Vec<(u64, Arc<Mutex<Dirty>>)> = {
            let files = self.cache.files.lock();
            match only {
                Some(ino) => files
                    .get(&ino)
                    .map(|e| (ino, e.clone()))
                    .into_iter()
                    .collect(),
                None => files.iter().map(|(&i, e)| (i, e.clone())).collect(),
            }
        };
        let mut left = max_pages.min(buf.len() / BS as usize);
        let mut used = 0;
        let mut out = Vec::new();
        for (ino, entry) in entries {
            if left == 0 {
                break;
            }
            // Out of the map under the lock (moves only); copied into
            // runs after it, so writers of this file are not held up.
            let pages: Vec<(u64, Page)> = {
                let mut d = entry.lock();
                let n = d.pages.len().min(left);
                let mut pages = Vec::with_capacity(n);
                while pages.len() < n {
                    pages.push(d.pages.pop_first().expect("counted above"));
                }
                let reserved: u64 = pages.iter().map(|(_, p)| u64::from(p.reserved)).sum();
                d.reserved -= reserved;
                d.writing = true;
                let holes = pages.iter().filter(|(_, p)| p.reserved).map(|(b, _)| *b);
                d.flight_holes.extend(holes);
                pages
            };
            let n = pages.len();
            let reserved = pages.iter().map(|(_, p)| u64::from(p.reserved)).sum();
            let mut runs: Vec<TakenRun> = Vec::new();
            for (b, page) in &pages {
                match runs.last_mut() {
                    Some(r) if r.first_block + r.blocks == *b => r.blocks += 1,
                    _ => runs.push(TakenRun {
                        first_block: *b,
                        at: used,
                        blocks: 1,
                    }),
                }
                buf[used..used + BS as usize].copy_from_slice(&page.data);
                used += BS as usize;
            }
            self.cache.recycle(pages.into_iter().map(|(_, p)| p));
            left -= n;
            out.push(Taken {
                ino,
                entry,
                runs,
                reserved,
                pages: n as u64,
            });
        }
        out
    }

    /// Puts taken pages on the device: allocates their holes (their
    /// reservations become blocks), writes every run in one submission,
    /// then logs the maps and the size and times the data implies.
    fn write_back(&self, taken: Vec<Taken>, buf: &AlignedBuf) -> Result<()> {
        if taken.is_empty() {
            return Ok(());
        }
        let pages: u64 = taken.iter().map(|t| t.pages).sum();
        let result = self.write_back_taken(&taken, buf);
        for t in &taken {
            let mut d = t.entry.lock();
            d.writing = false;
            d.flight_holes.clear();
        }
        self.cache.bytes.fetch_sub(pages * BS, Ordering::SeqCst);
        if result.is_err() {
            self.fail("write-back");
        }
        result
    }

    fn write_back_taken(&self, taken: &[Taken], buf: &AlignedBuf) -> Result<()> {
        self.fail_if_broken()?;
        let plans: Vec<Option<Vec<RunPlan>>> = {
            let mut st = self.state.write();
            let mut plans = Vec::with_capacity(taken.len());
            for t in taken {
                st.delalloc = st.delalloc.saturating_sub(t.reserved);
            }
            for t in taken {
                match self.plan_write_back(&mut st, t) {
                    Ok(p) => plans.push(p),
                    Err(e) => {
                        for p in plans.iter().flatten().flatten() {
                            Self::release_allocated(&mut st, p);
                        }
                        return Err(e);
                    }
                }
            }
            plans
        };
        let flat: Vec<&RunPlan> = plans.iter().flatten().flatten().collect();
        let ranges: Vec<IoRange> = flat.iter().flat_map(|p| p.ranges.iter().copied()).collect();
        // Every run in one submission: the device sees them as one queue.
        let failed = if ranges.is_empty() {
            None
        } else {
            self.dev
                .submit(Direction::Write, &IoBuffer::from_ref(buf), &ranges)
                .err()
        };
        let mut st = self.state.write();
        if let Some(e) = failed {
            for p in flat {
                Self::release_allocated(&mut st, p);
            }
            return Err(e.into());
        }
        self.data_dirty.store(true, Ordering::SeqCst);
        for (t, plan) in taken.iter().zip(plans) {
            let plan = plan.unwrap_or_default();
            if st.meta.get(t.ino).is_none() {
                for p in &plan {
                    Self::release_allocated(&mut st, p);
                }
                self.forget_entry(t);
                continue;
            }
            for p in &plan {
                for &(file_block, dev_block, len) in &p.maps {
                    self.log(
                        &mut st,
                        Record::Map {
                            ino: t.ino,
                            file_block,
                            dev_block,
                            len,
                            unwritten: false,
                        },
                    );
                }
            }
            let written_to = t
                .runs
                .iter()
                .map(|r| (r.first_block + r.blocks) * BS)
                .max()
                .unwrap_or(0);
            let mut d = t.entry.lock();
            // Mapped now (under this state lock), so writers may plan on it.
            d.writing = false;
            d.flight_holes.clear();
            let done = d.pages.is_empty();
            let Some(i) = st.meta.get(t.ino) else {
                continue;
            };
            let mut a = i.attrs.clone();
            let size = if done { d.size } else { d.size.min(written_to) };
            a.size = a.size.max(size);
            if let Some(m) = d.mtime {
                a.mtime = m;
            }
            a.ctime = a.ctime.max(d.ctime);
            drop(d);
            if a != i.attrs {
                self.log(&mut st, Record::Inode(a));
            }
            if done {
                // No writer adds pages without the state lock held here.
                self.forget_entry(t);
            }
        }
        Ok(())
    }

    fn release_allocated(st: &mut State, plan: &RunPlan) {
        for &(s, l) in &plan.allocated {
            st.alloc.release(s, l);
        }
    }

    fn forget_entry(&self, t: &Taken) {
        let mut files = self.cache.files.lock();
        if files.get(&t.ino).is_some_and(|e| Arc::ptr_eq(e, &t.entry)) {
            files.remove(&t.ino);
        }
    }

    /// Where one file's taken runs go; None if the file is gone.
    fn plan_write_back(&self, st: &mut State, t: &Taken) -> Result<Option<Vec<RunPlan>>> {
        let Some(i) = st.meta.get(t.ino).filter(|i| i.attrs.kind == Kind::File) else {
            return Ok(None);
        };
        let mut layout = Vec::new();
        for r in &t.runs {
            let (fb, n) = (&r.first_block, r.blocks);
            let hint = i
                .extents
                .range(..*fb)
                .next_back()
                .map(|(&s, e)| e.dev + (fb - s).min(e.len));
            layout.push((runs(i, *fb, n), hint));
        }
        let mut plans = Vec::new();
        for (r, (pieces, mut hint)) in t.runs.iter().zip(layout) {
            let mut plan = RunPlan::default();
            let place = |plan: &mut RunPlan, file_block: u64, dev: u64, len: u64| {
                plan.ranges.push(IoRange {
                    dev_offset: dev * BS,
                    buf_offset: r.at + ((file_block - r.first_block) * BS) as usize,
                    len: (len * BS) as usize,
                });
            };
            for piece in pieces {
                match piece {
                    Run::Mapped { file_block, ext } => {
                        place(&mut plan, file_block, ext.dev, ext.len);
                        if ext.unwritten {
                            plan.maps.push((file_block, ext.dev, ext.len));
                        }
                        hint = Some(ext.dev + ext.len);
                    }
                    Run::Hole { file_block, len } => {
                        // Reserved at write(): released just above, so
                        // this cannot come up short but on a broken count.
                        let got = st.alloc.allocate(len, hint);
                        let mut f = file_block;
                        for (s, l) in got {
                            place(&mut plan, f, s, l);
                            plan.maps.push((f, s, l));
                            plan.allocated.push((s, l));
                            f += l;
                            hint = Some(s + l);
                        }
                        if f < file_block + len {
                            // A reservation count gone wrong: fail loudly
                            // (fsync says EIO) rather than drop the pages.
                            error!(
                                "write-back of inode {}: no block for a reserved page",
                                t.ino
                            );
                            for p in plans.iter().chain([&plan]) {
                                Self::release_allocated(st, p);
                            }
                            return Err(FsError::NoSpace);
                        }
                    }
                }
            }
            plans.push(plan);
        }
        Ok(Some(plans))
    }

    /// Forgets a dropped inode's cached data (its number may be reused).
    pub(super) fn discard_cached(&self, st: &mut State, ino: u64) {
        let Some(entry) = self.cache.files.lock().remove(&ino) else {
            return;
        };
        let mut d = entry.lock();
        st.delalloc = st.delalloc.saturating_sub(d.reserved);
        self.cache
            .bytes
            .fetch_sub(d.pages.len() as u64 * BS, Ordering::SeqCst);
        d.reserved = 0;
        let pages = std::mem::take(&mut d.pages);
        drop(d);
        self.cache.recycle(pages.into_values());
    }

    /// Starts the thread that writes back once half the limit is dirty.
    pub(super) fn start_flusher(self: &Arc<Self>) {
        if !self.cache.enabled() || !self.opts.background_writeback {
            return;
        }
        let weak = Arc::downgrade(self);
        let wake = self.cache.wake.clone();
        let handle = std::thread::Builder::new()
            .name("flush".into())
            .spawn(move || loop {
                {
                    let mut stop = wake.stop.lock();
                    if *stop {
                        return;
                    }
                    wake.work.wait_for(&mut stop, Duration::from_millis(200));
                    if *stop {
                        return;
                    }
                }
                let Some(fs) = weak.upgrade() else { return };
                if fs.cache.dirty_bytes() < fs.cache.background() {
                    continue;
                }
                while fs.cache.dirty_bytes() >= fs.cache.background() / 2 {
                    match fs.write_back_some(CHUNK_PAGES) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            error!("write-back failed: {e}");
                            break;
                        }
                    }
                }
            })
            .expect("spawn flush thread");
        *self.cache.flusher.lock() = Some(handle);
    }

    pub(super) fn stop_flusher(&self) {
        *self.cache.wake.stop.lock() = true;
        self.cache.wake.work.notify_all();
        if let Some(h) = self.cache.flusher.lock().take() {
            let _ = h.join();
        }
    }
}

/// The write-back buffer in its slot, made on first use.
fn run_buffer(slot: &mut Option<AlignedBuf>) -> &mut AlignedBuf {
    slot.get_or_insert_with(|| AlignedBuf::new(CHUNK_PAGES * BS as usize))
}

impl Dirty {
    fn new(a: &InodeAttrs) -> Self {
        Self {
            pages: BTreeMap::new(),
            size: a.size,
            mtime: None,
            ctime: a.ctime,
            reserved: 0,
            writing: false,
            flight_holes: Default::default(),
            draining: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::blockdev::hold::HoldDevice;
    use crate::blockdev::record::RecordingDevice;
    use crate::blockdev::MemDevice;

    const ROOT: Caller = Caller { uid: 0, gid: 0 };

    fn opts(dirty_limit: u64) -> MountOptions {
        MountOptions {
            commit_interval: Duration::from_secs(3600),
            dirty_limit,
            background_writeback: false,
            ..MountOptions::default()
        }
    }

    fn fresh(blocks: u64) -> Arc<MemDevice> {
        let mem = Arc::new(MemDevice::new(blocks * BS));
        format(mem.as_ref(), ROOT).unwrap();
        mem
    }

    fn mount(mem: &Arc<MemDevice>, o: MountOptions) -> Arc<Fs> {
        Fs::mount(mem.clone() as Arc<dyn BlockDevice>, o).unwrap()
    }

    fn new_file(fs: &Fs, name: &[u8]) -> u64 {
        let (a, fh) = fs.create(ROOT, ROOT_INO, name, 0o644, true, true).unwrap();
        fs.release(fh).unwrap();
        a.ino
    }

    fn content(fs: &Fs, ino: u64) -> Vec<u8> {
        let size = fs.getattr(ino).unwrap().size as usize;
        fs.read(ino, 0, size + 1).unwrap().to_vec()
    }

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u64).wrapping_mul(31).wrapping_add(seed * 7) as u8 | 1)
            .collect()
    }

    #[test]
    fn small_files_cost_no_device_io_until_a_commit() {
        let mem = fresh(4096);
        let dev = Arc::new(RecordingDevice::new(mem.clone() as Arc<dyn BlockDevice>));
        let fs = Fs::mount(
            dev.clone() as Arc<dyn BlockDevice>,
            opts(DEFAULT_DIRTY_LIMIT),
        )
        .unwrap();
        let before = dev.position();
        let mut files = Vec::new();
        for k in 0..200u64 {
            let ino = new_file(&fs, format!("f{k}").as_bytes());
            let data = bytes(k, 100 + (k as usize * 37) % 6000);
            fs.write(ino, 0, &data[..data.len() / 2]).unwrap();
            fs.write(ino, data.len() as u64 / 2, &data[data.len() / 2..])
                .unwrap();
            assert_eq!(fs.getattr(ino).unwrap().size, data.len() as u64);
            files.push((k, data));
        }
        assert_eq!(
            dev.position(),
            before,
            "create+write+close touched the device"
        );
        fs.fsync(ROOT_INO).unwrap();
        assert!(dev.position() > before);
        fs.unmount().unwrap();
        let fs = mount(&mem, opts(DEFAULT_DIRTY_LIMIT));
        for (k, data) in files {
            let ino = fs.lookup(ROOT_INO, format!("f{k}").as_bytes()).unwrap().ino;
            assert_eq!(content(&fs, ino), data, "f{k}");
        }
    }

    #[test]
    fn files_written_in_turns_get_one_extent_each() {
        let mem = fresh(4096);
        let fs = mount(&mem, opts(DEFAULT_DIRTY_LIMIT));
        let (a, b) = (new_file(&fs, b"a"), new_file(&fs, b"b"));
        for k in 0..64u64 {
            fs.write(a, k * BS, &bytes(k, BS as usize)).unwrap();
            fs.write(b, k * BS, &bytes(k + 100, BS as usize)).unwrap();
        }
        fs.fsync(ROOT_INO).unwrap();
        let st = fs.state.read();
        for ino in [a, b] {
            let i = st.meta.get(ino).unwrap();
            assert_eq!(i.extents.len(), 1, "inode {ino}: {:?}", i.extents);
            assert_eq!(i.allocated_blocks, 64);
        }
    }

    #[test]
    fn no_space_is_reported_by_write_and_what_it_took_is_kept() {
        let mem = fresh(2048);
        let fs = mount(&mem, opts(DEFAULT_DIRTY_LIMIT));
        let ino = new_file(&fs, b"big");
        let chunk = bytes(9, 64 << 10);
        let mut size = 0u64;
        let err = loop {
            match fs.write(ino, size, &chunk) {
                Ok(n) => size += n as u64,
                Err(e) => break e,
            }
            assert!(size < 64 << 20, "never full");
        };
        assert!(matches!(err, FsError::NoSpace), "{err:?}");
        assert!(fs.statfs().bfree < 16, "statfs counts the reservations");
        fs.fsync(ROOT_INO).expect("write-back after ENOSPC");
        fs.unmount().unwrap();
        let fs = mount(&mem, opts(DEFAULT_DIRTY_LIMIT));
        let got = content(&fs, ino);
        assert_eq!(got.len() as u64, size);
        assert!(got.chunks(chunk.len()).all(|c| c == &chunk[..c.len()]));
    }

    #[test]
    fn dirty_memory_stays_under_the_limit() {
        let mem = fresh(8192);
        let limit = 256 << 10;
        let fs = mount(&mem, opts(limit));
        let ino = new_file(&fs, b"stream");
        let piece = bytes(3, 64 << 10);
        let mut peak = 0;
        for k in 0..128u64 {
            fs.write(ino, k * piece.len() as u64, &piece).unwrap();
            peak = peak.max(fs.cache.dirty_bytes());
        }
        assert!(peak <= limit + piece.len() as u64, "peak {peak}");
        assert!(peak >= limit / 2, "the cache was used: peak {peak}");
        let got = content(&fs, ino);
        assert_eq!(got.len(), 128 * piece.len());
        assert!(got.chunks(piece.len()).all(|c| c == piece));
    }

    #[test]
    fn stat_shows_cached_writes_and_a_set_mtime_outlives_write_back() {
        let mem = fresh(4096);
        let fs = mount(&mem, opts(DEFAULT_DIRTY_LIMIT));
        let ino = new_file(&fs, b"f");
        let before = fs.getattr(ino).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        fs.write(ino, 10_000, b"tail").unwrap();
        let a = fs.getattr(ino).unwrap();
        assert_eq!(a.size, 10_004);
        assert_eq!(a.blocks, BS / 512, "the reserved block counts");
        assert!(a.mtime > before.mtime && a.ctime > before.ctime);
        // tar: write, then set the times it recorded.
        let old = Timespec {
            sec: 1_000_000,
            nsec: 5,
        };
        let set = SetAttr {
            mtime: Some(TimeSet::At(old)),
            ..SetAttr::default()
        };
        fs.setattr(ino, &set).unwrap();
        assert_eq!(fs.getattr(ino).unwrap().mtime, old);
        fs.fsync(ROOT_INO).unwrap();
        fs.unmount().unwrap();
        let fs = mount(&mem, opts(DEFAULT_DIRTY_LIMIT));
        let a = fs.getattr(ino).unwrap();
        assert_eq!((a.size, a.mtime), (10_004, old));
        let got = content(&fs, ino);
        assert!(got[..10_000].iter().all(|&b| b == 0));
        assert_eq!(&got[10_000..], b"tail");
    }

    #[test]
    fn a_partial_write_over_written_blocks_keeps_their_other_bytes() {
        let mem = fresh(4096);
        let fs = mount(&mem, opts(DEFAULT_DIRTY_LIMIT));
        let ino = new_file(&fs, b"f");
        let mut want = bytes(1, 3 * BS as usize);
        fs.write(ino, 0, &want).unwrap();
        fs.fsync(ROOT_INO).unwrap();
        let patch = bytes(2, 5000);
        fs.write(ino, 3000, &patch).unwrap();
        want[3000..8000].copy_from_slice(&patch);
        assert_eq!(content(&fs, ino), want, "read after the write");
        fs.write(ino, 100, b"xyz").unwrap();
        want[100..103].copy_from_slice(b"xyz");
        fs.fsync(ROOT_INO).unwrap();
        fs.unmount().unwrap();
        let fs = mount(&mem, opts(DEFAULT_DIRTY_LIMIT));
        assert_eq!(content(&fs, ino), want, "after remount");
    }

    /// A mount whose device holds transfers when the test arms it.
    fn held_mount() -> (Arc<HoldDevice>, Arc<Fs>) {
        let dev = HoldDevice::new(fresh(4096));
        let fs = Fs::mount(dev.clone(), opts(DEFAULT_DIRTY_LIMIT)).unwrap();
        (dev, fs)
    }

    #[test]
    fn st_blocks_hold_while_a_write_back_is_in_flight() {
        let (dev, fs) = held_mount();
        let ino = new_file(&fs, b"f");
        fs.write(ino, 0, &bytes(1, 10 * BS as usize)).unwrap();
        assert_eq!(fs.getattr(ino).unwrap().blocks, 80);
        dev.arm(Direction::Write);
        let t = {
            let fs = fs.clone();
            std::thread::spawn(move || fs.fsync(ROOT_INO))
        };
        assert!(dev.wait_held(Duration::from_secs(10)));
        let mid = fs.getattr(ino).unwrap().blocks;
        dev.release();
        t.join().unwrap().unwrap();
        assert_eq!(mid, 80, "st_blocks while the write-back is in flight");
        assert_eq!(fs.getattr(ino).unwrap().blocks, 80);
    }

    #[test]
    fn rewriting_pages_in_flight_reserves_nothing_twice() {
        let (dev, fs) = held_mount();
        let ino = new_file(&fs, b"f");
        let room = fs.state.read().room();
        fs.write(ino, 0, &bytes(1, (room * BS) as usize)).unwrap();
        assert_eq!(fs.state.read().room(), 0);
        dev.arm(Direction::Write);
        let t = {
            let fs = fs.clone();
            std::thread::spawn(move || fs.write_back_some(CHUNK_PAGES))
        };
        assert!(dev.wait_held(Duration::from_secs(10)));
        // A whole page, whose block the write-back in flight allocated.
        let r = fs.write(ino, 0, &bytes(2, BS as usize));
        dev.release();
        t.join().unwrap().unwrap();
        r.expect("a rewrite of a page being written back");
        fs.fsync(ROOT_INO).unwrap();
        let got = content(&fs, ino);
        assert_eq!(&got[..BS as usize], &bytes(2, BS as usize)[..]);
        assert_eq!(fs.state.read().delalloc, 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { file: usize, off: u64, len: usize },
        Truncate { file: usize, size: u64 },
        Punch { file: usize, off: u64, len: u64 },
        Read { file: usize },
        Fsync,
        Remount,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..3usize, 0..40_000u64, 1..12_000usize)
                .prop_map(|(file, off, len)| Op::Write { file, off, len }),
            1 => (0..3usize, 0..30_000u64).prop_map(|(file, size)| Op::Truncate { file, size }),
            1 => (0..3usize, 0..30_000u64, 1..10_000u64)
                .prop_map(|(file, off, len)| Op::Punch { file, off, len }),
            2 => (0..3usize).prop_map(|file| Op::Read { file }),
            1 => Just(Op::Fsync),
            1 => Just(Op::Remount),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The cache against a plain model of three files, with a limit
        /// small enough that writers write back in the middle of things.
        #[test]
        fn cached_files_read_back_like_a_model(ops in proptest::collection::vec(op(), 1..40)) {
            let mem = fresh(4096);
            let o = opts(32 << 10);
            let mut fs = mount(&mem, o);
            let inos: Vec<u64> = (0..3).map(|k| new_file(&fs, format!("m{k}").as_bytes())).collect();
            let mut model: Vec<Vec<u8>> = vec![Vec::new(); 3];
            for (n, op) in ops.iter().enumerate() {
                match *op {
                    Op::Write { file, off, len } => {
                        let data = bytes(n as u64, len);
                        fs.write(inos[file], off, &data).unwrap();
                        let m = &mut model[file];
                        let end = off as usize + len;
                        if m.len() < end {
                            m.resize(end, 0);
                        }
                        m[off as usize..end].copy_from_slice(&data);
                    }
                    Op::Truncate { file, size } => {
                        let set = SetAttr { size: Some(size), ..SetAttr::default() };
                        fs.setattr(inos[file], &set).unwrap();
                        model[file].resize(size as usize, 0);
                    }
                    Op::Punch { file, off, len } => {
                        fs.fallocate(ROOT, inos[file], off, len, FallocMode::PunchHole).unwrap();
                        let m = &mut model[file];
                        let end = ((off + len) as usize).min(m.len());
                        if (off as usize) < end {
                            m[off as usize..end].fill(0);
                        }
                    }
                    Op::Read { file } => {
                        prop_assert_eq!(&content(&fs, inos[file]), &model[file], "op {}", n);
                    }
                    Op::Fsync => fs.fsync(ROOT_INO).unwrap(),
                    Op::Remount => {
                        fs.unmount().unwrap();
                        drop(fs);
                        fs = mount(&mem, o);
                    }
                }
                for (k, &ino) in inos.iter().enumerate() {
                    prop_assert_eq!(fs.getattr(ino).unwrap().size, model[k].len() as u64);
                }
            }
            for (k, &ino) in inos.iter().enumerate() {
                prop_assert_eq!(&content(&fs, ino), &model[k]);
            }
            prop_assert!(fs.cache.dirty_bytes() == 0, "reads wrote everything back");
        }
    }
}
