//! dmabuf-fs: a crash-safe FUSE filesystem on a block device or image
//! file, built so GPU/accelerator buffers and ordinary tools share files.
//!
//! Layers, top to bottom (nothing reaches up):
//! - [`fuse`]: thin adapter from FUSE requests to [`tokens`] and [`fs`]
//!   calls, and their errnos.
//! - [`tokens`]: the dmabuf token registry and token I/O.
//! - [`fs`]: namespace, inodes, extent maps, journal, fsck.
//! - [`blockdev`]: where bytes go (`submit(direction, buffer, ranges)`).
//! - [`format`]: the on-disk byte layouts.
//!
//! [`uapi`] is the ioctl ABI (with its C header `src/uapi/dmabuf_fs.h`),
//! [`client`] the Rust client API over it, and [`cli`] the `dmabuf-fs`
//! command.

pub mod blockdev;
pub mod cli;
pub mod client;
pub mod format;
pub mod fs;
pub mod fuse;
pub mod tokens;
pub mod uapi;
