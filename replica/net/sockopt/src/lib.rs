//! TCP socket options that std, tokio, socket2 and rustix do not wrap. This is the only crate of
//! KmMR with `unsafe` code: one `setsockopt` and one `getsockopt`, on a descriptor the caller
//! lends for the call, with a plain integer value.
//!
//! Why KmMR wants them: a replica's links carry one small message at a time (a PROPOSE, a WRITE,
//! an ACCEPT, a reply), so a lost segment is rarely followed by others that could trigger a fast
//! retransmission. Linux then waits for its tail loss probe, which with one segment in flight is
//! two round trips plus the minimum retransmission timeout, 200 ms by default: a WAN value. On a
//! link that drops packets (a flooded or congested port), every loss became a 200-250 ms stall
//! of consensus (the paper experiments' p99). Lowering the floor to a LAN value keeps Linux's
//! estimator in charge: the timeout is still at least the smoothed round trip plus four times
//! its variation, so a slow link keeps a long one.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

/// The TCP options this crate sets, by their numbers in Linux's `include/uapi/linux/tcp.h`
/// (libc 0.2 does not define them yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpOption {
    /// `TCP_RTO_MIN_US`: the floor of the retransmission timeout, and of the tail loss probe's
    /// wait with one segment in flight.
    RtoMin,
    /// `TCP_DELACK_MAX_US`: the longest this end delays an acknowledgement. Kept below the
    /// peer's timeout floor, so that a delayed acknowledgement does not look like a loss.
    DelackMax,
}

impl TcpOption {
    fn number(self) -> i32 {
        match self {
            TcpOption::RtoMin => 45,
            TcpOption::DelackMax => 46,
        }
    }
}

/// Sets `option` to `value` on a TCP socket. Kernels older than the option (both are recent:
/// Linux 6.18 has them) refuse it with `ENOPROTOOPT`, which callers may ignore: the socket then keeps
/// the kernel's defaults. The kernel rounds the value up to its timer's granularity.
pub fn set(fd: impl AsFd, option: TcpOption, value: Duration) -> io::Result<()> {
    let us = i32::try_from(value.as_micros()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{option:?} of {value:?} does not fit the kernel's microseconds"),
        )
    })?;
    imp::set(fd, option.number(), us)
}

/// The value of `option` on a TCP socket, as the kernel holds it (after its rounding).
pub fn get(fd: impl AsFd, option: TcpOption) -> io::Result<Duration> {
    let us = imp::get(fd, option.number())?;
    Ok(Duration::from_micros(u64::try_from(us).unwrap_or(0)))
}

/// Whether an error from [`set`] only says that this kernel does not have the option.
pub fn unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOPROTOOPT) || e.kind() == io::ErrorKind::Unsupported
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::os::fd::{AsFd, AsRawFd};

    const LEN: libc::socklen_t = std::mem::size_of::<libc::c_int>() as libc::socklen_t;

    pub(super) fn set(fd: impl AsFd, option: i32, value: i32) -> io::Result<()> {
        let fd = fd.as_fd();
        // SAFETY: `fd` is borrowed for the whole call, so the descriptor stays open; the kernel
        // reads LEN bytes from `value`, a c_int that lives on this stack frame until it returns.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                option,
                std::ptr::from_ref(&value).cast(),
                LEN,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub(super) fn get(fd: impl AsFd, option: i32) -> io::Result<i32> {
        let fd = fd.as_fd();
        let mut value: libc::c_int = 0;
        let mut len = LEN;
        // SAFETY: as in `set`; the kernel writes at most `len` (LEN) bytes into `value` and the
        // length it wrote into `len`, both on this stack frame.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                option,
                std::ptr::from_mut(&mut value).cast(),
                &mut len,
            )
        };
        if rc == 0 && len == LEN {
            Ok(value)
        } else if rc == 0 {
            Err(io::Error::other(format!(
                "getsockopt wrote {len} bytes, not {LEN}"
            )))
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;
    use std::os::fd::AsFd;

    pub(super) fn set(_: impl AsFd, _: i32, _: i32) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    pub(super) fn get(_: impl AsFd, _: i32) -> io::Result<i32> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn socket() -> TcpStream {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        TcpStream::connect(l.local_addr().expect("addr")).expect("connect")
    }

    /// On a kernel with the options, a value set is what the kernel then holds (rounded up to
    /// its timer's granularity, at most 10 ms here); on one without, the refusal is recognised.
    #[test]
    fn sets_and_reads_back_or_says_unsupported() {
        let s = socket();
        for option in [TcpOption::RtoMin, TcpOption::DelackMax] {
            let want = Duration::from_millis(10);
            match set(&s, option, want) {
                Ok(()) => {
                    let got = get(&s, option).expect("get");
                    assert!(
                        got >= want && got <= want + Duration::from_millis(10),
                        "{option:?}: set {want:?}, the kernel holds {got:?}"
                    );
                }
                Err(e) => assert!(unsupported(&e), "{option:?}: {e}"),
            }
        }
    }

    #[test]
    fn a_value_too_large_is_refused_before_the_kernel() {
        let s = socket();
        let e = set(&s, TcpOption::RtoMin, Duration::from_secs(10_000)).expect_err("too large");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
