//! The open-handle table: open, the handle lookup the token layer uses,
//! release (which reclaims unlinked files on their last close).

use super::*;

impl Fs {
    pub(super) fn new_handle(st: &mut State, ino: u64, readable: bool, writable: bool) -> u64 {
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(
            fh,
            OpenFile {
                ino,
                readable,
                writable,
            },
        );
        st.meta.get_mut(ino).unwrap().open_count += 1;
        fh
    }

    /// Whether the next read of `ino` should update its atime (by the
    /// mount's atime mode).
    pub fn read_updates_atime(&self, ino: u64) -> bool {
        let st = self.state.read();
        st.meta
            .get(ino)
            .is_some_and(|i| match self.with_cached_writes(&i.attrs) {
                Some((a, _)) => self.atime_due(&a),
                None => self.atime_due(&i.attrs),
            })
    }

    /// Opens `ino` (a file or a directory); returns the handle.
    pub fn open(&self, ino: u64, readable: bool, writable: bool) -> Result<u64> {
        if writable {
            self.writable()?;
        }
        let mut st = self.state.write();
        let attrs = &st.meta.get(ino).ok_or(FsError::NotFound)?.attrs;
        if attrs.kind == Kind::Dir && writable {
            return Err(FsError::IsDir);
        }
        Ok(Self::new_handle(&mut st, ino, readable, writable))
    }

    pub fn handle(&self, fh: u64) -> Result<OpenFile> {
        self.state
            .read()
            .handles
            .get(&fh)
            .copied()
            .ok_or(FsError::BadHandle)
    }

    /// The last close of an open file: an unlinked inode dies here.
    pub fn release(&self, fh: u64) -> Result<()> {
        let mut st = self.state.write();
        let of = st.handles.remove(&fh).ok_or(FsError::BadHandle)?;
        let Some(i) = st.meta.get_mut(of.ino) else {
            return Ok(());
        };
        i.open_count -= 1;
        if i.open_count == 0 && i.attrs.nlink == 0 && !self.opts.read_only {
            self.log(&mut st, Record::DropInode { ino: of.ino });
        }
        Ok(())
    }
}
