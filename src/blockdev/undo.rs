//! Test aid: a device wrapper that keeps an undo log of every write since
//! the last flush, in a side file that survives the daemon being killed.
//!
//! Crash tests mount with `-o test_undo_log=FILE`, SIGKILL the daemon at a
//! chosen point, then [`revert`] the log onto the image: what is left is
//! exactly the device as a power cut would leave it (every write issued
//! after the last flush lost, or the last one torn at a sector boundary).
//! Never used outside tests: it serialises writes and doubles their cost.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use std::sync::Arc;

use parking_lot::Mutex;

use super::{BlockDevice, DeviceError, Direction, IoBuffer, IoRange};

const MAGIC: u32 = 0x554E_444F; // "UNDO"

pub struct UndoDevice {
    inner: Arc<dyn BlockDevice>,
    log: Mutex<File>,
}

impl UndoDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, log_path: &Path) -> std::io::Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(log_path)?;
        Ok(Self {
            inner,
            log: Mutex::new(log),
        })
    }
}

impl BlockDevice for UndoDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn submit(
        &self,
        dir: Direction,
        buf: &IoBuffer<'_>,
        ranges: &[IoRange],
    ) -> Result<(), DeviceError> {
        if dir == Direction::Read {
            return self.inner.submit(dir, buf, ranges);
        }
        let mut log = self.log.lock();
        for r in ranges {
            let mut old = vec![0u8; r.len];
            self.inner.read_at(r.dev_offset, &mut old)?;
            let mut rec = Vec::with_capacity(16 + r.len);
            rec.extend_from_slice(&MAGIC.to_le_bytes());
            rec.extend_from_slice(&r.dev_offset.to_le_bytes());
            rec.extend_from_slice(&(r.len as u32).to_le_bytes());
            rec.extend_from_slice(&old);
            log.write_all(&rec)?;
            self.inner.submit(dir, buf, std::slice::from_ref(r))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        let mut log = self.log.lock();
        self.inner.flush()?;
        log.set_len(0)?;
        log.seek(SeekFrom::Start(0))?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "{} (with an undo log for crash tests)",
            self.inner.describe()
        )
    }
}

/// How much of the unflushed writes a simulated power cut loses.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    /// Every write since the last flush is lost.
    All,
    /// As All, but the last write made it to the device for its first
    /// `sectors` 512-byte sectors (a torn write).
    TornLast { sectors: usize },
}

/// Applies an undo log to `image`; returns how many writes were undone.
pub fn revert(image: &Path, log: &Path, cut: Cut) -> std::io::Result<usize> {
    let mut bytes = Vec::new();
    File::open(log)?.read_to_end(&mut bytes)?;
    let mut entries = Vec::new();
    let mut pos = 0usize;
    while pos + 16 <= bytes.len() {
        let magic = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap());
        let off = u64::from_le_bytes(bytes[pos + 4..pos + 12].try_into().unwrap());
        let len = u32::from_le_bytes(bytes[pos + 12..pos + 16].try_into().unwrap()) as usize;
        if magic != MAGIC || pos + 16 + len > bytes.len() {
            break; // the kill landed while this entry was being logged
        }
        entries.push((off, pos + 16, len));
        pos += 16 + len;
    }
    let img = OpenOptions::new().write(true).open(image)?;
    let n = entries.len();
    for (i, &(off, at, len)) in entries.iter().enumerate().rev() {
        let mut old = &bytes[at..at + len];
        let mut off = off;
        if let (Cut::TornLast { sectors }, true) = (cut, i + 1 == n) {
            let keep = (sectors * 512).min(len);
            old = &old[keep..];
            off += keep as u64;
        }
        img.write_all_at(old, off)?;
    }
    img.sync_all()?;
    Ok(n)
}
