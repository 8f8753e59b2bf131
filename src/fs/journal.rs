//! Durability: checkpoints and the metadata log on the device.
//!
//! Live changes are applied to [`Meta`] and their records queued here;
//! a commit frames the whole queue as one log commit (see
//! [`crate::format::log`]), writes it and flushes, so a crash keeps every
//! operation of a commit or none. When the log is full, a checkpoint
//! writes a whole snapshot to free data blocks and points the older header
//! slot at it, which empties the log and starts a new epoch.

use crate::blockdev::{AlignedBuf, BlockDevice};
use crate::format::{
    encode_commit, salted_crc, scan_log, CheckpointHeader, Decoder, Encoder, Record, Superblock,
    BLOCK_SIZE, CHECKPOINT_HEADER_BLOCKS, LOG_START_BLOCK,
};

use super::error::{FsError, Result};
use super::meta::Meta;

/// Records applied in memory but not yet on the device, and where the log
/// stands.
pub struct Journal {
    pub salt: u32,
    pub log_blocks: u64,
    /// Sequence number of the current checkpoint = epoch of the log.
    pub epoch: u64,
    /// Bytes of the log region in use (always a whole number of blocks).
    pub log_used: u64,
    /// Sequence number of the next commit within the epoch.
    pub next_commit: u64,
    /// Encoded records not yet written, whole operations only whenever
    /// the state lock is free (an operation queues all of its records
    /// under one hold of it).
    pub queued: Vec<Vec<u8>>,
    /// Global sequence number of the next record queued; records up to
    /// `next_lsn - 1` are in the queue or already durable.
    pub next_lsn: u64,
    /// The current checkpoint (its blocks are in use).
    pub checkpoint: CheckpointHeader,
}

impl Journal {
    pub fn new(sb: &Superblock, checkpoint: CheckpointHeader) -> Self {
        Self {
            salt: sb.salt(),
            log_blocks: sb.log_blocks,
            epoch: checkpoint.seq,
            log_used: 0,
            next_commit: 0,
            queued: Vec::new(),
            next_lsn: 1,
            checkpoint,
        }
    }

    /// Queues a record; returns its global lsn.
    pub fn push(&mut self, rec: &Record) -> u64 {
        let lsn = self.next_lsn;
        self.next_lsn += 1;
        self.queued.push(rec.to_bytes());
        lsn
    }

    /// Frames `records` as the next commit, or None if it does not fit in
    /// what is left of the log region.
    pub fn frame(&self, records: &[Vec<u8>]) -> Option<Vec<u8>> {
        let framed = encode_commit(self.salt, self.epoch, self.next_commit, records);
        (self.log_used + framed.len() as u64 <= self.log_blocks * BLOCK_SIZE).then_some(framed)
    }

    /// Byte offset on the device where the next commit goes.
    pub fn tail(&self) -> u64 {
        LOG_START_BLOCK * BLOCK_SIZE + self.log_used
    }

    /// Notes that a framed commit of `bytes` is durable.
    pub fn advance(&mut self, bytes: u64) {
        self.log_used += bytes;
        self.next_commit += 1;
    }

    /// Starts the log of a new checkpoint.
    pub fn restart(&mut self, checkpoint: CheckpointHeader) -> CheckpointHeader {
        self.epoch = checkpoint.seq;
        self.log_used = 0;
        self.next_commit = 0;
        std::mem::replace(&mut self.checkpoint, checkpoint)
    }
}

/// Serialises a snapshot of `meta`: record count, then each record
/// length-prefixed. Returns the bytes and the record count.
pub fn encode_snapshot(meta: &Meta) -> (Vec<u8>, u64) {
    let mut e = Encoder::with_capacity(meta.inodes.len() * 192 + 64);
    e.u64(0); // count, patched below
    let mut count = 0u64;
    let mut one = Encoder::new();
    meta.each_snapshot_record(|r| {
        one = Encoder::with_capacity(64);
        r.encode(&mut one);
        e.bytes(one.as_bytes());
        count += 1;
    });
    let mut blob = e.into_bytes();
    blob[..8].copy_from_slice(&count.to_le_bytes());
    (blob, count)
}

/// Writes a snapshot into `extents` and the header into slot `seq % 2`,
/// flushing before and after the header so it never points at bytes that
/// are not on the device.
pub fn write_checkpoint(
    dev: &dyn BlockDevice,
    salt: u32,
    seq: u64,
    blob: &[u8],
    record_count: u64,
    extents: Vec<(u64, u64)>,
) -> Result<CheckpointHeader> {
    let mut padded = blob.to_vec();
    padded.resize(
        (blob.len() as u64).div_ceil(BLOCK_SIZE) as usize * BLOCK_SIZE as usize,
        0,
    );
    let mut off = 0usize;
    for &(start, len) in &extents {
        let bytes = (len * BLOCK_SIZE) as usize;
        let end = (off + bytes).min(padded.len());
        if off < end {
            dev.write_at(start * BLOCK_SIZE, &padded[off..end])?;
        }
        off = end;
    }
    dev.flush()?;
    let header = CheckpointHeader {
        seq,
        blob_len: blob.len() as u64,
        blob_crc: salted_crc(salt, blob),
        record_count,
        extents,
    };
    let slot = CHECKPOINT_HEADER_BLOCKS[(seq % 2) as usize];
    dev.write_at(slot * BLOCK_SIZE, &header.encode())?;
    dev.flush()?;
    Ok(header)
}

/// What mount found on the device.
pub struct Loaded {
    pub meta: Meta,
    pub checkpoint: CheckpointHeader,
    /// Log records replayed on top of the checkpoint.
    pub replayed: usize,
    /// The newest log commit was written only in part (a crash during a
    /// commit; its operations were not durable yet and are dropped whole).
    pub torn_tail: bool,
    /// Why other checkpoint slots were not used, and what a salvaging
    /// load dropped (for fsck and logs).
    pub skipped: Vec<String>,
    /// A salvaging load dropped damaged metadata.
    pub salvaged: bool,
}

/// Loads the newest valid checkpoint and replays its log.
///
/// A checkpoint header that fails its checksum is a torn header write: the
/// older checkpoint and its log are then intact and used. A header that
/// checks out but points at an unreadable snapshot is damage: the older
/// checkpoint's log has been reused since, so falling back to it would
/// silently lose changes. That is refused unless `fall_back` (fsck
/// --repair) asks for the older checkpoint anyway.
pub fn load(dev: &dyn BlockDevice, sb: &Superblock, fall_back: bool) -> Result<Loaded> {
    let salt = sb.salt();
    let mut headers = Vec::new();
    let mut skipped = Vec::new();
    for (i, &blk) in CHECKPOINT_HEADER_BLOCKS.iter().enumerate() {
        let mut b = vec![0u8; BLOCK_SIZE as usize];
        dev.read_at(blk * BLOCK_SIZE, &mut b)?;
        match CheckpointHeader::decode(&b) {
            Ok(h) => headers.push(h),
            Err(e) => skipped.push(format!("checkpoint slot {}: {e}", i)),
        }
    }
    headers.sort_by_key(|h| std::cmp::Reverse(h.seq));
    let mut salvaged = false;
    for h in headers {
        match load_snapshot(dev, sb, salt, &h) {
            Ok(mut meta) => {
                let (replayed, torn_tail, damaged) =
                    replay_log(dev, sb, salt, h.seq, &mut meta, fall_back, &mut skipped)?;
                salvaged |= damaged;
                return Ok(Loaded {
                    meta,
                    checkpoint: h,
                    replayed,
                    torn_tail,
                    salvaged,
                    skipped,
                });
            }
            Err(e) if fall_back => {
                salvaged = true;
                skipped.push(format!(
                    "checkpoint {}: {e}; fell back to the older checkpoint (changes after it are lost)",
                    h.seq
                ))
            }
            Err(e) => {
                return Err(FsError::Corrupt(format!(
                    "checkpoint {}: {e}; the older checkpoint's log has been reused since, \
                     so mounting it would silently lose changes (`dmabuf-fs fsck --repair` \
                     falls back to it)",
                    h.seq
                )))
            }
        }
    }
    Err(FsError::Corrupt(format!(
        "no valid checkpoint ({})",
        skipped.join("; ")
    )))
}

fn load_snapshot(
    dev: &dyn BlockDevice,
    sb: &Superblock,
    salt: u32,
    h: &CheckpointHeader,
) -> Result<Meta> {
    let mut blob = Vec::with_capacity(h.blob_len as usize);
    for &(start, len) in &h.extents {
        if start < sb.data_start() || start.saturating_add(len) > sb.data_end() {
            return Err(FsError::Corrupt(format!(
                "snapshot extent {start}+{len} lies outside the data area"
            )));
        }
        let want = (h.blob_len as usize - blob.len()).min((len * BLOCK_SIZE) as usize);
        if want == 0 {
            break;
        }
        let mut chunk = vec![0u8; want.div_ceil(BLOCK_SIZE as usize) * BLOCK_SIZE as usize];
        dev.read_at(start * BLOCK_SIZE, &mut chunk)?;
        blob.extend_from_slice(&chunk[..want]);
    }
    if blob.len() as u64 != h.blob_len || salted_crc(salt, &blob) != h.blob_crc {
        return Err(FsError::Corrupt("snapshot checksum mismatch".into()));
    }
    let mut d = Decoder::new(&blob, "checkpoint snapshot");
    let n = d.count(4)?;
    if n as u64 != h.record_count {
        return Err(FsError::Corrupt("snapshot record count mismatch".into()));
    }
    let mut meta = Meta::default();
    for _ in 0..n {
        let rec = Record::from_bytes(d.bytes()?)?;
        meta.apply(&rec)
            .map_err(|e| FsError::Corrupt(format!("snapshot: {e}")))?;
    }
    Ok(meta)
}

fn replay_log(
    dev: &dyn BlockDevice,
    sb: &Superblock,
    salt: u32,
    epoch: u64,
    meta: &mut Meta,
    salvage: bool,
    notes: &mut Vec<String>,
) -> Result<(usize, bool, bool)> {
    let mut region = AlignedBuf::new((sb.log_blocks * BLOCK_SIZE) as usize);
    dev.read_at(LOG_START_BLOCK * BLOCK_SIZE, &mut region)?;
    let scan = scan_log(&region, salt, epoch);
    if let Some(damage) = &scan.damage {
        let what = format!("the log after checkpoint {epoch} is damaged: {damage}");
        if !salvage {
            return Err(FsError::Corrupt(format!(
                "{what} (`dmabuf-fs fsck --repair` keeps the commits before the damage)"
            )));
        }
        notes.push(format!(
            "{what}; salvaged the {} commit(s) before it",
            scan.commits.len()
        ));
    }
    for commit in &scan.commits {
        for p in commit {
            let rec = Record::from_bytes(p)?;
            meta.apply(&rec)
                .map_err(|e| FsError::Corrupt(format!("log replay: {e}")))?;
        }
    }
    Ok((scan.records(), scan.torn_tail, scan.damage.is_some()))
}
