//! Unix sockets that only one other user may use: created with their final
//! mode (through the umask, never a chmod after `bind`), handed to that user
//! with `lchown`, and the peer's credentials read from `SO_PEERCRED`.
//! vmcrypt-blk (disk sockets) and vmcrypt-migrate (QEMU's migration
//! sockets) use them for the domain's QEMU.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// The user and group a socket is handed to (the domain's QEMU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// uid allowed to connect besides root.
    pub uid: u32,
    /// gid of the socket file.
    pub gid: u32,
}

impl std::str::FromStr for Owner {
    type Err = String;

    /// `UID:GID` or `UID` (numeric; the gid then equals the uid).
    fn from_str(s: &str) -> Result<Owner, String> {
        let bad = || format!("{s:?} is not UID or UID:GID (numbers, e.g. 64055:64055)");
        let (u, g) = s.split_once(':').unwrap_or((s, s));
        let uid = u.trim_start_matches('+').parse().map_err(|_| bad())?;
        let gid = g.trim_start_matches('+').parse().map_err(|_| bad())?;
        Ok(Owner { uid, gid })
    }
}

/// Binds a unix socket at `path` whose file has `mode` from its creation,
/// then hands it to `owner`. An old socket at `path` is replaced; anything
/// else there (a file, a link, a directory) is refused.
///
/// Sets the process umask for the duration of `bind`: call it before other
/// threads create files.
pub fn bind(path: &Path, mode: u32, owner: Option<Owner>) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "something other than a socket is in the way",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mask = (!mode & 0o777) as libc::mode_t;
    // SAFETY: umask only swaps the process file-creation mask.
    let old = unsafe { libc::umask(mask) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound?;
    if let Some(o) = owner {
        // lchown: never follow a link someone might have put in its place
        // (the directory is root's, so nobody can; this is belt and braces).
        if let Err(e) = std::os::unix::fs::lchown(path, Some(o.uid), Some(o.gid)) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    }
    Ok(listener)
}

/// A connected peer's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id at connect time.
    pub pid: i32,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
}

/// `SO_PEERCRED` of a connected unix socket.
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The supplementary groups of a connected unix socket's peer
/// (`SO_PEERGROUPS`, Linux 4.13).
pub fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
    // SAFETY: groups and len describe a writable buffer of len bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
    Ok(groups)
}

/// The gid of a group, from the system's group database.
pub fn group_gid(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getgrnam reads a NUL-terminated name; the returned record is
    // only read here, before any other call that could reuse it.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    if g.is_null() {
        None
    } else {
        // SAFETY: g points to a valid group record (checked above).
        Some(unsafe { (*g).gr_gid })
    }
}

/// The group whose members may use vmcrypt's key operations besides root
/// (docs/design.md "Roles").
pub const ADMIN_GROUP: &str = "vmcrypt-admin";

/// The group of VM operators: the users libvirt's polkit rule (Debian's
/// 60-libvirt.rules) lets manage VMs. They may ask the migration daemon how
/// a migration went, nothing more.
pub const OPERATOR_GROUP: &str = "libvirt";

/// Whether the peer of `fd` is root or a member of [`ADMIN_GROUP`]
/// (primary or supplementary).
pub fn peer_is_admin(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let cred = peer_cred(fd)?;
    if cred.uid == 0 {
        return Ok(true);
    }
    let Some(admin) = group_gid(ADMIN_GROUP) else {
        return Ok(false);
    };
    Ok(cred.gid == admin || peer_groups(fd)?.contains(&admin))
}

/// Whether a peer may use a socket handed to `owner`: root, this
/// process's own user, or the owner.
pub fn peer_allowed(uid: u32, owner: Option<u32>) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    uid == 0 || uid == me || Some(uid) == owner
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixStream;

    #[test]
    fn owner_parses() {
        assert_eq!(
            "64055:107".parse(),
            Ok(Owner {
                uid: 64055,
                gid: 107
            })
        );
        assert_eq!(
            "+64055:+64055".parse(),
            Ok(Owner {
                uid: 64055,
                gid: 64055
            })
        );
        assert_eq!("5".parse(), Ok(Owner { uid: 5, gid: 5 }));
        assert!("qemu".parse::<Owner>().is_err());
        assert!("1:x".parse::<Owner>().is_err());
    }

    #[test]
    fn socket_is_born_with_its_mode_and_owner() {
        let d = std::env::temp_dir().join(format!("vmcrypt-unixsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("s.sock");
        let l = bind(
            &p,
            0o600,
            Some(Owner {
                uid: 4242,
                gid: 4343,
            }),
        )
        .unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!((m.uid(), m.gid()), (4242, 4343));
        drop(l);
        // A stale socket is replaced, anything else refused.
        let l = bind(&p, 0o600, None).unwrap();
        let c = UnixStream::connect(&p).unwrap();
        let (s, _) = l.accept().unwrap();
        let cred = peer_cred(std::os::fd::AsFd::as_fd(&s)).unwrap();
        assert_eq!(cred.pid, std::process::id() as i32);
        drop(c);
        let f = d.join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(bind(&f, 0o600, None).is_err());
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
