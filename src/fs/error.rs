//! Typed errors of the filesystem layer; the FUSE adapter turns them into
//! errnos at its edge.

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
}

impl From<FormatError> for FsError {
    fn from(e: FormatError) -> Self {
        FsError::Corrupt(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, FsError>;
