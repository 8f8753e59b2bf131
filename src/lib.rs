//! dmabuf-fs: a crash-safe FUSE filesystem on a block device or image
//! file, built so GPU/accelerator buffers and ordinary tools share files.
//!
//! Layers, top to bottom (nothing reaches up):
//! - [`fuse`]: thin adapter from FUSE requests to [`fs`] calls and errnos.
//! - [`fs`]: namespace, inodes, extent maps, journal, fsck.
//! - [`blockdev`]: where bytes go (`submit(direction, buffer, ranges)`).
//! - [`format`]: the on-disk byte layouts.
//!
//! [`cli`] holds the `dmabuf-fs` command (mkfs, mount, fsck).

pub mod blockdev;
pub mod cli;
pub mod format;
pub mod fs;
pub mod fuse;
