//! Extended attributes.

use super::*;

impl Fs {
    pub(super) fn check_xattr_name(kind: Kind, name: &[u8]) -> Result<()> {
        if name.is_empty() || name.len() > 255 {
            return Err(FsError::Invalid("bad attribute name"));
        }
        if name.starts_with(b"user.") {
            // Linux allows user.* only on regular files and directories.
            if !matches!(kind, Kind::File | Kind::Dir) {
                return Err(FsError::NotPermitted);
            }
            return Ok(());
        }
        if name.starts_with(b"trusted.") || name.starts_with(b"security.") {
            return Ok(());
        }
        Err(FsError::NotSupported)
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], mode: XattrMode) -> Result<()> {
        self.writable()?;
        if value.len() > MAX_XATTR_VALUE {
            return Err(FsError::AttrTooBig);
        }
        let mut st = self.state.write();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        Self::check_xattr_name(i.attrs.kind, name)?;
        let exists = i.xattrs.contains_key(name);
        match (mode, exists) {
            (XattrMode::Create, true) => return Err(FsError::Exists),
            (XattrMode::Replace, false) => return Err(FsError::NoAttr),
            _ => {}
        }
        let mut a = i.attrs.clone();
        a.ctime = Timespec::now();
        self.log(
            &mut st,
            Record::XattrSet {
                ino,
                name: name.to_vec(),
                value: value.to_vec(),
            },
        );
        self.log(&mut st, Record::Inode(a));
        Ok(())
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let st = self.state.read();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        if !(name.starts_with(b"user.")
            || name.starts_with(b"trusted.")
            || name.starts_with(b"security."))
        {
            return Err(FsError::NotSupported);
        }
        i.xattrs.get(name).cloned().ok_or(FsError::NoAttr)
    }

    /// Attribute names, each NUL-terminated, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let st = self.state.read();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        let mut out = Vec::new();
        for name in i.xattrs.keys() {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.writable()?;
        let mut st = self.state.write();
        let i = st.meta.get(ino).ok_or(FsError::NotFound)?;
        Self::check_xattr_name(i.attrs.kind, name)?;
        if !i.xattrs.contains_key(name) {
            return Err(FsError::NoAttr);
        }
        let mut a = i.attrs.clone();
        a.ctime = Timespec::now();
        self.log(
            &mut st,
            Record::XattrRemove {
                ino,
                name: name.to_vec(),
            },
        );
        self.log(&mut st, Record::Inode(a));
        Ok(())
    }
}
