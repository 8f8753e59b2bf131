//! Permission checks as non-root users (mounted with allow_other so that
//! other uids may use the mount at all).

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use common::*;

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn non_root_owns_what_it_creates() {
    let img = Image::new("256M");
    let m = img.mount_with("allow_other");
    chmod(m.path(), 0o755);
    let pub_dir = m.join("pub");
    fs::create_dir(&pub_dir).unwrap();
    chmod(&pub_dir, 0o777);

    let (uid, gid) = USER_A;
    let f = pub_dir.join("mine");
    let d = pub_dir.join("mydir");
    let l = pub_dir.join("mylink");
    let (f2, d2, l2) = (f.clone(), d.clone(), l.clone());
    as_user(uid, gid, move || {
        let mut h = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&f2)?;
        h.write_all(b"user data")?;
        drop(h);
        fs::create_dir(&d2)?;
        std::os::unix::fs::symlink("mine", &l2)?;
        // The owner may chmod and utime its own file.
        fs::set_permissions(&f2, fs::Permissions::from_mode(0o600))?;
        fs::write(d2.join("inner"), b"x")?;
        Ok(())
    })
    .expect("user A creating in a world-writable dir");

    for p in [&f, &d, &l, &d.join("inner")] {
        let md = fs::symlink_metadata(p).unwrap();
        assert_eq!((md.uid(), md.gid()), (uid, gid), "owner of {}", p.display());
    }
    assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
    assert_eq!(fs::read(&f).unwrap(), b"user data");

    // Another user cannot chmod or chown it, nor read the 0600 file.
    let (ub, gb) = USER_B;
    let f3 = f.clone();
    assert_eq!(
        as_user(ub, gb, move || fs::set_permissions(
            &f3,
            fs::Permissions::from_mode(0o666)
        )),
        Err(libc::EPERM),
        "chmod of another user's file"
    );
    let f3 = f.clone();
    assert_eq!(
        as_user(ub, gb, move || fs::read(&f3).map(drop)),
        Err(libc::EACCES),
        "read of another user's 0600 file"
    );
    let f3 = f.clone();
    assert_eq!(
        as_user(uid, gid, move || std::os::unix::fs::chown(
            &f3,
            Some(ub),
            None
        )),
        Err(libc::EPERM),
        "non-root chown to another uid"
    );
    assert_eq!(fs::metadata(&f).unwrap().uid(), uid);
}

#[test]
fn non_root_is_denied_by_mode_bits() {
    let img = Image::new("256M");
    let m = img.mount_with("allow_other");
    chmod(m.path(), 0o755);
    let (uid, gid) = USER_A;

    let secret = m.join("secret");
    fs::write(&secret, b"root only").unwrap();
    chmod(&secret, 0o600);
    let rootdir = m.join("rootdir");
    fs::create_dir(&rootdir).unwrap();
    chmod(&rootdir, 0o755);
    fs::write(rootdir.join("readable"), b"public").unwrap();
    chmod(&rootdir.join("readable"), 0o644);
    let closed = m.join("closed");
    fs::create_dir(&closed).unwrap();
    fs::write(closed.join("inside"), b"hidden").unwrap();
    chmod(&closed, 0o700);

    let s = secret.clone();
    assert_eq!(
        as_user(uid, gid, move || fs::read(&s).map(drop)),
        Err(libc::EACCES),
        "read 0600 root file"
    );
    let s = secret.clone();
    assert_eq!(
        as_user(uid, gid, move || OpenOptions::new()
            .write(true)
            .open(&s)
            .map(drop)),
        Err(libc::EACCES),
        "write-open 0600 root file"
    );
    let r = rootdir.clone();
    assert_eq!(
        as_user(uid, gid, move || fs::write(r.join("new"), b"x")),
        Err(libc::EACCES),
        "create in 0755 root dir"
    );
    let r = rootdir.clone();
    assert_eq!(
        as_user(uid, gid, move || fs::remove_file(r.join("readable"))),
        Err(libc::EACCES),
        "unlink in 0755 root dir"
    );
    let r = rootdir.clone();
    assert_eq!(
        as_user(uid, gid, move || fs::create_dir(r.join("sub"))),
        Err(libc::EACCES),
        "mkdir in 0755 root dir"
    );
    let r = rootdir.clone();
    assert_eq!(
        as_user(uid, gid, move || fs::rename(
            r.join("readable"),
            r.join("moved")
        )),
        Err(libc::EACCES),
        "rename in 0755 root dir"
    );
    let r = rootdir.clone();
    assert_eq!(
        as_user(uid, gid, move || OpenOptions::new()
            .append(true)
            .open(r.join("readable"))
            .map(drop)),
        Err(libc::EACCES),
        "write-open 0644 root file"
    );
    // What the mode bits do allow still works.
    let r = rootdir.clone();
    as_user(uid, gid, move || {
        let data = fs::read(r.join("readable"))?;
        if data != b"public" {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        fs::read_dir(&r)?.count();
        Ok(())
    })
    .expect("reading a 0644 file in a 0755 dir");
    let c = closed.clone();
    assert_eq!(
        as_user(uid, gid, move || fs::read(c.join("inside")).map(drop)),
        Err(libc::EACCES),
        "traverse 0700 dir"
    );
    let c = closed.clone();
    assert_eq!(
        as_user(uid, gid, move || fs::read_dir(&c).map(drop)),
        Err(libc::EACCES),
        "list 0700 dir"
    );
    // Group bits: a file of group 1000 with mode 0640 is readable by
    // user A (gid 1000) but not by user B.
    let g = m.join("groupfile");
    fs::write(&g, b"group").unwrap();
    std::os::unix::fs::chown(&g, Some(0), Some(gid)).unwrap();
    chmod(&g, 0o640);
    let g2 = g.clone();
    as_user(uid, gid, move || fs::read(&g2).map(drop)).expect("group read");
    let (ub, gb) = USER_B;
    let g2 = g.clone();
    assert_eq!(
        as_user(ub, gb, move || fs::read(&g2).map(drop)),
        Err(libc::EACCES),
        "other read of 0640"
    );
    // Root is not restricted by mode bits.
    assert_eq!(fs::read(&secret).unwrap(), b"root only");
    chmod(&secret, 0o000);
    assert_eq!(fs::read(&secret).unwrap(), b"root only");
}

#[test]
fn sticky_directory() {
    let img = Image::new("256M");
    let m = img.mount_with("allow_other");
    chmod(m.path(), 0o755);
    let tmp = m.join("tmp");
    fs::create_dir(&tmp).unwrap();
    chmod(&tmp, 0o1777);
    assert_eq!(fs::metadata(&tmp).unwrap().mode() & 0o7777, 0o1777);

    let (ua, ga) = USER_A;
    let (ub, gb) = USER_B;
    let a_file = tmp.join("a_file");
    let b_file = tmp.join("b_file");
    let p = a_file.clone();
    as_user(ua, ga, move || {
        fs::write(&p, b"a")?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o666))
    })
    .unwrap();
    let p = b_file.clone();
    as_user(ub, gb, move || fs::write(&p, b"b")).unwrap();

    let p = a_file.clone();
    assert_eq!(
        as_user(ub, gb, move || fs::remove_file(&p)),
        Err(libc::EPERM),
        "B deleting A's file in sticky dir"
    );
    let (p, q) = (a_file.clone(), tmp.join("stolen"));
    assert_eq!(
        as_user(ub, gb, move || fs::rename(&p, &q)),
        Err(libc::EPERM),
        "B renaming A's file in sticky dir"
    );
    assert!(a_file.exists());
    // B may still write to A's 0666 file, just not unlink it.
    let p = a_file.clone();
    as_user(ub, gb, move || fs::write(&p, b"written by b")).unwrap();
    // Owners delete their own; root deletes anything.
    let p = b_file.clone();
    as_user(ub, gb, move || fs::remove_file(&p)).expect("B deleting own file");
    assert!(!b_file.exists());
    fs::remove_file(&a_file).unwrap();

    // Without the sticky bit, B could delete A's file.
    let open = m.join("open");
    fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let p = open.join("a_file");
    as_user(ua, ga, {
        let p = p.clone();
        move || fs::write(&p, b"a")
    })
    .unwrap();
    let p2 = p.clone();
    as_user(ub, gb, move || fs::remove_file(&p2)).expect("B deleting in non-sticky dir");
    assert!(!p.exists());
}

#[test]
fn setgid_directory_inheritance() {
    let img = Image::new("256M");
    let m = img.mount_with("allow_other");
    chmod(m.path(), 0o755);
    let (ua, ga) = USER_A;
    let shared_gid = 4321;
    let sg = m.join("shared");
    fs::create_dir(&sg).unwrap();
    std::os::unix::fs::chown(&sg, Some(0), Some(shared_gid)).unwrap();
    chmod(&sg, 0o2777);
    assert_eq!(fs::metadata(&sg).unwrap().mode() & 0o7777, 0o2777);

    let (f, d) = (sg.join("file"), sg.join("subdir"));
    let (f2, d2) = (f.clone(), d.clone());
    as_user(ua, ga, move || {
        fs::write(&f2, b"x")?;
        fs::create_dir(&d2)?;
        fs::write(d2.join("nested"), b"y")?;
        Ok(())
    })
    .unwrap();
    let fm = fs::metadata(&f).unwrap();
    assert_eq!(fm.uid(), ua);
    assert_eq!(
        fm.gid(),
        shared_gid,
        "file gid not inherited from setgid dir"
    );
    assert_eq!(fm.mode() & 0o2000, 0, "regular file got the setgid bit");
    let dm = fs::metadata(&d).unwrap();
    assert_eq!(dm.gid(), shared_gid, "subdir gid not inherited");
    assert_ne!(
        dm.mode() & 0o2000,
        0,
        "subdir did not inherit the setgid bit"
    );
    let nm = fs::metadata(d.join("nested")).unwrap();
    assert_eq!(nm.gid(), shared_gid, "nested file gid");

    // Root creating there inherits too.
    fs::write(sg.join("rootfile"), b"").unwrap();
    assert_eq!(fs::metadata(sg.join("rootfile")).unwrap().gid(), shared_gid);
    // Without setgid on the dir, files get the creator's gid.
    let plain = m.join("plain");
    fs::create_dir(&plain).unwrap();
    std::os::unix::fs::chown(&plain, Some(0), Some(shared_gid)).unwrap();
    chmod(&plain, 0o777);
    let p = plain.join("f");
    let p2 = p.clone();
    as_user(ua, ga, move || fs::write(&p2, b"")).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().gid(), ga);

    // A non-member writing to a setgid file clears the setgid bit
    // (kernel killpriv handling): user A (not in group 4321) chmods its
    // own file g+s -> the bit is silently dropped.
    let own = sg.join("file");
    let own2 = own.clone();
    as_user(ua, ga, move || {
        fs::set_permissions(&own2, fs::Permissions::from_mode(0o2755))
    })
    .unwrap();
    assert_eq!(
        fs::metadata(&own).unwrap().mode() & 0o2000,
        0,
        "non-member could set setgid on a file of a foreign group"
    );
}
