//! In-memory device for tests: keeps what has been flushed apart from
//! what has only been written, so a test can "crash" it and see exactly
//! what a power cut would leave behind.

use parking_lot::Mutex;

use super::{check_device_range, BlockDevice, DeviceError, Direction, IoBuffer, IoRange};

/// Called at each flush, before it takes effect, with the durable image
/// and the writes the flush is about to make durable: a test's view of
/// the widest crash window.
pub type FlushHook = Box<dyn FnMut(&[u8], &[(u64, Vec<u8>)]) + Send>;

pub struct MemDevice {
    state: Mutex<MemState>,
    flush_hook: Mutex<Option<FlushHook>>,
}

struct MemState {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
    /// Writes since the last flush, in order: (offset, bytes).
    unflushed: Vec<(u64, Vec<u8>)>,
    flushes: u64,
}

impl MemDevice {
    pub fn new(size: u64) -> Self {
        Self::from_bytes(vec![0; size as usize])
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            state: Mutex::new(MemState {
                durable: bytes.clone(),
                current: bytes,
                unflushed: Vec::new(),
                flushes: 0,
            }),
            flush_hook: Mutex::new(None),
        }
    }

    /// Installs (or with None removes) the hook run at every flush.
    pub fn set_flush_hook(&self, hook: Option<FlushHook>) {
        *self.flush_hook.lock() = hook;
    }

    /// The device as a power cut now would leave it: flushed writes, plus
    /// those unflushed writes `keep` says survived.
    pub fn crash_image(&self, mut keep: impl FnMut(usize, u64, usize) -> bool) -> Vec<u8> {
        let s = self.state.lock();
        let mut img = s.durable.clone();
        for (i, (off, data)) in s.unflushed.iter().enumerate() {
            if keep(i, *off, data.len()) {
                img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
        }
        img
    }

    /// Everything written so far, flushed or not.
    pub fn snapshot(&self) -> Vec<u8> {
        self.state.lock().current.clone()
    }

    pub fn unflushed_writes(&self) -> usize {
        self.state.lock().unflushed.len()
    }

    pub fn flush_count(&self) -> u64 {
        self.state.lock().flushes
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.state.lock().current.len() as u64
    }

    fn submit(
        &self,
        dir: Direction,
        buf: &IoBuffer<'_>,
        ranges: &[IoRange],
    ) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        let size = s.current.len() as u64;
        for r in ranges {
            check_device_range(size, r)?;
            let dev = r.dev_offset as usize..r.dev_offset as usize + r.len;
            // Through the buffer's guarded copies: a caller's memory that
            // faults fails this transfer, not the process.
            match dir {
                Direction::Read => buf.copy_in(r.buf_offset, &s.current[dev])?,
                Direction::Write => {
                    let mut src = vec![0u8; r.len];
                    buf.copy_out(r.buf_offset, &mut src)?;
                    s.current[dev].copy_from_slice(&src);
                    s.unflushed.push((r.dev_offset, src));
                }
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        let mut s = self.state.lock();
        if let Some(hook) = self.flush_hook.lock().as_mut() {
            hook(&s.durable, &s.unflushed);
        }
        let writes = std::mem::take(&mut s.unflushed);
        for (off, data) in writes {
            s.durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        s.flushes += 1;
        Ok(())
    }

    fn describe(&self) -> String {
        "memory device".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_only_flushed_writes() {
        let d = MemDevice::new(8192);
        d.write_at(0, b"durable").unwrap();
        d.flush().unwrap();
        d.write_at(4096, b"volatile").unwrap();
        let mut b = [0u8; 8];
        d.read_at(4096, &mut b).unwrap();
        assert_eq!(&b, b"volatile");
        let img = d.crash_image(|_, _, _| false);
        assert_eq!(&img[..7], b"durable");
        assert_eq!(&img[4096..4104], &[0; 8]);
        let img = d.crash_image(|_, _, _| true);
        assert_eq!(&img[4096..4104], b"volatile");
    }
}
