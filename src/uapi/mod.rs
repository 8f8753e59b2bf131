//! The token ioctl ABI (version 1), shared by the daemon and clients.
//!
//! These are the Rust twins of `src/uapi/dmabuf_fs.h`; a test compiles a C
//! program against the header and checks every size and offset matches.
//! Structs are decoded from and encoded to the exact bytes the kernel
//! passes through FUSE (`zerocopy`, no unsafe).

use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

pub const ABI_VERSION: u32 = 1;
pub const IOC_MAGIC: u8 = 0xDB;
pub const MAX_BATCH: usize = 128;

pub const BACKEND_MAPPED: u32 = 1;
pub const BACKEND_KERNEL: u32 = 2;

pub const FEAT_BATCH: u64 = 1 << 0;
pub const FEAT_STATS: u64 = 1 << 1;
pub const FEAT_UNALIGNED: u64 = 1 << 2;
pub const FEAT_MEMFD: u64 = 1 << 3;
pub const FEAT_DMABUF: u64 = 1 << 4;
/// STATS reports the mount's token limits, the caller's usage and
/// `detached_ops`.
pub const FEAT_LIMITS: u64 = 1 << 5;

pub const BUF_MEMFD: u32 = 1;
pub const BUF_DMABUF: u32 = 2;

pub const PATH_DIRECT: u32 = 1;
pub const PATH_BOUNCE: u32 = 2;
pub const PATH_KERNEL: u32 = 3;

pub const OP_READ: u32 = 1;
pub const OP_WRITE: u32 = 2;

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Register {
    pub buf_fd: i32,
    pub flags: u32,
    pub buf_offset: u64,
    pub size: u64,
    pub token: u64,
    pub resv: [u64; 4],
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Unregister {
    pub token: u64,
    pub resv: [u64; 3],
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Io {
    pub token: u64,
    pub file_offset: u64,
    pub buf_offset: u64,
    pub len: u64,
    pub flags: u32,
    pub resv0: u32,
    pub transferred: u64,
    pub resv: [u64; 2],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Info {
    pub abi_version: u32,
    pub backend: u32,
    pub fast_align: u32,
    pub max_batch: u32,
    pub features: u64,
    pub max_io: u64,
    pub backend_reason: [u8; 88],
    pub resv: [u64; 1],
}

impl Default for Info {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

impl Info {
    /// The reason text up to its NUL.
    pub fn reason(&self) -> String {
        let end = self
            .backend_reason
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.backend_reason.len());
        String::from_utf8_lossy(&self.backend_reason[..end]).into_owned()
    }

    pub fn set_reason(&mut self, s: &str) {
        let n = s.len().min(self.backend_reason.len() - 1);
        self.backend_reason = [0; 88];
        self.backend_reason[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Counters {
    pub read_ops: u64,
    pub write_ops: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    pub unaligned_ops: u64,
    pub fallback_ops: u64,
    pub kernel_ops: u64,
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Stats {
    pub token: u64,
    pub flags: u32,
    pub live_tokens: u32,
    pub window_size: u64,
    pub buf_kind: u32,
    pub path: u32,
    pub c: Counters,
    /// The mount's limits (FEAT_LIMITS; 0 from older daemons).
    pub max_tokens_per_file: u32,
    pub max_tokens_per_user: u32,
    pub max_pinned_per_user: u64,
    /// The calling user's window bytes and tokens, over all its files.
    pub user_pinned: u64,
    pub user_tokens: u32,
    /// Ops that found the token's kernel registration detached and went
    /// the bounce way (file totals or the token).
    pub detached_ops: u32,
}

impl Stats {
    /// Offset of the first field after the counters (the reserved space
    /// of early ABI v1 daemons); output only, ignored on input.
    pub const LIMITS_OFFSET: usize = 96;
}

#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BatchOp {
    pub token: u64,
    pub file_offset: u64,
    pub buf_offset: u64,
    pub len: u64,
    pub cookie: u64,
    pub op: u32,
    pub flags: u32,
    pub result: i64,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Batch {
    pub count: u32,
    pub flags: u32,
    pub resv: u64,
    pub ops: [BatchOp; MAX_BATCH],
}

impl Default for Batch {
    fn default() -> Self {
        Self::new_zeroed()
    }
}

/// Linux `_IOC` encoding: direction, size, type, number.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((IOC_MAGIC as u32) << 8) | nr
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

pub const IOC_REGISTER: u32 = ioc(IOC_READ | IOC_WRITE, 0x40, size_of::<Register>());
pub const IOC_UNREGISTER: u32 = ioc(IOC_WRITE, 0x41, size_of::<Unregister>());
pub const IOC_READ_CMD: u32 = ioc(IOC_READ | IOC_WRITE, 0x42, size_of::<Io>());
pub const IOC_WRITE_CMD: u32 = ioc(IOC_READ | IOC_WRITE, 0x43, size_of::<Io>());
pub const IOC_INFO: u32 = ioc(IOC_READ, 0x44, size_of::<Info>());
pub const IOC_STATS: u32 = ioc(IOC_READ | IOC_WRITE, 0x45, size_of::<Stats>());
pub const IOC_BATCH: u32 = ioc(IOC_READ | IOC_WRITE, 0x46, size_of::<Batch>());

/// A decoded ioctl request: which command, with its input struct.
#[derive(Debug, Clone)]
pub enum Request {
    Register(Register),
    Unregister(Unregister),
    Read(Io),
    Write(Io),
    Info,
    Stats(Stats),
    Batch(Box<Batch>),
}

/// Why an ioctl could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Not one of ours (ENOTTY).
    UnknownCommand,
    /// Ours, but the input is not the size the command says (EINVAL).
    BadSize,
}

/// Decodes a restricted FUSE ioctl: `cmd` and the bytes the kernel copied
/// in (their size comes from the `_IOC` encoding of `cmd`).
pub fn decode(cmd: u32, input: &[u8]) -> Result<Request, DecodeError> {
    fn read<T: FromBytes>(input: &[u8]) -> Result<T, DecodeError> {
        T::read_from_bytes(input).map_err(|_| DecodeError::BadSize)
    }
    Ok(match cmd {
        IOC_REGISTER => Request::Register(read(input)?),
        IOC_UNREGISTER => Request::Unregister(read(input)?),
        IOC_READ_CMD => Request::Read(read(input)?),
        IOC_WRITE_CMD => Request::Write(read(input)?),
        IOC_INFO => Request::Info,
        IOC_STATS => Request::Stats(read(input)?),
        IOC_BATCH => {
            let mut b = Box::<Batch>::default();
            b.as_mut_bytes().copy_from_slice(
                input
                    .get(..size_of::<Batch>())
                    .ok_or(DecodeError::BadSize)?,
            );
            if input.len() != size_of::<Batch>() {
                return Err(DecodeError::BadSize);
            }
            Request::Batch(b)
        }
        _ => return Err(DecodeError::UnknownCommand),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_numbers_match_the_header() {
        assert_eq!(size_of::<Register>(), 64);
        assert_eq!(size_of::<Unregister>(), 32);
        assert_eq!(size_of::<Io>(), 64);
        assert_eq!(size_of::<Info>(), 128);
        assert_eq!(size_of::<Counters>(), 64);
        assert_eq!(size_of::<Stats>(), 128);
        assert_eq!(
            std::mem::offset_of!(Stats, max_tokens_per_file),
            Stats::LIMITS_OFFSET
        );
        assert_eq!(size_of::<BatchOp>(), 56);
        assert_eq!(size_of::<Batch>(), 16 + 56 * MAX_BATCH);
        // _IOWR(0xDB, 0x40, 64 bytes)
        assert_eq!(IOC_REGISTER, 0xC040_DB40);
        assert_eq!(IOC_UNREGISTER, 0x4020_DB41);
    }

    #[test]
    fn decode_checks_command_and_size() {
        let r = Register {
            buf_fd: 3,
            size: 4096,
            ..Default::default()
        };
        match decode(IOC_REGISTER, r.as_bytes()).unwrap() {
            Request::Register(x) => assert_eq!(x.buf_fd, 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode(IOC_REGISTER, &r.as_bytes()[..10]).unwrap_err(),
            DecodeError::BadSize
        );
        assert_eq!(
            decode(0x1234, &[]).unwrap_err(),
            DecodeError::UnknownCommand
        );
        let b = Batch::default();
        assert!(matches!(
            decode(IOC_BATCH, b.as_bytes()),
            Ok(Request::Batch(_))
        ));
        assert!(decode(IOC_BATCH, &b.as_bytes()[1..]).is_err());
    }
}
