//! The on-disk format: every byte layout the filesystem writes to its device.
//!
//! Layout, in 4 KiB blocks:
//!
//! ```text
//!  0            superblock (geometry, uuid, crc32c)
//!  1, 2         checkpoint headers A and B (alternate; newest valid wins)
//!  3 .. 3+L     metadata log (checksummed commits appended by fsync/commit)
//!  3+L .. N-1   data area: file extents and checkpoint snapshots
//!  N-1          superblock copy
//! ```
//!
//! A checkpoint is a full snapshot of the metadata ([`Record`]s that rebuild
//! it) stored in data-area extents that the header lists. The log holds the
//! commits appended since that checkpoint, tagged with the checkpoint's
//! sequence number (the log *epoch*) so stale records of an older epoch are
//! never replayed. This module only encodes and decodes; `fs` decides what
//! to write and when.

pub mod codec;
pub mod log;
mod record;

pub use codec::{Decoder, Encoder};
pub use log::{commit_bytes, encode_commit, scan_log, LogScan, COMMIT_HEADER_BYTES};
pub use record::{InodeAttrs, Kind, Record, Timespec};

use thiserror::Error;

pub const BLOCK_SIZE: u64 = 4096;
pub const MAGIC: &[u8; 8] = b"DMABUFFS";
/// Version 2: the log is framed in whole commits ([`log`]); version 1
/// packed single records and could lose committed ones at block edges.
pub const VERSION: u32 = 2;
pub const SUPERBLOCK_BLOCK: u64 = 0;
pub const CHECKPOINT_HEADER_BLOCKS: [u64; 2] = [1, 2];
pub const LOG_START_BLOCK: u64 = 3;
/// Smallest device mkfs accepts: room for the fixed blocks, a small log
/// and some data.
pub const MIN_DEVICE_BLOCKS: u64 = 1024;
pub const ROOT_INO: u64 = 1;
pub const MAX_NAME_LEN: usize = 255;
/// Largest file: 2^63 - 1 bytes would overflow block arithmetic, so cap
/// at 8 EiB / 4 KiB blocks like ext4's 16 TiB limit but wider.
pub const MAX_FILE_SIZE: u64 = 1 << 60;

const CHECKPOINT_MAGIC: &[u8; 8] = b"DMFSCKPT";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("{0} is truncated")]
    Truncated(&'static str),
    #[error("{0} is invalid: {1}")]
    Invalid(&'static str, &'static str),
    #[error("{0} checksum mismatch")]
    Checksum(&'static str),
    #[error("bad magic: not a dmabuf-fs {0}")]
    Magic(&'static str),
    #[error("unsupported format version {0} (this build reads version {VERSION})")]
    Version(u32),
    #[error("format version {0} was written by an older dmabuf-fs whose log can lose committed changes at block edges; this build reads version {VERSION} only: copy the files off with the older build, then mkfs again")]
    OldVersion(u32),
}

pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// A crc32c seeded with a per-filesystem salt, so records and snapshots
/// left on the device by an earlier filesystem never validate.
pub fn salted_crc(salt: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(salt, data)
}

impl Superblock {
    /// The crc seed derived from this filesystem's uuid.
    pub fn salt(&self) -> u32 {
        crc(&self.uuid)
    }
}

/// Device geometry and identity, stored in block 0 and the last block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub features: u64,
    pub total_blocks: u64,
    pub log_blocks: u64,
    pub uuid: [u8; 16],
    pub created: i64,
}

impl Superblock {
    pub fn new(total_blocks: u64, uuid: [u8; 16], created: i64) -> Self {
        // 1/64 of the device, 1 MiB to 64 MiB: big enough that commits
        // rarely force a checkpoint, small enough to replay quickly.
        let log_blocks = (total_blocks / 64).clamp(256, 16384);
        Self {
            version: VERSION,
            features: 0,
            total_blocks,
            log_blocks,
            uuid,
            created,
        }
    }

    pub fn data_start(&self) -> u64 {
        LOG_START_BLOCK + self.log_blocks
    }

    /// One past the last data block (the superblock copy follows).
    pub fn data_end(&self) -> u64 {
        self.total_blocks - 1
    }

    pub fn backup_block(&self) -> u64 {
        self.total_blocks - 1
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::with_capacity(BLOCK_SIZE as usize);
        e.raw(MAGIC)
            .u32(self.version)
            .u32(BLOCK_SIZE as u32)
            .u64(self.features)
            .u64(self.total_blocks)
            .u64(self.log_blocks)
            .raw(&self.uuid)
            .i64(self.created);
        seal_block(e)
    }

    pub fn decode(block: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "superblock";
        if block.len() < BLOCK_SIZE as usize {
            return Err(FormatError::Truncated(WHAT));
        }
        if &block[..8] != MAGIC {
            return Err(FormatError::Magic(WHAT));
        }
        check_block_seal(block, WHAT)?;
        let mut d = Decoder::new(&block[8..], WHAT);
        let version = d.u32()?;
        if version < VERSION {
            return Err(FormatError::OldVersion(version));
        }
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        if d.u32()? as u64 != BLOCK_SIZE {
            return Err(FormatError::Invalid(WHAT, "block size is not 4096"));
        }
        let sb = Self {
            version,
            features: d.u64()?,
            total_blocks: d.u64()?,
            log_blocks: d.u64()?,
            uuid: d.raw(16)?.try_into().unwrap(),
            created: d.i64()?,
        };
        if sb.features != 0 {
            return Err(FormatError::Invalid(WHAT, "unknown feature flags"));
        }
        if sb.total_blocks < MIN_DEVICE_BLOCKS {
            return Err(FormatError::Invalid(
                WHAT,
                "device smaller than the minimum",
            ));
        }
        if sb.log_blocks == 0 || sb.data_start() >= sb.data_end() {
            return Err(FormatError::Invalid(
                WHAT,
                "log region does not fit the device",
            ));
        }
        Ok(sb)
    }
}

/// Points at one checkpoint snapshot: where its bytes are and their crc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointHeader {
    pub seq: u64,
    pub blob_len: u64,
    pub blob_crc: u32,
    /// Records in the snapshot, to sanity-check the decode.
    pub record_count: u64,
    /// (start block, block count) runs holding the snapshot, in order.
    pub extents: Vec<(u64, u64)>,
}

impl CheckpointHeader {
    /// Extent runs that fit in one header block after the fixed fields.
    pub const MAX_EXTENTS: usize = 240;

    pub fn encode(&self) -> Vec<u8> {
        assert!(self.extents.len() <= Self::MAX_EXTENTS);
        let mut e = Encoder::with_capacity(BLOCK_SIZE as usize);
        e.raw(CHECKPOINT_MAGIC)
            .u64(self.seq)
            .u64(self.blob_len)
            .u32(self.blob_crc)
            .u64(self.record_count)
            .u32(self.extents.len() as u32);
        for &(start, len) in &self.extents {
            e.u64(start).u64(len);
        }
        seal_block(e)
    }

    pub fn decode(block: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "checkpoint header";
        if block.len() < BLOCK_SIZE as usize {
            return Err(FormatError::Truncated(WHAT));
        }
        if &block[..8] != CHECKPOINT_MAGIC {
            return Err(FormatError::Magic(WHAT));
        }
        check_block_seal(block, WHAT)?;
        let mut d = Decoder::new(&block[8..], WHAT);
        let seq = d.u64()?;
        let blob_len = d.u64()?;
        let blob_crc = d.u32()?;
        let record_count = d.u64()?;
        let n = d.u32()? as usize;
        if n > Self::MAX_EXTENTS {
            return Err(FormatError::Invalid(WHAT, "too many extents"));
        }
        let mut extents = Vec::with_capacity(n);
        for _ in 0..n {
            extents.push((d.u64()?, d.u64()?));
        }
        let blocks: u64 = extents.iter().map(|e| e.1).sum();
        if blocks.saturating_mul(BLOCK_SIZE) < blob_len {
            return Err(FormatError::Invalid(
                WHAT,
                "extents shorter than the snapshot",
            ));
        }
        Ok(Self {
            seq,
            blob_len,
            blob_crc,
            record_count,
            extents,
        })
    }
}

/// Pads an encoded structure to one block and stores its crc32c in the
/// last four bytes.
fn seal_block(e: Encoder) -> Vec<u8> {
    let mut block = e.into_bytes();
    assert!(block.len() <= BLOCK_SIZE as usize - 4);
    block.resize(BLOCK_SIZE as usize, 0);
    let c = crc(&block[..BLOCK_SIZE as usize - 4]);
    block[BLOCK_SIZE as usize - 4..].copy_from_slice(&c.to_le_bytes());
    block
}

fn check_block_seal(block: &[u8], what: &'static str) -> Result<(), FormatError> {
    let end = BLOCK_SIZE as usize - 4;
    let stored = u32::from_le_bytes(block[end..end + 4].try_into().unwrap());
    if crc(&block[..end]) != stored {
        return Err(FormatError::Checksum(what));
    }
    Ok(())
}

/// Bytes from the start of a device that [`recognise`] looks at.
pub const RECOGNISE_BYTES: usize = 68 * 1024;

/// Names the filesystem or volume whose signature starts `head` (the
/// first [`RECOGNISE_BYTES`] of a device), so mkfs never silently
/// overwrites one.
pub fn recognise(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, sig: &[u8]| head.get(off..off + sig.len()) == Some(sig);
    if at(0, MAGIC) {
        Some("dmabuf-fs")
    } else if at(1080, &[0x53, 0xef]) {
        Some("ext2/3/4")
    } else if at(0, b"XFSB") {
        Some("xfs")
    } else if at(65600, b"_BHRfS_M") {
        Some("btrfs")
    } else if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        Some("swap")
    } else if at(0, b"LUKS\xba\xbe") {
        Some("LUKS")
    } else if at(3, b"NTFS    ") {
        Some("ntfs")
    } else if at(82, b"FAT32   ") || at(54, b"FAT1") {
        Some("vfat")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trip_and_corruption() {
        let sb = Superblock::new(262144, [7; 16], 1234);
        let block = sb.encode();
        assert_eq!(block.len(), 4096);
        assert_eq!(Superblock::decode(&block).unwrap(), sb);
        let mut bad = block.clone();
        bad[40] ^= 1;
        assert_eq!(
            Superblock::decode(&bad),
            Err(FormatError::Checksum("superblock"))
        );
        let mut bad = block.clone();
        bad[0] = b'X';
        assert!(matches!(
            Superblock::decode(&bad),
            Err(FormatError::Magic(_))
        ));
        assert!(Superblock::decode(&block[..100]).is_err());
    }

    #[test]
    fn a_version_1_superblock_gets_a_clear_message() {
        let mut sb = Superblock::new(262144, [7; 16], 1234);
        sb.version = 1;
        let err = Superblock::decode(&sb.encode()).unwrap_err();
        assert_eq!(err, FormatError::OldVersion(1));
        assert!(err.to_string().contains("older dmabuf-fs"), "{err}");
    }

    #[test]
    fn checkpoint_header_round_trip() {
        let h = CheckpointHeader {
            seq: 9,
            blob_len: 5000,
            blob_crc: 42,
            record_count: 3,
            extents: vec![(100, 1), (300, 1)],
        };
        assert_eq!(CheckpointHeader::decode(&h.encode()).unwrap(), h);
        let short = CheckpointHeader {
            extents: vec![(100, 1)],
            ..h
        };
        assert!(CheckpointHeader::decode(&short.encode()).is_err());
    }
}
