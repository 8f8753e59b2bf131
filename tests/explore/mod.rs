//! The crash-state explorer, in the spirit of CrashMonkey and
//! dm-log-writes: run a generated workload on the `fs` library over a
//! [`RecordingDevice`], then rebuild the device as every crash the device
//! model allows could have left it, and check each state against an oracle
//! taken from the workload itself.
//!
//! Device model (DESIGN.md): writes completed before a flush are durable;
//! the writes issued since the last flush may each be kept or lost, in any
//! order, and torn at any 512-byte sector. States built per flush window:
//! every prefix of the window's writes, plus random subsets with random
//! order and torn writes.
//!
//! Oracle: after every operation the live filesystem is dumped (names,
//! kinds, sizes, modes, link counts, xattrs, symlink targets, contents).
//! A crash state must pass fsck without repair, mount, equal the dump at
//! some operation boundary between the last fsync that returned before the
//! window and the last operation that began before it ends (every
//! operation all or nothing, everything fsynced there), hold in each file
//! only bytes that file had then or that a later write put there in place
//! (never another file's bytes), and take a further workload.
//!
//! A state is named `family/seed/index`; [`replay`] checks one verbosely.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmabuf_fs::blockdev::record::{Event, RecordingDevice};
use dmabuf_fs::blockdev::{BlockDevice, MemDevice};
use dmabuf_fs::fs::{
    self, check, AtimeMode, Caller, FallocMode, Fs, Kind, MountOptions, RenameMode, SetAttr,
    TimeSet, Timespec, XattrMode, ROOT_INO,
};

use crate::common::Rng;

const ROOT: Caller = Caller { uid: 0, gid: 0 };
const SECTOR: usize = 512;

/// How hard to look.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// Random crash states per flush window, beside its prefixes.
    pub random_per_window: usize,
    /// Prefix states per window at most (evenly spread when more).
    pub max_prefixes: usize,
    /// Operations of an `ace` workload.
    pub ace_ops: usize,
    /// Entries of the `bigdir` directory (one commit).
    pub bigdir_entries: usize,
    /// Commits of a `wrap` workload (enough to wrap the log).
    pub wrap_commits: usize,
    /// fsync rounds of a `wb` workload.
    pub wb_rounds: usize,
}

impl Scale {
    pub const CI: Scale = Scale {
        random_per_window: 6,
        max_prefixes: 16,
        ace_ops: 40,
        bigdir_entries: 2000,
        wrap_commits: 320,
        wb_rounds: 6,
    };
    pub const LONG: Scale = Scale {
        random_per_window: 48,
        max_prefixes: 64,
        ace_ops: 80,
        bigdir_entries: 10_000,
        wrap_commits: 700,
        wb_rounds: 16,
    };
}

fn opts() -> MountOptions {
    MountOptions {
        commit_interval: Duration::from_secs(3600),
        atime: AtimeMode::Never,
        // No flusher thread: a replay must make the same device writes.
        background_writeback: false,
        ..MountOptions::default()
    }
}

/// The `wb` family's dirty limit: small, so writers over it write back
/// in the middle of a round, between commits.
const WB_DIRTY_LIMIT: u64 = 48 << 10;

// ----- the oracle: dumps of the live filesystem ---------------------------

/// One name in a dump.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    ino: u64,
    kind: Kind,
    size: u64,
    perm: u16,
    nlink: u32,
    mtime: Timespec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    target: Vec<u8>,
}

/// A whole tree: path -> entry, and each file's contents (run-length coded).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Dump {
    entries: BTreeMap<Vec<u8>, Entry>,
    contents: BTreeMap<u64, Vec<(u8, u32)>>,
}

fn rle(data: &[u8]) -> Vec<(u8, u32)> {
    let mut out: Vec<(u8, u32)> = Vec::new();
    for &b in data {
        match out.last_mut() {
            Some((v, n)) if *v == b => *n += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

fn unrle(r: &[(u8, u32)]) -> Vec<u8> {
    r.iter()
        .flat_map(|&(v, n)| std::iter::repeat_n(v, n as usize))
        .collect()
}

fn dump(fs: &Fs) -> Result<Dump, String> {
    let mut d = Dump::default();
    let mut stack = vec![(ROOT_INO, b"/".to_vec())];
    while let Some((dir, path)) = stack.pop() {
        let mut kids = Vec::new();
        fs.readdir(dir, 0, |e| {
            if e.name != b"." && e.name != b".." {
                kids.push((e.name.to_vec(), e.ino));
            }
            false
        })
        .map_err(|e| format!("readdir {}: {e}", String::from_utf8_lossy(&path)))?;
        for (name, ino) in kids {
            let mut p = path.clone();
            if p.len() > 1 {
                p.push(b'/');
            }
            p.extend_from_slice(&name);
            let a = fs
                .getattr(ino)
                .map_err(|e| format!("stat {}: {e}", String::from_utf8_lossy(&p)))?;
            let mut xattrs = Vec::new();
            let list = fs.listxattr(ino).unwrap_or_default();
            for n in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
                xattrs.push((n.to_vec(), fs.getxattr(ino, n).unwrap_or_default()));
            }
            let mut target = Vec::new();
            match a.kind {
                Kind::Dir => stack.push((ino, p.clone())),
                Kind::Symlink => target = fs.readlink(ino).unwrap_or_default(),
                Kind::File => {
                    if let std::collections::btree_map::Entry::Vacant(v) = d.contents.entry(ino) {
                        let data = fs
                            .read(ino, 0, a.size as usize)
                            .map_err(|e| format!("read {}: {e}", String::from_utf8_lossy(&p)))?;
                        v.insert(rle(&data));
                    }
                }
                _ => {}
            }
            d.entries.insert(
                p,
                Entry {
                    ino,
                    kind: a.kind,
                    size: if a.kind == Kind::Dir { 0 } else { a.size },
                    perm: a.perm,
                    nlink: a.nlink,
                    mtime: if a.kind == Kind::File {
                        a.mtime
                    } else {
                        Timespec::default()
                    },
                    xattrs,
                    target,
                },
            );
        }
    }
    Ok(d)
}

/// A write that changed bytes in place (a later state may show them).
#[derive(Clone, Copy, Debug)]
struct WriteRec {
    op: usize,
    ino: u64,
    off: u64,
    len: u64,
    tag: u8,
}

/// A recorded workload.
pub struct Recording {
    base: Vec<u8>,
    events: Vec<Event>,
    /// Dump after op i (index 0: after mount, before any op); None where
    /// the family skips it (bulk phases that end in their own fsync).
    dumps: Vec<Option<Dump>>,
    /// Event position after op i.
    ev_after: Vec<usize>,
    /// (event position when the fsync returned, op index).
    synced: Vec<(usize, usize)>,
    writes: Vec<WriteRec>,
    pub ops: usize,
}

// ----- workloads ----------------------------------------------------------

struct Driver {
    fs: Arc<Fs>,
    dev: Arc<RecordingDevice>,
    rec: Recording,
    rng: Rng,
    open: Vec<u64>,
}

impl Driver {
    fn ino_of(&self, path: &[u8]) -> Option<u64> {
        let mut ino = ROOT_INO;
        for part in path.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
            ino = self.fs.lookup(ino, part).ok()?.ino;
        }
        Some(ino)
    }

    /// Ends an operation: records where the log stands and (unless
    /// `bulk`) what the tree looks like.
    fn done(&mut self, bulk: bool) {
        self.rec.ops += 1;
        self.rec.ev_after.push(self.dev.position());
        self.rec.dumps.push(if bulk {
            None
        } else {
            Some(dump(&self.fs).expect("dump of the live fs"))
        });
    }

    fn fsync(&mut self) {
        let ino = ROOT_INO;
        self.fs.fsync(ino).expect("fsync");
        self.done(false);
        self.rec.synced.push((self.dev.position(), self.rec.ops));
    }

    fn write(&mut self, path: &[u8], off: u64, len: u64) {
        self.write_as(path, off, len, false)
    }

    fn write_as(&mut self, path: &[u8], off: u64, len: u64, bulk: bool) {
        let op = self.rec.ops + 1;
        let tag = (op % 250) as u8 + 1;
        if let Some(ino) = self.ino_of(path) {
            if self.fs.write(ino, off, &vec![tag; len as usize]).is_ok() {
                self.rec.writes.push(WriteRec {
                    op,
                    ino,
                    off,
                    len,
                    tag,
                });
            }
        }
        self.done(bulk);
    }

    fn split(path: &[u8]) -> (Vec<u8>, Vec<u8>) {
        match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (path[..i].to_vec(), path[i + 1..].to_vec()),
            None => (Vec::new(), path.to_vec()),
        }
    }

    fn in_dir(&self, path: &[u8]) -> Option<(u64, Vec<u8>)> {
        let (dir, name) = Self::split(path);
        Some((self.ino_of(&dir)?, name))
    }

    fn create(&mut self, path: &[u8], keep_open: bool, bulk: bool) {
        if let Some((dir, name)) = self.in_dir(path) {
            if let Ok((_, fh)) = self.fs.create(ROOT, dir, &name, 0o644, true, true) {
                if keep_open {
                    self.open.push(fh);
                } else {
                    let _ = self.fs.release(fh);
                }
            }
        }
        self.done(bulk);
    }
}

fn name_of(k: u64, len: usize) -> Vec<u8> {
    let mut n = format!("{k}_").into_bytes();
    n.resize(len.max(n.len()).min(255), b'a' + (k % 26) as u8);
    n
}

/// A random ACE-style workload: every kind of operation, fsyncs between.
fn ace(d: &mut Driver, scale: Scale) {
    const LENS: [usize; 7] = [1, 2, 30, 100, 200, 254, 255];
    let dirs: [&[u8]; 3] = [b"", b"d1", b"d1/d2"];
    let pick = |rng: &mut Rng| -> Vec<u8> {
        let dir = dirs[rng.below(3) as usize];
        let k = rng.below(6);
        let name = name_of(k, LENS[rng.below(LENS.len() as u64) as usize]);
        let mut p = dir.to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend(name);
        p
    };
    for _ in 0..scale.ace_ops {
        let a = pick(&mut d.rng);
        let b = pick(&mut d.rng);
        match d.rng.below(20) {
            0 | 1 => {
                let keep = d.rng.below(4) == 0;
                d.create(&a, keep, false)
            }
            2 => {
                // Small and unaligned.
                let off = d.rng.below(20_000);
                let len = 1 + d.rng.below(300);
                d.write(&a, off, len)
            }
            3 => {
                // Many blocks, unaligned.
                let off = d.rng.below(40_000);
                let len = 8192 + d.rng.below(70_000);
                d.write(&a, off, len)
            }
            4 => {
                // Sparse, past the end.
                let off = 100_000 + d.rng.below(200_000);
                let len = 1 + d.rng.below(5000);
                d.write(&a, off, len)
            }
            5 => {
                let size = match d.rng.below(3) {
                    0 => d.rng.below(4096),
                    1 => d.rng.below(100_000),
                    _ => 4096 * d.rng.below(30),
                };
                if let Some(ino) = d.ino_of(&a) {
                    let set = SetAttr {
                        size: Some(size),
                        ..SetAttr::default()
                    };
                    let _ = d.fs.setattr(ino, &set);
                }
                d.done(false)
            }
            6 => {
                let mode = match d.rng.below(4) {
                    0 => FallocMode::Allocate { keep_size: false },
                    1 => FallocMode::Allocate { keep_size: true },
                    2 => FallocMode::PunchHole,
                    _ => FallocMode::ZeroRange {
                        keep_size: d.rng.below(2) == 0,
                    },
                };
                let off = d.rng.below(90_000);
                let len = 1 + d.rng.below(40_000);
                if let Some(ino) = d.ino_of(&a) {
                    let _ = d.fs.fallocate(ROOT, ino, off, len, mode);
                }
                d.done(false)
            }
            7 | 8 => {
                let mode = match d.rng.below(4) {
                    0 => RenameMode::Exchange,
                    1 => RenameMode::NoReplace,
                    _ => RenameMode::Replace,
                };
                if let (Some((pa, na)), Some((pb, nb))) = (d.in_dir(&a), d.in_dir(&b)) {
                    let _ = d.fs.rename(pa, &na, pb, &nb, mode);
                }
                d.done(false)
            }
            9 => {
                if let (Some(ino), Some((pb, nb))) = (d.ino_of(&a), d.in_dir(&b)) {
                    let _ = d.fs.link(ino, pb, &nb);
                }
                d.done(false)
            }
            10 => {
                if let Some((p, n)) = d.in_dir(&a) {
                    let _ = d.fs.unlink(p, &n);
                }
                d.done(false)
            }
            11 => {
                let dir = if d.rng.below(2) == 0 {
                    b"d1".to_vec()
                } else {
                    b"d1/d2".to_vec()
                };
                if let Some((p, n)) = d.in_dir(&dir) {
                    match d.rng.below(2) {
                        0 => {
                            let _ = d.fs.rmdir(p, &n);
                        }
                        _ => {
                            let _ = d.fs.mkdir(ROOT, p, &n, 0o755);
                        }
                    }
                }
                d.done(false)
            }
            12 => {
                if let Some(ino) = d.ino_of(&a) {
                    let name = format!("user.x{}", d.rng.below(3));
                    if d.rng.below(3) == 0 {
                        let _ = d.fs.removexattr(ino, name.as_bytes());
                    } else {
                        let len = [1usize, 100, 5000, 65536][d.rng.below(4) as usize];
                        let _ = d.fs.setxattr(
                            ino,
                            name.as_bytes(),
                            &vec![d.rng.below(256) as u8; len],
                            XattrMode::Any,
                        );
                    }
                }
                d.done(false)
            }
            13 => {
                if let Some(ino) = d.ino_of(&a) {
                    let set = SetAttr {
                        mode: Some(0o600 + d.rng.below(0o100) as u32),
                        mtime: Some(TimeSet::At(Timespec {
                            sec: d.rng.below(1 << 30) as i64,
                            nsec: 0,
                        })),
                        ..SetAttr::default()
                    };
                    let _ = d.fs.setattr(ino, &set);
                }
                d.done(false)
            }
            14 => {
                if let Some(fh) = d.open.pop() {
                    let _ = d.fs.release(fh);
                }
                if let Some((p, n)) = d.in_dir(&a) {
                    let _ = d.fs.symlink(ROOT, p, &n, &b);
                }
                d.done(false)
            }
            _ => d.fsync(),
        }
    }
}

/// Names of every length 1..=255 created in one commit, then renamed and
/// removed in another.
fn names(d: &mut Driver) {
    let _ = d.fs.mkdir(ROOT, ROOT_INO, b"n", 0o755);
    d.done(false);
    d.fsync();
    for len in 1..=255usize {
        let mut p = b"n/".to_vec();
        p.extend(name_of(len as u64, len));
        d.create(&p, false, true);
    }
    d.fsync();
    for len in (1..=255usize).step_by(7) {
        let from = name_of(len as u64, len);
        let to = name_of(len as u64 + 1000, 256 - len);
        let n = d.ino_of(b"n").unwrap();
        let _ = d.fs.rename(n, &from, n, &to, RenameMode::Replace);
        let _ = d.fs.unlink(n, &name_of(len as u64 + 1, len + 1));
        d.done(true);
    }
    d.fsync();
}

/// One directory of many entries created in a single commit (larger than
/// the log, so the commit becomes a checkpoint), then half of it removed.
fn bigdir(d: &mut Driver, scale: Scale) {
    let _ = d.fs.mkdir(ROOT, ROOT_INO, b"big", 0o755);
    d.done(false);
    let dir = d.ino_of(b"big").unwrap();
    for k in 0..scale.bigdir_entries {
        let name = name_of(k as u64, 20 + k % 40);
        if let Ok((_, fh)) = d.fs.create(ROOT, dir, &name, 0o644, true, true) {
            let _ = d.fs.release(fh);
        }
        d.done(true);
    }
    d.fsync();
    for k in (0..scale.bigdir_entries).step_by(2) {
        let _ = d.fs.unlink(dir, &name_of(k as u64, 20 + k % 40));
        d.done(true);
    }
    d.fsync();
}

/// Small commits until the log wraps into a checkpoint, with data.
fn wrap(d: &mut Driver, scale: Scale) {
    for c in 0..scale.wrap_commits {
        let p = name_of((c % 9) as u64, 10 + c % 200);
        match c % 3 {
            0 => d.create(&p, false, false),
            1 => {
                let off = d.rng.below(50_000);
                let len = 1 + d.rng.below(9000);
                d.write(&p, off, len)
            }
            _ => {
                if let Some((dir, n)) = d.in_dir(&p) {
                    let _ = d.fs.unlink(dir, &n);
                }
                d.done(false)
            }
        }
        d.fsync();
    }
}

/// Write-back: rounds of writes that stay in memory across truncates,
/// renames, unlinks and punches, some written back early by writers over
/// a small dirty limit (in-place overwrites and new blocks landing between
/// commits), each round ending in an fsync. No dumps inside a round: the
/// dump's reads would write the files back.
fn wb(d: &mut Driver, scale: Scale) {
    let files: Vec<Vec<u8>> = (0..4).map(|k| format!("w{k}").into_bytes()).collect();
    for (k, f) in files.iter().enumerate() {
        d.create(f, false, true);
        d.write_as(f, 0, 3000 + 9000 * k as u64, true);
    }
    d.fsync();
    for _ in 0..scale.wb_rounds {
        for _ in 0..2 + d.rng.below(6) {
            let f = files[d.rng.below(4) as usize].clone();
            let g = files[d.rng.below(4) as usize].clone();
            match d.rng.below(10) {
                0..=4 => {
                    let off = d.rng.below(60_000);
                    let len = 1 + d.rng.below(30_000);
                    d.write_as(&f, off, len, true)
                }
                5 => {
                    if let Some(ino) = d.ino_of(&f) {
                        let set = SetAttr {
                            size: Some(d.rng.below(40_000)),
                            ..SetAttr::default()
                        };
                        let _ = d.fs.setattr(ino, &set);
                    }
                    d.done(true)
                }
                6 => {
                    if let (Some((pf, nf)), Some((pg, ng))) = (d.in_dir(&f), d.in_dir(&g)) {
                        let _ = d.fs.rename(pf, &nf, pg, &ng, RenameMode::Replace);
                    }
                    d.done(true);
                    d.create(&f, false, true)
                }
                7 => {
                    if let Some((p, n)) = d.in_dir(&f) {
                        let _ = d.fs.unlink(p, &n);
                    }
                    d.done(true);
                    d.create(&f, false, true)
                }
                8 => {
                    let (off, len) = (d.rng.below(50_000), 1 + d.rng.below(20_000));
                    if let Some(ino) = d.ino_of(&f) {
                        let _ = d.fs.fallocate(ROOT, ino, off, len, FallocMode::PunchHole);
                    }
                    d.done(true)
                }
                _ => {
                    if let Some(ino) = d.ino_of(&f) {
                        let set = SetAttr {
                            mode: Some(0o600 + d.rng.below(0o100) as u32),
                            ..SetAttr::default()
                        };
                        let _ = d.fs.setattr(ino, &set);
                    }
                    d.done(true)
                }
            }
        }
        d.fsync();
    }
}

/// Runs one workload and records it.
pub fn record(family: &str, seed: u64, scale: Scale) -> Recording {
    // The smallest device mkfs takes (its log is as small as logs get),
    // except where a directory of many entries needs the room.
    let size: u64 = match family {
        "bigdir" => 64 << 20,
        _ => 4 << 20,
    };
    let mem = Arc::new(MemDevice::new(size));
    fs::format(mem.as_ref(), ROOT).unwrap();
    mem.flush().unwrap();
    let base = mem.snapshot();
    let dev = Arc::new(RecordingDevice::new(mem as Arc<dyn BlockDevice>));
    let mount_opts = match family {
        "wb" => MountOptions {
            dirty_limit: WB_DIRTY_LIMIT,
            ..opts()
        },
        _ => opts(),
    };
    let fs = Fs::mount(dev.clone() as Arc<dyn BlockDevice>, mount_opts).unwrap();
    let mut d = Driver {
        rec: Recording {
            base,
            events: Vec::new(),
            dumps: vec![Some(dump(&fs).unwrap())],
            ev_after: vec![dev.position()],
            synced: Vec::new(),
            writes: Vec::new(),
            ops: 0,
        },
        fs,
        dev,
        rng: Rng::new(seed ^ 0xC0FFEE),
        open: Vec::new(),
    };
    if family == "ace" {
        let _ = d.fs.mkdir(ROOT, ROOT_INO, b"d1", 0o755);
        d.done(false);
        let _ = d.fs.mkdir(ROOT, d.ino_of(b"d1").unwrap(), b"d2", 0o755);
        d.done(false);
    }
    match family {
        "ace" => ace(&mut d, scale),
        "names" => names(&mut d),
        "bigdir" => bigdir(&mut d, scale),
        "wrap" => wrap(&mut d, scale),
        "wb" => wb(&mut d, scale),
        other => panic!("unknown workload family {other}"),
    }
    for fh in std::mem::take(&mut d.open) {
        let _ = d.fs.release(fh);
    }
    d.done(false);
    d.fs.unmount().unwrap();
    d.done(false);
    d.rec.events = d.dev.events();
    d.rec
}

// ----- crash states -------------------------------------------------------

/// One crash state: the image, and the oracle's window of operations.
pub struct State {
    pub image: Vec<u8>,
    /// Every op up to this one was fsynced before the crash window.
    pub durable_op: usize,
    /// No op after this one had begun when the window ended.
    pub last_op: usize,
    pub what: String,
}

fn apply(img: &mut [u8], at: u64, data: &[u8]) {
    img[at as usize..at as usize + data.len()].copy_from_slice(data);
}

/// Calls `f` with every crash state of `rec`, in a fixed order (so an index
/// names a state); stops early when `f` returns false.
pub fn states(rec: &Recording, scale: Scale, seed: u64, mut f: impl FnMut(usize, State) -> bool) {
    let mut rng = Rng::new(seed ^ 0x5EED);
    let mut durable = rec.base.clone();
    let mut pending: Vec<(u64, &[u8])> = Vec::new();
    let mut last_flush = 0usize; // events before this are durable
    let mut index = 0usize;
    for (pos, ev) in rec
        .events
        .iter()
        .map(Some)
        .chain(std::iter::once(None))
        .enumerate()
    {
        match ev {
            Some(Event::Write { at, data }) => {
                pending.push((*at, data));
                continue;
            }
            Some(Event::Flush) | None => {}
        }
        // The window: durable image + any of `pending`.
        let durable_op = rec
            .synced
            .iter()
            .filter(|&&(p, _)| p <= last_flush)
            .map(|&(_, op)| op)
            .max()
            .unwrap_or(0);
        // Op i began at ev_after[i - 1]; any op begun before the window
        // ended may show.
        let last_op = rec
            .ev_after
            .iter()
            .rposition(|&p| p <= pos)
            .map_or(0, |j| (j + 1).min(rec.ops));
        let n = pending.len();
        let step = n.div_ceil(scale.max_prefixes.max(1)).max(1);
        let mut prefixes: Vec<usize> = (0..=n).step_by(step).collect();
        if *prefixes.last().unwrap() != n {
            prefixes.push(n);
        }
        let mut emit = |image, what| {
            let go = f(
                index,
                State {
                    image,
                    durable_op,
                    last_op,
                    what,
                },
            );
            index += 1;
            go
        };
        for m in prefixes {
            let mut image = durable.clone();
            for (at, data) in &pending[..m] {
                apply(&mut image, *at, data);
            }
            let what = format!("window ending at event {pos}: first {m} of {n} writes");
            if !emit(image, what) {
                return;
            }
        }
        if n > 0 {
            for _ in 0..scale.random_per_window {
                let mut order: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let mut image = durable.clone();
                let (mut kept, mut torn) = (0, 0);
                for &i in &order {
                    let (at, data) = pending[i];
                    match rng.below(4) {
                        0 => {}
                        1 | 2 => {
                            apply(&mut image, at, data);
                            kept += 1;
                        }
                        _ => {
                            for (k, sector) in data.chunks(SECTOR).enumerate() {
                                if rng.below(2) == 0 {
                                    apply(&mut image, at + (k * SECTOR) as u64, sector);
                                }
                            }
                            torn += 1;
                        }
                    }
                }
                let what = format!(
                    "window ending at event {pos}: {kept} of {n} writes kept, {torn} torn, in random order"
                );
                if !emit(image, what) {
                    return;
                }
            }
        }
        for (at, data) in pending.drain(..) {
            apply(&mut durable, at, data);
        }
        last_flush = pos + 1;
    }
}

// ----- checking a state ---------------------------------------------------

fn describe_diff(want: &Dump, got: &Dump) -> String {
    let mut out = Vec::new();
    for (p, e) in &want.entries {
        match got.entries.get(p) {
            None => out.push(format!("missing {}", String::from_utf8_lossy(p))),
            Some(g) if g != e => out.push(format!(
                "{} differs: want {e:?}, got {g:?}",
                String::from_utf8_lossy(p)
            )),
            _ => {}
        }
    }
    for p in got
        .entries
        .keys()
        .filter(|p| !want.entries.contains_key(*p))
    {
        out.push(format!("unexpected {}", String::from_utf8_lossy(p)));
    }
    out.truncate(6);
    out.join("; ")
}

/// Whether `got`'s contents are `want`'s, except bytes a write after op
/// `after` (and up to `last`) put in place.
fn contents_allowed(
    rec: &Recording,
    want: &Dump,
    got: &Dump,
    after: usize,
    last: usize,
) -> Result<(), String> {
    for (ino, w) in &want.contents {
        let Some(g) = got.contents.get(ino) else {
            continue; // sizes and names already matched: a hard link's twin
        };
        if g == w {
            continue;
        }
        let (w, g) = (unrle(w), unrle(g));
        for (off, (&wb, &gb)) in w.iter().zip(&g).enumerate() {
            if wb == gb {
                continue;
            }
            let later = rec.writes.iter().any(|x| {
                x.op > after
                    && x.op <= last
                    && x.ino == *ino
                    && x.tag == gb
                    && (x.off..x.off + x.len).contains(&(off as u64))
            });
            if !later {
                return Err(format!(
                    "inode {ino} byte {off}: {gb:#x}, expected {wb:#x} (or a later in-place write)"
                ));
            }
        }
    }
    Ok(())
}

/// Checks one crash state; Err says what is wrong.
pub fn check_state(rec: &Recording, st: &State) -> Result<(), String> {
    let dev = Arc::new(MemDevice::from_bytes(st.image.clone()));
    let report =
        check::fsck(dev.as_ref(), false).map_err(|e| format!("fsck could not read: {e}"))?;
    let bad: Vec<_> = report.remaining.iter().filter(|p| !p.is_orphan()).collect();
    if !bad.is_empty() {
        return Err(format!("fsck without repair finds {bad:?}"));
    }
    let fs = Fs::mount(dev.clone() as Arc<dyn BlockDevice>, opts())
        .map_err(|e| format!("mount failed: {e}"))?;
    let got = dump(&fs)?;
    let mut why = None;
    let candidates = (st.durable_op..=st.last_op.min(rec.ops))
        .filter_map(|i| rec.dumps[i].as_ref().map(|d| (i, d)));
    let mut matched = false;
    for (i, want) in candidates {
        if want.entries != got.entries {
            continue;
        }
        match contents_allowed(rec, want, &got, i, st.last_op) {
            Ok(()) => {
                matched = true;
                break;
            }
            Err(e) => why = Some(format!("tree of op {i} matches but {e}")),
        }
    }
    if !matched {
        let base = rec.dumps[..=st.durable_op]
            .iter()
            .rev()
            .flatten()
            .next()
            .expect("op 0 has a dump");
        return Err(why.unwrap_or_else(|| {
            format!(
                "matches no state between op {} (fsynced) and op {}: against op {}: {}",
                st.durable_op,
                st.last_op,
                st.durable_op,
                describe_diff(base, &got)
            )
        }));
    }
    // A further workload on the recovered filesystem.
    let (a, fh) = fs
        .create(ROOT, ROOT_INO, b"after-the-crash", 0o644, true, true)
        .map_err(|e| format!("create after the crash: {e}"))?;
    let data = vec![0x5a; 10_000];
    fs.write(a.ino, 123, &data)
        .map_err(|e| format!("write after the crash: {e}"))?;
    fs.release(fh).unwrap();
    fs.fsync(a.ino)
        .map_err(|e| format!("fsync after the crash: {e}"))?;
    fs.unmount()
        .map_err(|e| format!("unmount after the crash: {e}"))?;
    let report = check::fsck(dev.as_ref(), false).map_err(|e| format!("fsck after reuse: {e}"))?;
    if !report.remaining.is_empty() {
        return Err(format!("fsck after reuse finds {:?}", report.remaining));
    }
    let fs = Fs::mount(dev as Arc<dyn BlockDevice>, opts())
        .map_err(|e| format!("remount after reuse: {e}"))?;
    let ino = fs
        .lookup(ROOT_INO, b"after-the-crash")
        .map_err(|e| format!("after reuse: {e}"))?
        .ino;
    let back = fs
        .read(ino, 123, data.len())
        .map_err(|e| format!("read after reuse: {e}"))?;
    if back.to_vec() != data {
        return Err("the file written after the crash reads back wrong".into());
    }
    fs.unmount().map_err(|e| format!("final unmount: {e}"))?;
    Ok(())
}

/// Totals of a sweep.
#[derive(Debug, Default)]
pub struct Tally {
    pub workloads: usize,
    pub states: usize,
    pub failed: usize,
    pub first_failure: Option<String>,
}

/// Explores `seeds` of `family`; stops a workload at its first failure.
pub fn sweep(family: &str, seeds: std::ops::Range<u64>, scale: Scale) -> Tally {
    let mut t = Tally::default();
    let started = Instant::now();
    let long = std::env::var_os("EXPLORE_LONG").is_some();
    // A budget for one family, in seconds (scripts/crash-explore --minutes).
    let budget = std::env::var("EXPLORE_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok());
    for seed in seeds {
        if budget.is_some_and(|b| started.elapsed().as_secs_f64() > b) {
            println!(
                "explore {family}: time budget spent after {} workloads",
                t.workloads
            );
            break;
        }
        let rec = record(family, seed, scale);
        t.workloads += 1;
        if long && t.workloads % 10 == 0 {
            println!(
                "explore {family}: {} workloads so far, {} states, {} failed, {:.0} s",
                t.workloads,
                t.states,
                t.failed,
                started.elapsed().as_secs_f64()
            );
        }
        states(&rec, scale, seed, |i, st| {
            t.states += 1;
            match check_state(&rec, &st) {
                Ok(()) => true,
                Err(e) => {
                    t.failed += 1;
                    if t.first_failure.is_none() {
                        t.first_failure = Some(format!(
                            "{family}/{seed}/{i} ({}): {e}\n  replay: scripts/crash-explore {}--replay {family}/{seed}/{i}",
                            st.what,
                            if long { "--long " } else { "" }
                        ));
                    }
                    false
                }
            }
        });
    }
    println!(
        "explore {family}: {} workloads, {} crash states tried, {} failed, {:.1} s",
        t.workloads,
        t.states,
        t.failed,
        started.elapsed().as_secs_f64()
    );
    if let Some(f) = &t.first_failure {
        println!("  first failing state: {f}");
    }
    t
}

/// Rebuilds and checks one state, named `family/seed/index`.
pub fn replay(id: &str, scale: Scale) -> Result<(), String> {
    let parts: Vec<&str> = id.split('/').collect();
    let [family, seed, index] = parts[..] else {
        return Err(format!("bad state id {id} (want family/seed/index)"));
    };
    let seed: u64 = seed.parse().map_err(|_| format!("bad seed in {id}"))?;
    let index: usize = index.parse().map_err(|_| format!("bad index in {id}"))?;
    let rec = record(family, seed, scale);
    let mut result = Err(format!("{id}: no such state"));
    states(&rec, scale, seed, |i, st| {
        if i < index {
            return true;
        }
        println!(
            "state {id}: {} (ops {}..={} of {})",
            st.what, st.durable_op, st.last_op, rec.ops
        );
        result = check_state(&rec, &st);
        false
    });
    result
}
