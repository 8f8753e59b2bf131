//! A device for tests that holds transfers of one direction, while armed,
//! until the test releases them: a device stuck in the middle of an
//! operation, to look at the filesystem meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::{BlockDevice, DeviceError, Direction, IoBuffer, IoRange};

pub struct HoldDevice {
    inner: Arc<dyn BlockDevice>,
    armed: AtomicBool,
    dir: Mutex<Option<Direction>>,
    /// (a transfer is being held, released)
    gate: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl HoldDevice {
    pub fn new(inner: Arc<dyn BlockDevice>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            armed: AtomicBool::new(false),
            dir: Mutex::new(None),
            gate: Mutex::new((false, true)),
            changed: Condvar::new(),
        })
    }

    /// From now on, transfers in `dir` wait for [`Self::release`].
    pub fn arm(&self, dir: Direction) {
        *self.dir.lock() = Some(dir);
        *self.gate.lock() = (false, false);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Whether a transfer got held within `timeout`.
    pub fn wait_held(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.gate.lock();
        while !g.0 {
            if self.changed.wait_until(&mut g, deadline).timed_out() {
                return false;
            }
        }
        true
    }

    /// Lets held (and later) transfers through, and disarms.
    pub fn release(&self) {
        self.armed.store(false, Ordering::SeqCst);
        *self.gate.lock() = (false, true);
        self.changed.notify_all();
    }
}

impl BlockDevice for HoldDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn submit(
        &self,
        dir: Direction,
        buf: &IoBuffer<'_>,
        ranges: &[IoRange],
    ) -> Result<(), DeviceError> {
        if self.armed.load(Ordering::SeqCst) && *self.dir.lock() == Some(dir) {
            let mut g = self.gate.lock();
            g.0 = true;
            self.changed.notify_all();
            while !g.1 {
                self.changed.wait(&mut g);
            }
        }
        self.inner.submit(dir, buf, ranges)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }

    fn describe(&self) -> String {
        "held memory device".into()
    }
}
