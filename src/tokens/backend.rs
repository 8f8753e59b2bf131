//! Choosing the token backend for a mount.
//!
//! - kernel: the kernel series' io_uring dmabuf registered buffers. Every
//!   token's buffer is registered with the device's rings (a dmabuf bound
//!   to the O_DIRECT device fd, a memfd as pinned user memory) and I/O
//!   goes down as `READ_FIXED`/`WRITE_FIXED`.
//! - mapped: O_DIRECT between the device and the daemon's mapping of the
//!   buffer; dmabufs (whose mappings O_DIRECT cannot target) are bounced.
//!
//! `tokens=auto` (the default) takes the kernel backend where the probe
//! finds the series and the device is an O_DIRECT block device (the
//! series binds dmabufs to block devices only), else mapped and says why;
//! a dmabuf its driver will not take (the series drives NVMe only) then
//! falls back to the bounce path, token by token. `tokens=kernel`
//! insists: the mount fails without fixed buffers, and a dmabuf the
//! kernel will not register fails REGISTER with EOPNOTSUPP instead of
//! falling back, so a missing kernel feature is loud.

use std::str::FromStr;

use log::warn;

use crate::blockdev::uring::{probe_dmabuf_support, KernelSupport};
use crate::blockdev::FileDevice;
use crate::uapi;

/// Which backend carries token I/O, and why.
#[derive(Debug, Clone)]
pub struct Backend {
    pub kind: u32,
    /// Whether dmabuf buffers can be registered at all.
    pub dmabufs: bool,
    /// tokens=kernel: no per-token fallback to the mapped path for dmabufs.
    pub strict: bool,
    pub reason: String,
}

impl Backend {
    fn mapped(reason: impl Into<String>) -> Self {
        Self {
            kind: uapi::BACKEND_MAPPED,
            dmabufs: true,
            strict: false,
            reason: reason.into(),
        }
    }

    pub fn is_kernel(&self) -> bool {
        self.kind == uapi::BACKEND_KERNEL
    }
}

/// The `tokens=` mount option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    #[default]
    Auto,
    Mapped,
    Kernel,
}

impl FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Choice::Auto),
            "mapped" => Ok(Choice::Mapped),
            "kernel" => Ok(Choice::Kernel),
            _ => Err(format!("tokens={s:?}: expected auto, mapped or kernel")),
        }
    }
}

/// Picks the backend for `dev` and sets up its fixed buffers when the
/// kernel backend is taken. `plain` is false when test wrappers sit
/// between the filesystem and `dev` (fixed-buffer I/O would bypass them).
pub fn choose(choice: Choice, dev: &mut FileDevice, plain: bool) -> Result<Backend, String> {
    if choice == Choice::Mapped {
        return Ok(Backend::mapped("chosen with tokens=mapped"));
    }
    let support = probe_dmabuf_support();
    let obstacle = if !dev.is_direct() {
        Some("device cannot do O_DIRECT, which the kernel backend needs".to_string())
    } else if !plain {
        Some("test device wrappers in use".to_string())
    } else {
        None
    };
    match (choice, support, obstacle) {
        (Choice::Auto, KernelSupport::Absent(why), _) => Ok(Backend::mapped(why)),
        (Choice::Auto, KernelSupport::Present, Some(why)) => Ok(Backend::mapped(why)),
        (Choice::Auto, KernelSupport::Present, None) if !dev.is_block_device() => Ok(
            Backend::mapped("kernel has the series, but it binds dmabufs to block devices only"),
        ),
        (_, _, Some(why)) => Err(format!("tokens=kernel impossible: {why}")),
        (_, support, None) => {
            if let Err(e) = dev.enable_fixed_buffers() {
                let why = format!("io_uring fixed buffers unavailable ({e})");
                return match choice {
                    Choice::Kernel => Err(format!("tokens=kernel impossible: {why}")),
                    _ => Ok(Backend::mapped(why)),
                };
            }
            Ok(match support {
                KernelSupport::Present => Backend {
                    kind: uapi::BACKEND_KERNEL,
                    dmabufs: true,
                    strict: choice == Choice::Kernel,
                    reason: "io_uring dmabuf registered buffers on the O_DIRECT device".into(),
                },
                KernelSupport::Absent(why) => {
                    warn!("tokens=kernel on a kernel without dmabuf registered buffers: {why}");
                    Backend {
                        kind: uapi::BACKEND_KERNEL,
                        dmabufs: false,
                        strict: true,
                        reason: format!("tokens=kernel, memfds only: {why}"),
                    }
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockdev::file::temp_image;
    use crate::blockdev::OpenMode;

    #[test]
    fn choices_on_an_image_file() {
        let (_dir, path) = temp_image(1 << 20);
        let mut dev = FileDevice::open(&path, OpenMode::default()).unwrap();
        let mapped = choose(Choice::Mapped, &mut dev, true).unwrap();
        assert!(!mapped.is_kernel());
        let auto = choose(Choice::Auto, &mut dev, true).unwrap();
        assert!(auto.reason.len() < 88, "{}", auto.reason);
        println!("tokens=auto here: {:?}", auto);
        if dev.is_direct() {
            let forced = choose(Choice::Kernel, &mut dev, true).unwrap();
            assert!(forced.is_kernel());
            assert!(choose(Choice::Kernel, &mut dev, false).is_err());
        }
        assert!("bogus".parse::<Choice>().is_err());
    }
}
