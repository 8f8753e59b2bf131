//! Test aid: a device wrapper that records every write (offset and bytes)
//! and every flush, in order, so a crash-state explorer can rebuild the
//! device as any power cut during the run could have left it.
//!
//! The device contract has no FUA writes; a flush is the only durability
//! point, so the log of writes and flushes is the whole story.

use std::sync::Arc;

use parking_lot::Mutex;

use super::{BlockDevice, DeviceError, Direction, IoBuffer, IoRange};

/// One device operation that changes what a crash leaves.
#[derive(Debug, Clone)]
pub enum Event {
    Write { at: u64, data: Vec<u8> },
    Flush,
}

pub struct RecordingDevice {
    inner: Arc<dyn BlockDevice>,
    events: Mutex<Vec<Event>>,
}

impl RecordingDevice {
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        Self {
            inner,
            events: Mutex::new(Vec::new()),
        }
    }

    /// How many events are recorded so far (a position in the log).
    pub fn position(&self) -> usize {
        self.events.lock().len()
    }

    /// The events recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().clone()
    }
}

impl BlockDevice for RecordingDevice {
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
        // Held across the write so the log's order is the device's order.
        let mut events = self.events.lock();
        self.inner.submit(dir, buf, ranges)?;
        for r in ranges {
            let mut data = vec![0u8; r.len];
            buf.copy_out(r.buf_offset, &mut data)?;
            events.push(Event::Write {
                at: r.dev_offset,
                data,
            });
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        let mut events = self.events.lock();
        self.inner.flush()?;
        events.push(Event::Flush);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("{} (recording writes and flushes)", self.inner.describe())
    }
}
