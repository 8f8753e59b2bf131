//! Test aid: a device wrapper that fails every operation with EIO once a
//! budget of operations is spent (mount option `test_fail_after=N`), to
//! check that device errors reach callers as EIO and never as wrong data.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use super::{BlockDevice, DeviceError, Direction, IoBuffer, IoRange};

pub struct FailingDevice {
    inner: Arc<dyn BlockDevice>,
    /// Operations left before everything fails.
    budget: AtomicI64,
}

impl FailingDevice {
    pub fn new(inner: Arc<dyn BlockDevice>, ops: u64) -> Self {
        Self {
            inner,
            budget: AtomicI64::new(ops.min(i64::MAX as u64) as i64),
        }
    }

    fn spend(&self) -> Result<(), DeviceError> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO).into());
        }
        Ok(())
    }
}

impl BlockDevice for FailingDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn submit(
        &self,
        dir: Direction,
        buf: &IoBuffer<'_>,
        ranges: &[IoRange],
    ) -> Result<(), DeviceError> {
        self.spend()?;
        self.inner.submit(dir, buf, ranges)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.spend()?;
        self.inner.flush()
    }

    fn describe(&self) -> String {
        format!(
            "{} (failing after a budget of operations)",
            self.inner.describe()
        )
    }
}
