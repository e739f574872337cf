//! Process hardening for programs that hold keys.
//!
//! A key-holding process must never write a core dump (vSphere encrypts its
//! core dumps; we do not produce any) and must not let another unprivileged
//! process read its memory through ptrace or `/proc/PID/mem`. Key buffers are
//! locked into RAM where the limit allows, so they are not written to swap.

/// Makes the process non-dumpable and sets its core size limit to zero.
///
/// `PR_SET_DUMPABLE=0` also makes `/proc/PID/mem` and ptrace refuse other
/// users' processes. Errors are returned so the caller can refuse to run.
pub fn forbid_core_dumps() -> std::io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a valid rlimit struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Locks the pages that hold `buf` into RAM (best effort).
///
/// Returns false when the memlock limit refuses it; the caller logs that.
pub fn lock_memory(buf: &[u8]) -> bool {
    if buf.is_empty() {
        return true;
    }
    // SAFETY: mlock only pins the pages of a live buffer we borrow; it does
    // not read or write the memory.
    unsafe { libc::mlock(buf.as_ptr().cast(), buf.len()) == 0 }
}

/// Whether this process is currently non-dumpable.
pub fn is_non_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 0 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lock_small_buffer() {
        let buf = vec![0u8; 4096];
        // May be refused under a tiny memlock limit; must not crash.
        let _ = super::lock_memory(&buf);
    }
}
