//! Token ioctls from real processes on a real mount: registration, round
//! trips against ordinary reads, every errno of ABI v1, sharing rules,
//! coherency with the page cache, concurrency.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

use common::{assert_errno, pseudo_random, Image};
use dmabuf_fs::client::{sealed_memfd, udmabuf_from_memfd, TokenFile};
use dmabuf_fs::uapi::{self, BatchOp, Io, Register, Stats, Unregister};
use zerocopy::IntoBytes;

fn raw_ioctl<T: IntoBytes + zerocopy::FromBytes>(
    f: &File,
    cmd: u32,
    arg: &mut T,
) -> io::Result<()> {
    // SAFETY: arg is a repr(C) struct of the size encoded in cmd.
    let r = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            cmd as libc::c_ulong,
            arg.as_mut_bytes().as_mut_ptr(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn write_file(p: &Path, data: &[u8]) {
    let mut f = File::create(p).unwrap();
    f.write_all(data).unwrap();
}

fn memfd_bytes(mut m: &File, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.seek(SeekFrom::Start(0)).unwrap();
    m.read_exact(&mut v).unwrap();
    v
}

fn fill_memfd(mut m: &File, data: &[u8]) {
    m.seek(SeekFrom::Start(0)).unwrap();
    m.write_all(data).unwrap();
}

/// Whether this run forces the kernel backend (DMABUF_FS_TEST_TOKENS).
fn kernel_forced() -> bool {
    common::forced_token_backend().as_deref() == Some("kernel")
}

/// Checks that aligned token I/O took the path the backend promises:
/// io_uring fixed buffers under the kernel backend, never a bounce for a
/// memfd under the mapped one.
fn assert_path_of_aligned_io(s: &Stats, backend: u32) {
    if backend == uapi::BACKEND_KERNEL {
        assert_eq!(s.path, uapi::PATH_KERNEL, "{s:?}");
        assert!(s.c.kernel_ops > 0, "no READ_FIXED/WRITE_FIXED: {:?}", s.c);
    } else {
        assert_eq!(s.c.kernel_ops, 0, "{:?}", s.c);
    }
}

#[test]
fn read_and_write_round_trip_against_ordinary_io() {
    let img = Image::new("256M");
    let m = img.mount();
    let data = pseudo_random(1, 3 << 20);
    write_file(&m.join("f"), &data);

    let f = TokenFile::open(&m.join("f"), true).unwrap();
    let buf = sealed_memfd("t", 4 << 20).unwrap();
    let t = f.register(&buf, 0, 0).unwrap();
    assert_ne!(t.id(), 0);
    assert_eq!(t.read(0, 0, 3 << 20).unwrap(), 3 << 20);
    assert_eq!(memfd_bytes(&buf, 3 << 20), data);

    // WRITE: new content through the token; cat/cmp see it at once.
    let new = pseudo_random(2, 1 << 20);
    fill_memfd(&buf, &new);
    assert_eq!(t.write(1 << 20, 0, 1 << 20).unwrap(), 1 << 20);
    let out = Command::new("cat").arg(m.join("f")).output().unwrap();
    assert_eq!(&out.stdout[..1 << 20], &data[..1 << 20]);
    assert_eq!(&out.stdout[1 << 20..2 << 20], &new[..]);
    assert_eq!(&out.stdout[2 << 20..], &data[2 << 20..]);

    // WRITE extends like pwrite; READ past EOF is short; at EOF is 0.
    assert_eq!(t.write((3 << 20) + 100, 0, 5000).unwrap(), 5000);
    assert_eq!(
        std::fs::metadata(m.join("f")).unwrap().len(),
        (3 << 20) + 5100
    );
    assert_eq!(t.read((3 << 20) + 5000, 0, 4096).unwrap(), 100);
    assert_eq!(t.read((3 << 20) + 5100, 0, 4096).unwrap(), 0);
    assert_eq!(t.read(1 << 40, 0, 4096).unwrap(), 0);
    // The gap written over by nothing reads as zeros.
    t.read(3 << 20, 0, 100).unwrap();
    assert_eq!(memfd_bytes(&buf, 100), vec![0u8; 100]);

    let s = t.stats().unwrap();
    assert_eq!(s.buf_kind, uapi::BUF_MEMFD);
    assert!(s.c.read_ops >= 4 && s.c.write_ops == 2, "{:?}", s.c);
    assert_eq!(s.c.write_bytes, (1 << 20) + 5000);
    assert_path_of_aligned_io(&s, f.info().unwrap().backend);
}

#[test]
fn kernel_backend_moves_memfd_tokens_with_fixed_buffers() {
    // tokens=kernel works on any kernel with io_uring for memfds (pinned
    // user memory in the rings' buffer tables); dmabufs need the series.
    let img = Image::new("128M");
    let m = img.mount_with("tokens=kernel");
    let data = pseudo_random(41, 2 << 20);
    write_file(&m.join("f"), &data);
    let f = TokenFile::open(&m.join("f"), true).unwrap();
    let i = f.info().unwrap();
    assert_eq!(i.backend, uapi::BACKEND_KERNEL, "{}", i.reason());
    println!("INFO: backend {} ({})", i.backend, i.reason());
    let buf = sealed_memfd("k", 2 << 20).unwrap();
    let t = f.register(&buf, 0, 0).unwrap();
    assert_eq!(t.read(0, 0, 2 << 20).unwrap(), 2 << 20);
    assert_eq!(memfd_bytes(&buf, 2 << 20), data);
    let new = pseudo_random(42, 1 << 20);
    fill_memfd(&buf, &new);
    assert_eq!(t.write(4096, 0, 1 << 20).unwrap(), 1 << 20);
    let out = Command::new("cat").arg(m.join("f")).output().unwrap();
    assert_eq!(&out.stdout[4096..4096 + (1 << 20)], &new[..]);
    let s = t.stats().unwrap();
    assert_path_of_aligned_io(&s, uapi::BACKEND_KERNEL);
    assert_eq!(s.c.kernel_ops, 2, "{:?}", s.c);
    assert_eq!(s.c.fallback_ops, 0, "{:?}", s.c);
    // Unaligned: the middle still goes down fixed, the edges bounce.
    assert_eq!(t.read(100, 100, 3 * 4096).unwrap(), 3 * 4096);
    let mut want = vec![0u8; 3 * 4096];
    File::open(m.join("f"))
        .unwrap()
        .read_exact_at(&mut want, 100)
        .unwrap();
    assert_eq!(memfd_bytes(&buf, 100 + 3 * 4096)[100..], want[..]);
    let s = t.stats().unwrap();
    assert_eq!(
        (s.c.kernel_ops, s.c.fallback_ops, s.c.unaligned_ops),
        (3, 1, 1)
    );
    if i.features & uapi::FEAT_DMABUF == 0 {
        assert!(i.reason().contains("memfds only"), "{}", i.reason());
    }
    drop(t);
    assert_eq!(f.stats(0).unwrap().live_tokens, 0);
}

#[test]
fn holes_and_unaligned_ranges() {
    let img = Image::new("128M");
    let m = img.mount();
    let p = m.join("sparse");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.set_len(1 << 20).unwrap();
    let data = pseudo_random(3, 200_000);
    f.write_all_at(&data, 300_001).unwrap();
    let tf = TokenFile::open(&p, true).unwrap();
    let buf = sealed_memfd("t", 2 << 20).unwrap();
    let t = tf.register(&buf, 0, 0).unwrap();
    // Hole before the data reads as zeros, even where the buffer held junk.
    fill_memfd(&buf, &vec![0xEE; 2 << 20]);
    assert_eq!(t.read(0, 0, 300_001).unwrap(), 300_001);
    assert!(memfd_bytes(&buf, 300_001).iter().all(|&b| b == 0));

    let mut seed = 7u64;
    for _ in 0..60 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (seed >> 20) % (1 << 20);
        let boff = (seed >> 8) % 5000;
        let len = 1 + (seed >> 40) % 70_000;
        let got = t.read(off, boff, len).unwrap();
        let want_len = len.min((1 << 20) - off);
        assert_eq!(got, want_len);
        let mut want = vec![0u8; want_len as usize];
        f.read_exact_at(&mut want, off).unwrap();
        let mut have = vec![0u8; want_len as usize];
        buf.read_exact_at(&mut have, boff).unwrap();
        assert_eq!(have, want, "READ off {off} boff {boff} len {len}");
        // And write it back shifted through an unaligned WRITE.
        let woff = (seed >> 3) % (1 << 20);
        assert_eq!(t.write(woff, boff, want_len).unwrap(), want_len);
        let mut back = vec![0u8; want_len as usize];
        f.read_exact_at(&mut back, woff).unwrap();
        assert_eq!(back, want, "WRITE off {woff}");
    }
    let s = tf.stats(0).unwrap();
    assert!(s.c.unaligned_ops >= 100, "{:?}", s.c);
}

/// A memfd of `len` bytes (any length) with the given seals.
fn memfd_with(len: u64, seals: &[memfd::FileSeal]) -> File {
    let m = memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create("x")
        .unwrap();
    m.as_file().set_len(len).unwrap();
    for s in seals {
        m.add_seal(*s).unwrap();
    }
    m.into_file()
}

fn register_raw(f: &File, fd: i32, off: u64, size: u64) -> io::Result<u64> {
    let mut r = Register {
        buf_fd: fd,
        buf_offset: off,
        size,
        ..Default::default()
    };
    raw_ioctl(f, uapi::IOC_REGISTER, &mut r).map(|_| r.token)
}

fn io_raw(f: &File, write: bool, io: &mut Io) -> io::Result<u64> {
    let cmd = if write {
        uapi::IOC_WRITE_CMD
    } else {
        uapi::IOC_READ_CMD
    };
    raw_ioctl(f, cmd, io).map(|_| io.transferred)
}

#[test]
fn register_errors() {
    let img = Image::new("64M");
    let m = img.mount();
    write_file(&m.join("f"), b"hello");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("f"))
        .unwrap();
    let good = sealed_memfd("g", 8192).unwrap();
    let fd = good.as_raw_fd();

    let mut r = Register {
        buf_fd: fd,
        flags: 1,
        ..Default::default()
    };
    assert_errno(
        raw_ioctl(&f, uapi::IOC_REGISTER, &mut r),
        libc::EINVAL,
        "flags",
    );
    let mut r = Register {
        buf_fd: fd,
        resv: [0, 0, 1, 0],
        ..Default::default()
    };
    assert_errno(
        raw_ioctl(&f, uapi::IOC_REGISTER, &mut r),
        libc::EINVAL,
        "reserved",
    );
    assert_errno(
        register_raw(&f, fd, 100, 0),
        libc::EINVAL,
        "unaligned buf_offset",
    );
    assert_errno(register_raw(&f, fd, 0, 100), libc::EINVAL, "unaligned size");
    assert_errno(register_raw(&f, fd, 8192, 0), libc::EINVAL, "empty window");
    assert_errno(
        register_raw(&f, fd, 4096, 8192),
        libc::EINVAL,
        "window past the end",
    );
    let odd = memfd_with(5000, &[memfd::FileSeal::SealShrink]);
    assert_errno(
        register_raw(&f, odd.as_raw_fd(), 0, 0),
        libc::EINVAL,
        "size not 4 KiB multiple",
    );
    let unsealed = memfd_with(8192, &[]);
    assert_errno(
        register_raw(&f, unsealed.as_raw_fd(), 0, 0),
        libc::EINVAL,
        "unsealed memfd",
    );
    write_file(&img.dir().join("regular"), &[0u8; 8192]);
    let regular = File::open(img.dir().join("regular")).unwrap();
    assert_errno(
        register_raw(&f, regular.as_raw_fd(), 0, 0),
        libc::EINVAL,
        "regular file",
    );
    let devnull = File::open("/dev/null").unwrap();
    assert_errno(
        register_raw(&f, devnull.as_raw_fd(), 0, 0),
        libc::EINVAL,
        "/dev/null",
    );
    let dir = File::open(m.path()).unwrap();
    assert_errno(
        register_raw(&f, dir.as_raw_fd(), 0, 0),
        libc::EINVAL,
        "directory",
    );
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    assert_errno(
        register_raw(&f, a.as_raw_fd(), 0, 0),
        libc::EINVAL,
        "socket",
    );
    let mut pipe = [0i32; 2];
    // SAFETY: pipe writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: fresh fds we own.
    let (_pr, _pw) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
    assert_errno(register_raw(&f, pipe[0], 0, 0), libc::EINVAL, "pipe");
    assert_errno(register_raw(&f, 987_654, 0, 0), libc::EBADF, "fd not open");
    assert_errno(register_raw(&f, -1, 0, 0), libc::EBADF, "negative fd");
    // A token on a directory: nothing to move data to or from.
    assert_errno(
        register_raw(&dir, fd, 0, 0),
        libc::EOPNOTSUPP,
        "directory target",
    );

    // A window inside the buffer works, and tokens are unique and nonzero.
    let t1 = register_raw(&f, fd, 4096, 4096).unwrap();
    let t2 = register_raw(&f, fd, 0, 0).unwrap();
    assert!(t1 != 0 && t2 != 0 && t1 != t2);

    // The daemon is still serving.
    assert_eq!(std::fs::read(m.join("f")).unwrap(), b"hello");
}

#[test]
fn io_errors_and_their_order() {
    let img = Image::new("64M");
    let m = img.mount();
    write_file(&m.join("f"), &[7u8; 10000]);
    write_file(&m.join("other"), &[1u8; 100]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("f"))
        .unwrap();
    let buf = sealed_memfd("t", 16384).unwrap();
    let tok = register_raw(&f, buf.as_raw_fd(), 4096, 8192).unwrap();
    let io = |token, file_offset, buf_offset, len| Io {
        token,
        file_offset,
        buf_offset,
        len,
        ..Default::default()
    };

    assert_eq!(io_raw(&f, false, &mut io(tok, 0, 0, 8192)).unwrap(), 8192);
    // EINVAL first: flags, reserved, overflow.
    let mut x = io(tok, 0, 0, 10);
    x.flags = 1;
    assert_errno(io_raw(&f, false, &mut x), libc::EINVAL, "flags");
    let mut x = io(tok, 0, 0, 10);
    x.resv0 = 1;
    assert_errno(io_raw(&f, false, &mut x), libc::EINVAL, "resv0");
    let mut x = io(tok, 0, 0, 10);
    x.resv[1] = 1;
    assert_errno(io_raw(&f, false, &mut x), libc::EINVAL, "resv");
    assert_errno(
        io_raw(&f, false, &mut io(tok, u64::MAX - 5, 0, 10)),
        libc::EINVAL,
        "overflow",
    );
    // EINVAL beats EBADF (unknown token) and EFAULT (len 0).
    assert_errno(
        io_raw(&f, false, &mut io(999_999, u64::MAX, 0, 10)),
        libc::EINVAL,
        "order",
    );
    // transferred is ignored on input.
    let mut x = io(tok, 0, 0, 10);
    x.transferred = 12345;
    assert_eq!(io_raw(&f, false, &mut x).unwrap(), 10);
    // EBADF: unknown, foreign (another open of the same file), another file.
    assert_errno(
        io_raw(&f, false, &mut io(999_999, 0, 0, 10)),
        libc::EBADF,
        "unknown token",
    );
    let f2 = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("f"))
        .unwrap();
    assert_errno(
        io_raw(&f2, false, &mut io(tok, 0, 0, 10)),
        libc::EBADF,
        "second open()",
    );
    let other = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("other"))
        .unwrap();
    assert_errno(
        io_raw(&other, false, &mut io(tok, 0, 0, 10)),
        libc::EBADF,
        "another file",
    );
    assert_errno(
        io_raw(&other, true, &mut io(tok, 0, 0, 10)),
        libc::EBADF,
        "another file, write",
    );
    // EBADF beats EFAULT.
    assert_errno(
        io_raw(&f2, false, &mut io(tok, 0, 0, 0)),
        libc::EBADF,
        "foreign + len 0",
    );
    // EFAULT: len 0, outside the window.
    assert_errno(
        io_raw(&f, false, &mut io(tok, 0, 0, 0)),
        libc::EFAULT,
        "len 0",
    );
    assert_errno(
        io_raw(&f, false, &mut io(tok, 0, 4096, 4097)),
        libc::EFAULT,
        "past window",
    );
    assert_errno(
        io_raw(&f, true, &mut io(tok, 0, 8192, 1)),
        libc::EFAULT,
        "write past window",
    );
    assert_errno(
        io_raw(&f, false, &mut io(tok, 0, u64::MAX, 2)),
        libc::EFAULT,
        "huge buf_offset",
    );

    // Open modes: READ on O_WRONLY, WRITE on O_RDONLY -> EBADF.
    let wo = OpenOptions::new().write(true).open(m.join("f")).unwrap();
    let tw = register_raw(&wo, buf.as_raw_fd(), 0, 0).unwrap();
    assert_errno(
        io_raw(&wo, false, &mut io(tw, 0, 0, 10)),
        libc::EBADF,
        "READ on O_WRONLY",
    );
    assert_eq!(io_raw(&wo, true, &mut io(tw, 0, 0, 10)).unwrap(), 10);
    let ro = File::open(m.join("f")).unwrap();
    let tr = register_raw(&ro, buf.as_raw_fd(), 0, 0).unwrap();
    assert_errno(
        io_raw(&ro, true, &mut io(tr, 0, 0, 10)),
        libc::EBADF,
        "WRITE on O_RDONLY",
    );
    assert_eq!(io_raw(&ro, false, &mut io(tr, 0, 0, 10)).unwrap(), 10);

    // UNREGISTER: only on the owning open file; then the token is stale.
    let mut u = Unregister {
        token: tok,
        ..Default::default()
    };
    assert_errno(
        raw_ioctl(&f2, uapi::IOC_UNREGISTER, &mut u),
        libc::EBADF,
        "foreign unregister",
    );
    let mut u = Unregister {
        token: tok,
        resv: [1, 0, 0],
    };
    assert_errno(
        raw_ioctl(&f, uapi::IOC_UNREGISTER, &mut u),
        libc::EINVAL,
        "unregister resv",
    );
    let mut u = Unregister {
        token: tok,
        ..Default::default()
    };
    raw_ioctl(&f, uapi::IOC_UNREGISTER, &mut u).unwrap();
    assert_errno(
        io_raw(&f, false, &mut io(tok, 0, 0, 10)),
        libc::EBADF,
        "stale token",
    );
    // READ's number with a 32-byte size (a client built against another
    // struct layout) is not READ: ENOTTY, like any unknown command.
    let mut short = [0u64; 4];
    let wrong_size = (uapi::IOC_READ_CMD & !(0x3fff << 16)) | (32 << 16);
    // SAFETY: the kernel copies 32 bytes in and out of `short`.
    let r = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            wrong_size as libc::c_ulong,
            short.as_mut_ptr(),
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOTTY)
    );
    // Unknown ioctl on the file: ENOTTY; daemon keeps serving.
    let mut junk = [0u64; 4];
    // SAFETY: a command the daemon does not know; 32 bytes of arg.
    let r = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            0xC020_DB7Fu32 as libc::c_ulong,
            junk.as_mut_ptr(),
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOTTY)
    );
    assert_eq!(std::fs::read(m.join("other")).unwrap(), vec![1u8; 100]);
}

#[test]
fn write_sealed_memfd_registers_read_only() {
    let img = Image::new("64M");
    let m = img.mount();
    write_file(&m.join("f"), &[5u8; 4096]);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("f"))
        .unwrap();
    let buf = memfd_with(4096, &[]);
    fill_memfd(&buf, &[9u8; 4096]);
    let m2 = memfd::Memfd::try_from_file(buf).unwrap();
    m2.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealWrite])
        .unwrap();
    let buf = m2.into_file();
    let t = register_raw(&f, buf.as_raw_fd(), 0, 0).unwrap();
    let mut io = Io {
        token: t,
        len: 4096,
        ..Default::default()
    };
    assert_errno(
        io_raw(&f, false, &mut io),
        libc::EACCES,
        "READ into a write-sealed memfd",
    );
    let mut io = Io {
        token: t,
        len: 4096,
        ..Default::default()
    };
    assert_eq!(io_raw(&f, true, &mut io).unwrap(), 4096);
    assert_eq!(std::fs::read(m.join("f")).unwrap(), vec![9u8; 4096]);
}

#[test]
fn tokens_follow_the_open_file_dup_fork_and_close() {
    let img = Image::new("64M");
    let m = img.mount();
    write_file(&m.join("f"), &pseudo_random(4, 65536));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.join("f"))
        .unwrap();
    let buf = sealed_memfd("t", 65536).unwrap();
    let tok = register_raw(&f, buf.as_raw_fd(), 0, 0).unwrap();
    // dup shares the open file, so the token.
    let d = f.try_clone().unwrap();
    let mut io = Io {
        token: tok,
        len: 100,
        ..Default::default()
    };
    assert_eq!(io_raw(&d, false, &mut io).unwrap(), 100);
    // fork: the child uses the inherited fd with the parent's token.
    // SAFETY: the child only makes an ioctl and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut io = Io {
            token: tok,
            len: 4096,
            ..Default::default()
        };
        let code = match io_raw(&f, false, &mut io) {
            Ok(4096) => 0,
            _ => 1,
        };
        // SAFETY: exit the forked child without running destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child could not use the token"
    );

    // The buffer fd closed right after REGISTER: the daemon has its own copy.
    let buf2 = sealed_memfd("t2", 8192).unwrap();
    let tok2 = register_raw(&f, buf2.as_raw_fd(), 0, 0).unwrap();
    drop(buf2);
    let mut io = Io {
        token: tok2,
        len: 8192,
        ..Default::default()
    };
    assert_eq!(io_raw(&f, false, &mut io).unwrap(), 8192);
    // A sealed memfd cannot be truncated under the daemon.
    let buf3 = sealed_memfd("t3", 8192).unwrap();
    register_raw(&f, buf3.as_raw_fd(), 0, 0).unwrap();
    assert!(
        buf3.set_len(0).is_err(),
        "F_SEAL_SHRINK must refuse shrinking"
    );

    // Closing every fd of the open file releases its tokens.
    let probe = File::open(m.join("f")).unwrap();
    let mut s = Stats::default();
    raw_ioctl(&probe, uapi::IOC_STATS, &mut s).unwrap();
    assert_eq!(s.live_tokens, 3);
    drop(f);
    drop(d);
    let mut s = Stats::default();
    for _ in 0..100 {
        raw_ioctl(&probe, uapi::IOC_STATS, &mut s).unwrap();
        if s.live_tokens == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(s.live_tokens, 0, "tokens outlived the last close");
    // STATS of a token of another open file: EBADF.
    let mut s = Stats {
        token: tok,
        ..Default::default()
    };
    assert_errno(
        raw_ioctl(&probe, uapi::IOC_STATS, &mut s),
        libc::EBADF,
        "stats of a foreign token",
    );
}

#[test]
fn token_write_is_seen_by_cat_and_existing_mmaps() {
    let img = Image::new("64M");
    let m = img.mount();
    let p = m.join("f");
    write_file(&p, &[1u8; 16384]);
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    // SAFETY: a shared read mapping of a file we keep open; unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            16384,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: the mapping is 16384 readable bytes.
    let view = unsafe { std::slice::from_raw_parts(map as *const u8, 16384) };
    assert_eq!(view[5000], 1); // pages now cached
    let mut one = [0u8; 1];
    f.read_exact_at(&mut one, 5000).unwrap();
    assert_eq!(one[0], 1);
    let tf = TokenFile::from_file(f.try_clone().unwrap());
    let buf = sealed_memfd("t", 16384).unwrap();
    fill_memfd(&buf, &[2u8; 16384]);
    let t = tf.register(&buf, 0, 0).unwrap();
    assert_eq!(t.write(4096, 0, 8192).unwrap(), 8192);
    // Through the already-open fd and the live mapping first: a new
    // open() would drop the cache by itself.
    f.read_exact_at(&mut one, 5000).unwrap();
    assert_eq!(one[0], 2, "pread after token WRITE is stale");
    // SAFETY: re-reading the live mapping.
    assert_eq!(
        unsafe { std::ptr::read_volatile(map.cast::<u8>().add(5000)) },
        2,
        "mmap is stale"
    );
    assert_eq!(view[0], 1);
    assert_eq!(
        std::fs::read(&p).unwrap()[5000],
        2,
        "cat after token WRITE is stale"
    );
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(map, 16384) };
    // And a token READ sees a write() that just returned.
    f.write_all_at(&[3u8; 10], 100).unwrap();
    t.read(100, 0, 10).unwrap();
    assert_eq!(memfd_bytes(&buf, 10), vec![3u8; 10]);
}

#[test]
fn batch_runs_each_op_with_its_own_result() {
    let img = Image::new("128M");
    let m = img.mount();
    let data = pseudo_random(5, 1 << 20);
    write_file(&m.join("f"), &data);
    let f = TokenFile::open(&m.join("f"), true).unwrap();
    let buf = sealed_memfd("t", 1 << 20).unwrap();
    let t = f.register(&buf, 0, 0).unwrap();
    let mut ops: Vec<BatchOp> = (0..64u64)
        .map(|i| BatchOp {
            token: t.id(),
            file_offset: i * 4096 * 3 % (1 << 20),
            buf_offset: i * 4096,
            len: 4096,
            cookie: 1000 + i,
            op: uapi::OP_READ,
            ..Default::default()
        })
        .collect();
    ops[10].token = 424242; // not ours
    ops[11].len = 0;
    ops[12].op = 9;
    ops[13].op = uapi::OP_WRITE;
    ops[13].file_offset = (1 << 20) + 4096;
    f.batch(&mut ops).unwrap();
    for (i, op) in ops.iter().enumerate() {
        assert_eq!(op.cookie, 1000 + i as u64);
        match i {
            10 => assert_eq!(op.result, -(libc::EBADF as i64)),
            11 => assert_eq!(op.result, -(libc::EFAULT as i64)),
            12 => assert_eq!(op.result, -(libc::EINVAL as i64)),
            _ => assert_eq!(op.result, 4096, "op {i}"),
        }
    }
    let mut got = vec![0u8; 4096];
    buf.read_exact_at(&mut got, 5 * 4096).unwrap();
    let off = 5 * 4096 * 3;
    assert_eq!(got, &data[off..off + 4096]);
    assert_eq!(
        std::fs::metadata(m.join("f")).unwrap().len(),
        (1 << 20) + 8192
    );
    // Too many or zero ops: EINVAL.
    let mut b = Box::<uapi::Batch>::default();
    b.count = 0;
    assert_errno(
        raw_ioctl(f.file(), uapi::IOC_BATCH, b.as_mut()),
        libc::EINVAL,
        "count 0",
    );
    b.count = uapi::MAX_BATCH as u32 + 1;
    assert_errno(
        raw_ioctl(f.file(), uapi::IOC_BATCH, b.as_mut()),
        libc::EINVAL,
        "count too big",
    );
}

/// Threads of process `pid` other than io_uring's own workers.
fn daemon_threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| !c.starts_with("iou-"))
                })
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn batch_starts_no_threads() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let img = Image::new("128M");
    let m = img.mount();
    let data = pseudo_random(9, 8 << 20);
    write_file(&m.join("f"), &data);
    // On the device first: the write-back a READ would trigger otherwise
    // is not what this counts (io_uring may add a kernel worker for it).
    File::open(m.join("f")).unwrap().sync_all().unwrap();
    let pid = *m.daemons().first().expect("daemon pid");
    let f = TokenFile::open(&m.join("f"), false).unwrap();
    let buf = sealed_memfd("t", 8 << 20).unwrap();
    let t = f.register(&buf, 0, 0).unwrap();
    let before = daemon_threads(pid);
    let (stop, most) = (AtomicBool::new(false), AtomicUsize::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(daemon_threads(pid), Ordering::Relaxed);
            }
        });
        for round in 0..10u64 {
            let mut ops: Vec<BatchOp> = (0..uapi::MAX_BATCH as u64)
                .map(|i| BatchOp {
                    token: t.id(),
                    file_offset: (i * 37 + round * 11) % 128 * 65536,
                    buf_offset: i * 65536,
                    len: 65536,
                    op: uapi::OP_READ,
                    ..Default::default()
                })
                .collect();
            f.batch(&mut ops).unwrap();
            for op in &ops {
                assert_eq!(op.result, 65536);
            }
            let op = &ops[round as usize];
            let mut got = vec![0u8; 65536];
            buf.read_exact_at(&mut got, op.buf_offset).unwrap();
            let at = op.file_offset as usize;
            assert_eq!(got, &data[at..at + 65536], "round {round}");
        }
        stop.store(true, Ordering::Relaxed);
    });
    let most = most.load(Ordering::Relaxed);
    assert!(
        most <= before,
        "BATCH started threads: {before} before, up to {most} during"
    );
}

#[test]
fn info_reports_the_backend() {
    let img = Image::new("64M");
    let m = img.mount();
    write_file(&m.join("f"), b"x");
    let f = TokenFile::open(&m.join("f"), false).unwrap();
    let i = f.info().unwrap();
    assert_eq!(i.abi_version, uapi::ABI_VERSION);
    assert_eq!(i.max_batch as usize, uapi::MAX_BATCH);
    assert_eq!(i.fast_align, 4096);
    assert!(i.features & uapi::FEAT_BATCH != 0);
    assert!(!i.reason().is_empty());
    println!("backend {} ({})", i.backend, i.reason());
    if kernel_forced() {
        assert_eq!(i.backend, uapi::BACKEND_KERNEL, "{}", i.reason());
    }
    let out = common::fs_cmd(&[std::ffi::OsStr::new("info"), m.join("f").as_os_str()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("abi version:  1"));
}

#[test]
fn concurrent_token_io_with_ls_and_cp_running() {
    let img = Image::new("512M");
    let m = img.mount();
    let files: Vec<_> = (0..4).map(|i| m.join(format!("f{i}"))).collect();
    for (i, p) in files.iter().enumerate() {
        write_file(p, &pseudo_random(10 + i as u64, 4 << 20));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bg = {
        let stop = stop.clone();
        let dir = m.path().to_path_buf();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert!(Command::new("ls")
                    .arg("-l")
                    .arg(&dir)
                    .output()
                    .unwrap()
                    .status
                    .success());
                assert!(Command::new("cp")
                    .arg(dir.join("f0"))
                    .arg(dir.join("copy"))
                    .status()
                    .unwrap()
                    .success());
                n += 1;
            }
            n
        })
    };
    std::thread::scope(|s| {
        for th in 0..8u64 {
            let p = files[(th % 4) as usize].clone();
            s.spawn(move || {
                let f = TokenFile::open(&p, true).unwrap();
                let buf = sealed_memfd("t", 1 << 20).unwrap();
                let t = f.register(&buf, 0, 0).unwrap();
                // Each thread owns a disjoint 1 MiB region of its file.
                let region = (th / 4) * (2 << 20);
                for round in 0..20u64 {
                    let data = pseudo_random(th * 100 + round, 256 << 10);
                    buf.write_all_at(&data, 0).unwrap();
                    let off = region + (round % 4) * (256 << 10);
                    assert_eq!(t.write(off, 0, 256 << 10).unwrap(), 256 << 10);
                    assert_eq!(t.read(off, 512 << 10, 256 << 10).unwrap(), 256 << 10);
                    let mut back = vec![0u8; 256 << 10];
                    buf.read_exact_at(&mut back, 512 << 10).unwrap();
                    assert_eq!(back, data, "thread {th} round {round}");
                    let mut via_read = vec![0u8; 256 << 10];
                    File::open(&p)
                        .unwrap()
                        .read_exact_at(&mut via_read, off)
                        .unwrap();
                    assert_eq!(via_read, data, "read() after token WRITE, thread {th}");
                }
            });
        }
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(bg.join().unwrap() > 0);
}

#[test]
fn c_header_matches_the_rust_layout() {
    if !common::have_tool("gcc") {
        println!("SKIP: gcc not installed; cannot compile the C header");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("layout.c");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include <stddef.h>
#include "dmabuf_fs.h"
#define S(t) printf(#t " %zu\n", sizeof(struct t));
#define O(t, f) printf(#t "." #f " %zu\n", offsetof(struct t, f));
int main(void) {
  S(dmabuf_fs_register) O(dmabuf_fs_register, size) O(dmabuf_fs_register, token) O(dmabuf_fs_register, resv)
  S(dmabuf_fs_unregister)
  S(dmabuf_fs_io) O(dmabuf_fs_io, flags) O(dmabuf_fs_io, transferred)
  S(dmabuf_fs_info) O(dmabuf_fs_info, features) O(dmabuf_fs_info, backend_reason)
  S(dmabuf_fs_stats) O(dmabuf_fs_stats, c) O(dmabuf_fs_stats, max_tokens_per_file) O(dmabuf_fs_stats, max_pinned_per_user) O(dmabuf_fs_stats, user_pinned) O(dmabuf_fs_stats, user_tokens) O(dmabuf_fs_stats, detached_ops)
  printf("FEAT_LIMITS %llu\n", (unsigned long long)DMABUF_FS_FEAT_LIMITS);
  S(dmabuf_fs_batch_op) O(dmabuf_fs_batch_op, result)
  S(dmabuf_fs_batch) O(dmabuf_fs_batch, ops)
  printf("REGISTER %lu\nUNREGISTER %lu\nREAD %lu\nWRITE %lu\nINFO %lu\nSTATS %lu\nBATCH %lu\n",
    (unsigned long)DMABUF_FS_IOC_REGISTER, (unsigned long)DMABUF_FS_IOC_UNREGISTER,
    (unsigned long)DMABUF_FS_IOC_READ, (unsigned long)DMABUF_FS_IOC_WRITE,
    (unsigned long)DMABUF_FS_IOC_INFO, (unsigned long)DMABUF_FS_IOC_STATS,
    (unsigned long)DMABUF_FS_IOC_BATCH);
  return 0;
}
"#,
    )
    .unwrap();
    let header_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/uapi");
    use std::mem::{offset_of, size_of};
    let want = format!(
        "dmabuf_fs_register {}\ndmabuf_fs_register.size {}\ndmabuf_fs_register.token {}\ndmabuf_fs_register.resv {}\n\
dmabuf_fs_unregister {}\ndmabuf_fs_io {}\ndmabuf_fs_io.flags {}\ndmabuf_fs_io.transferred {}\n\
dmabuf_fs_info {}\ndmabuf_fs_info.features {}\ndmabuf_fs_info.backend_reason {}\n\
dmabuf_fs_stats {}\ndmabuf_fs_stats.c {}\ndmabuf_fs_stats.max_tokens_per_file {}\ndmabuf_fs_stats.max_pinned_per_user {}\n\
dmabuf_fs_stats.user_pinned {}\ndmabuf_fs_stats.user_tokens {}\ndmabuf_fs_stats.detached_ops {}\nFEAT_LIMITS {}\n\
dmabuf_fs_batch_op {}\ndmabuf_fs_batch_op.result {}\ndmabuf_fs_batch {}\ndmabuf_fs_batch.ops {}\n\
REGISTER {}\nUNREGISTER {}\nREAD {}\nWRITE {}\nINFO {}\nSTATS {}\nBATCH {}\n",
        size_of::<Register>(), offset_of!(Register, size), offset_of!(Register, token), offset_of!(Register, resv),
        size_of::<Unregister>(), size_of::<Io>(), offset_of!(Io, flags), offset_of!(Io, transferred),
        size_of::<uapi::Info>(), offset_of!(uapi::Info, features), offset_of!(uapi::Info, backend_reason),
        size_of::<Stats>(), offset_of!(Stats, c), offset_of!(Stats, max_tokens_per_file), offset_of!(Stats, max_pinned_per_user),
        offset_of!(Stats, user_pinned), offset_of!(Stats, user_tokens), offset_of!(Stats, detached_ops), uapi::FEAT_LIMITS,
        size_of::<BatchOp>(), offset_of!(BatchOp, result), size_of::<uapi::Batch>(), offset_of!(uapi::Batch, ops),
        uapi::IOC_REGISTER, uapi::IOC_UNREGISTER, uapi::IOC_READ_CMD, uapi::IOC_WRITE_CMD,
        uapi::IOC_INFO, uapi::IOC_STATS, uapi::IOC_BATCH,
    );
    let mut tried = 0;
    for (flag, what) in [("-m64", "64-bit"), ("-m32", "32-bit")] {
        let exe = dir.path().join(format!("layout{flag}"));
        let cc = Command::new("gcc")
            .args([flag, "-Wall", "-Werror", "-I"])
            .arg(&header_dir)
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap();
        if !cc.status.success() {
            println!(
                "note: {what} layout not checked: gcc {flag} cannot build here: {}",
                String::from_utf8_lossy(&cc.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
            );
            continue;
        }
        let out = Command::new(&exe).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            want,
            "{what} layout differs"
        );
        tried += 1;
    }
    assert!(tried >= 1, "the header did not compile at all");
}

/// A udmabuf of `len` bytes and the sealed memfd under it (for CPU
/// access), or None where /dev/udmabuf is absent.
fn udmabuf(len: u64) -> Option<(File, File)> {
    if !Path::new("/dev/udmabuf").exists() {
        return None;
    }
    let mem = sealed_memfd("u", len).unwrap();
    let dmabuf = udmabuf_from_memfd(&mem).unwrap();
    Some((mem, dmabuf))
}

#[test]
fn real_dmabufs_need_an_exporter() {
    if !Path::new("/dev/udmabuf").exists() {
        println!("SKIP: /dev/udmabuf is absent on this machine (no dmabuf exporter); the VM test covers real dmabufs");
        return;
    }
    // With an exporter: make a udmabuf from a sealed memfd and round-trip.
    let img = Image::new("64M");
    let m = img.mount();
    write_file(&m.join("f"), &pseudo_random(9, 65536));
    let (mem, dmabuf) = udmabuf(65536).unwrap();
    let f = TokenFile::open(&m.join("f"), true).unwrap();
    let t = f.register(&dmabuf, 0, 0).unwrap();
    assert_eq!(t.read(0, 0, 65536).unwrap(), 65536);
    assert_eq!(memfd_bytes(&mem, 65536), pseudo_random(9, 65536));
    // And back into the file at another place, through the same token.
    assert_eq!(t.write(1 << 20, 0, 65536).unwrap(), 65536);
    let mut back = vec![0u8; 65536];
    File::open(m.join("f"))
        .unwrap()
        .read_exact_at(&mut back, 1 << 20)
        .unwrap();
    assert_eq!(back, pseudo_random(9, 65536));
    let s = t.stats().unwrap();
    assert_eq!(s.buf_kind, uapi::BUF_DMABUF);
    let backend = f.info().unwrap().backend;
    if backend == uapi::BACKEND_KERNEL {
        assert_path_of_aligned_io(&s, backend);
        assert_eq!(s.c.kernel_ops, 2, "{:?}", s.c);
    } else {
        assert_eq!(s.path, uapi::PATH_BOUNCE);
    }
}

#[test]
fn the_c_example_builds_and_reads_through_a_token() {
    if !common::have_tool("gcc") {
        println!("SKIP: gcc not installed; cannot build scripts/examples/token_read.c");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("token_read");
    let cc = Command::new("gcc")
        .args(["-Wall", "-Werror", "-O2", "-I"])
        .arg(root.join("src/uapi"))
        .arg(root.join("scripts/examples/token_read.c"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let img = Image::new("64M");
    let m = img.mount();
    write_file(&m.join("data"), &pseudo_random(77, 300_001));
    let out = Command::new(&exe).arg(m.join("data")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("token READ of 300001 bytes matches read()"),
        "{text}"
    );
}

#[test]
fn real_dma_heap_buffers() {
    let heap = Path::new("/dev/dma_heap/system");
    if !heap.exists() {
        println!("SKIP: /dev/dma_heap/system is absent on this machine (no dma-buf heap); the VM test covers it");
        return;
    }
    let img = Image::new("64M");
    let m = img.mount();
    let data = pseudo_random(21, 200_000);
    write_file(&m.join("f"), &data);
    #[repr(C)]
    struct Alloc {
        len: u64,
        fd: u32,
        fd_flags: u32,
        heap_flags: u64,
    }
    let h = OpenOptions::new()
        .read(true)
        .write(true)
        .open(heap)
        .unwrap();
    let mut a = Alloc {
        len: 256 << 10,
        fd: 0,
        fd_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
        heap_flags: 0,
    };
    // SAFETY: DMA_HEAP_IOCTL_ALLOC = _IOWR('H', 0, struct dma_heap_allocation_data).
    let r = unsafe { libc::ioctl(h.as_raw_fd(), 0xC018_4800, &mut a) };
    assert_eq!(r, 0, "DMA_HEAP_IOCTL_ALLOC: {}", io::Error::last_os_error());
    // SAFETY: a fresh dmabuf fd we own.
    let dmabuf = unsafe { File::from_raw_fd(a.fd as i32) };
    let f = TokenFile::open(&m.join("f"), true).unwrap();
    let t = f.register(&dmabuf, 0, 0).unwrap();
    assert_eq!(t.stats().unwrap().buf_kind, uapi::BUF_DMABUF);
    // File -> dmabuf -> another place in the file, unaligned on purpose.
    assert_eq!(t.read(1000, 5, 150_000).unwrap(), 150_000);
    assert_eq!(t.write(400_001, 5, 150_000).unwrap(), 150_000);
    let mut back = vec![0u8; 150_000];
    File::open(m.join("f"))
        .unwrap()
        .read_exact_at(&mut back, 400_001)
        .unwrap();
    assert_eq!(back, &data[1000..151_000]);
    let s = t.stats().unwrap();
    assert_eq!(s.c.fallback_ops, 2, "unaligned dmabuf I/O is bounced");
    let backend = f.info().unwrap().backend;
    if backend == uapi::BACKEND_KERNEL {
        // Aligned I/O goes straight between device and dmabuf.
        assert_eq!(t.read(8192, 4096, 64 << 10).unwrap(), 64 << 10);
        assert_eq!(t.write(1 << 20, 4096, 64 << 10).unwrap(), 64 << 10);
        File::open(m.join("f"))
            .unwrap()
            .read_exact_at(&mut back[..64 << 10], 1 << 20)
            .unwrap();
        assert_eq!(&back[..64 << 10], &data[8192..8192 + (64 << 10)]);
        let s = t.stats().unwrap();
        assert_eq!(s.c.fallback_ops, 2, "{:?}", s.c);
        assert_path_of_aligned_io(&s, backend);
    } else {
        assert_eq!(s.path, uapi::PATH_BOUNCE);
    }
}

#[test]
fn dmabuf_unregister_during_io_and_close_with_tokens_alive() {
    let Some((_mem, dmabuf)) = udmabuf(4 << 20) else {
        println!("SKIP: /dev/udmabuf is absent on this machine (no dmabuf exporter); the VM test covers it");
        return;
    };
    let img = Image::new("128M");
    let m = img.mount();
    let p = m.join("f");
    write_file(&p, &pseudo_random(13, 8 << 20));
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let token = register_raw(&f, dmabuf.as_raw_fd(), 0, 0).unwrap();
    // Four threads of READ and WRITE on the token while it is unregistered
    // under them: each op moves everything or fails EBADF, nothing else.
    let moved = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4u64)
            .map(|i| {
                let f = &f;
                s.spawn(move || {
                    let mut ops = 0u64;
                    loop {
                        let mut io = Io {
                            token,
                            file_offset: (i % 2) << 22,
                            buf_offset: i << 20,
                            len: 1 << 20,
                            ..Default::default()
                        };
                        match io_raw(f, i >= 2, &mut io) {
                            Ok(n) => assert_eq!(n, 1 << 20),
                            Err(e) => {
                                assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
                                return ops;
                            }
                        }
                        ops += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut u = Unregister {
            token,
            ..Default::default()
        };
        raw_ioctl(&f, uapi::IOC_UNREGISTER, &mut u).unwrap();
        workers.into_iter().map(|w| w.join().unwrap()).sum::<u64>()
    });
    assert!(moved > 0, "no I/O ran before UNREGISTER");
    // Close an open file with live tokens (one busy in another thread).
    let g = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let tokens: Vec<u64> = (0..3)
        .map(|_| register_raw(&g, dmabuf.as_raw_fd(), 0, 0).unwrap())
        .collect();
    let mut io = Io {
        token: tokens[0],
        len: 4 << 20,
        ..Default::default()
    };
    assert_eq!(io_raw(&g, false, &mut io).unwrap(), 4 << 20);
    drop(g);
    // RELEASE reaches the daemon just after close() returns (FUSE sends
    // it in the background; with FOPEN_NOFLUSH no FLUSH round trip comes
    // first to slow close() down).
    let t = TokenFile::open(&p, false).unwrap();
    assert!(
        common::wait_for(std::time::Duration::from_secs(5), || {
            t.stats(0).unwrap().live_tokens == 0
        }),
        "tokens outlived the last close"
    );
    drop(m);
    img.assert_fsck_clean();
}

#[test]
fn kernel_rejects_a_dmabuf_on_another_open_of_the_device() {
    use dmabuf_fs::blockdev::uring::{probe_dmabuf_support, set_dmabuf_slot, KernelSupport};
    use io_uring::{opcode, squeue, types, IoUring};
    // The kernel series' own rule, one level below ours: a dmabuf
    // registered for one open file of the device is EBADF on another.
    let Some(dev) = common::test_device() else {
        println!("SKIP: needs DMABUF_FS_TEST_DEVICE (a block device the dmabuf series drives, e.g. NVMe in the VM test)");
        return;
    };
    if let KernelSupport::Absent(why) = probe_dmabuf_support() {
        println!("SKIP: {why}");
        return;
    }
    let Some((mem, dmabuf)) = udmabuf(1 << 20) else {
        println!("SKIP: /dev/udmabuf is absent");
        return;
    };
    let data = pseudo_random(17, 1 << 20);
    {
        let w = OpenOptions::new().write(true).open(&dev).unwrap();
        w.write_all_at(&data, 1 << 20).unwrap();
        w.sync_all().unwrap();
    }
    let open_direct = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev)
            .unwrap()
    };
    let (a, b) = (open_direct(), open_direct());
    let mut ring = IoUring::new(4).unwrap();
    ring.submitter().register_buffers_sparse(1).unwrap();
    set_dmabuf_slot(ring.as_raw_fd(), 0, dmabuf.as_raw_fd(), a.as_raw_fd()).unwrap();
    // READ_FIXED of 64 KiB at device offset 1 MiB + `at` into dmabuf offset `at`.
    let mut read_fixed = |fd: &File, at: u64| -> i32 {
        let sqe = opcode::ReadFixed::new(types::Fd(fd.as_raw_fd()), at as *mut u8, 65536, 0)
            .offset((1 << 20) + at)
            .build()
            // Inline issue can leak a mapping reference in v3 (see
            // blockdev::uring); io-wq issue cannot.
            .flags(squeue::Flags::ASYNC);
        // SAFETY: slot 0 stays registered until the completion is reaped.
        unsafe { ring.submission().push(&sqe).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().unwrap();
        cqe.result()
    };
    assert_eq!(read_fixed(&a, 0), 65536);
    assert_eq!(read_fixed(&a, 128 << 10), 65536);
    let got = memfd_bytes(&mem, 1 << 20);
    assert_eq!(&got[..65536], &data[..65536]);
    assert_eq!(&got[128 << 10..192 << 10], &data[128 << 10..192 << 10]);
    assert_eq!(
        read_fixed(&b, 0),
        -libc::EBADF,
        "another open of the device"
    );
    // The series trusts O_DIRECT on the target; report what it does
    // without it (dmabuf-fs itself refuses fixed I/O on such an fd).
    fill_memfd(&mem, &vec![0u8; 1 << 20]);
    // SAFETY: fcntl on our own fd.
    unsafe {
        let fl = libc::fcntl(a.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(a.as_raw_fd(), libc::F_SETFL, fl & !libc::O_DIRECT);
    }
    let r = read_fixed(&a, 0);
    let filled = memfd_bytes(&mem, 65536) == data[..65536];
    println!("O_DIRECT cleared after registration: READ_FIXED returned {r}, data filled: {filled}");
}

/// A mount whose daemon treats every dmabuf as one the CPU cannot map
/// (`DMABUF_FS_TEST_UNMAPPABLE_DMABUFS=1`, the stand-in for GPU VRAM);
/// unmounted on drop.
struct UnmappableMount {
    dir: tempfile::TempDir,
}

impl UnmappableMount {
    fn new(image: &Path, opts: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(common::bin())
            .env("DMABUF_FS_TEST_UNMAPPABLE_DMABUFS", "1")
            .arg("mount")
            .arg(image)
            .arg(dir.path())
            .args(["-o", opts])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", common::output_text(&out));
        Self { dir }
    }

    fn join(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for UnmappableMount {
    fn drop(&mut self) {
        let _ = common::run_unchecked("umount", &[self.dir.path()]);
    }
}

#[test]
fn unmappable_dmabufs_need_the_kernel_backend_and_aligned_ranges() {
    let Some((mem, dmabuf)) = udmabuf(64 << 10) else {
        println!("SKIP: /dev/udmabuf is absent on this machine (no dmabuf exporter); the VM test runs this");
        return;
    };
    let img = Image::new("64M");
    let data = pseudo_random(31, 64 << 10);
    {
        // The mapped backend moves everything through the daemon's
        // mapping: a dmabuf it cannot map is refused at REGISTER.
        let m = UnmappableMount::new(img.path(), "tokens=mapped");
        write_file(&m.join("f"), &data);
        let f = TokenFile::open(&m.join("f"), true).unwrap();
        assert_errno(
            f.register(&dmabuf, 0, 0).map(|t| t.leak()),
            libc::EOPNOTSUPP,
            "unmappable dmabuf under tokens=mapped",
        );
        // A memfd is unaffected by the switch.
        let plain = sealed_memfd("plain", 8192).unwrap();
        f.register(&plain, 0, 0).unwrap();
    }
    let backend = common::forced_token_backend().unwrap_or_else(|| "auto".into());
    let m = UnmappableMount::new(img.path(), &format!("tokens={backend}"));
    let f = TokenFile::open(&m.join("f"), true).unwrap();
    let info = f.info().unwrap();
    if info.backend != uapi::BACKEND_KERNEL || info.features & uapi::FEAT_DMABUF == 0 {
        println!(
            "SKIP: the kernel backend with dmabufs is not available here ({}); the VM test on a patched kernel runs the rest",
            info.reason()
        );
        return;
    }
    // The kernel backend registers it without a CPU mapping.
    let t = f.register(&dmabuf, 0, 0).unwrap();
    assert_eq!(t.stats().unwrap().path, uapi::PATH_KERNEL);
    // Aligned READ: the bytes land in the buffer (compared, not assumed).
    assert_eq!(t.read(8192, 4096, 16384).unwrap(), 16384);
    assert_eq!(
        memfd_bytes(&mem, 64 << 10)[4096..4096 + 16384],
        data[8192..8192 + 16384]
    );
    // Aligned WRITE: the file gets the buffer's bytes.
    let fresh = pseudo_random(32, 8192);
    mem.write_all_at(&fresh, 32768).unwrap();
    assert_eq!(t.write(40960, 32768, 8192).unwrap(), 8192);
    let mut back = vec![0u8; 8192];
    File::open(m.join("f"))
        .unwrap()
        .read_exact_at(&mut back, 40960)
        .unwrap();
    assert_eq!(back, fresh);
    // Unaligned ranges need a CPU bounce: EINVAL, as the series answers.
    assert_errno(t.read(100, 0, 4096), libc::EINVAL, "unaligned READ");
    assert_errno(t.write(0, 0, 1000), libc::EINVAL, "unaligned WRITE");
}

#[test]
fn token_write_growing_the_file_is_seen_at_once_through_open_fds_and_mmaps() {
    let img = Image::new("64M");
    let m = img.mount();
    let p = m.join("f");
    write_file(&p, &[1u8; 4096]);
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut one = [0u8; 1];
    f.read_exact_at(&mut one, 4095).unwrap(); // size and page cached
                                              // SAFETY: a shared read mapping of three pages of a file we keep
                                              // open (two past EOF for now); unmapped below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            3 * 4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    let tf = TokenFile::from_file(f.try_clone().unwrap());
    let buf = sealed_memfd("t", 3 * 4096).unwrap();
    let fresh = pseudo_random(41, 8192 - 7);
    fill_memfd(&buf, &fresh);
    let t = tf.register(&buf, 0, 0).unwrap();
    // Unaligned end: the file grows to 12281 bytes.
    assert_eq!(
        t.write(4096, 0, fresh.len() as u64).unwrap(),
        fresh.len() as u64
    );
    let end = 4096 + fresh.len();
    // The kernel knows the new size before the WRITE returns: a fault
    // on the grown part (which checks the cached i_size, no revalidation;
    // past it: SIGBUS) and pread of the last byte work, with no stat.
    // SAFETY: inside the mapping and, now, inside the file.
    let at = |i: usize| unsafe { std::ptr::read_volatile(map.cast::<u8>().add(i)) };
    assert_eq!(at(10000), fresh[10000 - 4096]);
    assert_eq!(at(end - 1), fresh[fresh.len() - 1], "last byte by mmap");
    f.read_exact_at(&mut one, end as u64 - 1).unwrap();
    assert_eq!(one[0], fresh[fresh.len() - 1], "last byte by pread");
    assert_eq!(f.metadata().unwrap().len(), end as u64);
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(map, 3 * 4096) };
}

/// Write-back coherency: a token READ sees every write() that returned
/// before it while the data is still in the daemon's write-back cache,
/// with two writers adding unaligned records all the while.
#[test]
fn token_reads_see_every_returned_write_while_writers_race() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    const REC: usize = 4096 + 700; // records straddle pages
    const N: usize = 400;
    let img = Image::new("256M");
    let m = img.mount();
    let p = m.join("f");
    write_file(&p, b"");
    let record = |writer: usize, i: usize| pseudo_random((writer * 100_000 + i) as u64, REC);
    let done: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (p, done) = (p.clone(), done.clone());
            std::thread::spawn(move || {
                let f = OpenOptions::new().write(true).open(&p).unwrap();
                for i in 0..N {
                    let at = ((w * N + i) * REC) as u64;
                    f.write_all_at(&record(w, i), at).unwrap();
                    done[w].store(i + 1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let f = TokenFile::open(&p, false).unwrap();
    let buf = sealed_memfd("t", (2 * N * REC) as u64).unwrap();
    let t = f.register(&buf, 0, 0).unwrap();
    let mut checks = 0;
    loop {
        let finished = writers.iter().all(|h| h.is_finished());
        let seen = [
            done[0].load(Ordering::SeqCst),
            done[1].load(Ordering::SeqCst),
        ];
        t.read(0, 0, (2 * N * REC) as u64).unwrap();
        let got = memfd_bytes(&buf, 2 * N * REC);
        for (w, &n) in seen.iter().enumerate() {
            for i in 0..n {
                let at = (w * N + i) * REC;
                assert!(
                    got[at..at + REC] == record(w, i)[..],
                    "writer {w} record {i} returned before the READ but is not in it"
                );
            }
        }
        checks += 1;
        if finished {
            break;
        }
    }
    for h in writers {
        h.join().unwrap();
    }
    assert!(checks >= 2, "{checks} READs");
    let all = std::fs::read(&p).unwrap();
    assert_eq!(all.len(), 2 * N * REC);
}

/// A token WRITE over data still in the write-back cache wins, and stays
/// won after the cache is written back (and across a remount); write()s
/// around it keep their bytes.
#[test]
fn token_write_over_cached_writes_wins_after_write_back() {
    let img = Image::new("64M");
    let mut m = img.mount();
    let p = m.join("f");
    let old = pseudo_random(51, 64 << 10);
    write_file(&p, &old); // in the daemon's cache, not on the device
    let f = TokenFile::open(&p, true).unwrap();
    let buf = sealed_memfd("t", 16 << 10).unwrap();
    let new = pseudo_random(52, 10_000);
    fill_memfd(&buf, &new);
    let t = f.register(&buf, 0, 0).unwrap();
    assert_eq!(
        t.write(5000, 0, new.len() as u64).unwrap(),
        new.len() as u64
    );
    let mut want = old.clone();
    want[5000..15_000].copy_from_slice(&new);
    // More cached writes after the token WRITE, beside its range.
    let g = OpenOptions::new().write(true).open(&p).unwrap();
    g.write_all_at(b"after", 20_000).unwrap();
    want[20_000..20_005].copy_from_slice(b"after");
    drop(t);
    drop(g);
    drop(f);
    assert!(std::fs::read(&p).unwrap() == want, "before write-back");
    File::open(&p).unwrap().sync_all().unwrap();
    m.remount();
    assert!(std::fs::read(m.join("f")).unwrap() == want, "after remount");
}
