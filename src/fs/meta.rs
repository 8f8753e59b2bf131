//! The in-memory metadata: inodes, directories, extent maps, xattrs.
//!
//! All of it changes only through [`Meta::apply`], both live and during
//! log replay, so what is logged is exactly what happened.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::format::{InodeAttrs, Kind, Record};

/// A run of device blocks backing a run of file blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub dev: u64,
    pub len: u64,
    /// Allocated by fallocate but never written: reads as zeros.
    pub unwritten: bool,
}

/// A directory's entries, with a stable cookie per entry so readdir can
/// resume at an offset while entries come and go. Each name is stored
/// once, shared by both maps.
#[derive(Debug, Default)]
pub struct Dir {
    pub entries: HashMap<Arc<[u8]>, (u64, u64)>,
    pub by_cookie: BTreeMap<u64, Arc<[u8]>>,
    next_cookie: u64,
}

/// readdir offsets 1 and 2 are "." and ".."; entries start after them.
pub const FIRST_COOKIE: u64 = 3;

impl Dir {
    pub fn get(&self, name: &[u8]) -> Option<u64> {
        self.entries.get(name).map(|e| e.0)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn cookie(&self, name: &[u8]) -> Option<u64> {
        self.entries.get(name).map(|e| e.1)
    }

    /// Moves `name` to readdir position `cookie` (a free one): a rename
    /// within a directory keeps the entry where it was, so a reader
    /// walking the directory meanwhile never meets it twice.
    pub fn move_to_cookie(&mut self, name: &[u8], cookie: u64) {
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        if self.by_cookie.contains_key(&cookie) {
            return;
        }
        if let Some(n) = self.by_cookie.remove(&e.1) {
            e.1 = cookie;
            self.by_cookie.insert(cookie, n);
        }
    }

    fn insert(&mut self, name: &[u8], ino: u64) {
        if let Some(e) = self.entries.get_mut(name) {
            e.0 = ino;
            return;
        }
        let cookie = self.next_cookie.max(FIRST_COOKIE);
        self.next_cookie = cookie + 1;
        let name: Arc<[u8]> = name.into();
        self.entries.insert(name.clone(), (ino, cookie));
        self.by_cookie.insert(cookie, name);
    }

    fn remove(&mut self, name: &[u8]) -> Option<u64> {
        let (ino, cookie) = self.entries.remove(name)?;
        self.by_cookie.remove(&cookie);
        Some(ino)
    }
}

#[derive(Debug)]
pub struct Inode {
    pub attrs: InodeAttrs,
    /// file block -> extent, non-overlapping.
    pub extents: BTreeMap<u64, Extent>,
    pub allocated_blocks: u64,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub target: Vec<u8>,
    pub dir: Option<Box<Dir>>,
    /// Open file handles (the inode lives on while > 0 after unlink).
    pub open_count: u32,
}

impl Inode {
    fn new(attrs: InodeAttrs) -> Self {
        let dir = (attrs.kind == Kind::Dir).then(Box::default);
        Self {
            attrs,
            extents: BTreeMap::new(),
            allocated_blocks: 0,
            xattrs: BTreeMap::new(),
            target: Vec::new(),
            dir,
            open_count: 0,
        }
    }
}

/// What a range of file blocks maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    Hole { file_block: u64, len: u64 },
    Mapped { file_block: u64, ext: Extent },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("record refers to missing inode {0}")]
    MissingInode(u64),
    #[error("record adds an entry to inode {0}, which is not a directory")]
    NotDir(u64),
    #[error("extent of inode {0} overflows")]
    Overflow(u64),
}

#[derive(Debug, Default)]
pub struct Meta {
    pub inodes: HashMap<u64, Inode>,
    pub next_ino: u64,
}

impl Meta {
    pub fn get(&self, ino: u64) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Inode> {
        self.inodes.get_mut(&ino)
    }

    /// Applies one record; returns the device runs it stopped referencing.
    pub fn apply(&mut self, rec: &Record) -> Result<Vec<(u64, u64)>, ApplyError> {
        let mut freed = Vec::new();
        match rec {
            Record::Inode(a) => {
                self.next_ino = self.next_ino.max(a.ino + 1);
                match self.inodes.get_mut(&a.ino) {
                    Some(i) => {
                        if a.kind == Kind::Dir && i.dir.is_none() {
                            i.dir = Some(Box::default());
                        }
                        i.attrs = a.clone();
                    }
                    None => {
                        self.inodes.insert(a.ino, Inode::new(a.clone()));
                    }
                }
            }
            Record::DropInode { ino } => {
                if let Some(i) = self.inodes.remove(ino) {
                    freed.extend(i.extents.values().map(|e| (e.dev, e.len)));
                }
            }
            Record::DirAdd { parent, name, ino } => {
                let p = self
                    .inodes
                    .get_mut(parent)
                    .ok_or(ApplyError::MissingInode(*parent))?;
                p.dir
                    .as_mut()
                    .ok_or(ApplyError::NotDir(*parent))?
                    .insert(name, *ino);
            }
            Record::DirRemove { parent, name } => {
                if let Some(d) = self.inodes.get_mut(parent).and_then(|p| p.dir.as_mut()) {
                    d.remove(name);
                }
            }
            Record::Map {
                ino,
                file_block,
                dev_block,
                len,
                unwritten,
            } => {
                let i = self
                    .inodes
                    .get_mut(ino)
                    .ok_or(ApplyError::MissingInode(*ino))?;
                if file_block.checked_add(*len).is_none() || dev_block.checked_add(*len).is_none() {
                    return Err(ApplyError::Overflow(*ino));
                }
                let old = unmap(i, *file_block, *len);
                // Blocks remapped in place (unwritten -> written) stay in use.
                for (d, l) in old {
                    subtract_run(&mut freed, d, l, *dev_block, *len);
                }
                map(i, *file_block, *dev_block, *len, *unwritten);
            }
            Record::Unmap {
                ino,
                file_block,
                len,
            } => {
                let i = self
                    .inodes
                    .get_mut(ino)
                    .ok_or(ApplyError::MissingInode(*ino))?;
                freed = unmap(i, *file_block, (*len).min(u64::MAX - *file_block));
            }
            Record::XattrSet { ino, name, value } => {
                let i = self
                    .inodes
                    .get_mut(ino)
                    .ok_or(ApplyError::MissingInode(*ino))?;
                i.xattrs.insert(name.clone(), value.clone());
            }
            Record::XattrRemove { ino, name } => {
                if let Some(i) = self.inodes.get_mut(ino) {
                    i.xattrs.remove(name);
                }
            }
            Record::SymlinkTarget { ino, target } => {
                let i = self
                    .inodes
                    .get_mut(ino)
                    .ok_or(ApplyError::MissingInode(*ino))?;
                i.target = target.clone();
            }
            Record::NextIno(n) => self.next_ino = self.next_ino.max(*n),
        }
        Ok(freed)
    }

    /// The records that rebuild this metadata from nothing (a checkpoint).
    #[cfg(test)]
    pub fn snapshot(&self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.inodes.len() * 2 + 1);
        self.each_snapshot_record(|r| out.push(r));
        out
    }

    /// Produces the snapshot records one at a time, so a checkpoint of
    /// millions of inodes never holds them all at once. Parents come
    /// before children so DirAdd always finds its directory.
    pub fn each_snapshot_record(&self, mut f: impl FnMut(Record)) {
        f(Record::NextIno(self.next_ino));
        let mut inos: Vec<u64> = self.inodes.keys().copied().collect();
        inos.sort_unstable();
        for &ino in &inos {
            let i = &self.inodes[&ino];
            f(Record::Inode(i.attrs.clone()));
            if !i.target.is_empty() {
                f(Record::SymlinkTarget {
                    ino,
                    target: i.target.clone(),
                });
            }
            for (name, value) in &i.xattrs {
                f(Record::XattrSet {
                    ino,
                    name: name.clone(),
                    value: value.clone(),
                });
            }
            for (&fb, e) in &i.extents {
                f(Record::Map {
                    ino,
                    file_block: fb,
                    dev_block: e.dev,
                    len: e.len,
                    unwritten: e.unwritten,
                });
            }
        }
        for &ino in &inos {
            if let Some(d) = &self.inodes[&ino].dir {
                for name in d.by_cookie.values() {
                    f(Record::DirAdd {
                        parent: ino,
                        name: name.to_vec(),
                        ino: d.entries[name].0,
                    });
                }
            }
        }
    }
}

/// Removes `run` (d2, l2) from (d, l) and appends what is left to `out`.
fn subtract_run(out: &mut Vec<(u64, u64)>, d: u64, l: u64, d2: u64, l2: u64) {
    let (s, e) = (d, d + l);
    let (s2, e2) = (d2, d2 + l2);
    if e <= s2 || e2 <= s {
        out.push((d, l));
        return;
    }
    if s < s2 {
        out.push((s, s2 - s));
    }
    if e2 < e {
        out.push((e2, e - e2));
    }
}

/// Removes the mapping of file blocks `fb..fb+len`; returns the device
/// runs that were mapped there.
fn unmap(i: &mut Inode, fb: u64, len: u64) -> Vec<(u64, u64)> {
    let end = fb.saturating_add(len);
    let mut freed = Vec::new();
    let mut touched: Vec<u64> = Vec::new();
    if let Some((&s, e)) = i.extents.range(..fb).next_back() {
        if s + e.len > fb {
            touched.push(s);
        }
    }
    touched.extend(i.extents.range(fb..end).map(|(&s, _)| s));
    for s in touched {
        let e = i.extents.remove(&s).unwrap();
        let e_end = s + e.len;
        let cut_start = s.max(fb);
        let cut_end = e_end.min(end);
        if s < cut_start {
            i.extents.insert(
                s,
                Extent {
                    len: cut_start - s,
                    ..e
                },
            );
        }
        if cut_end < e_end {
            i.extents.insert(
                cut_end,
                Extent {
                    dev: e.dev + (cut_end - s),
                    len: e_end - cut_end,
                    unwritten: e.unwritten,
                },
            );
        }
        freed.push((e.dev + (cut_start - s), cut_end - cut_start));
        i.allocated_blocks -= cut_end - cut_start;
    }
    freed
}

/// Maps file blocks `fb..fb+len` (already unmapped) to `dev..`, merging
/// with neighbours that continue on the device.
fn map(i: &mut Inode, fb: u64, dev: u64, len: u64, unwritten: bool) {
    if len == 0 {
        return;
    }
    let mut start = fb;
    let mut ext = Extent {
        dev,
        len,
        unwritten,
    };
    if let Some((&ps, &p)) = i.extents.range(..fb).next_back() {
        if ps + p.len == fb && p.dev + p.len == dev && p.unwritten == unwritten {
            i.extents.remove(&ps);
            start = ps;
            ext = Extent {
                dev: p.dev,
                len: p.len + len,
                unwritten,
            };
        }
    }
    if let Some(&n) = i.extents.get(&(fb + len)) {
        if dev + len == n.dev && n.unwritten == unwritten {
            i.extents.remove(&(fb + len));
            ext.len += n.len;
        }
    }
    i.extents.insert(start, ext);
    i.allocated_blocks += len;
}

/// The mapping of file blocks `fb..fb+len` as holes and extents pieces.
pub fn runs(i: &Inode, fb: u64, len: u64) -> Vec<Run> {
    let end = fb.saturating_add(len);
    let mut out = Vec::new();
    let mut pos = fb;
    let push_hole = |out: &mut Vec<Run>, from: u64, to: u64| {
        if to > from {
            out.push(Run::Hole {
                file_block: from,
                len: to - from,
            });
        }
    };
    let first = i
        .extents
        .range(..fb)
        .next_back()
        .filter(|(&s, e)| s + e.len > fb)
        .map(|(&s, &e)| (s, e));
    for (s, e) in first
        .into_iter()
        .chain(i.extents.range(fb..end).map(|(&s, &e)| (s, e)))
    {
        push_hole(&mut out, pos, s.max(pos));
        let from = s.max(pos);
        let to = (s + e.len).min(end);
        out.push(Run::Mapped {
            file_block: from,
            ext: Extent {
                dev: e.dev + (from - s),
                len: to - from,
                unwritten: e.unwritten,
            },
        });
        pos = to;
    }
    push_hole(&mut out, pos, end);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Timespec;

    fn file(ino: u64) -> Record {
        Record::Inode(InodeAttrs {
            ino,
            kind: Kind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size: 0,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            crtime: Timespec::default(),
            rdev: 0,
            parent: 0,
        })
    }

    fn mapr(ino: u64, fb: u64, dev: u64, len: u64, unwritten: bool) -> Record {
        Record::Map {
            ino,
            file_block: fb,
            dev_block: dev,
            len,
            unwritten,
        }
    }

    #[test]
    fn map_unmap_split_merge() {
        let mut m = Meta::default();
        m.apply(&file(5)).unwrap();
        m.apply(&mapr(5, 0, 100, 10, false)).unwrap();
        m.apply(&mapr(5, 10, 110, 10, false)).unwrap();
        assert_eq!(m.get(5).unwrap().extents.len(), 1, "contiguous runs merge");
        let freed = m
            .apply(&Record::Unmap {
                ino: 5,
                file_block: 5,
                len: 3,
            })
            .unwrap();
        assert_eq!(freed, vec![(105, 3)]);
        let i = m.get(5).unwrap();
        assert_eq!(i.allocated_blocks, 17);
        assert_eq!(
            runs(i, 0, 20),
            vec![
                Run::Mapped {
                    file_block: 0,
                    ext: Extent {
                        dev: 100,
                        len: 5,
                        unwritten: false
                    }
                },
                Run::Hole {
                    file_block: 5,
                    len: 3
                },
                Run::Mapped {
                    file_block: 8,
                    ext: Extent {
                        dev: 108,
                        len: 12,
                        unwritten: false
                    }
                },
            ]
        );
    }

    #[test]
    fn remapping_in_place_frees_nothing_and_replay_is_idempotent() {
        let mut m = Meta::default();
        m.apply(&file(5)).unwrap();
        m.apply(&mapr(5, 0, 100, 8, true)).unwrap();
        let freed = m.apply(&mapr(5, 2, 102, 2, false)).unwrap();
        assert!(freed.is_empty());
        let freed = m.apply(&mapr(5, 2, 102, 2, false)).unwrap();
        assert!(freed.is_empty());
        assert_eq!(m.get(5).unwrap().allocated_blocks, 8);
        assert_eq!(m.get(5).unwrap().extents.len(), 3);
    }

    #[test]
    fn snapshot_rebuilds_the_same_state() {
        let mut m = Meta::default();
        let mut root = file(1);
        if let Record::Inode(a) = &mut root {
            a.kind = Kind::Dir;
        }
        m.apply(&root).unwrap();
        m.apply(&file(7)).unwrap();
        m.apply(&Record::DirAdd {
            parent: 1,
            name: b"f".to_vec(),
            ino: 7,
        })
        .unwrap();
        m.apply(&mapr(7, 3, 50, 2, false)).unwrap();
        let mut m2 = Meta::default();
        for r in m.snapshot() {
            m2.apply(&r).unwrap();
        }
        assert_eq!(m2.snapshot(), m.snapshot());
        assert_eq!(m2.get(1).unwrap().dir.as_ref().unwrap().get(b"f"), Some(7));
        assert!(m2.apply(&mapr(99, 0, 1, 1, false)).is_err());
    }
}
