//! Token quotas: how many live tokens one open file and one user may hold,
//! and how many window bytes one user may have registered (what the
//! kernel backend pins). A root mount is `allow_other`, so without them
//! one user could fill the daemon's fd table or pin memory without bound
//! and lock every other user out.
//!
//! A user's usage is charged at REGISTER and given back when the token
//! dies (UNREGISTER or the last close, once in-flight I/O lets go).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

/// The quota limits of a mount (mount options `token_max_per_file`,
/// `token_max_per_user`, `token_max_pinned`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub tokens_per_file: u32,
    pub tokens_per_user: u32,
    /// Window bytes of one user's live tokens.
    pub pinned_per_user: u64,
}

impl Default for Limits {
    /// Far above what one application needs (a few tokens per file, a
    /// few GiB of staging buffers), far below what takes the daemon down:
    /// a few users at their token limit stay under the fd limit the daemon
    /// raises itself to, and no one user can pin more than half of RAM
    /// (the kernel backend pins memfd windows whole).
    fn default() -> Self {
        Self {
            tokens_per_file: 1024,
            tokens_per_user: 4096,
            pinned_per_user: half_of_ram(),
        }
    }
}

/// Half of the machine's physical memory (4 GiB if it cannot be read).
fn half_of_ram() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        return 4 << 30;
    }
    (pages as u64).saturating_mul(size as u64) / 2
}

/// Which limit a REGISTER ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    FileTokens(u32),
    UserTokens(u32),
    UserPinned(u64),
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exceeded::FileTokens(n) => write!(f, "{n} live tokens per open file"),
            Exceeded::UserTokens(n) => write!(f, "{n} live tokens per user"),
            Exceeded::UserPinned(n) => write!(f, "{n} registered bytes per user"),
        }
    }
}

/// What one user holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub tokens: u32,
    pub pinned: u64,
}

/// Usage per uid, checked against the limits.
pub(super) struct Quotas {
    limits: Limits,
    users: Mutex<HashMap<u32, Usage>>,
}

impl Quotas {
    pub(super) fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            users: Mutex::new(HashMap::new()),
        })
    }

    pub(super) fn limits(&self) -> Limits {
        self.limits
    }

    pub(super) fn usage(&self, uid: u32) -> Usage {
        self.users.lock().get(&uid).copied().unwrap_or_default()
    }

    /// Charges one token of `bytes` to `uid`, or says which limit it hits.
    pub(super) fn charge(self: &Arc<Self>, uid: u32, bytes: u64) -> Result<Charge, Exceeded> {
        let mut users = self.users.lock();
        let u = users.entry(uid).or_default();
        if u.tokens >= self.limits.tokens_per_user {
            return Err(Exceeded::UserTokens(self.limits.tokens_per_user));
        }
        if u.pinned.saturating_add(bytes) > self.limits.pinned_per_user {
            return Err(Exceeded::UserPinned(self.limits.pinned_per_user));
        }
        u.tokens += 1;
        u.pinned += bytes;
        Ok(Charge {
            quotas: self.clone(),
            uid,
            bytes,
        })
    }
}

/// One token's share of its user's quota; given back on drop.
pub(super) struct Charge {
    quotas: Arc<Quotas>,
    uid: u32,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let mut users = self.quotas.users.lock();
        if let Some(u) = users.get_mut(&self.uid) {
            u.tokens -= 1;
            u.pinned -= self.bytes;
            if u.tokens == 0 {
                users.remove(&self.uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_per_user_and_come_back() {
        let q = Quotas::new(Limits {
            tokens_per_file: 10,
            tokens_per_user: 2,
            pinned_per_user: 8192,
        });
        let a1 = q.charge(1000, 4096).unwrap();
        assert_eq!(q.charge(1000, 8192).err(), Some(Exceeded::UserPinned(8192)));
        let a2 = q.charge(1000, 4096).unwrap();
        assert_eq!(q.charge(1000, 0).err(), Some(Exceeded::UserTokens(2)));
        let b = q.charge(2000, 8192).unwrap();
        assert_eq!(
            q.usage(1000),
            Usage {
                tokens: 2,
                pinned: 8192
            }
        );
        drop(a1);
        assert_eq!(q.usage(1000).tokens, 1);
        let _a3 = q.charge(1000, 4096).unwrap();
        drop((a2, b));
        assert_eq!(q.usage(2000), Usage::default());
    }
}
