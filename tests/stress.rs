//! fsstress-style: several processes doing random namespace and data
//! operations on one shared tree at once for a fixed time; then unmount,
//! fsck clean, remount and read everything back.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{symlink, FileExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Image, Rng};

/// Errors that racing processes legitimately cause each other.
fn expected(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOENT
                | libc::EEXIST
                | libc::ENOTEMPTY
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::EINVAL
                | libc::ENODATA
        )
    )
}

fn path(root: &Path, rng: &mut Rng) -> PathBuf {
    let d = rng.below(6);
    let n = rng.below(24);
    if d == 0 {
        root.join(format!("n{n}"))
    } else {
        root.join(format!("d{d}/n{n}"))
    }
}

/// One worker: random operations until the deadline. Returns the count of
/// operations, or panics on an unexpected error.
fn worker(root: &Path, seed: u64, until: Instant) -> u64 {
    let mut rng = Rng::new(seed);
    let mut ops = 0;
    while Instant::now() < until {
        let p = path(root, &mut rng);
        let q = path(root, &mut rng);
        let r: std::io::Result<()> = match rng.below(14) {
            0 | 1 => OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&p)
                .and_then(|f| {
                    f.write_all_at(
                        &vec![seed as u8 | 1; 1 + rng.below(200_000) as usize],
                        rng.below(300_000),
                    )
                }),
            2 => OpenOptions::new()
                .append(true)
                .open(&p)
                .and_then(|mut f| f.write_all(b"appended")),
            3 => OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_len(rng.below(100_000))),
            4 => fs::remove_file(&p),
            5 => fs::rename(&p, &q),
            6 => fs::create_dir(root.join(format!("d{}/sub{}", 1 + rng.below(5), rng.below(4)))),
            7 => fs::remove_dir(root.join(format!("d{}/sub{}", 1 + rng.below(5), rng.below(4)))),
            8 => fs::hard_link(&p, &q),
            9 => symlink(&p, &q),
            10 => fs::read(&p).map(|_| ()),
            11 => fs::read_dir(p.parent().unwrap()).map(|rd| rd.for_each(drop)),
            12 => fs::File::open(&p).and_then(|f| f.sync_all()),
            _ => {
                let c = common::cpath(&p);
                // SAFETY: NUL-terminated strings and a valid buffer.
                let r = unsafe {
                    libc::setxattr(
                        c.as_ptr(),
                        c"user.stress".as_ptr(),
                        b"v".as_ptr().cast(),
                        1,
                        0,
                    )
                };
                if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
        };
        if let Err(e) = r {
            // EPERM: user xattrs on a symlink; ELOOP/ENOTSUP likewise.
            let benign = matches!(
                e.raw_os_error(),
                Some(libc::EPERM | libc::ELOOP | libc::EOPNOTSUPP | libc::EMLINK)
            );
            assert!(
                expected(&e) || benign,
                "worker {seed}: unexpected error {e} on {}",
                p.display()
            );
        }
        ops += 1;
    }
    ops
}

#[test]
fn processes_racing_on_one_tree_leave_it_consistent() {
    let secs: u64 = std::env::var("STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let img = Image::new("256M");
    let mut m = img.mount();
    for d in 1..6 {
        fs::create_dir(m.join(format!("d{d}"))).unwrap();
    }
    let until = Instant::now() + Duration::from_secs(secs);
    let mut children = Vec::new();
    for w in 0..4u64 {
        // SAFETY: the child only does file operations and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match std::panic::catch_unwind(|| worker(m.path(), w + 1, until)) {
                Ok(_) => 0,
                Err(_) => 1,
            };
            // SAFETY: leave the forked child without running destructors.
            unsafe { libc::_exit(code) };
        }
        children.push(pid);
    }
    for pid in children {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "a worker failed (see its panic above)"
        );
    }
    m.unmount();
    img.assert_fsck_clean();
    m.mount();
    // Everything readable after remount.
    let mut stack = vec![m.path().to_path_buf()];
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                fs::read(e.path()).unwrap();
                files += 1;
            }
        }
    }
    println!("stress: {secs} s, 4 processes, {files} files at the end");
}
