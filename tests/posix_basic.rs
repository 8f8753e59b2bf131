//! POSIX behaviour of a mounted dmabuf-fs through ordinary syscalls and
//! tools.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use common::*;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// The process umask, from /proc/self/status (reading it with umask(2)
/// would race with other test threads).
fn process_umask() -> u32 {
    let st = fs::read_to_string("/proc/self/status").unwrap();
    let line = st.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
}

fn mtime_ns(m: &fs::Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

fn ctime_ns(m: &fs::Metadata) -> i128 {
    m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128
}

#[test]
fn create_write_read() {
    let img = Image::new("256M");
    let m = img.mount();
    let p = m.join("hello.txt");
    fs::write(&p, b"hello, world\n").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"hello, world\n");
    let md = fs::metadata(&p).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), 13);

    // Append, overwrite in the middle, read at offsets.
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"second line\n").unwrap();
    drop(f);
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.write_all_at(b"HELLO", 0).unwrap();
    let mut buf = [0u8; 6];
    f.read_exact_at(&mut buf, 13).unwrap();
    assert_eq!(&buf, b"second");
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"HELLO, world\nsecond line\n");

    // A 3 MiB file written in odd-sized chunks, read back whole.
    let data = pseudo_random(7, 3 * MIB as usize + 123);
    let q = m.join("big.bin");
    let mut f = File::create(&q).unwrap();
    for chunk in data.chunks(77_777) {
        f.write_all(chunk).unwrap();
    }
    drop(f);
    assert_bytes_eq(&fs::read(&q).unwrap(), &data, "big.bin");
    // Unaligned read in the middle.
    let f = File::open(&q).unwrap();
    let mut mid = vec![0u8; 10_000];
    f.read_exact_at(&mut mid, 1_000_003).unwrap();
    assert_bytes_eq(&mid, &data[1_000_003..1_010_003], "mid read");

    // O_EXCL on an existing file fails; missing file is ENOENT.
    assert_errno(
        OpenOptions::new().write(true).create_new(true).open(&p),
        libc::EEXIST,
        "create_new on existing",
    );
    assert_errno(File::open(m.join("nope")), libc::ENOENT, "open missing");
    // O_TRUNC empties.
    File::create(&p).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
}

#[test]
fn sparse_file_beyond_4gib() {
    let img = Image::new("256M");
    let m = img.mount();
    let p = m.join("sparse");
    let off = 5 * GIB;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all_at(b"hello", off).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.len(), off + 5);
    assert!(
        md.blocks() <= 256,
        "st_blocks {} too large for 5 bytes of data",
        md.blocks()
    );
    let f = File::open(&p).unwrap();
    let mut buf = vec![0xffu8; 65536];
    for &pos in &[0, GIB, 4 * GIB - 100, 4 * GIB + 4096] {
        f.read_exact_at(&mut buf, pos).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "hole not zero at {pos}");
    }
    let mut tail = [0xffu8; 15];
    f.read_exact_at(&mut tail, off - 10).unwrap();
    assert_eq!(&tail, b"\0\0\0\0\0\0\0\0\0\0hello");
    // Reading past EOF returns 0 bytes.
    let n = f.read_at(&mut buf, off + 5).unwrap();
    assert_eq!(n, 0);
    // Filesystem barely used: free space dropped by less than 1 MiB.
    let s = statvfs(m.path());
    assert!(s.f_bfree * s.f_frsize > 200 * MIB);
}

#[test]
fn directories() {
    let img = Image::new("256M");
    let m = img.mount();
    fs::create_dir_all(m.join("a/b/c/d")).unwrap();
    fs::write(m.join("a/b/c/d/f"), b"x").unwrap();
    assert!(fs::metadata(m.join("a/b/c")).unwrap().is_dir());
    assert_errno(
        fs::create_dir(m.join("a/b")),
        libc::EEXIST,
        "mkdir existing",
    );
    assert_errno(
        fs::create_dir(m.join("missing/x")),
        libc::ENOENT,
        "mkdir in missing",
    );
    assert_errno(
        fs::create_dir(m.join("a/b/c/d/f/x")),
        libc::ENOTDIR,
        "mkdir under file",
    );
    assert_errno(
        fs::remove_dir(m.join("a/b")),
        libc::ENOTEMPTY,
        "rmdir non-empty",
    );
    assert_errno(
        fs::remove_dir(m.join("a/b/c/d/f")),
        libc::ENOTDIR,
        "rmdir file",
    );
    assert_errno(fs::remove_file(m.join("a/b")), libc::EISDIR, "unlink dir");

    let mut names: Vec<String> = fs::read_dir(m.join("a/b/c/d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["f"]);

    // `ls -a` shows . and ..
    let out = run("ls", &["-a", m.join("a").to_str().unwrap()]);
    let ls: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(ls, vec![".", "..", "b"]);

    // Name length limits.
    let long = "n".repeat(255);
    fs::write(m.join(&long), b"").unwrap();
    assert!(m.join(&long).exists());
    assert_errno(
        fs::write(m.join("n".repeat(256)), b""),
        libc::ENAMETOOLONG,
        "256-byte name",
    );

    fs::remove_file(m.join("a/b/c/d/f")).unwrap();
    fs::remove_dir(m.join("a/b/c/d")).unwrap();
    assert!(!m.join("a/b/c/d").exists());
    fs::remove_dir_all(m.join("a")).unwrap();
    assert!(!m.join("a").exists());

    // Directory link count: 2 + number of subdirectories.
    fs::create_dir(m.join("p")).unwrap();
    fs::create_dir(m.join("p/s1")).unwrap();
    fs::create_dir(m.join("p/s2")).unwrap();
    fs::write(m.join("p/file"), b"").unwrap();
    assert_eq!(fs::metadata(m.join("p")).unwrap().nlink(), 4);
    fs::remove_dir(m.join("p/s1")).unwrap();
    assert_eq!(fs::metadata(m.join("p")).unwrap().nlink(), 3);
}

#[test]
fn many_entries_in_one_directory() {
    const N: usize = 20_000;
    let img = Image::new("256M");
    let m = img.mount();
    let d = m.join("many");
    fs::create_dir(&d).unwrap();
    for i in 0..N {
        File::create(d.join(format!("file-{i:05}"))).unwrap();
    }
    let mut names: Vec<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), N, "readdir count");
    names.sort();
    names.dedup();
    assert_eq!(names.len(), N, "readdir returned duplicates");
    assert_eq!(names[0], "file-00000");
    assert_eq!(names[N - 1], format!("file-{:05}", N - 1));
    for i in [0, 1, 4321, 9999, N - 1] {
        let md = fs::metadata(d.join(format!("file-{i:05}"))).unwrap();
        assert!(md.is_file());
        assert_eq!(md.len(), 0);
    }
    // `ls | wc -l` agrees.
    let out = run("ls", &["-f", d.to_str().unwrap()]);
    let count = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(count, N + 2, "ls -f count (with . and ..)");
    assert_errno(fs::remove_dir(&d), libc::ENOTEMPTY, "rmdir full dir");
    for i in 0..N {
        fs::remove_file(d.join(format!("file-{i:05}"))).unwrap();
    }
    assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
    fs::remove_dir(&d).unwrap();
}

#[test]
fn symlinks() {
    let img = Image::new("256M");
    let m = img.mount();
    fs::write(m.join("target"), b"through the link").unwrap();
    std::os::unix::fs::symlink("target", m.join("rel")).unwrap();
    std::os::unix::fs::symlink(m.join("target"), m.join("abs")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", m.join("dangling")).unwrap();
    let long_target = "x/".repeat(1000) + "end";
    std::os::unix::fs::symlink(&long_target, m.join("long")).unwrap();

    assert_eq!(fs::read_link(m.join("rel")).unwrap(), Path::new("target"));
    assert_eq!(fs::read_link(m.join("abs")).unwrap(), m.join("target"));
    assert_eq!(
        fs::read_link(m.join("long")).unwrap(),
        Path::new(&long_target)
    );
    assert_eq!(fs::read(m.join("rel")).unwrap(), b"through the link");
    assert_eq!(fs::read(m.join("abs")).unwrap(), b"through the link");
    let lmd = fs::symlink_metadata(m.join("rel")).unwrap();
    assert!(lmd.file_type().is_symlink());
    assert_eq!(lmd.len(), 6, "symlink size is target length");
    assert!(fs::metadata(m.join("rel")).unwrap().is_file());
    assert_errno(fs::metadata(m.join("dangling")), libc::ENOENT, "dangling");
    assert!(fs::symlink_metadata(m.join("dangling")).is_ok());
    assert_errno(
        fs::read_link(m.join("target")),
        libc::EINVAL,
        "readlink on file",
    );
    assert_errno(
        std::os::unix::fs::symlink("t", m.join("rel")),
        libc::EEXIST,
        "symlink over existing",
    );
    // Symlink to a directory traverses.
    fs::create_dir(m.join("dir")).unwrap();
    fs::write(m.join("dir/inner"), b"in").unwrap();
    std::os::unix::fs::symlink("dir", m.join("dirlink")).unwrap();
    assert_eq!(fs::read(m.join("dirlink/inner")).unwrap(), b"in");
    fs::remove_file(m.join("rel")).unwrap();
    assert!(m.join("target").exists());
    assert!(fs::symlink_metadata(m.join("rel")).is_err());
}

#[test]
fn hard_links() {
    let img = Image::new("256M");
    let m = img.mount();
    let a = m.join("a");
    fs::write(&a, b"shared content").unwrap();
    fs::create_dir(m.join("sub")).unwrap();
    let b = m.join("sub/b");
    fs::hard_link(&a, &b).unwrap();
    let c = m.join("c");
    fs::hard_link(&b, &c).unwrap();
    let ma = fs::metadata(&a).unwrap();
    assert_eq!(ma.nlink(), 3);
    assert_eq!(fs::metadata(&b).unwrap().ino(), ma.ino());
    assert_eq!(fs::metadata(&c).unwrap().nlink(), 3);
    // Writes through one name are seen through the others.
    let f = OpenOptions::new().write(true).open(&b).unwrap();
    f.write_all_at(b"SHARED", 0).unwrap();
    drop(f);
    assert_eq!(fs::read(&a).unwrap(), b"SHARED content");
    assert_eq!(fs::read(&c).unwrap(), b"SHARED content");
    fs::remove_file(&a).unwrap();
    assert_eq!(fs::metadata(&b).unwrap().nlink(), 2);
    assert_eq!(fs::read(&b).unwrap(), b"SHARED content");
    fs::remove_file(&c).unwrap();
    assert_eq!(fs::metadata(&b).unwrap().nlink(), 1);
    assert_errno(fs::hard_link(&b, &b), libc::EEXIST, "link onto itself");
    assert_errno(
        fs::hard_link(m.join("sub"), m.join("dirlink")),
        libc::EPERM,
        "hard link to a directory",
    );
    // `ln` tool.
    run(
        "ln",
        &[b.to_str().unwrap(), m.join("viatool").to_str().unwrap()],
    );
    assert_eq!(fs::metadata(&b).unwrap().nlink(), 2);
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let f = cpath(from);
    let t = cpath(to);
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[test]
fn rename() {
    let img = Image::new("256M");
    let m = img.mount();
    fs::write(m.join("a"), b"aaa").unwrap();
    fs::write(m.join("b"), b"bbbbbb").unwrap();
    let ino_a = ino(&m.join("a"));

    // Simple rename, then into another directory.
    fs::rename(m.join("a"), m.join("a2")).unwrap();
    assert!(!m.join("a").exists());
    assert_eq!(ino(&m.join("a2")), ino_a);
    fs::create_dir(m.join("d")).unwrap();
    fs::rename(m.join("a2"), m.join("d/a3")).unwrap();
    assert_eq!(fs::read(m.join("d/a3")).unwrap(), b"aaa");

    // Over an existing file: target replaced, old inode gone.
    fs::rename(m.join("d/a3"), m.join("b")).unwrap();
    assert!(!m.join("d/a3").exists());
    assert_eq!(fs::read(m.join("b")).unwrap(), b"aaa");
    assert_eq!(ino(&m.join("b")), ino_a);
    assert_eq!(fs::read_dir(m.join("d")).unwrap().count(), 0);

    // RENAME_NOREPLACE.
    fs::write(m.join("x"), b"x").unwrap();
    assert_errno(
        renameat2(&m.join("x"), &m.join("b"), libc::RENAME_NOREPLACE),
        libc::EEXIST,
        "RENAME_NOREPLACE onto existing",
    );
    assert_eq!(fs::read(m.join("b")).unwrap(), b"aaa");
    assert_eq!(fs::read(m.join("x")).unwrap(), b"x");
    renameat2(&m.join("x"), &m.join("y"), libc::RENAME_NOREPLACE).unwrap();
    assert!(!m.join("x").exists());
    assert_eq!(fs::read(m.join("y")).unwrap(), b"x");

    // RENAME_EXCHANGE between a file and a directory in different dirs.
    fs::create_dir(m.join("d/sub")).unwrap();
    fs::write(m.join("d/sub/inner"), b"inner").unwrap();
    let ino_y = ino(&m.join("y"));
    let ino_sub = ino(&m.join("d/sub"));
    renameat2(&m.join("y"), &m.join("d/sub"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(ino(&m.join("y")), ino_sub);
    assert_eq!(ino(&m.join("d/sub")), ino_y);
    assert_eq!(fs::read(m.join("y/inner")).unwrap(), b"inner");
    assert_eq!(fs::read(m.join("d/sub")).unwrap(), b"x");
    // `..` of the moved directory points to its new parent.
    assert_eq!(
        fs::metadata(m.join("y/..")).unwrap().ino(),
        fs::metadata(m.path()).unwrap().ino()
    );
    assert_errno(
        renameat2(&m.join("y"), &m.join("nothere"), libc::RENAME_EXCHANGE),
        libc::ENOENT,
        "RENAME_EXCHANGE with missing target",
    );

    // Directory over non-empty directory fails, over empty one works.
    fs::create_dir(m.join("e1")).unwrap();
    fs::create_dir(m.join("e2")).unwrap();
    fs::write(m.join("e2/f"), b"").unwrap();
    assert_errno(
        fs::rename(m.join("e1"), m.join("e2")),
        libc::ENOTEMPTY,
        "rename dir over non-empty dir",
    );
    fs::create_dir(m.join("e3")).unwrap();
    fs::rename(m.join("e2"), m.join("e3")).unwrap();
    assert!(m.join("e3/f").exists());
    assert!(!m.join("e2").exists());
    assert_errno(
        fs::rename(m.join("b"), m.join("e1")),
        libc::EISDIR,
        "rename file over dir",
    );
    assert_errno(
        fs::rename(m.join("e1"), m.join("b")),
        libc::ENOTDIR,
        "rename dir over file",
    );
    assert_errno(
        fs::rename(m.join("e3"), m.join("e3/f2")),
        libc::EINVAL,
        "rename dir into itself",
    );
    // `mv` tool.
    run(
        "mv",
        &[
            m.join("b").to_str().unwrap(),
            m.join("e3/moved").to_str().unwrap(),
        ],
    );
    assert_eq!(fs::read(m.join("e3/moved")).unwrap(), b"aaa");
}

#[test]
fn unlink_open_file() {
    let img = Image::new("256M");
    let m = img.mount();
    fsync_dir(m.path());
    let before = free_bytes(m.path());
    let data = pseudo_random(3, 16 * MIB as usize);
    let p = m.join("doomed");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    let during = free_bytes(m.path());
    assert!(
        before >= during + 15 * MIB,
        "writing 16 MiB freed too little: before {before} after {during}"
    );
    fs::remove_file(&p).unwrap();
    assert!(!p.exists());
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    // Still readable through the fd.
    let mut back = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut back).unwrap();
    assert_bytes_eq(&back, &data, "unlinked file via fd");
    // And writable.
    f.write_all_at(b"still here", 0).unwrap();
    let mut b = [0u8; 10];
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"still here");
    // A new file with the same name is a different file.
    fs::write(&p, b"new").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"new");
    fs::remove_file(&p).unwrap();
    drop(f);
    // Release is asynchronous in FUSE and space may be reclaimed at the
    // next commit: poll, forcing commits with a directory fsync.
    let tolerance = 2 * MIB;
    let ok = wait_for(Duration::from_secs(15), || {
        fsync_dir(m.path());
        free_bytes(m.path()) + tolerance >= before
    });
    assert!(
        ok,
        "space not reclaimed after close: before {before}, now {}",
        free_bytes(m.path())
    );
}

#[test]
fn truncate_grow_and_shrink() {
    let img = Image::new("256M");
    let m = img.mount();
    let p = m.join("t");
    let data = pseudo_random(11, 100_000);
    fs::write(&p, &data).unwrap();

    // ftruncate shrink to an unaligned size.
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.set_len(5_000).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 5_000);
    // Grow again: the old bytes must not reappear.
    f.set_len(100_000).unwrap();
    drop(f);
    let back = fs::read(&p).unwrap();
    assert_eq!(back.len(), 100_000);
    assert_bytes_eq(&back[..5_000], &data[..5_000], "kept prefix");
    assert!(
        back[5_000..].iter().all(|&b| b == 0),
        "stale data after shrink+grow"
    );

    // truncate(2) by path.
    let c = cpath(&p);
    check(unsafe { libc::truncate(c.as_ptr(), 10 * MIB as i64) }).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.len(), 10 * MIB);
    let f = File::open(&p).unwrap();
    let mut tail = vec![1u8; 4096];
    f.read_exact_at(&mut tail, 10 * MIB - 4096).unwrap();
    assert!(tail.iter().all(|&b| b == 0));
    check(unsafe { libc::truncate(c.as_ptr(), 0) }).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
    assert_eq!(fs::read(&p).unwrap(), b"");
    // Shrink inside a block then write beyond: gap reads zero.
    fs::write(&p, vec![0xaau8; 8192]).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.set_len(100).unwrap();
    f.write_all_at(b"end", 6000).unwrap();
    drop(f);
    let back = fs::read(&p).unwrap();
    assert_eq!(back.len(), 6003);
    assert!(back[..100].iter().all(|&b| b == 0xaa));
    assert!(
        back[100..6000].iter().all(|&b| b == 0),
        "stale bytes in gap"
    );
    assert_eq!(&back[6000..], b"end");
    // `truncate` tool.
    run("truncate", &["-s", "1M", p.to_str().unwrap()]);
    assert_eq!(fs::metadata(&p).unwrap().len(), MIB);
    assert_errno(
        File::open(&p).unwrap().set_len(10),
        libc::EINVAL,
        "ftruncate on read-only fd",
    );
}

fn utimens(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<libc::c_int> {
    let c = cpath(p);
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) })
}

#[test]
fn chmod_chown_utimes() {
    let img = Image::new("256M");
    let m = img.mount();
    let p = m.join("f");
    fs::write(&p, b"data").unwrap();
    let md0 = fs::metadata(&p).unwrap();
    assert_eq!(md0.uid(), 0);
    assert_eq!(md0.gid(), 0);

    sleep(Duration::from_millis(20));
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    let md1 = fs::metadata(&p).unwrap();
    assert_eq!(md1.mode() & 0o7777, 0o640);
    assert!(ctime_ns(&md1) > ctime_ns(&md0), "ctime unchanged by chmod");
    assert_eq!(mtime_ns(&md1), mtime_ns(&md0), "mtime changed by chmod");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o4755)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o4755);

    sleep(Duration::from_millis(20));
    std::os::unix::fs::chown(&p, Some(1000), Some(1234)).unwrap();
    let md2 = fs::metadata(&p).unwrap();
    assert_eq!((md2.uid(), md2.gid()), (1000, 1234));
    assert!(ctime_ns(&md2) > ctime_ns(&md1), "ctime unchanged by chown");
    // chown by root clears setuid.
    assert_eq!(md2.mode() & 0o4000, 0, "setuid kept after chown");
    std::os::unix::fs::chown(&p, None, Some(42)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().uid(), 1000);
    assert_eq!(fs::metadata(&p).unwrap().gid(), 42);

    // Explicit atime/mtime with nanoseconds.
    utimens(
        &p,
        (1_000_000_000, 123_456_789),
        (1_500_000_000, 987_654_321),
    )
    .unwrap();
    let md3 = fs::metadata(&p).unwrap();
    assert_eq!(
        (md3.atime(), md3.atime_nsec()),
        (1_000_000_000, 123_456_789)
    );
    assert_eq!(
        (md3.mtime(), md3.mtime_nsec()),
        (1_500_000_000, 987_654_321)
    );
    // UTIME_OMIT for atime, UTIME_NOW for mtime.
    utimens(&p, (0, libc::UTIME_OMIT), (0, libc::UTIME_NOW)).unwrap();
    let md4 = fs::metadata(&p).unwrap();
    assert_eq!(
        (md4.atime(), md4.atime_nsec()),
        (1_000_000_000, 123_456_789)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (md4.mtime() - now).abs() < 60,
        "UTIME_NOW mtime {}",
        md4.mtime()
    );
    // `touch -d` tool.
    run(
        "touch",
        &["-m", "-d", "2001-02-03 04:05:06 UTC", p.to_str().unwrap()],
    );
    assert_eq!(fs::metadata(&p).unwrap().mtime(), 981_173_106);

    // write() moves mtime and ctime.
    let q = m.join("w");
    fs::write(&q, b"1").unwrap();
    let before = fs::metadata(&q).unwrap();
    sleep(Duration::from_millis(30));
    let f = OpenOptions::new().write(true).open(&q).unwrap();
    f.write_all_at(b"22", 0).unwrap();
    drop(f);
    let after = fs::metadata(&q).unwrap();
    assert!(
        mtime_ns(&after) > mtime_ns(&before),
        "mtime not moved by write"
    );
    assert!(
        ctime_ns(&after) > ctime_ns(&before),
        "ctime not moved by write"
    );

    // Directory mtime moves on create.
    let d = m.join("d");
    fs::create_dir(&d).unwrap();
    let d0 = fs::metadata(&d).unwrap();
    sleep(Duration::from_millis(30));
    fs::write(d.join("x"), b"").unwrap();
    let d1 = fs::metadata(&d).unwrap();
    assert!(
        mtime_ns(&d1) > mtime_ns(&d0),
        "dir mtime not moved by create"
    );
}

#[test]
fn mknod_fifo_and_char_device() {
    let img = Image::new("256M");
    let m = img.mount();
    let fifo = m.join("fifo");
    let c = cpath(&fifo);
    check(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }).unwrap();
    let md = fs::symlink_metadata(&fifo).unwrap();
    assert!(md.file_type().is_fifo(), "not a fifo: {:o}", md.mode());
    assert_eq!(md.mode() & 0o777, 0o644 & !process_umask());
    // Data flows through the FIFO (kernel pipe on a FUSE inode).
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    f.write_all(b"through fifo").unwrap();
    let mut buf = [0u8; 12];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"through fifo");
    drop(f);

    let dev = m.join("null");
    let c = cpath(&dev);
    let rdev = libc::makedev(1, 3);
    check(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, rdev) }).unwrap();
    let md = fs::symlink_metadata(&dev).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(md.rdev(), rdev);
    let bdev = m.join("blk");
    let c = cpath(&bdev);
    let brdev = libc::makedev(7, 200);
    check(unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, brdev) }).unwrap();
    let md = fs::symlink_metadata(&bdev).unwrap();
    assert!(md.file_type().is_block_device());
    assert_eq!(md.rdev(), brdev);
    // mknod of a regular file works too.
    let reg = m.join("reg");
    let c = cpath(&reg);
    check(unsafe { libc::mknod(c.as_ptr(), libc::S_IFREG | 0o600, 0) }).unwrap();
    assert!(fs::metadata(&reg).unwrap().is_file());
    // `mkfifo` tool and `ls -l` type letters.
    run("mkfifo", &[m.join("fifo2").to_str().unwrap()]);
    let out = run("ls", &["-l", m.path().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with('p') && l.ends_with("fifo2")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with('c') && l.ends_with("null")),
        "{text}"
    );
}

fn setxattr(p: &Path, name: &str, val: &[u8], flags: i32) -> io::Result<libc::c_int> {
    let c = cpath(p);
    let n = std::ffi::CString::new(name).unwrap();
    check(unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            val.as_ptr() as *const libc::c_void,
            val.len(),
            flags,
        )
    })
}

fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let c = cpath(p);
    let n = std::ffi::CString::new(name).unwrap();
    let size = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; size as usize + 1];
    let got = unsafe {
        libc::getxattr(
            c.as_ptr(),
            n.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(got as usize);
    Ok(buf)
}

fn listxattr(p: &Path) -> Vec<String> {
    let c = cpath(p);
    let size = unsafe { libc::listxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(size >= 0, "listxattr: {}", io::Error::last_os_error());
    let mut buf = vec![0u8; size as usize + 1];
    let got =
        unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    assert!(got >= 0, "listxattr: {}", io::Error::last_os_error());
    buf.truncate(got as usize);
    let mut v: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    v.sort();
    v
}

fn removexattr(p: &Path, name: &str) -> io::Result<libc::c_int> {
    let c = cpath(p);
    let n = std::ffi::CString::new(name).unwrap();
    check(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) })
}

#[test]
fn xattrs() {
    let img = Image::new("256M");
    let m = img.mount();
    let p = m.join("f");
    fs::write(&p, b"x").unwrap();
    fs::create_dir(m.join("d")).unwrap();

    assert_eq!(listxattr(&p), Vec::<String>::new());
    setxattr(&p, "user.one", b"value one", 0).unwrap();
    setxattr(&p, "user.empty", b"", 0).unwrap();
    setxattr(&p, "trusted.secret", b"\0binary\xff", 0).unwrap();
    let big = pseudo_random(60, 60 * 1024);
    setxattr(&p, "user.big", &big, 0).unwrap();
    setxattr(&m.join("d"), "user.ondir", b"dir value", 0).unwrap();

    assert_eq!(getxattr(&p, "user.one").unwrap(), b"value one");
    assert_eq!(getxattr(&p, "user.empty").unwrap(), b"");
    assert_eq!(getxattr(&p, "trusted.secret").unwrap(), b"\0binary\xff");
    assert_bytes_eq(&getxattr(&p, "user.big").unwrap(), &big, "60 KiB xattr");
    assert_eq!(getxattr(&m.join("d"), "user.ondir").unwrap(), b"dir value");
    assert_eq!(
        listxattr(&p),
        vec!["trusted.secret", "user.big", "user.empty", "user.one"]
    );
    assert_errno(getxattr(&p, "user.missing"), libc::ENODATA, "get missing");

    // Too-small buffer is ERANGE.
    let c = cpath(&p);
    let n = std::ffi::CString::new("user.one").unwrap();
    let mut small = [0u8; 3];
    let r = unsafe {
        libc::getxattr(
            c.as_ptr(),
            n.as_ptr(),
            small.as_mut_ptr() as *mut libc::c_void,
            small.len(),
        )
    };
    assert_eq!(r, -1);
    assert_eq!(errno(), libc::ERANGE);

    // Flags.
    assert_errno(
        setxattr(&p, "user.one", b"again", libc::XATTR_CREATE),
        libc::EEXIST,
        "XATTR_CREATE on existing",
    );
    assert_errno(
        setxattr(&p, "user.nothere", b"v", libc::XATTR_REPLACE),
        libc::ENODATA,
        "XATTR_REPLACE on missing",
    );
    setxattr(&p, "user.one", b"replaced", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&p, "user.one").unwrap(), b"replaced");
    setxattr(&p, "user.new", b"created", libc::XATTR_CREATE).unwrap();
    assert_eq!(getxattr(&p, "user.new").unwrap(), b"created");

    // Remove.
    removexattr(&p, "user.one").unwrap();
    assert_errno(getxattr(&p, "user.one"), libc::ENODATA, "get removed");
    assert_errno(removexattr(&p, "user.one"), libc::ENODATA, "remove twice");
    assert_eq!(
        listxattr(&p),
        vec!["trusted.secret", "user.big", "user.empty", "user.new"]
    );
    // Value over the kernel limit.
    assert_errno(
        setxattr(&p, "user.huge", &vec![0u8; 65537], 0),
        libc::E2BIG,
        "66 KiB xattr",
    );
    // Xattrs follow the inode through a hard link and a rename.
    fs::hard_link(&p, m.join("link")).unwrap();
    fs::rename(&p, m.join("renamed")).unwrap();
    assert_eq!(getxattr(&m.join("link"), "user.new").unwrap(), b"created");
    assert_bytes_eq(
        &getxattr(&m.join("renamed"), "user.big").unwrap(),
        &big,
        "xattr after rename",
    );
}

#[test]
fn statfs_and_df() {
    let img = Image::new("256M");
    let m = img.mount();
    let size = 256 * MIB;
    let s = statvfs(m.path());
    let total = s.f_blocks * s.f_frsize;
    assert!(
        total <= size && total >= size * 85 / 100,
        "total {total} not close to image size {size}"
    );
    assert!(s.f_bfree <= s.f_blocks && s.f_bavail <= s.f_bfree);
    assert!(
        s.f_bsize > 0 && s.f_namemax >= 255,
        "bsize {} namemax {}",
        s.f_bsize,
        s.f_namemax
    );
    let free0 = s.f_bfree * s.f_frsize;
    assert!(
        free0 > total * 80 / 100,
        "fresh fs has only {free0} free of {total}"
    );

    write_sync(&m.join("ten"), &pseudo_random(10, 10 * MIB as usize));
    let free1 = free_bytes(m.path());
    assert!(
        free0 >= free1 + 10 * MIB - 64 * 1024,
        "free space dropped by only {} after writing 10 MiB",
        free0 as i64 - free1 as i64
    );
    assert!(
        free0 - free1 < 20 * MIB,
        "10 MiB write used {}",
        free0 - free1
    );

    // df agrees with statvfs and shows the image as the source.
    let out = run("df", &["-P", "-B1", m.path().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("df output: {text}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols.len(), 6, "df line: {line}");
    assert_eq!(cols[0], img.path().to_str().unwrap(), "df source");
    assert_eq!(cols[1].parse::<u64>().unwrap(), total, "df total");
    let avail: u64 = cols[3].parse().unwrap();
    assert!(
        avail <= free1 && avail + 20 * MIB > free1,
        "df avail {avail} vs free {free1}"
    );
    assert_eq!(cols[5], m.path().to_str().unwrap());
    // And /proc/mounts has the canonical image path as the source.
    let (src, _, fstype, _) = mount_entry(m.path()).unwrap();
    assert_eq!(src, img.path().to_str().unwrap());
    assert!(fstype.starts_with("fuse"), "fstype {fstype}");
}

#[test]
fn fsync_and_fdatasync() {
    let img = Image::new("256M");
    let m = img.mount();
    let p = m.join("f");
    let mut f = File::create(&p).unwrap();
    f.write_all(b"abc").unwrap();
    f.sync_all().unwrap();
    f.write_all(b"def").unwrap();
    f.sync_data().unwrap();
    assert_eq!(check(unsafe { libc::fdatasync(f.as_raw_fd()) }).unwrap(), 0);
    assert_eq!(check(unsafe { libc::fsync(f.as_raw_fd()) }).unwrap(), 0);
    drop(f);
    fs::create_dir(m.join("d")).unwrap();
    fsync_dir(&m.join("d"));
    fsync_dir(m.path());
    // fsync on a read-only fd is allowed.
    File::open(&p).unwrap().sync_all().unwrap();
    unsafe { libc::sync() };
    let c = cpath(&p);
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY) };
    assert!(fd >= 0);
    assert_eq!(
        unsafe { libc::syncfs(fd) },
        0,
        "syncfs: {}",
        io::Error::last_os_error()
    );
    unsafe { libc::close(fd) };
    assert_eq!(fs::read(&p).unwrap(), b"abcdef");
}

#[test]
fn shared_writable_mmap() {
    let img = Image::new("256M");
    let m = img.mount();
    let p = m.join("mapped");
    let len = 64 * 1024usize;
    fs::write(&p, vec![b'.'; len]).unwrap();
    let before = fs::metadata(&p).unwrap();
    sleep(Duration::from_millis(1100));
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        ptr,
        libc::MAP_FAILED,
        "mmap: {}",
        io::Error::last_os_error()
    );
    let map = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
    assert!(
        map.iter().all(|&b| b == b'.'),
        "mapping does not show file content"
    );
    let pattern = pseudo_random(99, 8192);
    map[1000..1000 + 8192].copy_from_slice(&pattern);
    map[len - 5..].copy_from_slice(b"tail!");
    assert_eq!(
        unsafe { libc::msync(ptr, len, libc::MS_SYNC) },
        0,
        "msync: {}",
        io::Error::last_os_error()
    );
    assert_eq!(unsafe { libc::munmap(ptr, len) }, 0);
    drop(f);
    let back = fs::read(&p).unwrap();
    assert_eq!(back.len(), len);
    assert_bytes_eq(&back[1000..1000 + 8192], &pattern, "mmap-written bytes");
    assert_eq!(&back[len - 5..], b"tail!");
    assert!(back[..1000].iter().all(|&b| b == b'.'));
    // Also through a fresh descriptor after dropping caches for the file.
    let f = File::open(&p).unwrap();
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut b = vec![0u8; 8192];
    f.read_exact_at(&mut b, 1000).unwrap();
    assert_bytes_eq(&b, &pattern, "after fadvise");
    let after = fs::metadata(&p).unwrap();
    assert!(
        mtime_ns(&after) > mtime_ns(&before),
        "mtime not moved by mmap write: {} -> {}",
        mtime_ns(&before),
        mtime_ns(&after)
    );
}

#[test]
fn o_direct_io() {
    let img = Image::new("256M");
    let m = img.mount();
    let p = m.join("direct");
    let len = 256 * 1024;
    let mut wbuf = AlignedBuf::new(len);
    wbuf.as_mut_slice().copy_from_slice(&pseudo_random(5, len));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    assert_eq!(f.write_at(wbuf.as_slice(), 0).unwrap(), len);
    // A second aligned write at an aligned offset beyond the first.
    assert_eq!(f.write_at(&wbuf.as_slice()[..4096], 1 << 20).unwrap(), 4096);
    let mut rbuf = AlignedBuf::new(len);
    assert_eq!(f.read_at(rbuf.as_mut_slice(), 0).unwrap(), len);
    assert_bytes_eq(rbuf.as_slice(), wbuf.as_slice(), "O_DIRECT read");
    f.sync_all().unwrap();
    drop(f);
    // Buffered read sees the O_DIRECT data and the gap is zero.
    let back = fs::read(&p).unwrap();
    assert_eq!(back.len(), (1 << 20) + 4096);
    assert_bytes_eq(&back[..len], wbuf.as_slice(), "buffered read");
    assert!(back[len..1 << 20].iter().all(|&b| b == 0));
    assert_bytes_eq(&back[1 << 20..], &wbuf.as_slice()[..4096], "second write");
    // Buffered write, then O_DIRECT read sees it.
    let g = OpenOptions::new().write(true).open(&p).unwrap();
    g.write_all_at(&[7u8; 4096], 8192).unwrap();
    drop(g);
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .unwrap();
    let mut r = AlignedBuf::new(4096);
    assert_eq!(f.read_at(r.as_mut_slice(), 8192).unwrap(), 4096);
    assert!(r.as_slice().iter().all(|&b| b == 7));
    // dd with oflag=direct.
    run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", m.join("dd").display()),
            "bs=64k",
            "count=16",
            "oflag=direct",
            "status=none",
        ],
    );
    assert_eq!(fs::metadata(m.join("dd")).unwrap().len(), 1 << 20);
}

fn fallocate(f: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<libc::c_int> {
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) })
}

#[test]
fn fallocate_modes() {
    let img = Image::new("256M");
    let m = img.mount();
    let p = m.join("fa");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();

    // Default mode extends the size and allocates blocks.
    let free0 = free_bytes(m.path());
    fallocate(&f, 0, 0, MIB).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), MIB);
    assert!(
        md.blocks() * 512 >= MIB,
        "st_blocks {} after 1 MiB fallocate",
        md.blocks()
    );
    assert!(
        free_bytes(m.path()) + MIB - 64 * 1024 <= free0,
        "fallocate did not reserve space"
    );
    let mut buf = vec![1u8; MIB as usize];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "fallocated range not zero");

    // KEEP_SIZE: blocks beyond EOF, size unchanged.
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, MIB, MIB).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), MIB, "KEEP_SIZE changed size");
    assert!(
        md.blocks() * 512 >= 2 * MIB,
        "st_blocks {} after KEEP_SIZE",
        md.blocks()
    );

    // Fill with data, punch a hole in the middle.
    let data = vec![0xabu8; MIB as usize];
    f.write_all_at(&data, 0).unwrap();
    f.sync_all().unwrap();
    let blocks_before = f.metadata().unwrap().blocks();
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        256 * 1024,
        256 * 1024,
    )
    .unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), MIB, "punch hole changed size");
    assert!(
        md.blocks() * 512 + 256 * 1024 <= blocks_before * 512,
        "punch hole freed no blocks: {} -> {}",
        blocks_before,
        md.blocks()
    );
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..256 * 1024].iter().all(|&b| b == 0xab));
    assert!(
        buf[256 * 1024..512 * 1024].iter().all(|&b| b == 0),
        "punched range not zero"
    );
    assert!(buf[512 * 1024..].iter().all(|&b| b == 0xab));
    // Unaligned punch zeroes partial blocks.
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        600_001,
        10_000,
    )
    .unwrap();
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf[600_000], 0xab);
    assert!(buf[600_001..610_001].iter().all(|&b| b == 0));
    assert_eq!(buf[610_001], 0xab);

    // ZERO_RANGE inside the file.
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 800_000, 100_000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), MIB);
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf[799_999], 0xab);
    assert!(
        buf[800_000..900_000].iter().all(|&b| b == 0),
        "zero range not zero"
    );
    assert_eq!(buf[900_000], 0xab);
    // ZERO_RANGE past EOF extends without KEEP_SIZE...
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, MIB, 4096).unwrap();
    assert_eq!(f.metadata().unwrap().len(), MIB + 4096);
    // ...and not with it.
    fallocate(
        &f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        2 * MIB,
        4096,
    )
    .unwrap();
    assert_eq!(f.metadata().unwrap().len(), MIB + 4096);
    let mut tail = vec![1u8; 4096];
    f.read_exact_at(&mut tail, MIB).unwrap();
    assert!(tail.iter().all(|&b| b == 0));
    // PUNCH_HOLE without KEEP_SIZE is EOPNOTSUPP per fallocate(2).
    assert_errno(
        fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096),
        libc::EOPNOTSUPP,
        "PUNCH_HOLE without KEEP_SIZE",
    );
    // `fallocate` tool.
    if have_tool("fallocate") {
        run("fallocate", &["-l", "2M", m.join("tool").to_str().unwrap()]);
        assert_eq!(fs::metadata(m.join("tool")).unwrap().len(), 2 * MIB);
    } else {
        println!("skipping fallocate(1) check: tool missing");
    }
}

fn lseek(f: &File, off: u64, whence: libc::c_int) -> io::Result<u64> {
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

#[test]
fn seek_data_and_hole() {
    let img = Image::new("256M");
    let m = img.mount();
    let p = m.join("holey");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    f.write_all_at(&chunk, 0).unwrap();
    f.write_all_at(&chunk, 2 * MIB).unwrap();
    f.sync_all().unwrap();
    let end = 2 * MIB + 64 * 1024;
    assert_eq!(f.metadata().unwrap().len(), end);

    assert_eq!(lseek(&f, 0, libc::SEEK_DATA).unwrap(), 0);
    assert_eq!(
        lseek(&f, 0, libc::SEEK_HOLE).unwrap(),
        64 * 1024,
        "first hole"
    );
    assert_eq!(lseek(&f, 100, libc::SEEK_HOLE).unwrap(), 64 * 1024);
    assert_eq!(
        lseek(&f, 64 * 1024, libc::SEEK_DATA).unwrap(),
        2 * MIB,
        "second data"
    );
    assert_eq!(lseek(&f, MIB, libc::SEEK_DATA).unwrap(), 2 * MIB);
    assert_eq!(
        lseek(&f, MIB, libc::SEEK_HOLE).unwrap(),
        MIB,
        "offset in a hole"
    );
    assert_eq!(
        lseek(&f, 2 * MIB, libc::SEEK_HOLE).unwrap(),
        end,
        "implicit hole at EOF"
    );
    assert_errno(
        lseek(&f, end, libc::SEEK_DATA),
        libc::ENXIO,
        "SEEK_DATA at EOF",
    );
    assert_errno(
        lseek(&f, end + 1, libc::SEEK_HOLE),
        libc::ENXIO,
        "SEEK_HOLE past EOF",
    );

    // A file ending in a hole.
    f.set_len(4 * MIB).unwrap();
    assert_eq!(
        lseek(&f, 2 * MIB + 64 * 1024, libc::SEEK_HOLE).unwrap(),
        end
    );
    assert_errno(
        lseek(&f, end, libc::SEEK_DATA),
        libc::ENXIO,
        "SEEK_DATA in trailing hole",
    );
    // `cp --sparse=always` keeps it sparse... checked through st_blocks.
    let md = f.metadata().unwrap();
    assert!(
        md.blocks() * 512 < MIB,
        "holey file uses {} blocks",
        md.blocks()
    );
}

fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("top.txt"), b"top level\n").unwrap();
    fs::write(root.join("a/data.bin"), pseudo_random(1, 300_000)).unwrap();
    fs::write(root.join("a/b/c/deep"), b"deep\n").unwrap();
    fs::write(root.join("a/b/exec.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("a/b/exec.sh"), fs::Permissions::from_mode(0o751)).unwrap();
    fs::set_permissions(root.join("top.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("../top.txt", root.join("a/link")).unwrap();
    fs::hard_link(root.join("a/b/c/deep"), root.join("a/hard")).unwrap();
    std::os::unix::fs::chown(root.join("a/b/c/deep"), Some(1000), Some(1000)).unwrap();
    let mut sparse = File::create(root.join("sparse")).unwrap();
    sparse.seek(SeekFrom::Start(5 * MIB)).unwrap();
    sparse.write_all(b"end").unwrap();
    utimens(
        &root.join("a/data.bin"),
        (1_200_000_000, 0),
        (1_300_000_000, 500),
    )
    .unwrap();
}

fn assert_same_meta(src: &Path, dst: &Path, rel: &str, check_times: bool) {
    let a = fs::symlink_metadata(src.join(rel)).unwrap();
    let b = fs::symlink_metadata(dst.join(rel)).unwrap();
    assert_eq!(a.mode(), b.mode(), "mode of {rel}");
    assert_eq!((a.uid(), a.gid()), (b.uid(), b.gid()), "owner of {rel}");
    if check_times {
        assert_eq!(a.mtime(), b.mtime(), "mtime of {rel}");
    }
}

#[test]
fn cp_and_tar_tree() {
    let img = Image::new("256M");
    let m = img.mount();
    let src_dir = tempdir("dmabuf-src-");
    let src = src_dir.path().join("tree");
    make_tree(&src);

    // cp -a in, diff -r, metadata preserved.
    run(
        "cp",
        &["-a", src.to_str().unwrap(), m.join("cp").to_str().unwrap()],
    );
    run(
        "diff",
        &[
            "-r",
            "--no-dereference",
            src.to_str().unwrap(),
            m.join("cp").to_str().unwrap(),
        ],
    );
    for rel in [
        "top.txt",
        "a/data.bin",
        "a/b/exec.sh",
        "a/b/c/deep",
        "a/link",
        "empty",
        "sparse",
    ] {
        assert_same_meta(&src, &m.join("cp"), rel, true);
    }
    assert_eq!(
        ino(&m.join("cp/a/hard")),
        ino(&m.join("cp/a/b/c/deep")),
        "cp -a hard link"
    );
    assert_eq!(
        fs::read_link(m.join("cp/a/link")).unwrap(),
        Path::new("../top.txt")
    );

    // tar out of the mount, into another host dir, compare.
    let out_dir = tempdir("dmabuf-out-");
    let archive = out_dir.path().join("t.tar");
    run(
        "tar",
        &[
            "-C",
            m.join("cp").to_str().unwrap(),
            "-cf",
            archive.to_str().unwrap(),
            ".",
        ],
    );
    // tar into the mount.
    fs::create_dir(m.join("tar")).unwrap();
    run(
        "tar",
        &[
            "-C",
            m.join("tar").to_str().unwrap(),
            "-xpf",
            archive.to_str().unwrap(),
        ],
    );
    run(
        "diff",
        &[
            "-r",
            "--no-dereference",
            src.to_str().unwrap(),
            m.join("tar").to_str().unwrap(),
        ],
    );
    for rel in [
        "top.txt",
        "a/data.bin",
        "a/b/exec.sh",
        "a/b/c/deep",
        "a/link",
    ] {
        assert_same_meta(&src, &m.join("tar"), rel, true);
    }
    assert_eq!(
        ino(&m.join("tar/a/hard")),
        ino(&m.join("tar/a/b/c/deep")),
        "tar hard link"
    );
    // And back out to the host with cp -a.
    let back = out_dir.path().join("back");
    run(
        "cp",
        &[
            "-a",
            m.join("tar").to_str().unwrap(),
            back.to_str().unwrap(),
        ],
    );
    run(
        "diff",
        &[
            "-r",
            "--no-dereference",
            src.to_str().unwrap(),
            back.to_str().unwrap(),
        ],
    );
    run(
        "cmp",
        &[
            src.join("a/data.bin").to_str().unwrap(),
            back.join("a/data.bin").to_str().unwrap(),
        ],
    );
}

#[test]
fn xfs_io_commands() {
    if !have_tool("xfs_io") {
        println!("SKIP: xfs_io is not installed (Debian package xfsprogs)");
        return;
    }
    let img = Image::new("256M");
    let m = img.mount();
    let p = m.join("xio");
    let ps = p.to_str().unwrap();
    run(
        "xfs_io",
        &[
            "-f",
            "-c",
            "pwrite -S 0x61 0 64k",
            "-c",
            "pwrite -S 0x62 1m 4k",
            "-c",
            "fsync",
            "-c",
            "fpunch 4k 4k",
            ps,
        ],
    );
    let data = fs::read(&p).unwrap();
    assert_eq!(data.len() as u64, MIB + 4096);
    assert!(data[..4096].iter().all(|&b| b == 0x61));
    assert!(
        data[4096..8192].iter().all(|&b| b == 0),
        "fpunch range not zero"
    );
    assert!(data[8192..65536].iter().all(|&b| b == 0x61));
    assert!(data[65536..MIB as usize].iter().all(|&b| b == 0));
    assert!(data[MIB as usize..].iter().all(|&b| b == 0x62));
    let out = run("xfs_io", &["-c", "seek -h 0", ps]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("4096"), "xfs_io seek -h 0: {text}");
}
