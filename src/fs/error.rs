//! Typed errors of the filesystem layer, and the errno each one means.
//!
//! The mapping lives here, beside the type, because two edges need it:
//! the FUSE adapter's replies and the per-op results of a token BATCH.

use thiserror::Error;

use crate::blockdev::DeviceError;
use crate::format::FormatError;

#[derive(Debug, Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("no space left on device")]
    NoSpace,
    #[error("file name too long")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("file too large")]
    FileTooBig,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("no such attribute")]
    NoAttr,
    #[error("attribute value too large")]
    AttrTooBig,
    #[error("operation not supported")]
    NotSupported,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("bad file handle")]
    BadHandle,
    #[error("offset beyond the data")]
    NoData,
    #[error("too many links")]
    TooManyLinks,
    #[error("device I/O failed: {0}")]
    Io(#[from] DeviceError),
    #[error("corrupt filesystem: {0}")]
    Corrupt(String),
    /// An earlier commit failed: what it carried is lost, the mount takes
    /// no more changes, and every later fsync says so.
    #[error("an earlier commit failed: changes since the last good commit are lost")]
    CommitFailed,
}

impl FsError {
    /// The errno a caller sees for this error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NoSpace => libc::ENOSPC,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::FileTooBig => libc::EFBIG,
            FsError::ReadOnly => libc::EROFS,
            FsError::NoAttr => libc::ENODATA,
            FsError::AttrTooBig => libc::E2BIG,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::NotPermitted => libc::EPERM,
            FsError::BadHandle => libc::EBADF,
            FsError::NoData => libc::ENXIO,
            FsError::TooManyLinks => libc::EMLINK,
            // The caller's own memory faulted, or no bounce memory: that
            // caller's problem, not the device's.
            FsError::Io(DeviceError::Fault) => libc::EFAULT,
            FsError::Io(DeviceError::NoMemory) => libc::ENOMEM,
            // As the kernel series answers I/O it cannot do on a dmabuf.
            FsError::Io(DeviceError::NoCpuAccess) => libc::EINVAL,
            // Device failures and corruption found while serving: never
            // wrong data, always EIO.
            FsError::Io(_) | FsError::Corrupt(_) | FsError::CommitFailed => libc::EIO,
        }
    }
}

impl From<FormatError> for FsError {
    fn from(e: FormatError) -> Self {
        FsError::Corrupt(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, FsError>;
