//! The metadata log's framing: commits, the unit a crash keeps or loses.
//!
//! A commit starts on a block boundary with a [`COMMIT_HEADER_BYTES`]-byte
//! header and is followed by its body; the next commit starts on the next
//! block boundary. The header carries the log epoch (the checkpoint it
//! follows), the commit's sequence number within the epoch, the body's
//! length and a crc of the body; the header has its own crc. Both crcs are
//! salted with the filesystem's uuid, so bytes another filesystem left on
//! the device never validate.
//!
//! The body is the records of whole filesystem operations, each record
//! length-prefixed (u32 LE). Replay applies a commit only when its whole
//! body checks out, so an operation's records are applied all or none.
//!
//! One routine frames ([`encode_commit`]) and one reads ([`scan_log`]); the
//! writer, mount and fsck all use them.

use super::{salted_crc, BLOCK_SIZE};

const COMMIT_MAGIC: &[u8; 8] = b"DMFSCMIT";
/// Bytes of a commit header (the body follows it in the same block).
pub const COMMIT_HEADER_BYTES: usize = 64;
/// Bytes the header's crc covers (everything before the crc itself).
const HEADER_CRC_SPAN: usize = 44;

/// Bytes a commit of records with these payload lengths takes in the log,
/// padded to whole blocks.
pub fn commit_bytes(payload_lens: impl IntoIterator<Item = usize>) -> u64 {
    let body: usize = payload_lens.into_iter().map(|l| 4 + l).sum();
    ((COMMIT_HEADER_BYTES + body) as u64).div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

/// Frames one commit of `records` (encoded records, in order), padded with
/// zeros to whole blocks.
pub fn encode_commit(salt: u32, epoch: u64, seq: u64, records: &[Vec<u8>]) -> Vec<u8> {
    let total = commit_bytes(records.iter().map(|r| r.len())) as usize;
    let mut out = Vec::with_capacity(total);
    out.resize(COMMIT_HEADER_BYTES, 0);
    for r in records {
        out.extend_from_slice(&(r.len() as u32).to_le_bytes());
        out.extend_from_slice(r);
    }
    let body_len = (out.len() - COMMIT_HEADER_BYTES) as u64;
    let body_crc = salted_crc(salt, &out[COMMIT_HEADER_BYTES..]);
    let h = &mut out[..COMMIT_HEADER_BYTES];
    h[..8].copy_from_slice(COMMIT_MAGIC);
    h[8..16].copy_from_slice(&epoch.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    h[24..32].copy_from_slice(&body_len.to_le_bytes());
    h[32..36].copy_from_slice(&(records.len() as u32).to_le_bytes());
    h[36..40].copy_from_slice(&body_crc.to_le_bytes());
    // 40..44 reserved (zero).
    let header_crc = salted_crc(salt, &h[..HEADER_CRC_SPAN]);
    h[HEADER_CRC_SPAN..HEADER_CRC_SPAN + 4].copy_from_slice(&header_crc.to_le_bytes());
    out.resize(total, 0);
    out
}

/// A commit header that checks out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    epoch: u64,
    seq: u64,
    body_len: u64,
    records: u32,
    body_crc: u32,
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

fn header_at(region: &[u8], pos: usize, salt: u32) -> Option<Header> {
    let h = region.get(pos..pos + COMMIT_HEADER_BYTES)?;
    if &h[..8] != COMMIT_MAGIC
        || le32(&h[HEADER_CRC_SPAN..]) != salted_crc(salt, &h[..HEADER_CRC_SPAN])
    {
        return None;
    }
    Some(Header {
        epoch: le64(&h[8..]),
        seq: le64(&h[16..]),
        body_len: le64(&h[24..]),
        records: le32(&h[32..]),
        body_crc: le32(&h[36..]),
    })
}

/// Splits a checked body into its records.
fn split_body(body: &[u8], count: u32) -> Option<Vec<&[u8]>> {
    let mut out = Vec::with_capacity(count as usize);
    let mut pos = 0usize;
    while pos < body.len() {
        let len = le32(body.get(pos..pos + 4)?) as usize;
        let rec = body.get(pos + 4..(pos + 4).checked_add(len)?)?;
        out.push(rec);
        pos += 4 + len;
    }
    (out.len() == count as usize).then_some(out)
}

/// What a log region holds for one epoch.
#[derive(Debug, Default)]
pub struct LogScan<'a> {
    /// The valid commits, in order, each as its records.
    pub commits: Vec<Vec<&'a [u8]>>,
    /// Bytes of the region the valid commits take (a block multiple).
    pub used: u64,
    /// The commit after the last valid one was written only in part: what
    /// a crash during a commit leaves, and harmless.
    pub torn_tail: bool,
    /// Something unreadable sits before data that was written later: the
    /// log is damaged, and replaying up to the damage would silently drop
    /// committed changes.
    pub damage: Option<String>,
}

impl LogScan<'_> {
    pub fn records(&self) -> usize {
        self.commits.iter().map(Vec::len).sum()
    }
}

/// Reads the commits of `epoch` from a log region image.
///
/// The log ends at the first block that does not start a valid commit of
/// this epoch with the next sequence number. Only the newest commit can be
/// in flight at a crash (each is flushed before the next is written), so
/// a valid commit of this epoch anywhere after that end means damage in
/// the middle, not a torn tail.
pub fn scan_log(region: &[u8], salt: u32, epoch: u64) -> LogScan<'_> {
    let bs = BLOCK_SIZE as usize;
    let mut scan = LogScan::default();
    let mut pos = 0usize;
    let mut seq = 0u64;
    let mut problem = None;
    while pos + COMMIT_HEADER_BYTES <= region.len() {
        let Some(h) = header_at(region, pos, salt).filter(|h| h.epoch == epoch) else {
            break;
        };
        if h.seq != seq {
            problem = Some(format!(
                "log block {}: commit {} where commit {seq} was expected",
                pos / bs,
                h.seq
            ));
            break;
        }
        let body_start = pos + COMMIT_HEADER_BYTES;
        let Some(body) = usize::try_from(h.body_len)
            .ok()
            .and_then(|l| body_start.checked_add(l))
            .and_then(|end| region.get(body_start..end))
        else {
            problem = Some(format!(
                "log block {}: commit {seq} claims {} bytes, past the end of the log",
                pos / bs,
                h.body_len
            ));
            break;
        };
        if salted_crc(salt, body) != h.body_crc {
            scan.torn_tail = true;
            problem = Some(format!(
                "log block {}: commit {seq} ({} bytes) fails its checksum",
                pos / bs,
                h.body_len
            ));
            break;
        }
        let Some(records) = split_body(body, h.records) else {
            problem = Some(format!(
                "log block {}: commit {seq} passes its checksum but its records do not add up",
                pos / bs
            ));
            break;
        };
        scan.commits.push(records);
        pos = (body_start + body.len()).div_ceil(bs) * bs;
        seq += 1;
    }
    scan.used = pos as u64;
    // Anything of this epoch written after the end? Then the end is damage.
    let later = (pos / bs + 1..region.len() / bs)
        .find_map(|b| header_at(region, b * bs, salt).filter(|h| h.epoch == epoch && h.seq >= seq))
        .map(|h| h.seq);
    match (later, problem) {
        (Some(later), problem) => {
            scan.torn_tail = false;
            scan.damage = Some(format!(
                "{}; commit {later} of the same log follows it",
                problem
                    .unwrap_or_else(|| format!("log block {}: commit {seq} is missing", pos / bs))
            ));
        }
        (None, Some(p)) if !scan.torn_tail => scan.damage = Some(p),
        _ => {}
    }
    scan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SALT: u32 = 0x5a17;

    fn region_of(commits: &[Vec<Vec<u8>>], epoch: u64, blocks: usize) -> Vec<u8> {
        let mut region = Vec::new();
        for (seq, c) in commits.iter().enumerate() {
            region.extend(encode_commit(SALT, epoch, seq as u64, c));
        }
        assert!(region.len() <= blocks * BLOCK_SIZE as usize);
        region.resize(blocks * BLOCK_SIZE as usize, 0);
        region
    }

    fn owned(scan: &LogScan) -> Vec<Vec<Vec<u8>>> {
        scan.commits
            .iter()
            .map(|c| c.iter().map(|r| r.to_vec()).collect())
            .collect()
    }

    #[test]
    fn records_across_block_edges_all_come_back() {
        // The bug this framing replaces: records that straddle a block
        // edge, 30-byte-name creates that fill several blocks.
        let commit: Vec<Vec<u8>> = (0..500u32)
            .map(|i| vec![(i % 251) as u8; 37 + (i as usize % 90)])
            .collect();
        let region = region_of(&[commit.clone(), commit.clone()], 3, 64);
        let scan = scan_log(&region, SALT, 3);
        assert_eq!(owned(&scan), vec![commit.clone(), commit]);
        assert!(scan.damage.is_none() && !scan.torn_tail);
    }

    #[test]
    fn a_commit_of_many_mib_reads_back() {
        let big: Vec<Vec<u8>> = (0..700u32)
            .map(|i| vec![(i % 253) as u8; 4093 + i as usize % 7])
            .collect();
        let region = region_of(&[vec![vec![1u8; 3]], big.clone()], 1, 1024);
        let scan = scan_log(&region, SALT, 1);
        assert_eq!(scan.commits.len(), 2);
        assert_eq!(owned(&scan)[1], big);
        assert!(scan.used > 2 << 20);
    }

    #[test]
    fn a_torn_last_commit_is_dropped_whole_and_silently() {
        let small = vec![vec![1u8; 100]];
        let big: Vec<Vec<u8>> = (0..40).map(|i| vec![i as u8; 1000]).collect();
        let mut region = region_of(&[small.clone(), big], 9, 32);
        // The big commit's third block never reached the device.
        let third = 4096 + 2 * 4096;
        region[third..third + 4096].fill(0);
        let scan = scan_log(&region, SALT, 9);
        assert_eq!(owned(&scan), vec![small]);
        assert!(scan.torn_tail);
        assert!(scan.damage.is_none());
        assert_eq!(scan.used, 4096);
    }

    #[test]
    fn damage_before_a_later_commit_is_reported() {
        let c = |b: u8| vec![vec![b; 5000]];
        let mut region = region_of(&[c(1), c(2), c(3)], 4, 16);
        // Flip a byte in the second commit's body: the third still checks.
        region[2 * 4096 + 300] ^= 1;
        let scan = scan_log(&region, SALT, 4);
        assert_eq!(scan.commits.len(), 1);
        let d = scan.damage.expect("damage must be reported");
        assert!(d.contains("commit 2 of the same log follows"), "{d}");
        // A lost header before a later commit is damage too.
        let mut region = region_of(&[c(1), c(2), c(3)], 4, 16);
        region[2 * 4096..2 * 4096 + 64].fill(0);
        let scan = scan_log(&region, SALT, 4);
        assert!(scan.damage.unwrap().contains("commit 1 is missing"));
    }

    #[test]
    fn other_epochs_and_salts_are_not_this_log() {
        let region = region_of(&[vec![vec![7u8; 10]]], 5, 4);
        assert!(scan_log(&region, SALT, 6).commits.is_empty());
        assert!(scan_log(&region, SALT + 1, 5).commits.is_empty());
        // An older epoch's commits after this epoch's end are no damage.
        let mut region = region_of(&[vec![vec![1u8; 10]]], 6, 8);
        let old = region_of(&[vec![vec![2u8; 10]], vec![vec![3u8; 10]]], 5, 2);
        region[4096..8192].copy_from_slice(&old[4096..8192]);
        let scan = scan_log(&region, SALT, 6);
        assert_eq!(scan.commits.len(), 1);
        assert!(scan.damage.is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Commits of random record sizes (so records start, end and
        /// straddle every position of a block) read back exactly; cutting
        /// the log anywhere inside the last commit drops that commit whole.
        #[test]
        fn frame_and_scan_agree(
            sizes in prop::collection::vec(prop::collection::vec(0usize..6000, 1..40), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let commits: Vec<Vec<Vec<u8>>> = sizes
                .iter()
                .enumerate()
                .map(|(c, lens)| {
                    lens.iter()
                        .enumerate()
                        .map(|(i, &l)| vec![(c * 31 + i) as u8; l])
                        .collect()
                })
                .collect();
            let total: u64 = commits
                .iter()
                .map(|c| commit_bytes(c.iter().map(Vec::len)))
                .sum();
            let blocks = total as usize / 4096 + 2;
            let region = region_of(&commits, 2, blocks);
            let scan = scan_log(&region, SALT, 2);
            prop_assert_eq!(owned(&scan), commits.clone());
            prop_assert_eq!(scan.used, total);
            prop_assert!(scan.damage.is_none());

            // Tear the last commit at a random byte.
            let last = commit_bytes(commits.last().unwrap().iter().map(Vec::len));
            let start = (total - last) as usize;
            let at = start + cut.index(last as usize);
            let mut torn = region.clone();
            torn[at..total as usize].fill(0);
            let scan = scan_log(&torn, SALT, 2);
            let kept = owned(&scan);
            prop_assert!(scan.damage.is_none());
            // Zeroing only padding keeps the commit; otherwise it is gone.
            let whole = kept.len() == commits.len();
            prop_assert_eq!(&kept[..], &commits[..kept.len()]);
            prop_assert!(whole || kept.len() == commits.len() - 1);
        }
    }
}
