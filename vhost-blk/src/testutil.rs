//! Shared by the unit tests: guest memory, descriptor chains built with
//! `virtio_queue::mock`, and disks on temporary files.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmcrypt_crypto::xts::SectorCipher;

use crate::disk::{Access, Disk, SERIAL_LEN};
use crate::guest::GuestMem;

/// Where the mock queue's rings end and request buffers may start.
pub const BUFS: u64 = 0x10_0000;
/// Guest RAM size.
pub const MEM_LEN: usize = 0x40_0000;
/// Test disks' size in sectors.
pub const SECTORS: u64 = 64;
/// Test disks' payload offset (as a LUKS header would leave it).
pub const DATA_OFFSET: u64 = 4096;

/// Guest RAM as the backend maps it.
pub fn guest_mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap()
}

/// A device-readable descriptor.
pub fn r(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, 0, 0))
}

/// A device-writable descriptor.
pub fn w(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
}

/// Links `descs` into one chain that starts at table index `first`, for
/// `MockSplitQueue::add_desc_chains`.
pub fn chain(descs: &[RawDescriptor], first: u16) -> Vec<RawDescriptor> {
    let last = descs.len() - 1;
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = Descriptor::from(*d);
            let (flags, next) = if i == last {
                (d.flags(), 0)
            } else {
                (d.flags() | VRING_DESC_F_NEXT as u16, first + i as u16 + 1)
            };
            RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), flags, next))
        })
        .collect()
}

/// Writes a request header (type, sector) at `at`.
pub fn header<M: GuestMemory>(mem: &M, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// Writes a discard / write-zeroes segment list at `at`.
pub fn segments<M: GuestMemory>(mem: &M, at: u64, segs: &[(u64, u32, u32)]) {
    let mut raw = Vec::new();
    for &(sector, count, flags) in segs {
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&count.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
    }
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

/// Bytes that differ from sector to sector and from a shifted copy.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i / 512) as u8)
        .collect()
}

/// How a test disk reaches its image.
#[derive(Clone, Copy, Debug)]
pub enum Via {
    Mapped,
    Cached,
    Direct,
}

/// A disk on a temporary file, removed on drop.
pub struct TestDisk {
    pub path: PathBuf,
    pub key: Option<Vec<u8>>,
}

impl Drop for TestDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl TestDisk {
    /// The image's payload bytes as stored (ciphertext when encrypted).
    pub fn stored(&self, sector: u64, len: usize) -> Vec<u8> {
        let all = std::fs::read(&self.path).unwrap();
        let at = (DATA_OFFSET + sector * 512) as usize;
        all[at..at + len].to_vec()
    }

    /// The payload as the guest should see it.
    pub fn plaintext(&self, sector: u64, len: usize) -> Vec<u8> {
        let mut b = self.stored(sector, len);
        if let Some(k) = &self.key {
            SectorCipher::new(k)
                .unwrap()
                .decrypt(sector, &mut b)
                .unwrap();
        }
        b
    }
}

/// A fresh image of [`SECTORS`] sectors holding `pattern(.., 7)` as its
/// plaintext, and the [`Disk`] serving it.
pub fn disk(encrypted: bool, via: Via, readonly: bool) -> (TestDisk, Disk) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "vmcrypt-blk-unit-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let key = encrypted.then(|| vmcrypt_crypto::xts::random_key().unwrap().to_vec());
    let mut payload = pattern((SECTORS * 512) as usize, 7);
    if let Some(k) = &key {
        SectorCipher::new(k)
            .unwrap()
            .encrypt(0, &mut payload)
            .unwrap();
    }
    let mut image = vec![0xeeu8; DATA_OFFSET as usize];
    image.extend_from_slice(&payload);
    std::fs::write(&path, &image).unwrap();
    let file: File = OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(&path)
        .unwrap();
    let access = match via {
        Via::Mapped => Access::Mapped(
            crate::mapping::Mapping::new(&file, image.len() as u64)
                .expect("this kernel maps images (MADV_POPULATE_READ)"),
        ),
        Via::Cached => Access::Cached,
        // The buffered path, without O_DIRECT (tmpfs refuses it).
        Via::Direct => Access::Direct,
    };
    let mut serial = [0u8; SERIAL_LEN];
    serial[..11].copy_from_slice(b"test-serial");
    let d = Disk {
        file,
        data_offset: DATA_OFFSET,
        sectors: SECTORS,
        readonly,
        access,
        block_device: false,
        key: key.clone().map(zeroize::Zeroizing::new),
        serial,
        owner: Default::default(),
    };
    (TestDisk { path, key }, d)
}
