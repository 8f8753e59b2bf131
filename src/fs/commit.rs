//! The transaction and commit layer: how changes are queued as records,
//! made durable as one log commit (ordered after the data they point at),
//! checkpointed when the log is full, and what a failed commit means.

use super::*;

impl Fs {
    pub(super) fn writable(&self) -> Result<()> {
        if self.opts.read_only || self.broken.load(Ordering::SeqCst) {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }

    /// Applies a record to the metadata and queues it for the log.
    pub(super) fn log(&self, st: &mut State, rec: Record) {
        let freed = match st.meta.apply(&rec) {
            Ok(f) => f,
            Err(e) => {
                // Live records are built from the state they change.
                error!("internal error applying {rec:?}: {e}");
                return;
            }
        };
        let lsn = self.journal.lock().push(&rec);
        st.pending_free
            .extend(freed.into_iter().map(|(s, l)| (lsn, s, l)));
        if let Record::DropInode { ino } = rec {
            self.discard_cached(st, ino);
        }
    }

    /// Makes every change made so far durable: one log commit holding
    /// every queued operation, written after a flush of the data they
    /// point at and followed by a flush of its own.
    ///
    /// A failed commit breaks the mount: the records it carried are gone
    /// from memory, so every later `commit`/`fsync` reports
    /// [`FsError::CommitFailed`] (EIO) rather than pretending, and every
    /// change gets EROFS. Keeping the records queued for a retry was the
    /// other choice; a device that failed a write or flush is not trusted
    /// with the next one (Linux's errseq rule makes the same promise: once
    /// write-back failed, fsync says so).
    pub fn commit(&self) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let _sync = self.sync_lock.lock();
        self.fail_if_broken()?;
        // Cached writes first (the bulk while writers go on, the rest
        // behind the gate), so the queue holds whole operations only.
        self.write_back_all(true)?;
        let gate = self.cache.gate.write();
        self.write_back_all(false)?;
        let (queued, upto) = {
            // Under the state lock no operation is half-queued.
            let _st = self.state.read();
            let mut j = self.journal.lock();
            (std::mem::take(&mut j.queued), j.next_lsn - 1)
        };
        let dirty = self.data_dirty.swap(false, Ordering::SeqCst);
        if queued.is_empty() {
            if dirty {
                self.dev.flush().inspect_err(|_| self.fail("flush"))?;
            }
            return Ok(());
        }
        let framed = self.journal.lock().frame(&queued);
        let Some(bytes) = framed else {
            // The log is full: a checkpoint covers these records.
            self.journal.lock().queued.splice(0..0, queued);
            return self.checkpoint_locked();
        };
        drop(gate);
        // Ordered mode: the data the records point at goes first.
        self.dev.flush().inspect_err(|_| self.fail("flush"))?;
        let at = self.journal.lock().tail();
        self.dev
            .write_at(at, &bytes)
            .and_then(|_| self.dev.flush())
            .inspect_err(|_| self.fail("log write"))?;
        self.journal.lock().advance(bytes.len() as u64);
        self.release_durable(upto);
        Ok(())
    }

    /// Writes a full snapshot and empties the log.
    pub fn checkpoint(&self) -> Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        let _sync = self.sync_lock.lock();
        self.fail_if_broken()?;
        self.write_back_all(true)?;
        let _gate = self.cache.gate.write();
        self.write_back_all(false)?;
        self.checkpoint_locked()
    }

    pub(super) fn checkpoint_locked(&self) -> Result<()> {
        self.fail_if_broken()?;
        self.dev.flush().inspect_err(|_| self.fail("flush"))?;
        self.data_dirty.store(false, Ordering::SeqCst);
        let (blob, count, extents, upto, seq, salt) = {
            let mut st = self.state.write();
            let (blob, count) = journal::encode_snapshot(&st.meta);
            let blocks = (blob.len() as u64).div_ceil(BS);
            let extents = st.alloc.allocate(blocks, None);
            let got: u64 = extents.iter().map(|e| e.1).sum();
            if got < blocks || extents.len() > format::CheckpointHeader::MAX_EXTENTS {
                for &(s, l) in &extents {
                    st.alloc.release(s, l);
                }
                error!("no room for a checkpoint of {blocks} blocks");
                return Err(FsError::NoSpace);
            }
            let mut j = self.journal.lock();
            let upto = j.next_lsn - 1;
            j.queued.clear();
            (blob, count, extents, upto, j.checkpoint.seq + 1, j.salt)
        };
        let header = match journal::write_checkpoint(
            self.dev.as_ref(),
            salt,
            seq,
            &blob,
            count,
            extents.clone(),
        ) {
            Ok(h) => h,
            Err(e) => {
                self.fail("checkpoint write");
                return Err(e);
            }
        };
        let old = self.journal.lock().restart(header);
        {
            let mut st = self.state.write();
            for (s, l) in old.extents {
                st.alloc.release(s, l);
            }
        }
        self.release_durable(upto);
        self.update_reserve(&mut self.state.write());
        Ok(())
    }

    /// Frees the blocks whose freeing records are now durable.
    pub(super) fn release_durable(&self, upto: u64) {
        let mut st = self.state.write();
        let pending = std::mem::take(&mut st.pending_free);
        for (lsn, s, l) in pending {
            if lsn <= upto {
                st.alloc.release(s, l);
            } else {
                st.pending_free.push((lsn, s, l));
            }
        }
    }

    pub(super) fn update_reserve(&self, st: &mut State) {
        let ckpt_blocks: u64 = self
            .journal
            .lock()
            .checkpoint
            .extents
            .iter()
            .map(|e| e.1)
            .sum();
        let estimate = (st.meta.inodes.len() as u64 * 256).div_ceil(BS);
        st.reserve = 2 * ckpt_blocks.max(estimate) + 64;
    }

    pub(super) fn fail_if_broken(&self) -> Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(FsError::CommitFailed);
        }
        Ok(())
    }

    pub(super) fn fail(&self, what: &str) {
        if !self.broken.swap(true, Ordering::SeqCst) {
            error!("device error during {what}: the filesystem no longer accepts changes (remount after fixing the device)");
        }
    }

    pub(super) fn reclaim_orphans(&self) -> Result<usize> {
        let mut st = self.state.write();
        let orphans: Vec<u64> = st
            .meta
            .inodes
            .values()
            .filter(|i| i.attrs.nlink == 0 && i.open_count == 0)
            .map(|i| i.attrs.ino)
            .collect();
        for &ino in &orphans {
            self.log(&mut st, Record::DropInode { ino });
        }
        Ok(orphans.len())
    }
}
