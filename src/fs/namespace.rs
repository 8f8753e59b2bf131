//! Namespace operations: create, mkdir, symlink, link, unlink, rmdir,
//! rename and readdir.

use super::*;

impl Fs {
    pub(super) fn check_name(name: &[u8]) -> Result<()> {
        Self::check_name_len(name)?;
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Err(FsError::Invalid("bad file name"));
        }
        Ok(())
    }

    /// A name longer than NAME_MAX can never exist here: ENAMETOOLONG,
    /// also for the ops that only look a name up (unlink, rename's
    /// source), as on ext4, rather than ENOENT.
    pub(super) fn check_name_len(name: &[u8]) -> Result<()> {
        if name.len() > MAX_NAME_LEN {
            return Err(FsError::NameTooLong);
        }
        Ok(())
    }

    /// Creates an inode of `kind` named `name` in `parent`.
    pub(super) fn create_node(
        &self,
        st: &mut State,
        caller: Caller,
        parent: u64,
        name: &[u8],
        node: NewNode,
    ) -> Result<u64> {
        let NewNode { kind, mode, rdev } = node;
        Self::check_name(name)?;
        let p = st.meta.get(parent).ok_or(FsError::NotFound)?;
        let dir = p.dir.as_ref().ok_or(FsError::NotDir)?;
        if p.attrs.nlink == 0 {
            // Removed while open: nothing can be created in it.
            return Err(FsError::NotFound);
        }
        if dir.get(name).is_some() {
            return Err(FsError::Exists);
        }
        if kind == Kind::Dir && p.attrs.nlink >= MAX_LINKS {
            return Err(FsError::TooManyLinks);
        }
        if st.alloc.free_blocks() <= st.reserve / 2 {
            return Err(FsError::NoSpace);
        }
        let mut perm = (mode & 0o7777) as u16;
        let mut gid = caller.gid;
        let parent_attrs = p.attrs.clone();
        if parent_attrs.perm & libc::S_ISGID as u16 != 0 {
            // BSD group semantics in setgid directories.
            gid = parent_attrs.gid;
            if kind == Kind::Dir {
                perm |= libc::S_ISGID as u16;
            }
        }
        let ino = st.meta.next_ino;
        let now = Timespec::now();
        let attrs = InodeAttrs {
            ino,
            kind,
            perm,
            uid: caller.uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            rdev,
            parent: if kind == Kind::Dir { parent } else { 0 },
        };
        self.log(st, Record::Inode(attrs));
        self.log(
            st,
            Record::DirAdd {
                parent,
                name: name.to_vec(),
                ino,
            },
        );
        let mut pa = parent_attrs;
        if kind == Kind::Dir {
            pa.nlink += 1;
        }
        pa.mtime = now;
        pa.ctime = now;
        self.log(st, Record::Inode(pa));
        Ok(ino)
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> Result<Attr> {
        self.writable()?;
        let kind = Kind::from_mode(mode).ok_or(FsError::Invalid("bad file type"))?;
        if kind == Kind::Dir || kind == Kind::Symlink {
            return Err(FsError::Invalid("mknod of a directory or symlink"));
        }
        let mut st = self.state.write();
        let node = NewNode { kind, mode, rdev };
        let ino = self.create_node(&mut st, caller, parent, name, node)?;
        Ok(self.attr_of(st.meta.get(ino).unwrap()))
    }

    pub fn mkdir(&self, caller: Caller, parent: u64, name: &[u8], mode: u32) -> Result<Attr> {
        self.writable()?;
        let mut st = self.state.write();
        let ino = self.create_node(
            &mut st,
            caller,
            parent,
            name,
            NewNode {
                kind: Kind::Dir,
                mode,
                rdev: 0,
            },
        )?;
        Ok(self.attr_of(st.meta.get(ino).unwrap()))
    }

    pub fn symlink(&self, caller: Caller, parent: u64, name: &[u8], target: &[u8]) -> Result<Attr> {
        self.writable()?;
        if target.is_empty() {
            return Err(FsError::NotFound);
        }
        if target.len() >= BS as usize {
            return Err(FsError::NameTooLong);
        }
        let mut st = self.state.write();
        let ino = self.create_node(
            &mut st,
            caller,
            parent,
            name,
            NewNode {
                kind: Kind::Symlink,
                mode: 0o777,
                rdev: 0,
            },
        )?;
        self.log(
            &mut st,
            Record::SymlinkTarget {
                ino,
                target: target.to_vec(),
            },
        );
        Ok(self.attr_of(st.meta.get(ino).unwrap()))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.state.read();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        if i.attrs.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink"));
        }
        Ok(i.target.clone())
    }

    /// Creates and opens a regular file.
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        readable: bool,
        writable: bool,
    ) -> Result<(Attr, u64)> {
        self.writable()?;
        let mut st = self.state.write();
        let ino = self.create_node(
            &mut st,
            caller,
            parent,
            name,
            NewNode {
                kind: Kind::File,
                mode,
                rdev: 0,
            },
        )?;
        let fh = Self::new_handle(&mut st, ino, readable, writable);
        Ok((self.attr_of(st.meta.get(ino).unwrap()), fh))
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr> {
        self.writable()?;
        Self::check_name(name)?;
        let mut st = self.state.write();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        if i.attrs.kind == Kind::Dir {
            return Err(FsError::NotPermitted);
        }
        if i.attrs.nlink >= MAX_LINKS {
            return Err(FsError::TooManyLinks);
        }
        let mut a = i.attrs.clone();
        let p = st.meta.get(parent).ok_or(FsError::NotFound)?;
        if p.dir.as_ref().ok_or(FsError::NotDir)?.get(name).is_some() {
            return Err(FsError::Exists);
        }
        let mut pa = p.attrs.clone();
        let now = Timespec::now();
        a.nlink += 1;
        a.ctime = now;
        pa.mtime = now;
        pa.ctime = now;
        self.log(&mut st, Record::Inode(a));
        self.log(
            &mut st,
            Record::DirAdd {
                parent,
                name: name.to_vec(),
                ino,
            },
        );
        self.log(&mut st, Record::Inode(pa));
        Ok(self.attr_of(st.meta.get(ino).unwrap()))
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.remove(parent, name, true)
    }

    pub(super) fn remove(&self, parent: u64, name: &[u8], dir: bool) -> Result<()> {
        self.writable()?;
        Self::check_name_len(name)?;
        if name == b"." {
            return Err(FsError::Invalid("cannot remove ."));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        let mut st = self.state.write();
        let ino = Self::child(&st.meta, parent, name)?;
        let kind = st.meta.get(ino).ok_or(FsError::NotFound)?.attrs.kind;
        match (dir, kind == Kind::Dir) {
            (true, false) => return Err(FsError::NotDir),
            (false, true) => return Err(FsError::IsDir),
            _ => {}
        }
        if dir && !st.meta.get(ino).unwrap().dir.as_ref().unwrap().is_empty() {
            return Err(FsError::NotEmpty);
        }
        let now = Timespec::now();
        self.log(
            &mut st,
            Record::DirRemove {
                parent,
                name: name.to_vec(),
            },
        );
        let mut pa = st.meta.get(parent).unwrap().attrs.clone();
        if dir {
            pa.nlink -= 1;
        }
        pa.mtime = now;
        pa.ctime = now;
        self.log(&mut st, Record::Inode(pa));
        self.drop_link(&mut st, ino, now);
        Ok(())
    }

    /// One name of `ino` is gone: lower its link count and destroy it when
    /// nothing refers to it any more.
    pub(super) fn drop_link(&self, st: &mut State, ino: u64, now: Timespec) {
        let i = st.meta.get(ino).unwrap();
        let mut a = i.attrs.clone();
        a.nlink = if a.kind == Kind::Dir {
            0
        } else {
            a.nlink.saturating_sub(1)
        };
        a.ctime = now;
        let open = i.open_count;
        if a.nlink == 0 && open == 0 {
            self.log(st, Record::DropInode { ino });
        } else {
            self.log(st, Record::Inode(a));
        }
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        mode: RenameMode,
    ) -> Result<()> {
        self.rename_as(parent, name, new_parent, new_name, mode, None)
    }

    /// rename(2) with RENAME_WHITEOUT: as [`Fs::rename`] (`noreplace`:
    /// RENAME_NOREPLACE too), and in the same log transaction the source
    /// name becomes a whiteout, a character device 0/0 with mode 0 owned
    /// by `caller`, as overlayfs wants of its upper layer.
    pub fn rename_whiteout(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        noreplace: bool,
    ) -> Result<()> {
        let mode = if noreplace {
            RenameMode::NoReplace
        } else {
            RenameMode::Replace
        };
        self.rename_as(parent, name, new_parent, new_name, mode, Some(caller))
    }

    fn rename_as(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        mode: RenameMode,
        whiteout: Option<Caller>,
    ) -> Result<()> {
        self.writable()?;
        Self::check_name_len(name)?;
        Self::check_name(new_name)?;
        if whiteout.is_some() && mode == RenameMode::Exchange {
            return Err(FsError::Invalid("RENAME_EXCHANGE with RENAME_WHITEOUT"));
        }
        let mut st = self.state.write();
        let src = Self::child(&st.meta, parent, name)?;
        // Everything that can fail is checked before the first record:
        // the whiteout needs an inode, as mknod does.
        if whiteout.is_some() && st.alloc.free_blocks() <= st.reserve / 2 {
            return Err(FsError::NoSpace);
        }
        let np = st.meta.get(new_parent).ok_or(FsError::NotFound)?;
        let dst = np.dir.as_ref().ok_or(FsError::NotDir)?.get(new_name);
        let src_kind = st.meta.get(src).unwrap().attrs.kind;
        if src_kind == Kind::Dir && Self::is_ancestor(&st.meta, src, new_parent) {
            return Err(FsError::Invalid("cannot move a directory into itself"));
        }
        let now = Timespec::now();
        match (mode, dst) {
            (RenameMode::Exchange, None) => return Err(FsError::NotFound),
            (RenameMode::NoReplace, Some(_)) => return Err(FsError::Exists),
            (RenameMode::Exchange, Some(dst)) => {
                let dst_kind = st.meta.get(dst).unwrap().attrs.kind;
                if dst_kind == Kind::Dir && Self::is_ancestor(&st.meta, dst, parent) {
                    return Err(FsError::Invalid("cannot move a directory into itself"));
                }
                self.log(
                    &mut st,
                    Record::DirAdd {
                        parent,
                        name: name.to_vec(),
                        ino: dst,
                    },
                );
                self.log(
                    &mut st,
                    Record::DirAdd {
                        parent: new_parent,
                        name: new_name.to_vec(),
                        ino: src,
                    },
                );
                self.reparent(&mut st, src, parent, new_parent, now);
                self.reparent(&mut st, dst, new_parent, parent, now);
                self.touch_dirs(&mut st, &[parent, new_parent], now);
                return Ok(());
            }
            (_, Some(dst)) if dst == src => return Ok(()),
            (_, Some(dst)) => {
                let d = st.meta.get(dst).unwrap();
                match (src_kind == Kind::Dir, d.attrs.kind == Kind::Dir) {
                    (true, false) => return Err(FsError::NotDir),
                    (false, true) => return Err(FsError::IsDir),
                    (true, true) if !d.dir.as_ref().unwrap().is_empty() => {
                        return Err(FsError::NotEmpty)
                    }
                    _ => {}
                }
                if d.attrs.kind == Kind::Dir {
                    let mut pa = st.meta.get(new_parent).unwrap().attrs.clone();
                    pa.nlink -= 1;
                    self.log(&mut st, Record::Inode(pa));
                }
                self.drop_link(&mut st, dst, now);
            }
            (_, None) => {}
        }
        let position = st
            .meta
            .get(parent)
            .and_then(|p| p.dir.as_ref()?.cookie(name));
        self.log(
            &mut st,
            Record::DirRemove {
                parent,
                name: name.to_vec(),
            },
        );
        self.log(
            &mut st,
            Record::DirAdd {
                parent: new_parent,
                name: new_name.to_vec(),
                ino: src,
            },
        );
        if let (true, Some(cookie)) = (parent == new_parent, position) {
            if let Some(d) = st.meta.get_mut(parent).and_then(|p| p.dir.as_mut()) {
                d.move_to_cookie(new_name, cookie);
            }
        }
        self.reparent(&mut st, src, parent, new_parent, now);
        self.touch_dirs(&mut st, &[parent, new_parent], now);
        if let Some(caller) = whiteout {
            let node = NewNode {
                kind: Kind::CharDev,
                mode: libc::S_IFCHR,
                rdev: 0,
            };
            // Cannot fail: the name was just freed in a live directory
            // and the space was checked above.
            self.create_node(&mut st, caller, parent, name, node)?;
        }
        Ok(())
    }

    /// `ino` moved from directory `from` to `to`: fix a directory's ".."
    /// and the parents' link counts, and touch its ctime.
    pub(super) fn reparent(&self, st: &mut State, ino: u64, from: u64, to: u64, now: Timespec) {
        let mut a = st.meta.get(ino).unwrap().attrs.clone();
        a.ctime = now;
        if a.kind == Kind::Dir && from != to {
            a.parent = to;
            for (dir, delta) in [(from, -1i64), (to, 1)] {
                let mut pa = st.meta.get(dir).unwrap().attrs.clone();
                pa.nlink = (pa.nlink as i64 + delta) as u32;
                self.log(st, Record::Inode(pa));
            }
        }
        self.log(st, Record::Inode(a));
    }

    pub(super) fn touch_dirs(&self, st: &mut State, dirs: &[u64], now: Timespec) {
        for (i, &d) in dirs.iter().enumerate() {
            if dirs[..i].contains(&d) {
                continue;
            }
            if let Some(inode) = st.meta.get(d) {
                let mut a = inode.attrs.clone();
                a.mtime = now;
                a.ctime = now;
                self.log(st, Record::Inode(a));
            }
        }
    }

    /// Whether `dir` is `ino` or below it.
    pub(super) fn is_ancestor(meta: &Meta, ino: u64, mut dir: u64) -> bool {
        // Bounded: mount refuses parent cycles, but never spin on one.
        for _ in 0..=meta.inodes.len() {
            if dir == ino {
                return true;
            }
            if dir == ROOT_INO {
                return false;
            }
            match meta.get(dir) {
                Some(i) if i.attrs.parent != dir => dir = i.attrs.parent,
                _ => return false,
            }
        }
        false
    }

    /// Calls `f` for each entry after `offset` until it returns true
    /// ("buffer full").
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        mut f: impl FnMut(DirEntry<'_>) -> bool,
    ) -> Result<()> {
        let touch = self.list_dir(ino, offset, |e, _| f(e))?;
        if touch {
            self.touch_atime(ino);
        }
        Ok(())
    }

    /// [`Fs::readdir`] with each entry's attributes (READDIRPLUS), taken
    /// under the same hold of the state lock as the entry.
    pub fn readdir_plus(
        &self,
        ino: u64,
        offset: u64,
        mut f: impl FnMut(DirEntry<'_>, &Attr) -> bool,
    ) -> Result<()> {
        // An entry naming no inode (never made by this code) is left out:
        // there are no attributes to give for it.
        let touch = self.list_dir(ino, offset, |e, i| {
            i.is_some_and(|i| f(e, &self.attr_of(i)))
        })?;
        if touch {
            self.touch_atime(ino);
        }
        Ok(())
    }

    /// readdir's walk, handing `f` each entry and its inode; returns
    /// whether the directory's atime is due.
    pub(super) fn list_dir(
        &self,
        ino: u64,
        offset: u64,
        mut f: impl FnMut(DirEntry<'_>, Option<&meta::Inode>) -> bool,
    ) -> Result<bool> {
        let st = self.state.read();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        let d = i.dir.as_ref().ok_or(FsError::NotDir)?;
        let parent = i.attrs.parent;
        let due = self.atime_due(&i.attrs);
        let dot = DirEntry {
            ino,
            offset: 1,
            kind: Kind::Dir,
            name: b".",
        };
        if offset < 1 && f(dot, Some(i)) {
            return Ok(due);
        }
        let dotdot = DirEntry {
            ino: parent,
            offset: 2,
            kind: Kind::Dir,
            name: b"..",
        };
        if offset < 2 && f(dotdot, st.meta.get(parent)) {
            return Ok(due);
        }
        for (&cookie, name) in d.by_cookie.range(offset.max(FIRST_COOKIE - 1) + 1..) {
            let child = d.entries[name].0;
            let c = st.meta.get(child);
            let e = DirEntry {
                ino: child,
                offset: cookie,
                kind: c.map_or(Kind::File, |c| c.attrs.kind),
                name,
            };
            if f(e, c) {
                break;
            }
        }
        Ok(due)
    }

    pub fn statfs(&self) -> StatFs {
        let st = self.state.read();
        let blocks = self.sb.data_end() - self.sb.data_start();
        let held: u64 = st.pending_free.iter().map(|p| p.2).sum();
        let free = (st.alloc.free_blocks() + held).saturating_sub(st.reserve + st.delalloc);
        let used_inodes = st.meta.inodes.len() as u64;
        // Inodes cost memory and checkpoint space, not blocks: report room
        // for as many more as there are free blocks.
        StatFs {
            blocks,
            bfree: free,
            bavail: free,
            files: used_inodes + free,
            ffree: free,
            bsize: BS as u32,
            namelen: MAX_NAME_LEN as u32,
        }
    }
}
