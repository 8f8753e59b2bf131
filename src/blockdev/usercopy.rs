//! Copies to and from memory the daemon does not own (a caller's memfd or
//! dmabuf mapping) that survive the memory faulting under them.
//!
//! The daemon's CPU touches application memory when it bounces, zeroes
//! holes and copies edges. An exporter may answer a fault with SIGBUS (a
//! GPU reset), and a memfd truncated under us does the same; by default
//! that kills the daemon and the mount with it, for every user. Here the
//! copies are two tiny assembly routines (`rep movsb`, `rep stosb`) with a
//! fixup address, as the kernel's exception table does for its user
//! copies: a process-wide SIGBUS/SIGSEGV handler, installed once, checks
//! whether the faulting instruction is one of those two; if so it resumes
//! at the fixup, which returns the count left, and the copy reports
//! [`DeviceError::Fault`]. Any other fault restores the previous
//! disposition and returns, so the fault fires again and behaves exactly
//! as it did before (real bugs still crash, Rust's stack-overflow report
//! still prints).
//!
//! Only x86_64 Linux has the guarded routines; elsewhere [`copy`] and
//! [`zero`] are plain copies and a fault still kills the process.

use super::DeviceError;

/// Copies `len` bytes from `src` to `dst`; a fault on either side (SIGBUS
/// or SIGSEGV) is `Err(Fault)`, with some prefix of the bytes copied.
///
/// # Safety
/// `dst..dst+len` and `src..src+len` must not overlap and must be memory
/// the process may legitimately access (mapped now, or a mapping whose
/// pages may vanish): the guard turns faults into errors, it does not make
/// wild pointers valid targets of a write.
pub unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) -> Result<(), DeviceError> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: forwarded from the caller.
    unsafe { imp::copy(dst, src, len) }
}

/// Zeroes `len` bytes at `dst`; a fault is `Err(Fault)`.
///
/// # Safety
/// As [`copy`], for `dst..dst+len`.
pub unsafe fn zero(dst: *mut u8, len: usize) -> Result<(), DeviceError> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: forwarded from the caller.
    unsafe { imp::zero(dst, len) }
}

/// Whether faults in [`copy`] and [`zero`] are caught on this build.
pub const GUARDED: bool = cfg!(all(target_arch = "x86_64", target_os = "linux"));

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use std::sync::{Once, OnceLock};

    use super::DeviceError;

    // Each routine: the count into rcx, one `rep` string instruction, and
    // a fixup label right after it that returns what rcx still holds (0
    // when the instruction finished). On a fault the handler points RIP
    // at the fixup; the CPU leaves rcx/rsi/rdi at the faulting byte.
    core::arch::global_asm!(
        ".pushsection .text.dmabuf_fs_usercopy,\"ax\",@progbits",
        ".p2align 4",
        ".globl dmabuf_fs_copy_guarded",
        ".hidden dmabuf_fs_copy_guarded",
        "dmabuf_fs_copy_guarded:",
        "mov rcx, rdx",
        ".globl dmabuf_fs_copy_insn",
        ".hidden dmabuf_fs_copy_insn",
        "dmabuf_fs_copy_insn:",
        "rep movsb",
        ".globl dmabuf_fs_copy_fixup",
        ".hidden dmabuf_fs_copy_fixup",
        "dmabuf_fs_copy_fixup:",
        "mov rax, rcx",
        "ret",
        ".p2align 4",
        ".globl dmabuf_fs_zero_guarded",
        ".hidden dmabuf_fs_zero_guarded",
        "dmabuf_fs_zero_guarded:",
        "mov rcx, rsi",
        "xor eax, eax",
        ".globl dmabuf_fs_zero_insn",
        ".hidden dmabuf_fs_zero_insn",
        "dmabuf_fs_zero_insn:",
        "rep stosb",
        ".globl dmabuf_fs_zero_fixup",
        ".hidden dmabuf_fs_zero_fixup",
        "dmabuf_fs_zero_fixup:",
        "mov rax, rcx",
        "ret",
        ".popsection",
    );

    extern "C" {
        /// Returns the bytes not copied (0: all of them).
        fn dmabuf_fs_copy_guarded(dst: *mut u8, src: *const u8, len: usize) -> usize;
        /// Returns the bytes not zeroed (0: all of them).
        fn dmabuf_fs_zero_guarded(dst: *mut u8, len: usize) -> usize;
        // Labels only: their addresses are what the handler compares.
        fn dmabuf_fs_copy_insn();
        fn dmabuf_fs_copy_fixup();
        fn dmabuf_fs_zero_insn();
        fn dmabuf_fs_zero_fixup();
    }

    /// The dispositions our handler replaced, restored for faults that
    /// are not ours. Set before the handler is installed.
    static PREVIOUS: OnceLock<[libc::sigaction; 2]> = OnceLock::new();
    static INSTALL: Once = Once::new();
    const SIGNALS: [libc::c_int; 2] = [libc::SIGBUS, libc::SIGSEGV];

    pub(super) unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) -> Result<(), DeviceError> {
        install();
        // SAFETY: the caller vouches for both ranges; a fault returns early.
        match unsafe { dmabuf_fs_copy_guarded(dst, src, len) } {
            0 => Ok(()),
            _ => Err(DeviceError::Fault),
        }
    }

    pub(super) unsafe fn zero(dst: *mut u8, len: usize) -> Result<(), DeviceError> {
        install();
        // SAFETY: the caller vouches for the range; a fault returns early.
        match unsafe { dmabuf_fs_zero_guarded(dst, len) } {
            0 => Ok(()),
            _ => Err(DeviceError::Fault),
        }
    }

    fn install() {
        INSTALL.call_once(|| {
            let mut previous = [empty_sigaction(), empty_sigaction()];
            for (i, &sig) in SIGNALS.iter().enumerate() {
                // SAFETY: reads the current disposition into our struct.
                unsafe { libc::sigaction(sig, std::ptr::null(), &mut previous[i]) };
            }
            let _ = PREVIOUS.set(previous);
            let mut action = empty_sigaction();
            action.sa_sigaction = on_fault as *const () as usize;
            // On the alternate stack where the thread has one (Rust's own
            // threads do), so a stack overflow still reaches Rust's report.
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            for &sig in &SIGNALS {
                // SAFETY: installs a handler that only touches the
                // interrupted context and calls sigaction, both
                // async-signal-safe.
                if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } != 0 {
                    log::warn!(
                        "cannot install the fault handler for signal {sig}: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
        });
    }

    fn empty_sigaction() -> libc::sigaction {
        // SAFETY: sigaction is plain data; all-zero is SIG_DFL, no flags,
        // an empty mask.
        unsafe { std::mem::zeroed() }
    }

    extern "C" fn on_fault(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo.
        let code = unsafe { (*info).si_code };
        if code <= 0 {
            // Sent (kill, tgkill, sigqueue), not a fault, even if it
            // arrives during a copy: put back the old disposition and send
            // it again, so that it acts as it would have without us.
            restore(sig);
            // SAFETY: raise is async-signal-safe; the signal stays blocked
            // until this handler returns, then meets the old disposition.
            unsafe { libc::raise(sig) };
            return;
        }
        let ctx = ctx.cast::<libc::ucontext_t>();
        // SAFETY: with SA_SIGINFO the kernel passes the interrupted
        // thread's ucontext, which the handler may read and change.
        let rip = unsafe { &mut (*ctx).uc_mcontext.gregs[libc::REG_RIP as usize] };
        let fixup = if *rip as usize == dmabuf_fs_copy_insn as *const () as usize {
            Some(dmabuf_fs_copy_fixup as *const () as usize)
        } else if *rip as usize == dmabuf_fs_zero_insn as *const () as usize {
            Some(dmabuf_fs_zero_fixup as *const () as usize)
        } else {
            None
        };
        match fixup {
            Some(at) => *rip = at as libc::greg_t,
            // Not ours: put back what was there and return; the
            // instruction faults again and meets the old disposition.
            None => restore(sig),
        }
    }

    /// Puts back the disposition `sig` had before the guard (async-signal-safe).
    fn restore(sig: libc::c_int) {
        let i = SIGNALS.iter().position(|&s| s == sig).unwrap_or(0);
        if let Some(prev) = PREVIOUS.get() {
            // SAFETY: sigaction is async-signal-safe.
            unsafe { libc::sigaction(sig, &prev[i], std::ptr::null_mut()) };
        } else {
            let dfl = empty_sigaction();
            // SAFETY: as above.
            unsafe { libc::sigaction(sig, &dfl, std::ptr::null_mut()) };
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod imp {
    use super::DeviceError;

    pub(super) unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) -> Result<(), DeviceError> {
        // SAFETY: forwarded from the caller (no fault guard here).
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        Ok(())
    }

    pub(super) unsafe fn zero(dst: *mut u8, len: usize) -> Result<(), DeviceError> {
        // SAFETY: forwarded from the caller (no fault guard here).
        unsafe { std::ptr::write_bytes(dst, 0, len) };
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A shared mapping of an unsealed memfd of `len` bytes.
    pub(crate) fn shared_memfd(len: usize) -> (memfd::Memfd, *mut u8) {
        let mfd = memfd::MemfdOptions::default()
            .allow_sealing(true)
            .create("usercopy-test")
            .unwrap();
        mfd.as_file().set_len(len as u64).unwrap();
        // SAFETY: a fresh shared mapping of a file we own.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mfd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        (mfd, p.cast())
    }

    #[test]
    fn faults_on_vanished_pages_are_errors() {
        if !GUARDED {
            println!("SKIP: no guarded copies on this architecture");
            return;
        }
        let len = 64 << 10;
        let (mfd, p) = shared_memfd(len);
        let mut local = vec![7u8; len];
        // SAFETY: p is a live mapping of len bytes, local is ours.
        unsafe {
            copy(p, local.as_ptr(), len).unwrap();
            copy(local.as_mut_ptr(), p, len).unwrap();
        }
        // The pages vanish under the mapping: every access now SIGBUSes.
        mfd.as_file().set_len(0).unwrap();
        for _ in 0..3 {
            // SAFETY: the mapping is still ours; its pages are gone.
            unsafe {
                assert!(matches!(
                    copy(local.as_mut_ptr(), p, len),
                    Err(DeviceError::Fault)
                ));
                assert!(matches!(
                    copy(p.add(100), local.as_ptr(), 10),
                    Err(DeviceError::Fault)
                ));
                assert!(matches!(zero(p.add(4096), 5000), Err(DeviceError::Fault)));
            }
        }
        // A partly valid mapping: the copy stops at the first bad page.
        mfd.as_file().set_len(4096).unwrap();
        let mut back = vec![1u8; 8192];
        // SAFETY: as above.
        unsafe {
            zero(p, 4096).unwrap();
            assert!(matches!(
                copy(back.as_mut_ptr(), p, 8192),
                Err(DeviceError::Fault)
            ));
            libc::munmap(p.cast(), len);
        }
        assert!(back[..4096].iter().all(|&b| b == 0));
    }

    #[test]
    fn copies_are_byte_exact() {
        let src: Vec<u8> = (0..20000u32).map(|i| (i * 13 % 251) as u8).collect();
        for &(from, to, len) in &[
            (0, 0, 0),
            (0, 0, 1),
            (1, 3, 4095),
            (0, 0, 4096),
            (4095, 1, 4097),
            (17, 9000, 10000),
        ] {
            let mut dst = vec![0xEEu8; 20000];
            // SAFETY: both ranges are inside their vectors.
            unsafe { copy(dst.as_mut_ptr().add(to), src.as_ptr().add(from), len).unwrap() };
            assert_eq!(dst[to..to + len], src[from..from + len]);
            assert!(dst[..to].iter().all(|&b| b == 0xEE));
            assert!(dst[to + len..].iter().all(|&b| b == 0xEE));
            // SAFETY: inside the vector.
            unsafe { zero(dst.as_mut_ptr().add(to), len).unwrap() };
            assert!(dst[to..to + len].iter().all(|&b| b == 0));
            assert!(dst[to + len..].iter().all(|&b| b == 0xEE));
        }
    }

    /// Child half of [`faults_elsewhere_still_kill_the_process`]: with
    /// the handler installed, fault outside the guarded routines.
    #[test]
    fn fault_outside_the_guard_child() {
        let Ok(how) = std::env::var("USERCOPY_CRASH_CHILD") else {
            return; // run only as the child
        };
        let (mfd, p) = shared_memfd(4096);
        // SAFETY: a valid mapping; installs the handler.
        unsafe { copy(p, [1u8; 8].as_ptr(), 8).unwrap() };
        mfd.as_file().set_len(0).unwrap();
        // SAFETY: deliberately not: the faults below must kill us.
        unsafe {
            match how.as_str() {
                "bus" => println!("{}", std::ptr::read_volatile(p)),
                _ => println!("{}", std::ptr::read_volatile(8 as *const u8)),
            }
        }
        println!("survived a fault outside the guard");
    }

    #[test]
    fn faults_elsewhere_still_kill_the_process() {
        use std::os::unix::process::ExitStatusExt;
        if !GUARDED {
            println!("SKIP: no guarded copies on this architecture");
            return;
        }
        for (how, sig) in [("bus", libc::SIGBUS), ("segv", libc::SIGSEGV)] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "blockdev::usercopy::tests::fault_outside_the_guard_child",
                ])
                .args(["--nocapture", "--test-threads=1"])
                .env("USERCOPY_CRASH_CHILD", how)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(!stdout.contains("survived"), "{how}: {stdout}");
            assert_eq!(out.status.signal(), Some(sig), "{how}: {:?}", out.status);
        }
    }
}
