//! Crash safety: SIGKILL the daemon, lazily unmount, remount.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn fsynced_data_survives_sigkill() {
    let img = Image::new("256M");
    let mut m = img.mount();
    fs::create_dir_all(m.join("d/e")).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..8u64)
        .map(|i| {
            (
                if i % 2 == 0 {
                    format!("f{i}")
                } else {
                    format!("d/e/f{i}")
                },
                pseudo_random(100 + i, (i as usize + 1) * 300_000 + 17),
            )
        })
        .collect();
    for (name, data) in &files {
        write_sync(&m.join(name), data);
    }
    // Overwrite in place + fsync, extend + fdatasync.
    let f = OpenOptions::new().write(true).open(m.join("f0")).unwrap();
    f.write_all_at(b"PATCHED", 1000).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut f = OpenOptions::new().append(true).open(m.join("f2")).unwrap();
    f.write_all(b"tail appended").unwrap();
    f.sync_data().unwrap();
    drop(f);
    fsync_dir(m.path());
    fsync_dir(&m.join("d/e"));
    // Unsynced work after the last fsync: may or may not survive.
    fs::write(m.join("unsynced"), b"maybe").unwrap();

    m.kill();
    // fsck straight after the crash: consistent without any repair.
    let out = img.fsck();
    assert!(
        out.status.success(),
        "fsck right after SIGKILL:\n{}",
        output_text(&out)
    );
    m.mount();
    for (name, data) in &files {
        let mut want = data.clone();
        if name == "f0" {
            want[1000..1007].copy_from_slice(b"PATCHED");
        }
        if name == "f2" {
            want.extend_from_slice(b"tail appended");
        }
        let got = fs::read(m.join(name)).unwrap_or_else(|e| panic!("{name} lost after crash: {e}"));
        assert_bytes_eq(&got, &want, name);
    }
    if let Ok(d) = fs::read(m.join("unsynced")) {
        assert!(
            d.is_empty() || d == b"maybe",
            "unsynced file has garbage: {d:?}"
        );
    }
    // The remounted fs is fully usable.
    fs::write(m.join("after"), b"after crash").unwrap();
    m.unmount();
    img.assert_fsck_clean();
    m.mount();
    assert_eq!(fs::read(m.join("after")).unwrap(), b"after crash");
}

fn content(tag: &str, gen: u64, len: usize) -> Vec<u8> {
    let mut v = format!("{tag} generation {gen}\n").into_bytes();
    v.extend(pseudo_random(gen * 7 + 1, len));
    v
}

/// write tmp, fsync, rename over target (no directory fsync), crash:
/// the target holds either the complete old or the complete new content.
#[test]
fn rename_over_is_atomic_across_crash() {
    let img = Image::new("256M");
    let mut m = img.mount();
    let target = m.join("config");
    let mut old = content("config", 0, 50_000);
    write_sync(&target, &old);
    fsync_dir(m.path());
    for gen in 1..=3u64 {
        let new = content("config", gen, 40_000 + gen as usize * 10_000);
        let tmp = m.join("config.tmp");
        write_sync(&tmp, &new);
        fs::rename(&tmp, &target).unwrap();
        m.kill();
        m.mount();
        let got = fs::read(m.join("config")).expect("target missing after crash");
        assert!(
            got == old || got == new,
            "generation {gen}: target is neither old ({} bytes) nor new ({} bytes) content: {} bytes, starts {:?}",
            old.len(),
            new.len(),
            got.len(),
            String::from_utf8_lossy(&got[..got.len().min(30)])
        );
        if let Ok(t) = fs::read(m.join("config.tmp")) {
            // If the rename was lost the temp file must be intact.
            assert!(
                got == old && t == new,
                "config.tmp survives with wrong content or beside new target"
            );
        }
        old = got;
    }
    m.unmount();
    img.assert_fsck_clean();
}

/// Same idiom with an fsync of the directory after the rename: the new
/// content must win.
#[test]
fn rename_over_with_dir_fsync_is_durable() {
    let img = Image::new("256M");
    let mut m = img.mount();
    fs::create_dir(m.join("etc")).unwrap();
    let target = m.join("etc/app.conf");
    write_sync(&target, &content("app", 0, 30_000));
    fsync_dir(&m.join("etc"));
    for gen in 1..=2u64 {
        let new = content("app", gen, 20_000 * gen as usize);
        let tmp = m.join("etc/.app.conf.tmp");
        write_sync(&tmp, &new);
        fs::rename(&tmp, &target).unwrap();
        fsync_dir(&m.join("etc"));
        m.kill();
        m.mount();
        let got = fs::read(m.join("etc/app.conf")).expect("target missing after crash");
        assert_bytes_eq(&got, &new, &format!("generation {gen} after dir fsync"));
        assert!(
            !m.join("etc/.app.conf.tmp").exists(),
            "temp name still exists after durable rename"
        );
    }
    m.unmount();
    img.assert_fsck_clean();
}

#[test]
fn unlinked_open_file_is_reclaimed_after_crash() {
    let img = Image::new("256M");
    let mut m = img.mount();
    fs::write(m.join("other"), b"unrelated").unwrap();
    fsync_dir(m.path());
    let baseline = free_bytes(m.path());
    let data = pseudo_random(77, 24 * MIB as usize);
    let p = m.join("orphan");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    fsync_dir(m.path());
    let used = free_bytes(m.path());
    assert!(
        baseline >= used + 23 * MIB,
        "24 MiB file used only {} bytes",
        baseline as i64 - used as i64
    );
    fs::remove_file(&p).unwrap();
    fsync_dir(m.path());
    // Still open: data reachable through the fd.
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact(&mut head).unwrap();
    assert_bytes_eq(&head, &data[..4096], "orphan via fd");

    m.kill();
    drop(f);
    m.mount();
    assert!(!m.join("orphan").exists(), "unlinked file came back");
    assert_eq!(fs::read(m.join("other")).unwrap(), b"unrelated");
    let tolerance = 2 * MIB;
    let ok = wait_for(Duration::from_secs(15), || {
        fsync_dir(m.path());
        free_bytes(m.path()) + tolerance >= baseline
    });
    assert!(
        ok,
        "orphan space not reclaimed after crash+remount: baseline free {baseline}, now {} ({} MiB leaked)",
        free_bytes(m.path()),
        (baseline as i64 - free_bytes(m.path()) as i64) / MIB as i64
    );
    // The space is really usable: write a file as big as the orphan.
    write_sync(&m.join("reuse"), &data);
    m.unmount();
    img.assert_fsck_clean();
}

#[test]
fn crash_during_metadata_churn_stays_consistent() {
    let img = Image::new("256M");
    let mut m = img.mount();
    fs::create_dir(m.join("w")).unwrap();
    // Durable base state.
    for i in 0..100 {
        write_sync(
            &m.join(format!("w/base{i}")),
            format!("base {i}").as_bytes(),
        );
    }
    fsync_dir(&m.join("w"));
    // Lots of un-synced churn, then kill.
    for i in 0..300 {
        let p = m.join(format!("w/churn{i}"));
        fs::write(&p, format!("churn {i}")).unwrap();
        if i % 3 == 0 {
            fs::remove_file(&p).unwrap();
        } else if i % 3 == 1 {
            fs::rename(&p, m.join(format!("w/renamed{i}"))).unwrap();
        }
        if i % 50 == 0 {
            fs::create_dir(m.join(format!("w/dir{i}"))).unwrap();
        }
    }
    m.kill();
    let out = img.fsck();
    assert!(
        out.status.success(),
        "fsck after crash during churn:\n{}",
        output_text(&out)
    );
    m.mount();
    for i in 0..100 {
        assert_eq!(
            fs::read_to_string(m.join(format!("w/base{i}"))).unwrap(),
            format!("base {i}"),
            "durable file base{i}"
        );
    }
    // Whatever churn survived is self-consistent.
    for e in fs::read_dir(m.join("w")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let md = e.metadata().unwrap();
        if let Some(n) = name
            .strip_prefix("churn")
            .or_else(|| name.strip_prefix("renamed"))
        {
            let data = fs::read_to_string(e.path()).unwrap();
            assert!(
                data.is_empty() || data == format!("churn {n}"),
                "{name} has content {data:?}"
            );
            assert_eq!(md.nlink(), 1);
        }
    }
    m.unmount();
    img.assert_fsck_clean();
}

/// Without any fsync, the periodic commit (every 5 s) makes metadata
/// durable; whatever it made durable must point at the right data.
#[test]
fn periodic_commit_persists_unsynced_changes() {
    let img = Image::new("256M");
    let mut m = img.mount();
    let data = pseudo_random(5, 3 * MIB as usize + 5);
    fs::create_dir(m.join("dir")).unwrap();
    fs::write(m.join("dir/unsynced"), &data).unwrap();
    std::os::unix::fs::symlink("unsynced", m.join("dir/link")).unwrap();
    // Two commit intervals plus slack.
    std::thread::sleep(Duration::from_secs(11));
    m.kill();
    m.mount();
    let got = fs::read(m.join("dir/unsynced")).expect("file not committed by the periodic commit");
    assert_bytes_eq(&got, &data, "periodically committed file");
    assert_eq!(
        fs::read_link(m.join("dir/link")).unwrap(),
        std::path::Path::new("unsynced")
    );
    m.unmount();
    img.assert_fsck_clean();
}

/// Creates `names` in a fresh directory, fsyncs the directory once, kills
/// the daemon and checks every name came back with fsck clean.
fn creates_survive_dir_fsync_and_sigkill(names: &[String]) {
    let img = Image::new("256M");
    let mut m = img.mount_with("commit=3600");
    let dir = m.join("d");
    fs::create_dir(&dir).unwrap();
    for n in names {
        fs::File::create(dir.join(n)).unwrap();
    }
    fsync_dir(&dir);
    fsync_dir(m.path());
    m.kill();
    let out = img.fsck();
    assert!(
        out.status.success(),
        "fsck after SIGKILL:\n{}",
        output_text(&out)
    );
    m.mount();
    let mut back: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    back.sort();
    let mut want = names.to_vec();
    want.sort();
    let lost: Vec<_> = want
        .iter()
        .filter(|n| back.binary_search(n).is_err())
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} fsynced names lost, e.g. {:?}",
        lost.len(),
        want.len(),
        lost.iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!(back.len(), want.len());
    m.unmount();
    img.assert_fsck_clean();
}

#[test]
fn names_of_every_length_survive_a_dir_fsync_and_sigkill() {
    let names: Vec<String> = (1..=255usize)
        .map(|len| {
            if len < 3 {
                return "z".repeat(len);
            }
            let mut n = format!("{len}-");
            let fill = (b'a' + (len % 26) as u8) as char;
            n.extend(std::iter::repeat_n(fill, len - n.len()));
            n
        })
        .collect();
    assert!(names.iter().enumerate().all(|(i, n)| n.len() == i + 1));
    creates_survive_dir_fsync_and_sigkill(&names);
}

#[test]
fn ten_thousand_creates_in_one_commit_survive_sigkill() {
    let names: Vec<String> = (0..10_000)
        .map(|i| format!("file-{i:05}-{}", "n".repeat(10 + i % 30)))
        .collect();
    creates_survive_dir_fsync_and_sigkill(&names);
}
