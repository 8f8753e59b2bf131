//! Power cuts of a real daemon at every step of a workload: the daemon is
//! SIGKILLed and every device write it issued after its last flush is
//! undone (or the last one torn at a sector boundary), through the
//! `test_undo_log` mount option. Then: fsck clean, every fsynced file
//! exactly as fsynced, renames over a file atomic, no file holding bytes
//! it never had, orphans reclaimed.

mod common;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{fsync_dir, Image, Mounted};
use dmabuf_fs::blockdev::undo::{revert, Cut};

/// Bytes of version `v` of the file called `name`: one nonzero tag byte.
fn tag(name: &str, v: u8) -> u8 {
    let h = name.bytes().fold(v as u32 * 31 + 7, |a, b| {
        a.wrapping_mul(131).wrapping_add(b as u32)
    });
    (h % 251) as u8 + 1
}

fn version(name: &str, v: u8, len: usize) -> Vec<u8> {
    vec![tag(name, v); len]
}

fn write_new(p: &Path, data: &[u8], sync: bool) {
    let mut f = File::create(p).unwrap();
    f.write_all(data).unwrap();
    if sync {
        f.sync_all().unwrap();
    }
}

/// What the workload guarantees after a crash at a given step.
#[derive(Default, Clone)]
struct Model {
    /// Files that must hold exactly these bytes.
    exact: HashMap<String, Vec<u8>>,
    /// Files that must hold one of these contents (atomic rename).
    one_of: HashMap<String, Vec<Vec<u8>>>,
    /// Bytes each name may ever hold (besides zero).
    allowed: HashMap<String, HashSet<u8>>,
}

impl Model {
    fn allow(&mut self, name: &str, t: u8) {
        self.allowed.entry(name.into()).or_default().insert(t);
    }
}

/// Runs steps `0..upto` of the workload on mount `m`; returns the model
/// of what must survive a crash right after.
fn workload(m: &Mounted, upto: usize) -> Model {
    let mut md = Model::default();
    // config.tmp may survive as itself when its rename is lost.
    for n in ["a", "b", "c", "config", "config.tmp", "sub/e", "sub/c2"] {
        for v in 1..=3 {
            md.allow(n, tag(n, v));
        }
    }
    // config.tmp becomes config; c becomes sub/c2.
    for v in 1..=3 {
        md.allow("config", tag("config.tmp", v));
        md.allow("sub/c2", tag("c", v));
    }
    let root = m.path();
    for step in 0..upto {
        match step {
            0 => {
                write_new(&m.join("a"), &version("a", 1, 100_000), true);
                fsync_dir(root);
                md.exact.insert("a".into(), version("a", 1, 100_000));
            }
            1 => write_new(&m.join("b"), &version("b", 1, 1 << 20), false),
            2 => {
                write_new(&m.join("config.tmp"), &version("config.tmp", 1, 5000), true);
                fs::rename(m.join("config.tmp"), m.join("config")).unwrap();
                fsync_dir(root);
                md.exact
                    .insert("config".into(), version("config.tmp", 1, 5000));
            }
            3 => {
                let f = OpenOptions::new().append(true).open(m.join("a")).unwrap();
                (&f).write_all(&version("a", 2, 50_000)).unwrap();
                f.sync_all().unwrap();
                let mut want = version("a", 1, 100_000);
                want.extend(version("a", 2, 50_000));
                md.exact.insert("a".into(), want);
            }
            4 => {
                OpenOptions::new()
                    .write(true)
                    .open(m.join("b"))
                    .unwrap()
                    .set_len(10_000)
                    .unwrap();
            }
            5 => {
                fs::remove_file(m.join("a")).unwrap();
                md.exact.remove("a");
            }
            6 => {
                write_new(&m.join("c"), &version("c", 1, 300_000), true);
                fsync_dir(root);
                md.exact.insert("c".into(), version("c", 1, 300_000));
            }
            7 => {
                // Rename over without a directory fsync: old or new, whole.
                write_new(&m.join("config.tmp"), &version("config.tmp", 2, 7000), true);
                fs::rename(m.join("config.tmp"), m.join("config")).unwrap();
                let old = md.exact.remove("config").unwrap();
                md.one_of
                    .insert("config".into(), vec![old, version("config.tmp", 2, 7000)]);
            }
            8 => {
                // An open, unlinked file: an orphan if we crash now.
                let f = File::create(m.join("d")).unwrap();
                f.write_all_at(&version("d", 1, 2 << 20), 0).unwrap();
                fs::remove_file(m.join("d")).unwrap();
                f.sync_all().unwrap();
                std::mem::forget(f); // held open until the crash
            }
            9 => {
                fs::create_dir(m.join("sub")).unwrap();
                write_new(&m.join("sub/e"), &version("sub/e", 1, 40_000), true);
                fsync_dir(&m.join("sub"));
                fsync_dir(root);
                md.exact.insert("sub/e".into(), version("sub/e", 1, 40_000));
                // The directory fsync also settled config's rename.
                if let Some(v) = md.one_of.remove("config") {
                    md.exact.insert("config".into(), v[1].clone());
                }
            }
            10 => {
                fs::rename(m.join("c"), m.join("sub/c2")).unwrap();
                fsync_dir(root);
                fsync_dir(&m.join("sub"));
                let v = md.exact.remove("c").unwrap();
                md.exact.insert("sub/c2".into(), v);
            }
            11 => {
                // Overwrite in place, no fsync: old or new bytes per block.
                let f = OpenOptions::new()
                    .write(true)
                    .open(m.join("sub/c2"))
                    .unwrap();
                f.write_all_at(&version("sub/c2", 2, 100_000), 50_000)
                    .unwrap();
                md.exact.remove("sub/c2");
            }
            _ => unreachable!(),
        }
    }
    md
}

const STEPS: usize = 12;

fn check(m: &Mounted, md: &Model, what: &str) {
    for (name, want) in &md.exact {
        let got = fs::read(m.join(name)).unwrap_or_else(|e| panic!("{what}: fsynced {name}: {e}"));
        assert!(
            got == *want,
            "{what}: fsynced {name} differs ({} bytes, want {})",
            got.len(),
            want.len()
        );
    }
    for (name, options) in &md.one_of {
        let got = fs::read(m.join(name)).unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
        assert!(
            options.contains(&got),
            "{what}: {name} is neither the old nor the new content"
        );
    }
    for entry in walk(m.path()) {
        let rel = entry
            .strip_prefix(m.path())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let data = fs::read(&entry).unwrap();
        let allowed = md.allowed.get(&rel).cloned().unwrap_or_default();
        assert!(
            data.iter().all(|b| *b == 0 || allowed.contains(b)),
            "{what}: {rel} holds bytes it never had"
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn power_cut_after_every_step() {
    let mut points = 0;
    let cuts = [
        Cut::All,
        Cut::TornLast { sectors: 1 },
        Cut::TornLast { sectors: 7 },
    ];
    for upto in 1..=STEPS {
        for cut in cuts {
            let img = Image::new("64M");
            let undo = img.dir().join("undo.log");
            let opts = format!("test_undo_log={},commit=3600", undo.display());
            let mut m = img.mount_with(&opts);
            let md = workload(&m, upto);
            m.kill();
            let undone = revert(img.path(), &undo, cut).unwrap();
            let what = format!("crash after {upto} steps ({cut:?}, {undone} writes undone)");
            let out = img.fsck();
            assert!(
                out.status.success(),
                "{what}: fsck: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            m.mount_with(None);
            check(&m, &md, &what);
            // The orphan of step 8 is gone: its 2 MiB came back.
            if upto > 8 {
                let free = common::free_bytes(m.path());
                let s = common::statvfs(m.path());
                let total = s.f_blocks * s.f_frsize;
                assert!(total - free < 8 << 20, "{what}: orphan space not reclaimed");
            }
            m.unmount();
            img.assert_fsck_clean();
            points += 1;
        }
    }
    println!("crash points tried: {points}");
}
