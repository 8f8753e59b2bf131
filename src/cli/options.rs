//! Parsing of sizes and of `-o` mount option strings.

use std::path::PathBuf;
use std::time::Duration;

use fuser::MountOption;

use crate::fs::AtimeMode;
use crate::tokens::{Choice, Limits};

/// Parses "4096", "256M", "4G", "1GiB" into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number like 4096, 256M or 4G"))?;
    let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("invalid size unit in {s:?}: use K, M, G or T")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Everything `-o` can say.
#[derive(Debug, Clone)]
pub struct MountOpts {
    pub read_only: bool,
    pub allow_other: Option<bool>,
    pub threads: usize,
    pub commit: Duration,
    pub atime: AtimeMode,
    pub nodiratime: bool,
    pub remount: bool,
    pub log: Option<PathBuf>,
    /// Crash tests only: keep an undo log of unflushed writes here.
    pub test_undo_log: Option<PathBuf>,
    /// Fault tests only: every device operation after this many fails.
    pub test_fail_after: Option<u64>,
    /// Kernel flags passed through (nosuid, nodev, noexec, ...).
    pub flags: Vec<MountOption>,
    /// Which token backend (`tokens=auto|mapped|kernel`).
    pub tokens: Choice,
    /// Token quotas: `token_max_per_file=N` (live tokens per open file),
    /// `token_max_per_user=N` (live tokens per uid), `token_max_pinned=SIZE`
    /// (window bytes of one uid's live tokens). REGISTER past one is
    /// EDQUOT.
    pub token_limits: Limits,
    /// `dirty_limit=SIZE`: most bytes of `write()` data the daemon holds
    /// before writing back (0: write through).
    pub dirty_limit: u64,
}

impl Default for MountOpts {
    fn default() -> Self {
        Self {
            read_only: false,
            allow_other: None,
            threads: 4,
            commit: Duration::from_secs(5),
            atime: AtimeMode::Relative,
            nodiratime: false,
            dirty_limit: crate::fs::DEFAULT_DIRTY_LIMIT,
            remount: false,
            log: None,
            test_undo_log: None,
            test_fail_after: None,
            flags: Vec::new(),
            tokens: Choice::Auto,
            token_limits: Limits::default(),
        }
    }
}

/// Options mount(8) and fstab pass that mean nothing to this filesystem.
const IGNORED: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "_netdev",
    "nofail",
    "lazytime",
    "nolazytime",
    "async",
    "dev",
    "suid",
    "exec",
    "default_permissions",
    "loop",
];

impl MountOpts {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut o = Self::default();
        for opt in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (key, value) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            let num = |v: Option<&str>| -> Result<u64, String> {
                v.and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("option {opt:?} needs a number"))
            };
            match key {
                "ro" => o.read_only = true,
                "rw" => o.read_only = false,
                "allow_other" | "allow_root" => o.allow_other = Some(true),
                "threads" => {
                    o.threads = num(value)? as usize;
                    if o.threads == 0 || o.threads > 256 {
                        return Err("threads must be 1 to 256".into());
                    }
                }
                "commit" => {
                    let secs = num(value)?;
                    if secs == 0 {
                        return Err("commit must be at least 1 second".into());
                    }
                    o.commit = Duration::from_secs(secs);
                }
                "noatime" => {
                    o.atime = AtimeMode::Never;
                    o.flags.push(MountOption::NoAtime);
                }
                "atime" | "relatime" => o.atime = AtimeMode::Relative,
                "strictatime" => o.atime = AtimeMode::Strict,
                "nodiratime" => o.nodiratime = true,
                "diratime" => o.nodiratime = false,
                "nosuid" => o.flags.push(MountOption::NoSuid),
                "nodev" => o.flags.push(MountOption::NoDev),
                "noexec" => o.flags.push(MountOption::NoExec),
                "sync" => o.flags.push(MountOption::Sync),
                "dirsync" => o.flags.push(MountOption::DirSync),
                "remount" => o.remount = true,
                "log" => o.log = value.map(PathBuf::from),
                "tokens" => o.tokens = value.unwrap_or_default().parse()?,
                "token_max_per_file" => {
                    o.token_limits.tokens_per_file = positive_u32(opt, num(value)?)?
                }
                "token_max_per_user" => {
                    o.token_limits.tokens_per_user = positive_u32(opt, num(value)?)?
                }
                "token_max_pinned" => {
                    o.token_limits.pinned_per_user =
                        parse_size(value.ok_or_else(|| format!("option {opt:?} needs a size"))?)?
                }
                "dirty_limit" => {
                    o.dirty_limit =
                        parse_size(value.ok_or_else(|| format!("option {opt:?} needs a size"))?)?
                }
                "test_undo_log" => o.test_undo_log = value.map(PathBuf::from),
                "test_fail_after" => o.test_fail_after = Some(num(value)?),
                // Set by this program itself; mount(8) may echo them back.
                "fsname" | "subtype" => {}
                k if IGNORED.contains(&k) || k.starts_with("x-") || k == "comment" => {}
                _ => return Err(format!("unknown mount option {opt:?}")),
            }
        }
        Ok(o)
    }
}

/// A count limit: 1 to u32::MAX (0 would forbid tokens altogether).
fn positive_u32(opt: &str, n: u64) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("option {opt:?}: expected 1 to {}", u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2k").unwrap(), 2048);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn options() {
        let o = MountOpts::parse("rw,nosuid,nodev,relatime,threads=8,commit=2,x-systemd.automount")
            .unwrap();
        assert!(!o.read_only);
        assert_eq!(o.threads, 8);
        assert_eq!(o.commit, Duration::from_secs(2));
        assert_eq!(o.flags, vec![MountOption::NoSuid, MountOption::NoDev]);
        assert!(MountOpts::parse("ro,remount").unwrap().remount);
        assert!(MountOpts::parse("threads=0").is_err());
        assert!(MountOpts::parse("bogus").is_err());
        let t = MountOpts::parse("token_max_per_file=3,token_max_per_user=5,token_max_pinned=40K")
            .unwrap();
        assert_eq!(
            t.token_limits,
            Limits {
                tokens_per_file: 3,
                tokens_per_user: 5,
                pinned_per_user: 40 << 10
            }
        );
        assert!(MountOpts::parse("token_max_per_file=0").is_err());
        assert!(MountOpts::parse("token_max_pinned").is_err());
        assert_eq!(
            MountOpts::parse("").unwrap().dirty_limit,
            crate::fs::DEFAULT_DIRTY_LIMIT
        );
        assert_eq!(
            MountOpts::parse("dirty_limit=64M").unwrap().dirty_limit,
            64 << 20
        );
        assert_eq!(MountOpts::parse("dirty_limit=0").unwrap().dirty_limit, 0);
        assert!(MountOpts::parse("dirty_limit").is_err());
    }
}
