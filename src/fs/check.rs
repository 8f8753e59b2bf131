//! Consistency checking (fsck): every invariant the metadata must keep,
//! found from the loaded state, and the repairs that restore them.

use std::collections::HashMap;
use std::fmt;

use crate::blockdev::BlockDevice;
use crate::format::{CheckpointHeader, InodeAttrs, Kind, Record, Superblock, Timespec, ROOT_INO};

use super::alloc::Allocator;
use super::error::Result;
use super::journal;
use super::meta::Meta;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    NoRoot,
    ExtentOutside {
        ino: u64,
        file_block: u64,
        dev: u64,
        len: u64,
    },
    DoubleUse {
        ino: u64,
        file_block: u64,
        dev: u64,
    },
    DanglingEntry {
        parent: u64,
        name: Vec<u8>,
        ino: u64,
    },
    DirLinkedTwice {
        parent: u64,
        name: Vec<u8>,
        ino: u64,
    },
    WrongParent {
        ino: u64,
        recorded: u64,
        actual: u64,
    },
    WrongNlink {
        ino: u64,
        recorded: u32,
        actual: u32,
    },
    Unreachable {
        ino: u64,
    },
    /// Unlinked while open when the filesystem stopped: reclaimed at mount.
    Orphan {
        ino: u64,
    },
}

impl Problem {
    pub fn is_orphan(&self) -> bool {
        matches!(self, Problem::Orphan { .. })
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NoRoot => write!(f, "root directory missing or not a directory"),
            Problem::ExtentOutside {
                ino,
                file_block,
                dev,
                len,
            } => write!(
                f,
                "inode {ino}: extent at file block {file_block} -> device blocks {dev}+{len} lies outside the data area"
            ),
            Problem::DoubleUse {
                ino,
                file_block,
                dev,
            } => write!(
                f,
                "inode {ino}: file block {file_block} uses device block {dev}, which is already in use"
            ),
            Problem::DanglingEntry { parent, name, ino } => write!(
                f,
                "directory {parent}: entry {:?} points at missing inode {ino}",
                String::from_utf8_lossy(name)
            ),
            Problem::DirLinkedTwice { parent, name, ino } => write!(
                f,
                "directory {parent}: entry {:?} is a second link to directory {ino}",
                String::from_utf8_lossy(name)
            ),
            Problem::WrongParent {
                ino,
                recorded,
                actual,
            } => write!(
                f,
                "directory {ino}: '..' is {recorded} but it lives in {actual}"
            ),
            Problem::WrongNlink {
                ino,
                recorded,
                actual,
            } => write!(f, "inode {ino}: link count {recorded}, should be {actual}"),
            Problem::Unreachable { ino } => {
                write!(f, "inode {ino}: has links but no directory entry names it")
            }
            Problem::Orphan { ino } => write!(f, "inode {ino}: orphan (unlinked while open)"),
        }
    }
}

/// The free-space map implied by the metadata, and every block that is
/// outside the data area or claimed twice.
pub(super) fn build_allocator(
    sb: &Superblock,
    meta: &Meta,
    ckpt: &CheckpointHeader,
) -> (Allocator, Vec<Problem>) {
    let mut alloc = Allocator::new(sb.data_start(), sb.data_end());
    let mut problems = Vec::new();
    for &(s, l) in &ckpt.extents {
        alloc.reserve(s, l);
    }
    let mut inos: Vec<&u64> = meta.inodes.keys().collect();
    inos.sort_unstable();
    for ino in inos {
        for (&fb, e) in &meta.inodes[ino].extents {
            if e.dev < sb.data_start() || e.dev.saturating_add(e.len) > sb.data_end() {
                problems.push(Problem::ExtentOutside {
                    ino: *ino,
                    file_block: fb,
                    dev: e.dev,
                    len: e.len,
                });
            } else if !alloc.reserve(e.dev, e.len) {
                problems.push(Problem::DoubleUse {
                    ino: *ino,
                    file_block: fb,
                    dev: e.dev,
                });
            }
        }
    }
    (alloc, problems)
}

/// Every inconsistency in the loaded metadata.
pub fn verify(sb: &Superblock, meta: &Meta, ckpt: &CheckpointHeader) -> Vec<Problem> {
    let mut problems = build_allocator(sb, meta, ckpt).1;
    match meta.get(ROOT_INO) {
        Some(r) if r.attrs.kind == Kind::Dir => {}
        _ => {
            problems.push(Problem::NoRoot);
            return problems;
        }
    }
    // Count the names of each inode and the subdirectories of each dir.
    let mut names: HashMap<u64, u32> = HashMap::new();
    let mut subdirs: HashMap<u64, u32> = HashMap::new();
    let mut dir_home: HashMap<u64, u64> = HashMap::new();
    let mut parents: Vec<&u64> = meta.inodes.keys().collect();
    parents.sort_unstable();
    for &parent in parents {
        let Some(d) = &meta.inodes[&parent].dir else {
            continue;
        };
        let mut entries: Vec<(&[u8], u64)> = d
            .entries
            .iter()
            .map(|(n, &(ino, _))| (&n[..], ino))
            .collect();
        entries.sort();
        for (name, ino) in entries {
            let Some(child) = meta.get(ino) else {
                problems.push(Problem::DanglingEntry {
                    parent,
                    name: name.to_vec(),
                    ino,
                });
                continue;
            };
            if child.attrs.kind == Kind::Dir {
                if ino == ROOT_INO || dir_home.contains_key(&ino) {
                    problems.push(Problem::DirLinkedTwice {
                        parent,
                        name: name.to_vec(),
                        ino,
                    });
                    continue;
                }
                dir_home.insert(ino, parent);
                *subdirs.entry(parent).or_default() += 1;
            }
            *names.entry(ino).or_default() += 1;
        }
    }
    // What can be reached from the root (a cycle of directories naming
    // each other is not).
    let mut reachable = std::collections::HashSet::from([ROOT_INO]);
    let mut queue = vec![ROOT_INO];
    while let Some(dir) = queue.pop() {
        if let Some(d) = meta.get(dir).and_then(|i| i.dir.as_ref()) {
            for &(child, _) in d.entries.values() {
                if meta.get(child).is_some() && reachable.insert(child) {
                    queue.push(child);
                }
            }
        }
    }
    let mut inos: Vec<&u64> = meta.inodes.keys().collect();
    inos.sort_unstable();
    for &ino in inos {
        let a = &meta.inodes[&ino].attrs;
        let n = names.get(&ino).copied().unwrap_or(0);
        if !reachable.contains(&ino) {
            if a.nlink == 0 && n == 0 {
                problems.push(Problem::Orphan { ino });
            } else {
                problems.push(Problem::Unreachable { ino });
            }
            continue;
        }
        let expected = match a.kind {
            Kind::Dir => 2 + subdirs.get(&ino).copied().unwrap_or(0),
            _ => n,
        };
        if a.nlink != expected {
            problems.push(Problem::WrongNlink {
                ino,
                recorded: a.nlink,
                actual: expected,
            });
        }
        if a.kind == Kind::Dir {
            let home = if ino == ROOT_INO {
                ROOT_INO
            } else {
                dir_home[&ino]
            };
            if a.parent != home {
                problems.push(Problem::WrongParent {
                    ino,
                    recorded: a.parent,
                    actual: home,
                });
            }
        }
    }
    problems
}

/// What `fsck` found and did.
pub struct Report {
    pub superblock: Superblock,
    pub checkpoint_seq: u64,
    pub replayed: usize,
    pub inodes: usize,
    pub used_blocks: u64,
    pub free_blocks: u64,
    pub notes: Vec<String>,
    pub problems: Vec<Problem>,
    /// Problems left after repair (all of them when not repairing).
    pub remaining: Vec<Problem>,
    pub repaired: bool,
}

/// Checks the filesystem on `dev`; with `repair`, fixes what it finds and
/// writes a new checkpoint. Errors are the unreadable cases (no valid
/// superblock or checkpoint).
pub fn fsck(dev: &dyn BlockDevice, repair: bool) -> Result<Report> {
    let sb = super::read_superblock(dev)?;
    let loaded = journal::load(dev, &sb, repair)?;
    let mut meta = loaded.meta;
    let problems = verify(&sb, &meta, &loaded.checkpoint);
    let mut notes = loaded.skipped;
    if loaded.torn_tail {
        notes.push(
            "the newest log commit was torn by a crash and is dropped whole (it was never acknowledged to an fsync)"
                .into(),
        );
    }
    if loaded.replayed > 0 {
        notes.push(format!(
            "{} log record(s) after checkpoint {} replayed (the filesystem was not unmounted cleanly)",
            loaded.replayed, loaded.checkpoint.seq
        ));
    }
    let mut remaining = problems.clone();
    let mut repaired = false;
    if repair && (!problems.is_empty() || loaded.salvaged) {
        for p in &problems {
            fix(&mut meta, p);
        }
        // Link counts and reachability depend on earlier fixes: settle them.
        for _ in 0..3 {
            let again = verify(&sb, &meta, &loaded.checkpoint);
            if again.is_empty() {
                break;
            }
            for p in &again {
                fix(&mut meta, p);
            }
        }
        remaining = verify(&sb, &meta, &loaded.checkpoint);
        if remaining.is_empty() {
            let (mut alloc, _) = build_allocator(&sb, &meta, &loaded.checkpoint);
            let (blob, count) = journal::encode_snapshot(&meta);
            let blocks = (blob.len() as u64).div_ceil(crate::format::BLOCK_SIZE);
            let extents = alloc.allocate(blocks, None);
            if extents.iter().map(|e| e.1).sum::<u64>() < blocks {
                return Err(super::FsError::NoSpace);
            }
            journal::write_checkpoint(
                dev,
                sb.salt(),
                loaded.checkpoint.seq + 1,
                &blob,
                count,
                extents,
            )?;
            repaired = true;
        }
    }
    let (alloc, _) = build_allocator(&sb, &meta, &loaded.checkpoint);
    let data_blocks = sb.data_end() - sb.data_start();
    Ok(Report {
        superblock: sb,
        checkpoint_seq: loaded.checkpoint.seq,
        replayed: loaded.replayed,
        inodes: meta.inodes.len(),
        used_blocks: data_blocks - alloc.free_blocks(),
        free_blocks: alloc.free_blocks(),
        notes,
        problems,
        remaining,
        repaired,
    })
}

fn apply(meta: &mut Meta, rec: Record) {
    // Repairs are built from the state they change; a failure here means
    // that state was already gone, which is what the repair wanted.
    let _ = meta.apply(&rec);
}

fn fix(meta: &mut Meta, p: &Problem) {
    match p {
        Problem::NoRoot => {
            let now = Timespec::now();
            if let Some(old) = meta.get(ROOT_INO).map(|r| r.attrs.clone()) {
                if old.kind != Kind::Dir {
                    apply(meta, Record::DropInode { ino: ROOT_INO });
                }
            }
            apply(
                meta,
                Record::Inode(InodeAttrs {
                    ino: ROOT_INO,
                    kind: Kind::Dir,
                    perm: 0o755,
                    uid: 0,
                    gid: 0,
                    nlink: 2,
                    size: 0,
                    atime: now,
                    mtime: now,
                    ctime: now,
                    crtime: now,
                    rdev: 0,
                    parent: ROOT_INO,
                }),
            );
        }
        Problem::ExtentOutside {
            ino,
            file_block,
            len,
            ..
        } => apply(
            meta,
            Record::Unmap {
                ino: *ino,
                file_block: *file_block,
                len: *len,
            },
        ),
        Problem::DoubleUse {
            ino, file_block, ..
        } => {
            let len = meta
                .get(*ino)
                .and_then(|i| i.extents.get(file_block))
                .map(|e| e.len)
                .unwrap_or(0);
            apply(
                meta,
                Record::Unmap {
                    ino: *ino,
                    file_block: *file_block,
                    len,
                },
            );
        }
        Problem::DanglingEntry { parent, name, .. }
        | Problem::DirLinkedTwice { parent, name, .. } => apply(
            meta,
            Record::DirRemove {
                parent: *parent,
                name: name.clone(),
            },
        ),
        Problem::WrongParent { ino, actual, .. } => {
            if let Some(mut a) = meta.get(*ino).map(|i| i.attrs.clone()) {
                a.parent = *actual;
                apply(meta, Record::Inode(a));
            }
        }
        Problem::WrongNlink { ino, actual, .. } => {
            if let Some(mut a) = meta.get(*ino).map(|i| i.attrs.clone()) {
                a.nlink = *actual;
                apply(meta, Record::Inode(a));
            }
        }
        Problem::Unreachable { ino } => {
            let lf = lost_and_found(meta);
            apply(
                meta,
                Record::DirAdd {
                    parent: lf,
                    name: format!("#{ino}").into_bytes(),
                    ino: *ino,
                },
            );
            if let Some(mut a) = meta.get(*ino).map(|i| i.attrs.clone()) {
                if a.kind == Kind::Dir {
                    a.parent = lf;
                    apply(meta, Record::Inode(a));
                }
            }
        }
        Problem::Orphan { ino } => apply(meta, Record::DropInode { ino: *ino }),
    }
}

/// The inode of /lost+found, created if missing.
fn lost_and_found(meta: &mut Meta) -> u64 {
    const NAME: &[u8] = b"lost+found";
    if let Some(ino) = meta
        .get(ROOT_INO)
        .and_then(|r| r.dir.as_ref())
        .and_then(|d| d.get(NAME))
    {
        return ino;
    }
    let ino = meta.next_ino;
    let now = Timespec::now();
    apply(
        meta,
        Record::Inode(InodeAttrs {
            ino,
            kind: Kind::Dir,
            perm: 0o700,
            uid: 0,
            gid: 0,
            nlink: 2,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev: 0,
            parent: ROOT_INO,
        }),
    );
    apply(
        meta,
        Record::DirAdd {
            parent: ROOT_INO,
            name: NAME.to_vec(),
            ino,
        },
    );
    ino
}
