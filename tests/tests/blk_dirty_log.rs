//! Dirty-page logging while QEMU migrates (issue 15): what vmcrypt-blk
//! writes into guest RAM must be marked in QEMU's log (SET_LOG_BASE) or the
//! destination resumes with stale pages. Driven through the real vhost-user
//! protocol against a real vmcrypt-blk, as QEMU drives it:
//!
//! 1. QEMU sets the log and acks `VHOST_F_LOG_ALL` (the migration starts),
//!    then adds a memory region (ADD_MEM_REGION). A disk read into the new
//!    region must be logged. (vhost-user-backend 0.24 gave the log only to
//!    the regions that existed at SET_LOG_BASE: this read went unlogged.)
//! 2. QEMU withdraws `VHOST_F_LOG_ALL` (the migration ended or failed).
//!    Nothing may be marked any more. (The crate ignored the withdrawal and
//!    kept writing into a log QEMU no longer reads.)
//!
//! The status byte of the first read, in the region that existed at
//! SET_LOG_BASE, is logged with or without the fix: the control that the
//! log is read right.

use std::os::fd::AsRawFd;

use anyhow::{ensure, Result};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use vmcrypt_tests::frontend::{header, memfd, BlkFrontend, Options, HEADER_ADDR, STATUS_ADDR};
use vmcrypt_tests::guest::TempDir;
use vmcrypt_tests::vmcrypt::Blk;

/// `VHOST_F_LOG_ALL`.
const LOG_ALL: u64 = 1 << 26;
/// QEMU's log page.
const PAGE: u64 = 4096;
/// Where the region added during the migration sits in guest memory.
const NEW_REGION: u64 = 64 << 20;
/// Its size.
const NEW_REGION_LEN: u64 = 1 << 20;
/// The log: one bit per page, enough for 128 MiB of guest memory.
const LOG_LEN: u64 = 4096;

/// The pages the log marks.
fn marked(log: &std::fs::File) -> Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0u8; LOG_LEN as usize];
    log.read_exact_at(&mut bytes, 0)?;
    let mut pages = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                pages.push(i as u64 * 8 + bit);
            }
        }
    }
    Ok(pages)
}

fn clear(log: &std::fs::File) -> Result<()> {
    use std::os::unix::fs::FileExt;
    log.write_all_at(&vec![0u8; LOG_LEN as usize], 0)?;
    Ok(())
}

/// A one-page read of sector 0 into `data`, status at [`STATUS_ADDR`].
fn read_into(fe: &mut BlkFrontend, data: u64) -> Result<()> {
    fe.write_guest(HEADER_ADDR, &header(VIRTIO_BLK_T_IN, 0))?;
    let c = fe.submit(&[
        (HEADER_ADDR, 16, false),
        (data, PAGE as u32, true),
        (STATUS_ADDR, 1, true),
    ])?;
    ensure!(c.status == 0, "the read failed: status {}", c.status);
    Ok(())
}

#[test]
fn guest_writes_are_logged_in_regions_added_mid_migration_and_not_after_it() -> Result<()> {
    let dir = TempDir::new("blk-dirty-log")?;
    let image = dir.join("disk.img");
    std::fs::File::create(&image)?.set_len(16 << 20)?;
    let socket = dir.join("blk.sock");
    let _blk = Blk::start(&socket, &image, &[] as &[String])?;
    let mut fe = BlkFrontend::connect_with(
        &socket,
        Options {
            migration: true,
            ..Options::default()
        },
    )?;
    let features = fe.acked_features();

    // The migration starts: the log, then VHOST_F_LOG_ALL.
    let log = memfd(LOG_LEN)?;
    fe.vhost().set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: LOG_LEN,
            mmap_offset: 0,
            mmap_handle: log.as_raw_fd(),
        }),
    )?;
    fe.vhost().set_features(features | LOG_ALL)?;
    // A region added during it.
    let extra = memfd(NEW_REGION_LEN)?;
    fe.vhost().add_mem_region(&VhostUserMemoryRegionInfo {
        guest_phys_addr: NEW_REGION,
        memory_size: NEW_REGION_LEN,
        // The frontend's address of it: only vring addresses are
        // translated through it, and no vring lives here.
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
        mmap_handle: extra.as_raw_fd(),
    })?;
    clear(&log)?;
    read_into(&mut fe, NEW_REGION)?;
    let pages = marked(&log)?;
    ensure!(
        pages.contains(&(STATUS_ADDR / PAGE)),
        "the status byte's page {} is not logged ({pages:?}): the log is not read right",
        STATUS_ADDR / PAGE
    );
    ensure!(
        pages.contains(&(NEW_REGION / PAGE)),
        "a disk read into the region added during the migration (page {}) was not logged: {pages:?}",
        NEW_REGION / PAGE
    );
    eprintln!("blk_dirty_log: during the migration, logged pages {pages:?}");

    // The migration is over: nothing is marked any more.
    fe.vhost().set_features(features)?;
    clear(&log)?;
    read_into(&mut fe, NEW_REGION)?;
    read_into(&mut fe, vmcrypt_tests::frontend::DATA_ADDR)?;
    let pages = marked(&log)?;
    ensure!(
        pages.is_empty(),
        "pages marked after VHOST_F_LOG_ALL was withdrawn: {pages:?}"
    );
    Ok(())
}
