//! Who may run which command (README "Roles", docs/security.md).
//!
//! Key operations run as root. Root runs them directly; a member of group
//! vmcrypt-admin runs them through `pkexec`, which asks polkit, and the
//! package's 60-vmcrypt.rules grants action `org.vmcrypt.admin` to that
//! group only. Anybody else gets one line saying so. The check here only
//! saves a non-member pkexec's noise: what enforces the role is polkit (a
//! non-member calling `pkexec /usr/bin/vmcrypt ...` is refused by it) and
//! the modes of what the commands read (keystore, KMIP credentials and
//! images are root's).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use vmcrypt_core::unixsock::{group_gid, ADMIN_GROUP};

/// Where Debian's pkexec lives.
const PKEXEC: &str = "/usr/bin/pkexec";

/// The option the re-executed command gets so that it works in the
/// caller's directory (pkexec starts it in root's home, and relative paths
/// must mean what the caller meant).
pub const CWD_OPTION: &str = "--caller-cwd";

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether this process's user is in vmcrypt-admin (primary or
/// supplementary group, as the process has them).
fn in_admin_group() -> bool {
    let Some(admin) = group_gid(ADMIN_GROUP) else {
        return false;
    };
    if rustix::process::getegid().as_raw() == admin {
        return true;
    }
    rustix::process::getgroups()
        .map(|g| g.iter().any(|g| g.as_raw() == admin))
        .unwrap_or(false)
}

/// Runs this command line again as root through pkexec (never returns on
/// success), or explains in one line why it cannot.
pub fn run_as_admin(what: &str) -> anyhow::Error {
    let uid = rustix::process::getuid().as_raw();
    if !in_admin_group() {
        return anyhow::anyhow!(
            "refused: `vmcrypt {what}` needs root or the {ADMIN_GROUP} role, and uid {uid} has neither (an administrator adds it: usermod -aG {ADMIN_GROUP} USER)"
        );
    }
    if !Path::new(PKEXEC).exists() {
        return anyhow::anyhow!(
            "`vmcrypt {what}` runs as root; members of {ADMIN_GROUP} get there through pkexec, which is not installed (apt install pkexec)"
        );
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return anyhow::anyhow!("cannot find the vmcrypt program: {e}"),
    };
    let cwd = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => return anyhow::anyhow!("cannot read the current directory: {e}"),
    };
    let err = std::process::Command::new(PKEXEC)
        .arg(&exe)
        .args(elevated_args(&cwd, std::env::args_os().skip(1)))
        .exec();
    anyhow::anyhow!("cannot run {PKEXEC}: {err}")
}

/// The arguments of the re-executed command: the caller's directory first.
fn elevated_args(cwd: &Path, rest: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut v = vec![OsString::from(CWD_OPTION), cwd.as_os_str().to_owned()];
    v.extend(rest);
    v
}

/// The user pkexec ran this process for, if it did (pkexec sets
/// PKEXEC_UID; only trusted when running as root, where pkexec put it).
pub fn caller_uid() -> Option<u32> {
    if !is_root() {
        return None;
    }
    std::env::var("PKEXEC_UID").ok()?.parse().ok()
}

/// Hands a file this process created for the caller to the user pkexec ran
/// it for, so that an administrator who is not root can move it (a save
/// file is ciphertext; its mode stays 0600).
pub fn give_to_caller(file: &std::fs::File) -> std::io::Result<()> {
    let Some(uid) = caller_uid() else {
        return Ok(());
    };
    std::os::unix::fs::fchown(file, Some(uid), None)
}

/// Goes to the caller's directory (see [`CWD_OPTION`]).
pub fn enter(dir: &PathBuf) -> anyhow::Result<()> {
    std::env::set_current_dir(dir)
        .map_err(|e| anyhow::anyhow!("cannot enter {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caller_directory_comes_first() {
        let v = elevated_args(
            Path::new("/home/alice"),
            ["save", "vm1", "vm1.save"].into_iter().map(OsString::from),
        );
        assert_eq!(
            v,
            ["--caller-cwd", "/home/alice", "save", "vm1", "vm1.save"]
                .map(OsString::from)
                .to_vec()
        );
    }
}
