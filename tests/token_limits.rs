//! Token quotas on a shared (allow_other) mount: two unprivileged users,
//! one of them at every limit, the other unaffected; the limits as STATS
//! reports them and as mount options set them; the daemon's own fd limit
//! (raised at start, ENFILE when exhausted, never EPERM).

mod common;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use dmabuf_fs::client::{sealed_memfd, TokenFile};
use dmabuf_fs::uapi;

const KIB: u64 = 1024;

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }).unwrap();
    // SAFETY: both fds are fresh and ours.
    unsafe {
        (
            File::from(OwnedFd::from_raw_fd(fds[0])),
            File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    }
}

fn quota(r: io::Result<impl Sized>, what: &str) {
    assert_errno(r.map(|_| ()), libc::EDQUOT, what);
}

/// A world-writable file for both users.
fn shared_file(m: &Mounted) -> PathBuf {
    fs::set_permissions(m.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let p = m.join("shared");
    fs::write(&p, vec![7u8; 64 << 10]).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o666)).unwrap();
    p
}

/// User A's part: runs into each limit, tells the parent (`ready`), waits
/// (`go`) while user B registers, then checks that unregister and close
/// give the quota back.
fn user_a(path: &Path, mut ready: File, mut go: File) -> io::Result<()> {
    let mem = sealed_memfd("a", 64 * KIB)?;
    let f1 = TokenFile::open(path, true)?;
    let info = f1.info()?;
    assert!(
        info.features & uapi::FEAT_LIMITS != 0,
        "INFO announces limits"
    );
    let t1 = f1.register(&mem, 0, 4 * KIB)?;
    let t2 = f1.register(&mem, 4 * KIB, 4 * KIB)?;
    let t3 = f1.register(&mem, 8 * KIB, 4 * KIB)?;
    quota(
        f1.register(&mem, 12 * KIB, 4 * KIB),
        "4th token on one open file",
    );
    let f2 = TokenFile::open(path, true)?;
    let _t4 = f2.register(&mem, 16 * KIB, 16 * KIB)?;
    quota(
        f2.register(&mem, 32 * KIB, 16 * KIB),
        "44 KiB registered past a 40 KiB limit",
    );
    let t5 = f2.register(&mem, 32 * KIB, 4 * KIB)?;
    quota(
        f2.register(&mem, 36 * KIB, 4 * KIB),
        "6th token of one user",
    );

    let s = f1.stats(0)?;
    assert_eq!(
        (
            s.max_tokens_per_file,
            s.max_tokens_per_user,
            s.max_pinned_per_user
        ),
        (3, 5, 40 * KIB),
        "STATS shows the mount's limits"
    );
    assert_eq!((s.user_tokens, s.user_pinned), (5, 32 * KIB), "A's usage");
    assert_eq!(s.live_tokens, 5, "tokens on the file");
    // At the limits, I/O through the tokens still works.
    assert_eq!(t1.write(0, 0, 4 * KIB)?, 4 * KIB);

    ready.write_all(b"r")?;
    let mut b = [0u8];
    go.read_exact(&mut b)?;

    // UNREGISTER gives one token back at once.
    drop(t5);
    let t6 = f2.register(&mem, 32 * KIB, 4 * KIB)?;
    quota(f2.register(&mem, 36 * KIB, 4 * KIB), "at 5 again");
    // The last close gives back the file's tokens (RELEASE reaches the
    // daemon just after close() returns).
    let _ = (t1.leak(), t2.leak(), t3.leak());
    drop(f1);
    let f3 = TokenFile::open(path, true)?;
    let mut got = Vec::new();
    assert!(
        wait_for(Duration::from_secs(5), || {
            if let Ok(t) = f3.register(&mem, 40 * KIB, 4 * KIB) {
                got.push(t.leak());
            }
            got.len() == 3
        }),
        "close did not give the quota back: {} of 3 registered",
        got.len()
    );
    quota(f3.register(&mem, 44 * KIB, 4 * KIB), "4th on the new file");
    drop(t6);
    Ok(())
}

#[test]
fn quotas_per_file_and_per_user_from_two_users() {
    let img = Image::new("64M");
    let m = img
        .mount_with("allow_other,token_max_per_file=3,token_max_per_user=5,token_max_pinned=40K");
    let path = shared_file(&m);
    let (mut ready_r, ready_w) = pipe();
    let (go_r, mut go_w) = pipe();
    let (ua, ga) = USER_A;
    let pa = path.clone();
    let a = std::thread::spawn(move || as_user(ua, ga, move || user_a(&pa, ready_w, go_r)));
    let mut b = [0u8];
    ready_r
        .read_exact(&mut b)
        .expect("user A did not reach its limits");

    // User B, while A sits at every limit: its own quota is untouched.
    let (ub, gb) = USER_B;
    let pb = path.clone();
    let r = as_user(ub, gb, move || {
        let mem = sealed_memfd("b", 16 * KIB)?;
        let f = TokenFile::open(&pb, true)?;
        let t1 = f.register(&mem, 0, 8 * KIB)?;
        let t2 = f.register(&mem, 8 * KIB, 4 * KIB)?;
        let s = t1.stats()?;
        assert_eq!((s.user_tokens, s.user_pinned), (2, 12 * KIB), "B's usage");
        assert_eq!(s.live_tokens, 7, "A's 5 and B's 2 on the file");
        assert_eq!(t2.read(0, 0, 4 * KIB)?, 4 * KIB);
        Ok(())
    });
    go_w.write_all(b"g").unwrap();
    let ra = a.join().unwrap();
    assert_eq!(r, Ok(()), "user B registering while A is at its limits");
    assert_eq!(ra, Ok(()), "user A (errno, EDQUOT = {})", libc::EDQUOT);

    // Root on the default mount sees the default limits.
    drop(m);
    let m = img.mount();
    let f = TokenFile::open(&m.join("shared"), false).unwrap();
    let s = f.stats(0).unwrap();
    let d = dmabuf_fs::tokens::Limits::default();
    assert_eq!(
        (
            s.max_tokens_per_file,
            s.max_tokens_per_user,
            s.max_pinned_per_user
        ),
        (d.tokens_per_file, d.tokens_per_user, d.pinned_per_user)
    );
    assert_eq!((s.user_tokens, s.user_pinned), (0, 0));
}

fn fd_limits(pid: i32) -> (u64, u64) {
    let text = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].parse().unwrap(), f[4].parse().unwrap())
}

fn set_soft_fd_limit(pid: i32, soft: u64, hard: u64) {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: prlimit reads the new limit; no old limit wanted.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    check(r).expect("prlimit on the daemon");
}

#[test]
fn daemon_out_of_fds_is_enfile_not_eperm() {
    let img = Image::new("64M");
    let m = img.mount();
    let pid = *m.daemons().first().expect("daemon pid");
    let (soft, hard) = fd_limits(pid);
    assert_eq!(
        soft, hard,
        "the daemon raises its soft fd limit to the hard one"
    );

    let p = m.join("f");
    fs::write(&p, vec![1u8; 64 << 10]).unwrap();
    let f = TokenFile::open(&p, true).unwrap();
    let mem = sealed_memfd("fds", 64 * KIB).unwrap();
    // Leave the daemon a handful of free fds.
    let open = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as u64;
    set_soft_fd_limit(pid, open + 6, hard);
    let mut tokens = Vec::new();
    let err = loop {
        match f.register(&mem, 0, 4 * KIB) {
            Ok(t) => tokens.push(t),
            Err(e) => break e,
        }
        assert!(tokens.len() < 64, "the fd limit never bit");
    };
    set_soft_fd_limit(pid, hard, hard);
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENFILE),
        "out of fds after {} tokens: {err}",
        tokens.len()
    );
    assert!(!tokens.is_empty());
    // With fds back, REGISTER works again and the mount serves on.
    f.register(&mem, 0, 4 * KIB).unwrap();
    assert_eq!(tokens[0].read(0, 0, 4 * KIB).unwrap(), 4 * KIB);
}
