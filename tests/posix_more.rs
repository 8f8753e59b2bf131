//! POSIX behaviour the real xfstests run asked for: atime modes, removed
//! directories that are still open, file handles, readdir during renames,
//! privilege dropping on fallocate, device nodes, and reuse of freed space.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use common::{as_user, cpath, Image, USER_A};

fn atime(p: &std::path::Path) -> (i64, i64) {
    let m = fs::metadata(p).unwrap();
    (m.atime(), m.atime_nsec())
}

#[test]
fn relatime_and_strictatime() {
    let img = Image::new("64M");
    let mut m = img.mount();
    let p = m.join("f");
    fs::write(&p, b"data").unwrap();
    // relatime: a read after a write (atime <= mtime) updates atime...
    std::thread::sleep(Duration::from_millis(20));
    let before = atime(&p);
    fs::read(&p).unwrap();
    let after = atime(&p);
    assert!(
        after > before,
        "relatime: read after write did not update atime"
    );
    // ...but a second read does not.
    std::thread::sleep(Duration::from_millis(20));
    fs::read(&p).unwrap();
    assert_eq!(atime(&p), after, "relatime: atime moved on a second read");
    // Writing again makes the next read update it, even with pages cached.
    OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"more")
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    fs::read(&p).unwrap();
    assert!(
        atime(&p) > after,
        "relatime: read after a second write kept the old atime"
    );
    // strictatime: every read.
    m.unmount();
    m.mount_with(Some("strictatime"));
    let p = m.join("f");
    for _ in 0..2 {
        let t = atime(&p);
        std::thread::sleep(Duration::from_millis(20));
        fs::read(&p).unwrap();
        assert!(atime(&p) > t, "strictatime: read did not update atime");
    }
    // noatime: never.
    m.unmount();
    m.mount_with(Some("noatime"));
    let p = m.join("f");
    let t = atime(&p);
    OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    fs::read(&p).unwrap();
    assert_eq!(atime(&p), t, "noatime: atime changed");
}

#[test]
fn removed_directory_stays_usable_while_open() {
    let img = Image::new("64M");
    let m = img.mount();
    fs::create_dir(m.join("a")).unwrap();
    fs::create_dir(m.join("b")).unwrap();
    let d = File::open(m.join("b")).unwrap();
    // Rename a over b: b's inode is gone from the tree but still open.
    fs::rename(m.join("a"), m.join("b")).unwrap();
    let meta = d.metadata().expect("fstat of an open, replaced directory");
    assert_eq!(meta.nlink(), 0);
    // Nothing can be created in it.
    let c = CString::new("x").unwrap();
    // SAFETY: openat on an open directory fd with a valid name.
    let r = unsafe {
        libc::openat(
            d.as_raw_fd(),
            c.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY,
            0o644,
        )
    };
    assert_eq!(r, -1);
    drop(d);
    drop(m);
    img.assert_fsck_clean();
}

#[test]
fn file_handles_open_by_handle_at() {
    let img = Image::new("64M");
    let m = img.mount();
    fs::create_dir(m.join("d")).unwrap();
    fs::write(m.join("d/f"), b"by handle").unwrap();
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        data: [u8; 128],
    }
    let mut h = Handle {
        bytes: 128,
        kind: 0,
        data: [0; 128],
    };
    let mut mount_id = 0;
    let path = cpath(m.join("d/f"));
    // SAFETY: a valid path and a handle buffer of the declared size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            path.as_ptr(),
            &mut h,
            &mut mount_id,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "name_to_handle_at: {}",
        std::io::Error::last_os_error()
    );
    let root = File::open(m.path()).unwrap();
    // SAFETY: the handle filled above; a directory fd on the same mount.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            root.as_raw_fd(),
            &h,
            libc::O_RDONLY,
        )
    };
    assert!(
        fd >= 0,
        "open_by_handle_at: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd as i32) };
    let mut s = String::new();
    std::io::Read::read_to_string(&mut &f, &mut s).unwrap();
    assert_eq!(s, "by handle");
}

#[test]
fn readdir_while_renaming_in_place_sees_each_entry_once() {
    let img = Image::new("64M");
    let m = img.mount();
    let d = m.join("d");
    fs::create_dir(&d).unwrap();
    for i in 0..2000 {
        File::create(d.join(format!("f{i:04}"))).unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    let mut count = 0;
    for e in fs::read_dir(&d).unwrap() {
        let name = e.unwrap().file_name();
        count += 1;
        assert!(count <= 2000, "readdir returned more entries than exist");
        assert!(seen.insert(name.clone()), "{name:?} returned twice");
        fs::rename(d.join(&name), d.join("TEMPFILE")).unwrap();
        fs::rename(d.join("TEMPFILE"), d.join(&name)).unwrap();
    }
    assert_eq!(count, 2000);
}

#[test]
fn fallocate_by_non_root_drops_setuid() {
    let img = Image::new("64M");
    let m = img.mount_with("allow_other");
    let dir = m.join("shared");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let p = dir.join("f");
    let pc = p.clone();
    as_user(USER_A.0, USER_A.1, move || {
        File::create(&pc)?.write_all(b"x")?;
        fs::set_permissions(&pc, fs::Permissions::from_mode(0o6775))
    })
    .unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o6775);
    let pc = p.clone();
    as_user(USER_A.0, USER_A.1, move || {
        let f = OpenOptions::new().write(true).open(&pc)?;
        // SAFETY: plain syscall on an open fd.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 8192) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(
        fs::metadata(&p).unwrap().mode() & 0o7777,
        0o775,
        "setuid/setgid survived fallocate"
    );
    // A root-owned setgid file, not group-executable, punched by a user
    // outside its group: setgid goes too, and stat shows it at once.
    let q = dir.join("g");
    File::create(&q).unwrap().write_all(&[1; 8192]).unwrap();
    fs::set_permissions(&q, fs::Permissions::from_mode(0o6666)).unwrap();
    let qc = q.clone();
    as_user(USER_A.0, USER_A.1, move || {
        let f = OpenOptions::new().write(true).open(&qc)?;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: plain syscall on an open fd.
        if unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, 4096) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(
        fs::metadata(&q).unwrap().mode() & 0o7777,
        0o666,
        "setgid survived a punch by a non-member"
    );
}

#[test]
fn device_nodes_work_on_a_root_mount() {
    let img = Image::new("64M");
    let m = img.mount();
    let p = cpath(m.join("null"));
    // SAFETY: a valid path; makedev(1, 3) is /dev/null.
    let r = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
    let mut f = OpenOptions::new()
        .write(true)
        .open(m.join("null"))
        .expect("open a device node (nodev?)");
    f.write_all(b"into the void").unwrap();
}

#[test]
fn freed_space_is_reusable_at_once() {
    let img = Image::new("128M");
    let m = img.mount_with("commit=3600");
    let big = vec![7u8; 1 << 20];
    for round in 0..3 {
        // Fill the device, delete everything, fill it again right away:
        // the freed blocks must not wait for the periodic commit.
        let mut n = 0;
        loop {
            let r =
                File::create(m.join(format!("f{round}-{n}"))).and_then(|mut f| f.write_all(&big));
            match r {
                Ok(()) => n += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert!(n > 80, "round {round}: only {n} MiB fit");
        for i in 0..=n {
            let _ = fs::remove_file(m.join(format!("f{round}-{i}")));
        }
    }
}

/// Runs a libc call that returns -1 on error as an io::Result.
fn sys(r: libc::c_int) -> std::io::Result<()> {
    common::check(r).map(|_| ())
}

#[test]
fn names_over_255_bytes_are_enametoolong_for_every_call() {
    use common::assert_errno;
    let img = Image::new("64M");
    let m = img.mount();
    let dir = m.join("d");
    fs::create_dir(&dir).unwrap();
    // 255 bytes (NAME_MAX) works end to end.
    let ok = dir.join("a".repeat(255));
    fs::write(&ok, b"x").unwrap();
    assert_eq!(fs::metadata(&ok).unwrap().len(), 1);
    fs::hard_link(&ok, dir.join("b".repeat(255))).unwrap();
    fs::rename(dir.join("b".repeat(255)), dir.join("c".repeat(255))).unwrap();
    fs::remove_file(dir.join("c".repeat(255))).unwrap();
    fs::create_dir(dir.join("e".repeat(255))).unwrap();
    fs::remove_dir(dir.join("e".repeat(255))).unwrap();
    // 256 bytes: ENAMETOOLONG, never ENOENT, from every call (twice, so
    // an answer the kernel cached is checked too).
    let long = dir.join("z".repeat(256));
    let c = cpath(&long);
    let file = cpath(&ok);
    let e = libc::ENAMETOOLONG;
    for _ in 0..2 {
        assert_errno(fs::metadata(&long), e, "stat");
        assert_errno(sys(unsafe { libc::chmod(c.as_ptr(), 0o644) }), e, "chmod");
        assert_errno(sys(unsafe { libc::chown(c.as_ptr(), 1, 1) }), e, "chown");
        assert_errno(sys(unsafe { libc::truncate(c.as_ptr(), 0) }), e, "truncate");
        // ftruncate's way in: the open that would create the file.
        let flags = libc::O_CREAT | libc::O_RDWR;
        assert_errno(
            sys(unsafe { libc::open(c.as_ptr(), flags, 0o644) }),
            e,
            "open(O_CREAT)",
        );
        assert_errno(sys(unsafe { libc::unlink(c.as_ptr()) }), e, "unlink");
        assert_errno(sys(unsafe { libc::rmdir(c.as_ptr()) }), e, "rmdir");
        assert_errno(sys(unsafe { libc::mkdir(c.as_ptr(), 0o755) }), e, "mkdir");
        assert_errno(
            sys(unsafe { libc::link(file.as_ptr(), c.as_ptr()) }),
            e,
            "link to",
        );
        assert_errno(
            sys(unsafe { libc::link(c.as_ptr(), file.as_ptr()) }),
            e,
            "link from",
        );
        assert_errno(
            sys(unsafe { libc::rename(file.as_ptr(), c.as_ptr()) }),
            e,
            "rename to",
        );
        assert_errno(
            sys(unsafe { libc::rename(c.as_ptr(), file.as_ptr()) }),
            e,
            "rename from",
        );
        assert_errno(
            sys(unsafe { libc::symlink(file.as_ptr(), c.as_ptr()) }),
            e,
            "symlink",
        );
    }
    // Nothing was created or lost on the way.
    let names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("a".repeat(255))]);
    fs::remove_file(&ok).unwrap();
}

fn renameat2(from: &std::path::Path, to: &std::path::Path, flags: u32) -> std::io::Result<()> {
    let (f, t) = (cpath(from), cpath(to));
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    };
    sys(r)
}

fn assert_whiteout(p: &std::path::Path, uid: u32, gid: u32) {
    let m = fs::symlink_metadata(p).unwrap();
    assert_eq!(
        m.mode(),
        libc::S_IFCHR,
        "{}: mode {:o}",
        p.display(),
        m.mode()
    );
    assert_eq!(m.rdev(), 0, "{}: rdev", p.display());
    assert_eq!((m.uid(), m.gid()), (uid, gid), "{}: owner", p.display());
}

#[test]
fn rename_whiteout_leaves_a_whiteout_in_the_same_operation() {
    use common::assert_errno;
    let img = Image::new("64M");
    let mut m = img.mount();
    let dir = m.join("d");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    fs::write(dir.join("src"), b"payload").unwrap();
    fs::write(dir.join("busy"), b"old").unwrap();
    // The kernel wants CAP_MKNOD for RENAME_WHITEOUT; a thread keeps it
    // with its fsuid/fsgid switched, so the request comes from a user.
    let d = dir.clone();
    std::thread::spawn(move || {
        unsafe {
            libc::setfsgid(USER_A.1);
            libc::setfsuid(USER_A.0);
        }
        renameat2(&d.join("src"), &d.join("dst"), libc::RENAME_WHITEOUT).unwrap();
    })
    .join()
    .unwrap();
    assert_whiteout(&dir.join("src"), USER_A.0, USER_A.1);
    assert_eq!(fs::read(dir.join("dst")).unwrap(), b"payload");
    // NOREPLACE|WHITEOUT onto an existing name: EEXIST, nothing moves.
    let nw = libc::RENAME_NOREPLACE | libc::RENAME_WHITEOUT;
    assert_errno(
        renameat2(&dir.join("dst"), &dir.join("busy"), nw),
        libc::EEXIST,
        "NOREPLACE|WHITEOUT",
    );
    assert_eq!(fs::read(dir.join("dst")).unwrap(), b"payload");
    assert_eq!(fs::read(dir.join("busy")).unwrap(), b"old");
    // ...onto a free name it works, across directories too.
    fs::create_dir(m.join("e")).unwrap();
    renameat2(&dir.join("dst"), &m.join("e/moved"), nw).unwrap();
    assert_whiteout(&dir.join("dst"), 0, 0);
    // Replacing: the old target is gone, the source a whiteout.
    renameat2(&dir.join("busy"), &m.join("e/moved"), libc::RENAME_WHITEOUT).unwrap();
    assert_whiteout(&dir.join("busy"), 0, 0);
    assert_eq!(fs::read(m.join("e/moved")).unwrap(), b"old");
    // A whiteout may itself be renamed over with another whiteout.
    fs::write(dir.join("x"), b"x").unwrap();
    renameat2(&dir.join("x"), &dir.join("src"), libc::RENAME_WHITEOUT).unwrap();
    assert_whiteout(&dir.join("x"), 0, 0);
    assert_eq!(fs::read(dir.join("src")).unwrap(), b"x");
    // EXCHANGE|WHITEOUT is EINVAL.
    let xw = libc::RENAME_EXCHANGE | libc::RENAME_WHITEOUT;
    assert_errno(
        renameat2(&dir.join("src"), &m.join("e/moved"), xw),
        libc::EINVAL,
        "EXCHANGE|WHITEOUT",
    );
    let mut names: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["busy", "dst", "src", "x"]);
    // All of it survives a remount and fsck finds it consistent.
    m.unmount();
    img.assert_fsck_clean();
    m.mount();
    assert_whiteout(&dir.join("dst"), 0, 0);
    assert_whiteout(&dir.join("busy"), 0, 0);
    assert_whiteout(&dir.join("x"), 0, 0);
    assert_eq!(fs::read(m.join("e/moved")).unwrap(), b"old");
    assert_eq!(fs::read(dir.join("src")).unwrap(), b"x");
}

#[test]
fn overlayfs_takes_the_mount_as_its_upper_layer() {
    let img = Image::new("64M");
    let m = img.mount();
    for d in ["lower", "upper", "work", "ovl"] {
        fs::create_dir(m.join(d)).unwrap();
    }
    fs::write(m.join("lower/gone"), b"lower").unwrap();
    fs::write(m.join("lower/kept"), b"kept").unwrap();
    let ovl = m.join("ovl");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        m.join("lower").display(),
        m.join("upper").display(),
        m.join("work").display()
    );
    let out = common::run_unchecked(
        "mount",
        &[
            "-t",
            "overlay",
            "overlay",
            "-o",
            &opts,
            ovl.to_str().unwrap(),
        ],
    );
    if !out.status.success() {
        println!(
            "SKIP: overlayfs cannot be mounted here: {}",
            common::output_text(&out).trim()
        );
        return;
    }
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            common::run_unchecked("umount", &[&self.0]);
        }
    }
    let guard = Umount(ovl.clone());
    // Deleting a lower file leaves a whiteout in the upper layer.
    fs::remove_file(ovl.join("gone")).unwrap();
    assert!(fs::symlink_metadata(ovl.join("gone")).is_err());
    assert_whiteout(&m.join("upper/gone"), 0, 0);
    assert_eq!(fs::read(m.join("lower/gone")).unwrap(), b"lower");
    // Copy-up and renames through the overlay land in the upper layer.
    fs::write(ovl.join("kept"), b"changed").unwrap();
    assert_eq!(fs::read(m.join("upper/kept")).unwrap(), b"changed");
    assert_eq!(fs::read(m.join("lower/kept")).unwrap(), b"kept");
    fs::rename(ovl.join("kept"), ovl.join("renamed")).unwrap();
    assert_eq!(fs::read(ovl.join("renamed")).unwrap(), b"changed");
    assert!(fs::symlink_metadata(ovl.join("kept")).is_err());
    let mut seen: Vec<_> = fs::read_dir(&ovl)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    seen.sort();
    assert_eq!(seen, ["renamed"]);
    drop(guard);
}

#[test]
fn cached_names_and_attributes_follow_every_change() {
    let img = Image::new("64M");
    let m = img.mount();
    let p = m.join("f");
    // A miss the kernel may now cache gives way to each way of making
    // the name.
    type Make = fn(&std::path::Path, &std::path::Path);
    let makers: [(&str, Make); 6] = [
        ("create", |_, p| fs::write(p, b"1").unwrap()),
        ("mkdir", |_, p| fs::create_dir(p).unwrap()),
        ("symlink", |_, p| {
            std::os::unix::fs::symlink("t", p).unwrap()
        }),
        ("link", |root, p| {
            fs::write(root.join("src"), b"s").unwrap();
            fs::hard_link(root.join("src"), p).unwrap();
            fs::remove_file(root.join("src")).unwrap();
        }),
        ("rename", |root, p| {
            fs::write(root.join("src"), b"s").unwrap();
            fs::rename(root.join("src"), p).unwrap();
        }),
        ("mknod", |_, p| {
            let c = cpath(p);
            sys(unsafe { libc::mknod(c.as_ptr(), libc::S_IFIFO | 0o600, 0) }).unwrap();
        }),
    ];
    for (how, make) in makers {
        for _ in 0..2 {
            assert!(fs::symlink_metadata(&p).is_err(), "{how}: exists early");
        }
        make(m.path(), &p);
        assert!(
            fs::symlink_metadata(&p).is_ok(),
            "{how}: the new name is hidden"
        );
        match fs::symlink_metadata(&p).unwrap().is_dir() {
            true => fs::remove_dir(&p).unwrap(),
            false => fs::remove_file(&p).unwrap(),
        }
        assert!(
            fs::symlink_metadata(&p).is_err(),
            "{how}: removed name still seen"
        );
    }
    // Attributes cached for long still show what changed them: link
    // counts through another name, sizes and times through other fds.
    fs::write(&p, b"abc").unwrap();
    let before = fs::metadata(&p).unwrap();
    fs::hard_link(&p, m.join("g")).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().nlink(), 2);
    std::thread::sleep(Duration::from_millis(20));
    OpenOptions::new()
        .append(true)
        .open(m.join("g"))
        .unwrap()
        .write_all(b"def")
        .unwrap();
    let after = fs::metadata(&p).unwrap();
    assert_eq!(after.len(), 6);
    assert!(after.mtime_nsec() != before.mtime_nsec() || after.mtime() != before.mtime());
    fs::set_permissions(m.join("g"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
    fs::remove_file(m.join("g")).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().nlink(), 1);
    // A directory's link count follows subdirectories made and moved.
    fs::create_dir_all(m.join("a/sub")).unwrap();
    fs::create_dir(m.join("b")).unwrap();
    assert_eq!(fs::metadata(m.join("a")).unwrap().nlink(), 3);
    fs::rename(m.join("a/sub"), m.join("b/sub")).unwrap();
    assert_eq!(fs::metadata(m.join("a")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(m.join("b")).unwrap().nlink(), 3);
    // ls -l's way (readdir with attributes) gives the same as stat.
    let listed: Vec<(String, u64, u32)> = {
        let mut v: Vec<_> = fs::read_dir(m.path())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let md = e.metadata().unwrap();
                (e.file_name().into_string().unwrap(), md.ino(), md.mode())
            })
            .collect();
        v.sort();
        v
    };
    for (name, ino, mode) in listed {
        let md = fs::symlink_metadata(m.join(&name)).unwrap();
        assert_eq!((md.ino(), md.mode()), (ino, mode), "{name}");
    }
}
