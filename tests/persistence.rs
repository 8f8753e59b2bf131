//! What survives umount + mount, and how mount/mkfs/fsck treat bad or
//! existing images and read-only mounts.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::hash::Hasher;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

#[derive(Debug, PartialEq, Eq, Clone)]
struct Entry {
    rel: String,
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: Option<u64>,
    nlink: Option<u64>,
    rdev: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    link_target: Option<PathBuf>,
    /// First path (in walk order) of the same inode, for hard links.
    same_inode_as: Option<String>,
    xattrs: Vec<(String, Vec<u8>)>,
    content_hash: Option<u64>,
}

fn list_xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let c = cpath(p);
    let size = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    assert!(
        size >= 0,
        "llistxattr {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
    let mut buf = vec![0u8; size as usize + 1];
    let got =
        unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    assert!(
        got >= 0,
        "llistxattr {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
    buf.truncate(got as usize);
    let mut out = Vec::new();
    for name in buf.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::CString::new(name).unwrap();
        let mut val = vec![0u8; 65536];
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr() as *mut libc::c_void,
                val.len(),
            )
        };
        assert!(
            n >= 0,
            "lgetxattr {}: {}",
            p.display(),
            io::Error::last_os_error()
        );
        val.truncate(n as usize);
        out.push((String::from_utf8_lossy(name).into_owned(), val));
    }
    out.sort();
    out
}

fn hash_file(p: &Path) -> u64 {
    let mut f = File::open(p).unwrap();
    let mut h = DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
    }
    h.finish()
}

/// Everything observable about a tree except atime (reads may move it).
/// Files larger than 64 MiB (sparse ones) are not hashed; check them
/// separately. Neither is "timed", whose atime is checked.
fn snapshot(root: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut inodes: HashMap<u64, String> = HashMap::new();
    walk(root, root, &mut out, &mut inodes);
    out
}

fn walk(root: &Path, p: &Path, out: &mut Vec<Entry>, inodes: &mut HashMap<u64, String>) {
    let md = fs::symlink_metadata(p).unwrap();
    let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "chr"
    } else if ft.is_block_device() {
        "blk"
    } else if ft.is_socket() {
        "sock"
    } else {
        "?"
    };
    let same_inode_as = if ft.is_dir() {
        None
    } else {
        let first = inodes.entry(md.ino()).or_insert_with(|| rel.clone());
        (first != &rel).then(|| first.clone())
    };
    out.push(Entry {
        rel: rel.clone(),
        kind,
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        size: (!ft.is_dir()).then_some(md.len()),
        nlink: (!ft.is_dir()).then_some(md.nlink()),
        rdev: md.rdev(),
        mtime: (md.mtime(), md.mtime_nsec()),
        ctime: (md.ctime(), md.ctime_nsec()),
        link_target: ft.is_symlink().then(|| fs::read_link(p).unwrap()),
        same_inode_as,
        xattrs: if ft.is_symlink() {
            Vec::new()
        } else {
            list_xattrs(p)
        },
        // "timed" is never read so that its atime stays as set.
        content_hash: (ft.is_file() && md.len() <= 64 * MIB && rel != "timed")
            .then(|| hash_file(p)),
    });
    if ft.is_dir() {
        let mut names: Vec<_> = fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            walk(root, &p.join(n), out, inodes);
        }
    }
}

#[track_caller]
fn assert_snapshots_eq(before: &[Entry], after: &[Entry], when: &str) {
    let a: HashMap<&str, &Entry> = before.iter().map(|e| (e.rel.as_str(), e)).collect();
    let b: HashMap<&str, &Entry> = after.iter().map(|e| (e.rel.as_str(), e)).collect();
    let mut problems = Vec::new();
    for e in before {
        match b.get(e.rel.as_str()) {
            None => problems.push(format!("missing after {when}: {:?}", e.rel)),
            Some(x) if *x != e => problems.push(format!(
                "changed: {:?}\n  before {e:?}\n  after  {x:?}",
                e.rel
            )),
            _ => {}
        }
    }
    for e in after {
        if !a.contains_key(e.rel.as_str()) {
            problems.push(format!("appeared after {when}: {:?}", e.rel));
        }
    }
    if !problems.is_empty() {
        let shown: Vec<_> = problems.iter().take(20).cloned().collect();
        panic!(
            "{} differences after {when}:\n{}",
            problems.len(),
            shown.join("\n")
        );
    }
}

fn setxattr(p: &Path, name: &str, val: &[u8]) {
    let c = cpath(p);
    let n = std::ffi::CString::new(name).unwrap();
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            val.as_ptr() as *const libc::c_void,
            val.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
}

fn utimens(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
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
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        r,
        0,
        "utimensat {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Builds a varied tree; returns the 20 MiB random content.
fn populate(m: &Path) -> Vec<u8> {
    fs::create_dir_all(m.join("dir/sub/deeper")).unwrap();
    fs::create_dir(m.join("empty_dir")).unwrap();
    fs::write(m.join("small.txt"), b"small file\n").unwrap();
    File::create(m.join("empty_file")).unwrap();
    fs::write(m.join("dir/sub/deeper/leaf"), pseudo_random(2, 12_345)).unwrap();
    let big = pseudo_random(20, 20 * MIB as usize);
    let mut f = File::create(m.join("dir/big.bin")).unwrap();
    for c in big.chunks(1_000_000) {
        f.write_all(c).unwrap();
    }
    drop(f);
    // Overwrite part of a file and truncate another.
    let f = OpenOptions::new()
        .write(true)
        .open(m.join("dir/sub/deeper/leaf"))
        .unwrap();
    f.write_all_at(b"OVERWRITTEN", 4000).unwrap();
    f.set_len(10_000).unwrap();
    drop(f);
    // Symlinks.
    std::os::unix::fs::symlink("../small.txt", m.join("dir/link_rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", m.join("dangling")).unwrap();
    // Hard links.
    fs::write(m.join("hl_a"), b"hard linked").unwrap();
    fs::hard_link(m.join("hl_a"), m.join("dir/hl_b")).unwrap();
    fs::hard_link(m.join("hl_a"), m.join("dir/sub/hl_c")).unwrap();
    // Modes, owners, times.
    chmod(&m.join("small.txt"), 0o640);
    fs::write(m.join("setuid"), b"#!/bin/sh\n").unwrap();
    chmod(&m.join("setuid"), 0o4755);
    chmod(&m.join("empty_dir"), 0o1770);
    std::os::unix::fs::chown(m.join("empty_file"), Some(1000), Some(1001)).unwrap();
    std::os::unix::fs::chown(m.join("dir/sub"), Some(65534), Some(65534)).unwrap();
    std::os::unix::fs::lchown(m.join("dangling"), Some(1000), Some(1000)).unwrap();
    fs::write(m.join("timed"), b"t").unwrap();
    utimens(
        &m.join("timed"),
        (1_111_111_111, 111_111_111),
        (1_222_222_222, 222_222_222),
    );
    utimens(
        &m.join("dir/link_rel"),
        (1_000_000_001, 1),
        (1_000_000_002, 2),
    );
    // Xattrs.
    setxattr(&m.join("small.txt"), "user.color", b"blue");
    setxattr(&m.join("small.txt"), "trusted.t", b"\x00\x01\x02");
    setxattr(&m.join("dir"), "user.dirattr", b"on a directory");
    setxattr(&m.join("empty_file"), "user.big", &pseudo_random(9, 50_000));
    // Special files.
    let c = cpath(m.join("fifo"));
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let c = cpath(m.join("chardev"));
    assert_eq!(
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 5)) },
        0
    );
    // Sparse: data at 1 GiB and at the end of a 3 GiB file.
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.join("sparse"))
        .unwrap();
    f.write_all_at(b"at one gib", GIB).unwrap();
    f.write_all_at(b"end", 3 * GIB - 3).unwrap();
    drop(f);
    // A directory with many small files.
    fs::create_dir(m.join("many")).unwrap();
    for i in 0..500u64 {
        fs::write(
            m.join(format!("many/f{i}")),
            pseudo_random(i, (i as usize * 37) % 5000),
        )
        .unwrap();
    }
    // Things that were created and then removed or renamed.
    fs::write(m.join("deleted"), b"gone").unwrap();
    fs::remove_file(m.join("deleted")).unwrap();
    fs::create_dir(m.join("deleted_dir")).unwrap();
    fs::remove_dir(m.join("deleted_dir")).unwrap();
    fs::write(m.join("old_name"), b"renamed file").unwrap();
    fs::rename(m.join("old_name"), m.join("dir/new_name")).unwrap();
    big
}

fn check_sparse(m: &Path) {
    let p = m.join("sparse");
    let md = fs::metadata(&p).unwrap();
    assert_eq!(md.len(), 3 * GIB);
    assert!(
        md.blocks() * 512 < MIB,
        "sparse file uses {} blocks",
        md.blocks()
    );
    let f = File::open(&p).unwrap();
    let mut b = [0xffu8; 10];
    f.read_exact_at(&mut b, GIB).unwrap();
    assert_eq!(&b, b"at one gib");
    let mut e = [0xffu8; 3];
    f.read_exact_at(&mut e, 3 * GIB - 3).unwrap();
    assert_eq!(&e, b"end");
    let mut z = vec![0xffu8; 65536];
    for off in [0, GIB - 65536, 2 * GIB] {
        f.read_exact_at(&mut z, off).unwrap();
        assert!(z.iter().all(|&x| x == 0), "hole at {off} not zero");
    }
}

#[test]
fn everything_survives_remount() {
    let img = Image::new("256M");
    let mut m = img.mount();
    let big = populate(m.path());
    let before = snapshot(m.path());
    assert!(before.len() > 500, "snapshot too small: {}", before.len());

    m.remount();
    let after = snapshot(m.path());
    assert_snapshots_eq(&before, &after, "remount");
    assert_bytes_eq(
        &fs::read(m.join("dir/big.bin")).unwrap(),
        &big,
        "20 MiB file after remount",
    );
    check_sparse(m.path());
    let t = fs::metadata(m.join("timed")).unwrap();
    assert_eq!(
        (t.atime(), t.atime_nsec()),
        (1_111_111_111, 111_111_111),
        "atime"
    );
    assert_eq!(
        (t.mtime(), t.mtime_nsec()),
        (1_222_222_222, 222_222_222),
        "mtime"
    );
    assert!(!m.join("deleted").exists());
    assert_eq!(fs::read(m.join("dir/new_name")).unwrap(), b"renamed file");
    assert_eq!(fs::metadata(m.join("hl_a")).unwrap().nlink(), 3);

    // Second generation of changes on top, then another remount.
    fs::remove_file(m.join("dir/hl_b")).unwrap();
    for i in 0..250u64 {
        fs::remove_file(m.join(format!("many/f{i}"))).unwrap();
    }
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.join("small.txt"))
        .unwrap();
    f.write_all(b"appended after remount\n").unwrap();
    drop(f);
    fs::remove_dir_all(m.join("dir/sub/deeper")).unwrap();
    fs::write(m.join("dir/big.bin"), b"replaced").unwrap();
    let before2 = snapshot(m.path());
    m.remount();
    let after2 = snapshot(m.path());
    assert_snapshots_eq(&before2, &after2, "second remount");
    assert_eq!(fs::metadata(m.join("hl_a")).unwrap().nlink(), 2);
    assert_eq!(fs::read(m.join("dir/big.bin")).unwrap(), b"replaced");

    m.unmount();
    let out = img.fsck();
    assert!(
        out.status.success(),
        "fsck after remounts:\n{}",
        output_text(&out)
    );
}

#[test]
fn mkfs_refuses_existing_fs_without_force() {
    let img = Image::new("256M");
    let mut m = img.mount();
    fs::write(m.join("keep"), b"precious").unwrap();
    m.unmount();

    let out = fs_cmd(&["mkfs", img.path().to_str().unwrap(), "--size", "256M"]);
    assert!(
        !out.status.success(),
        "mkfs over an existing fs succeeded without --force"
    );
    assert!(
        !output_text(&out).trim().is_empty(),
        "mkfs refused without a message"
    );
    m.mount();
    assert_eq!(
        fs::read(m.join("keep")).unwrap(),
        b"precious",
        "refused mkfs damaged the fs"
    );
    m.unmount();

    run(
        bin(),
        &[
            "mkfs",
            img.path().to_str().unwrap(),
            "--size",
            "256M",
            "--force",
        ],
    );
    m.mount();
    assert!(!m.join("keep").exists(), "mkfs --force kept old content");
    assert_eq!(
        fs::read_dir(m.path()).unwrap().count(),
        0,
        "fresh fs root not empty"
    );
    m.unmount();
    img.assert_fsck_clean();
}

#[test]
fn mkfs_size_suffixes() {
    for (arg, bytes) in [("8M", 8 * MIB), ("16384K", 16 * MIB), ("1G", GIB)] {
        let img = Image::unformatted();
        run(
            bin(),
            &["mkfs", img.path().to_str().unwrap(), "--size", arg],
        );
        let md = fs::metadata(img.path()).unwrap();
        assert_eq!(md.len(), bytes, "image size for --size {arg}");
        assert!(
            md.blocks() * 512 < bytes / 2,
            "image for {arg} is not sparse ({} blocks)",
            md.blocks()
        );
        img.assert_fsck_clean();
    }
}

fn assert_mount_fails(image: &Path, keywords: &[&str], what: &str) {
    let mnt_dir = tempdir("dmabuf-mnt-");
    let mnt = fs::canonicalize(mnt_dir.path()).unwrap();
    let out = mount_cmd(image, &mnt, None);
    let mounted = is_mounted(&mnt);
    if mounted {
        let _ = run_unchecked("umount", &[mnt.as_os_str()]);
        if is_mounted(&mnt) {
            let _ = run_unchecked("umount", &[std::ffi::OsStr::new("-l"), mnt.as_os_str()]);
        }
    }
    let text = output_text(&out);
    assert!(!out.status.success(), "mount of {what} succeeded:\n{text}");
    assert!(
        !mounted,
        "mount of {what} failed but left {} mounted",
        mnt.display()
    );
    assert!(
        wait_for(Duration::from_secs(5), || daemon_pids(&mnt).is_empty()),
        "mount of {what} left a daemon running: {:?}",
        daemon_pids(&mnt)
    );
    assert!(
        keywords.iter().any(|k| text.contains(k)),
        "mount of {what}: message does not say what is wrong (want one of {keywords:?}):\n{text}"
    );
}

#[test]
fn mount_missing_image_fails() {
    let img = Image::unformatted();
    assert!(!img.path().exists());
    assert_mount_fails(
        img.path(),
        &[
            "no such file",
            "not found",
            "does not exist",
            "fs.img",
            "missing",
        ],
        "a missing image",
    );
    assert!(!img.path().exists(), "mount of a missing image created it");
}

#[test]
fn mount_random_bytes_fails() {
    let img = Image::unformatted();
    fs::write(img.path(), pseudo_random(1234, 8 * MIB as usize)).unwrap();
    let before = fs::read(img.path()).unwrap();
    assert_mount_fails(
        img.path(),
        &[
            "magic",
            "not a dmabuf",
            "superblock",
            "corrupt",
            "invalid",
            "checksum",
            "bad",
        ],
        "random bytes",
    );
    let out = img.fsck();
    assert!(
        !out.status.success(),
        "fsck of random bytes exited 0:\n{}",
        output_text(&out)
    );
    assert_bytes_eq(
        &fs::read(img.path()).unwrap(),
        &before,
        "random image after failed mount/fsck",
    );
}

#[test]
fn mount_truncated_image_fails() {
    let img = Image::new("256M");
    let mut m = img.mount();
    fs::write(m.join("f"), pseudo_random(1, 100_000)).unwrap();
    m.unmount();
    drop(m);
    let f = OpenOptions::new().write(true).open(img.path()).unwrap();
    f.set_len(4 * 4096).unwrap();
    drop(f);
    assert_mount_fails(
        img.path(),
        &[
            "truncat",
            "size",
            "short",
            "small",
            "blocks",
            "superblock",
            "corrupt",
            "invalid",
            "geometry",
            "end of file",
            "eof",
        ],
        "a truncated image",
    );
    let out = img.fsck();
    assert!(
        !out.status.success(),
        "fsck of a truncated image exited 0:\n{}",
        output_text(&out)
    );
}

#[test]
fn read_only_mount_refuses_writes() {
    let img = Image::new("256M");
    let mut m = img.mount();
    fs::write(m.join("f"), b"content").unwrap();
    fs::create_dir(m.join("d")).unwrap();
    m.unmount();
    let image_before = hash_file(img.path());

    m.mount_with(Some("ro"));
    let (_, _, _, opts) = mount_entry(m.path()).unwrap();
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "mount options {opts} lack ro"
    );
    assert_eq!(fs::read(m.join("f")).unwrap(), b"content");
    assert_errno(
        OpenOptions::new().write(true).open(m.join("f")),
        libc::EROFS,
        "open for write",
    );
    assert_errno(fs::write(m.join("new"), b"x"), libc::EROFS, "create");
    assert_errno(fs::create_dir(m.join("d2")), libc::EROFS, "mkdir");
    assert_errno(fs::remove_file(m.join("f")), libc::EROFS, "unlink");
    assert_errno(fs::remove_dir(m.join("d")), libc::EROFS, "rmdir");
    assert_errno(fs::rename(m.join("f"), m.join("g")), libc::EROFS, "rename");
    assert_errno(
        fs::set_permissions(m.join("f"), fs::Permissions::from_mode(0o600)),
        libc::EROFS,
        "chmod",
    );
    assert_errno(
        std::os::unix::fs::symlink("f", m.join("s")),
        libc::EROFS,
        "symlink",
    );
    assert_eq!(fs::read(m.join("f")).unwrap(), b"content");
    m.unmount();
    assert_eq!(
        hash_file(img.path()),
        image_before,
        "image changed by a ro mount"
    );
    img.assert_fsck_clean();
}

#[test]
fn cli_remount_read_only_keeps_one_daemon() {
    let img = Image::new("256M");
    let mut m = img.mount();
    fs::write(m.join("before"), b"written rw").unwrap();
    let daemons = m.daemons();
    assert_eq!(daemons.len(), 1, "daemons for a fresh mount: {daemons:?}");

    let out = mount_cmd(img.path(), m.path(), Some("remount,ro"));
    assert!(
        out.status.success(),
        "remount,ro failed:\n{}",
        output_text(&out)
    );
    assert!(is_mounted(m.path()), "remount unmounted the fs");
    let (_, _, _, opts) = mount_entry(m.path()).unwrap();
    assert!(
        opts.split(',').any(|o| o == "ro"),
        "options after remount,ro: {opts}"
    );
    assert_errno(
        fs::write(m.join("after"), b"x"),
        libc::EROFS,
        "create after remount,ro",
    );
    assert_errno(
        OpenOptions::new().append(true).open(m.join("before")),
        libc::EROFS,
        "append after remount,ro",
    );
    assert_errno(
        fs::remove_file(m.join("before")),
        libc::EROFS,
        "unlink after remount,ro",
    );
    assert_eq!(fs::read(m.join("before")).unwrap(), b"written rw");
    // Give a wrongly started second daemon a moment to show up.
    std::thread::sleep(Duration::from_millis(300));
    let now = m.daemons();
    assert_eq!(
        now, daemons,
        "daemons after remount,ro: {now:?} (before {daemons:?})"
    );

    m.unmount();
    img.assert_fsck_clean();
    m.mount_with(None);
    assert_eq!(fs::read(m.join("before")).unwrap(), b"written rw");
    fs::write(m.join("after"), b"rw again").unwrap();
}

#[test]
fn image_is_locked_while_mounted() {
    let img = Image::new("256M");
    let m = img.mount();
    fs::write(m.join("f"), b"x").unwrap();
    // A second mount and an fsck of the same image must not succeed while
    // the daemon holds it (both give up after waiting for the lock).
    let path = img.path().to_path_buf();
    let fsck = std::thread::spawn(move || {
        let t = Instant::now();
        let out = fs_cmd(&[std::ffi::OsStr::new("fsck"), path.as_os_str()]);
        (out, t.elapsed())
    });
    let mnt_dir = tempdir("dmabuf-mnt-");
    let mnt2 = fs::canonicalize(mnt_dir.path()).unwrap();
    let out = mount_cmd(img.path(), &mnt2, None);
    let second_mounted = is_mounted(&mnt2);
    if second_mounted {
        let _ = run_unchecked("umount", &[mnt2.as_os_str()]);
        if is_mounted(&mnt2) {
            let _ = run_unchecked("umount", &[std::ffi::OsStr::new("-l"), mnt2.as_os_str()]);
        }
    }
    assert!(
        !out.status.success(),
        "second mount of a mounted image succeeded"
    );
    assert!(!second_mounted, "second mount left a mount behind");
    assert!(
        !output_text(&out).trim().is_empty(),
        "second mount failed silently"
    );
    let (fout, _took) = fsck.join().unwrap();
    assert!(
        !fout.status.success(),
        "fsck of a mounted image exited 0:\n{}",
        output_text(&fout)
    );
    assert_eq!(fs::read(m.join("f")).unwrap(), b"x", "first mount broken");
}

#[test]
fn fsck_repair_on_clean_image_changes_nothing() {
    let img = Image::new("256M");
    let mut m = img.mount();
    fs::create_dir(m.join("d")).unwrap();
    fs::write(m.join("d/f"), pseudo_random(5, 100_000)).unwrap();
    let before = snapshot(m.path());
    m.unmount();
    let out = fs_cmd(&[
        std::ffi::OsStr::new("fsck"),
        std::ffi::OsStr::new("--repair"),
        img.path().as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "fsck --repair on a clean image:\n{}",
        output_text(&out)
    );
    img.assert_fsck_clean();
    m.mount();
    assert_snapshots_eq(&before, &snapshot(m.path()), "fsck --repair");
}

#[test]
fn mount_source_is_canonical_and_harmless_options_accepted() {
    let img = Image::new("256M");
    let link = img.dir().join("link.img");
    std::os::unix::fs::symlink("fs.img", &link).unwrap();
    // A non-canonical spelling: through "." and a symlink.
    let odd = img.dir().join(".").join("link.img");
    let mut m = Mounted::new(
        &odd,
        Some("rw,dev,suid,exec,atime,noatime,default_permissions,threads=3"),
    );
    let (src, _, fstype, _) = mount_entry(m.path()).unwrap();
    assert_eq!(
        src,
        img.path().to_str().unwrap(),
        "mount source is not the canonical image path"
    );
    assert!(fstype.starts_with("fuse"), "fstype {fstype}");
    fs::write(m.join("f"), b"works").unwrap();
    assert_eq!(fs::read(m.join("f")).unwrap(), b"works");
    m.unmount();
    img.assert_fsck_clean();
}
