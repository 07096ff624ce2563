//! What the launcher's and lamd's poll loops share: a timeout that ends at a deadline, and the
//! list of sources that are ready.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// How long to wait for the next event: until `deadline` if there is one, at most `cap` if given,
/// forever otherwise. Milliseconds are rounded up, so a wake-up never comes before the deadline.
pub fn timeout_until(deadline: Option<Instant>, cap: Option<Duration>) -> PollTimeout {
    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
    let wait = match (left, cap) {
        (Some(l), Some(c)) => Some(l.min(c)),
        (l, c) => l.or(c),
    };
    match wait {
        None => PollTimeout::NONE,
        Some(w) => {
            let ms = w.as_micros().div_ceil(1000);
            PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX))
        }
    }
}

/// Polls `fds`, of which `srcs[i]` says what `fds[i]` is, and returns the ready ones with their
/// events. An interrupted poll returns nothing: the caller's loop simply goes round again.
pub fn ready<S: Copy>(
    fds: &mut [PollFd<'_>],
    srcs: &[S],
    timeout: PollTimeout,
) -> Result<Vec<(S, PollFlags)>, Errno> {
    match poll(fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(e) => return Err(e),
    }
    Ok(collect(fds, srcs))
}

/// Like [`ready`], but waits until `deadline` to the microsecond (a coalescing hold is far
/// shorter than poll's millisecond).
pub fn ready_by<S: Copy>(
    fds: &mut [PollFd<'_>],
    srcs: &[S],
    deadline: Option<Instant>,
) -> Result<Vec<(S, PollFlags)>, Errno> {
    let timeout = deadline.map(|d| {
        nix::sys::time::TimeSpec::from_duration(d.saturating_duration_since(Instant::now()))
    });
    match nix::poll::ppoll(fds, timeout, None) {
        Ok(_) | Err(Errno::EINTR) => {}
        Err(e) => return Err(e),
    }
    Ok(collect(fds, srcs))
}

fn collect<S: Copy>(fds: &[PollFd<'_>], srcs: &[S]) -> Vec<(S, PollFlags)> {
    fds.iter()
        .zip(srcs)
        .filter_map(|(f, s)| f.revents().filter(|r| !r.is_empty()).map(|r| (*s, r)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_capped_and_never_wrap() {
        let far = Instant::now() + Duration::from_secs(600);
        assert_eq!(
            timeout_until(Some(far), Some(Duration::from_secs(1))),
            PollTimeout::from(1000u16)
        );
        // 65.536 s used to wrap to 0 when cast to u16.
        let wrap = Instant::now() + Duration::from_millis(65_536 + 500);
        assert_eq!(timeout_until(Some(wrap), None), PollTimeout::from(u16::MAX));
        assert_eq!(timeout_until(None, None), PollTimeout::NONE);
        let past = Instant::now() - Duration::from_secs(1);
        assert_eq!(timeout_until(Some(past), None), PollTimeout::ZERO);
    }
}
