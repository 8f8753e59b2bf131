//! Device errors: with `-o test_fail_after=N` every device operation after
//! the N-th fails with EIO. Callers must see EIO (or EROFS once the mount
//! has stopped taking changes), never wrong data; the daemon must keep
//! serving until unmounted, and the image must come back clean.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};

use common::{pseudo_random, Image};

fn is_device_error(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EROFS))
}

#[test]
fn io_errors_reach_callers_as_eio_never_as_wrong_data() {
    let mut budgets_seen_failing = 0;
    for budget in [8u64, 20, 40, 80, 160] {
        let img = Image::new("64M");
        let files: Vec<Vec<u8>> = (0..6).map(|i| pseudo_random(i + budget, 300_000)).collect();
        {
            let m = img.mount();
            for (i, d) in files.iter().enumerate() {
                let mut f = File::create(m.join(format!("f{i}"))).unwrap();
                f.write_all(d).unwrap();
                f.sync_all().unwrap();
            }
        }
        let mnt = common::tempdir("dmabuf-fault-mnt-");
        let opts = format!("test_fail_after={budget},commit=3600");
        let out = common::mount_cmd(img.path(), mnt.path(), Some(&opts));
        if !out.status.success() {
            // The budget ran out while mounting: refused with a message.
            assert!(
                !out.stderr.is_empty(),
                "budget {budget}: silent mount failure"
            );
            continue;
        }
        let mut errors = 0;
        for round in 0..4 {
            for (i, want) in files.iter().enumerate() {
                let p = mnt.path().join(format!("f{i}"));
                // Fresh reads (drop the page cache between rounds).
                let _ = fs::write("/proc/sys/vm/drop_caches", "1");
                match File::open(&p).and_then(|mut f| {
                    let mut v = Vec::new();
                    f.read_to_end(&mut v).map(|_| v)
                }) {
                    Ok(got) => assert!(got == *want, "budget {budget}: f{i} read back wrong data"),
                    Err(e) => {
                        assert!(is_device_error(&e), "budget {budget}: read f{i}: {e}");
                        errors += 1;
                    }
                }
                let w = OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .write(true)
                    .open(mnt.path().join(format!("new{round}-{i}")))
                    .and_then(|mut f| {
                        f.write_all(&pseudo_random(round, 50_000))?;
                        f.sync_all()
                    });
                if let Err(e) = w {
                    assert!(is_device_error(&e), "budget {budget}: write: {e}");
                    errors += 1;
                }
            }
        }
        if errors > 0 {
            budgets_seen_failing += 1;
        }
        // Still serving: a clean unmount works.
        let um = std::process::Command::new("umount")
            .arg(mnt.path())
            .status()
            .unwrap();
        if !um.success() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(mnt.path())
                .status();
            panic!("budget {budget}: umount failed after device errors");
        }
        // Without faults: clean, and everything fsynced before is intact.
        let m = img.mount();
        for (i, want) in files.iter().enumerate() {
            assert!(
                fs::read(m.join(format!("f{i}"))).unwrap() == *want,
                "budget {budget}: f{i} after remount"
            );
        }
        drop(m);
        img.assert_fsck_clean();
    }
    assert!(
        budgets_seen_failing >= 2,
        "the fault budgets never produced an error"
    );
}
