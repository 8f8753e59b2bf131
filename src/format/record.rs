//! Metadata records: the unit of both the log and the checkpoint snapshot.
//!
//! Every record is idempotent (applying it twice leaves the same state), so
//! replaying a log whose tail was already folded into a checkpoint is safe.

use super::codec::{Decoder, Encoder};
use super::FormatError;

const WHAT: &str = "metadata record";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

impl Timespec {
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }

    fn encode(&self, e: &mut Encoder) {
        e.i64(self.sec).u32(self.nsec);
    }

    fn decode(d: &mut Decoder) -> Result<Self, FormatError> {
        let sec = d.i64()?;
        let nsec = d.u32()?;
        if nsec >= 1_000_000_000 {
            return Err(FormatError::Invalid(WHAT, "nanoseconds out of range"));
        }
        Ok(Self { sec, nsec })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::CharDev => 4,
            Kind::BlockDev => 5,
            Kind::Fifo => 6,
            Kind::Socket => 7,
        }
    }

    fn from_code(c: u8) -> Result<Self, FormatError> {
        Ok(match c {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::CharDev,
            5 => Kind::BlockDev,
            6 => Kind::Fifo,
            7 => Kind::Socket,
            _ => return Err(FormatError::Invalid(WHAT, "unknown inode kind")),
        })
    }

    /// The S_IFMT bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
        }
    }

    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            _ => return None,
        })
    }
}

/// The fixed-size attributes of an inode (what `stat` shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InodeAttrs {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (07777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub crtime: Timespec,
    pub rdev: u32,
    /// Parent directory of a directory (0 for other kinds).
    pub parent: u64,
}

impl InodeAttrs {
    fn encode(&self, e: &mut Encoder) {
        e.u64(self.ino)
            .u8(self.kind.code())
            .u16(self.perm)
            .u32(self.uid)
            .u32(self.gid)
            .u32(self.nlink)
            .u64(self.size);
        for t in [&self.atime, &self.mtime, &self.ctime, &self.crtime] {
            t.encode(e);
        }
        e.u32(self.rdev).u64(self.parent);
    }

    fn decode(d: &mut Decoder) -> Result<Self, FormatError> {
        let ino = d.u64()?;
        let kind = Kind::from_code(d.u8()?)?;
        let perm = d.u16()?;
        if perm & !0o7777 != 0 {
            return Err(FormatError::Invalid(WHAT, "permission bits out of range"));
        }
        Ok(Self {
            ino,
            kind,
            perm,
            uid: d.u32()?,
            gid: d.u32()?,
            nlink: d.u32()?,
            size: d.u64()?,
            atime: Timespec::decode(d)?,
            mtime: Timespec::decode(d)?,
            ctime: Timespec::decode(d)?,
            crtime: Timespec::decode(d)?,
            rdev: d.u32()?,
            parent: d.u64()?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Create or replace an inode's attributes.
    Inode(InodeAttrs),
    /// Forget an inode entirely (its extents must already be unmapped).
    DropInode {
        ino: u64,
    },
    DirAdd {
        parent: u64,
        name: Vec<u8>,
        ino: u64,
    },
    DirRemove {
        parent: u64,
        name: Vec<u8>,
    },
    /// Map `len` file blocks from `file_block` to device blocks from
    /// `dev_block`, replacing whatever was mapped there.
    Map {
        ino: u64,
        file_block: u64,
        dev_block: u64,
        len: u64,
        unwritten: bool,
    },
    /// Remove the mapping of `len` file blocks from `file_block`.
    Unmap {
        ino: u64,
        file_block: u64,
        len: u64,
    },
    XattrSet {
        ino: u64,
        name: Vec<u8>,
        value: Vec<u8>,
    },
    XattrRemove {
        ino: u64,
        name: Vec<u8>,
    },
    SymlinkTarget {
        ino: u64,
        target: Vec<u8>,
    },
    /// Inode numbers below this are never handed out again.
    NextIno(u64),
}

impl Record {
    pub fn encode(&self, e: &mut Encoder) {
        match self {
            Record::Inode(a) => {
                e.u8(1);
                a.encode(e);
            }
            Record::DropInode { ino } => {
                e.u8(2).u64(*ino);
            }
            Record::DirAdd { parent, name, ino } => {
                e.u8(3).u64(*parent).bytes(name).u64(*ino);
            }
            Record::DirRemove { parent, name } => {
                e.u8(4).u64(*parent).bytes(name);
            }
            Record::Map {
                ino,
                file_block,
                dev_block,
                len,
                unwritten,
            } => {
                e.u8(5)
                    .u64(*ino)
                    .u64(*file_block)
                    .u64(*dev_block)
                    .u64(*len)
                    .u8(*unwritten as u8);
            }
            Record::Unmap {
                ino,
                file_block,
                len,
            } => {
                e.u8(6).u64(*ino).u64(*file_block).u64(*len);
            }
            Record::XattrSet { ino, name, value } => {
                e.u8(7).u64(*ino).bytes(name).bytes(value);
            }
            Record::XattrRemove { ino, name } => {
                e.u8(8).u64(*ino).bytes(name);
            }
            Record::SymlinkTarget { ino, target } => {
                e.u8(9).u64(*ino).bytes(target);
            }
            Record::NextIno(n) => {
                e.u8(10).u64(*n);
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        self.encode(&mut e);
        e.into_bytes()
    }

    pub fn decode(d: &mut Decoder) -> Result<Self, FormatError> {
        Ok(match d.u8()? {
            1 => Record::Inode(InodeAttrs::decode(d)?),
            2 => Record::DropInode { ino: d.u64()? },
            3 => Record::DirAdd {
                parent: d.u64()?,
                name: d.bytes()?.to_vec(),
                ino: d.u64()?,
            },
            4 => Record::DirRemove {
                parent: d.u64()?,
                name: d.bytes()?.to_vec(),
            },
            5 => Record::Map {
                ino: d.u64()?,
                file_block: d.u64()?,
                dev_block: d.u64()?,
                len: d.u64()?,
                unwritten: match d.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(FormatError::Invalid(WHAT, "bad unwritten flag")),
                },
            },
            6 => Record::Unmap {
                ino: d.u64()?,
                file_block: d.u64()?,
                len: d.u64()?,
            },
            7 => Record::XattrSet {
                ino: d.u64()?,
                name: d.bytes()?.to_vec(),
                value: d.bytes()?.to_vec(),
            },
            8 => Record::XattrRemove {
                ino: d.u64()?,
                name: d.bytes()?.to_vec(),
            },
            9 => Record::SymlinkTarget {
                ino: d.u64()?,
                target: d.bytes()?.to_vec(),
            },
            10 => Record::NextIno(d.u64()?),
            _ => return Err(FormatError::Invalid(WHAT, "unknown record type")),
        })
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, FormatError> {
        let mut d = Decoder::new(b, WHAT);
        let r = Self::decode(&mut d)?;
        if !d.is_empty() {
            return Err(FormatError::Invalid(WHAT, "trailing bytes"));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> InodeAttrs {
        InodeAttrs {
            ino: 5,
            kind: Kind::File,
            perm: 0o4755,
            uid: 1000,
            gid: 100,
            nlink: 1,
            size: 1 << 33,
            atime: Timespec { sec: 1, nsec: 2 },
            mtime: Timespec { sec: 3, nsec: 4 },
            ctime: Timespec { sec: -5, nsec: 6 },
            crtime: Timespec::default(),
            rdev: 0,
            parent: 0,
        }
    }

    #[test]
    fn every_record_round_trips() {
        let recs = vec![
            Record::Inode(attrs()),
            Record::DropInode { ino: 9 },
            Record::DirAdd {
                parent: 1,
                name: b"a".to_vec(),
                ino: 9,
            },
            Record::DirRemove {
                parent: 1,
                name: b"a".to_vec(),
            },
            Record::Map {
                ino: 9,
                file_block: 1,
                dev_block: 2,
                len: 3,
                unwritten: true,
            },
            Record::Unmap {
                ino: 9,
                file_block: 1,
                len: 3,
            },
            Record::XattrSet {
                ino: 9,
                name: b"user.x".to_vec(),
                value: vec![0; 70000],
            },
            Record::XattrRemove {
                ino: 9,
                name: b"user.x".to_vec(),
            },
            Record::SymlinkTarget {
                ino: 9,
                target: b"/t".to_vec(),
            },
            Record::NextIno(77),
        ];
        for r in recs {
            assert_eq!(Record::from_bytes(&r.to_bytes()).unwrap(), r);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Record::from_bytes(&[]).is_err());
        assert!(Record::from_bytes(&[99]).is_err());
        let mut b = Record::Inode(attrs()).to_bytes();
        b.truncate(b.len() - 3);
        assert!(Record::from_bytes(&b).is_err());
        let mut b = Record::DropInode { ino: 1 }.to_bytes();
        b.push(0);
        assert!(Record::from_bytes(&b).is_err());
    }
}
