#!/usr/bin/python3
"""Replays OpenStack Nova's libvirt live-migration calls against a domain.

vmcrypt's tests use it to show that a migration started the way Nova starts
one is encrypted by vmcrypt with no Nova-specific support. It mirrors
(re-implemented, not copied) what nova/virt/libvirt does:

- driver.py ``_live_migration_operation``: the destination URI
  ``qemu+<live_migration_scheme>://<dest>/system`` (``_live_migration_uri``;
  scheme ``tcp`` by default, ``tls`` or ``ssh`` when configured), a
  ``migrate_uri`` of ``tcp://<live_migration_inbound_addr>`` unless the
  migration is tunnelled (``_migrate_uri``), and the guest's migratable XML
  as the destination and persistent XML;
- driver.py ``_parse_migration_flags``/``_prepare_migration_flags``: the
  default flags LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE, plus
  TUNNELLED (``live_migration_tunnelled``), POSTCOPY
  (``live_migration_permit_post_copy``), AUTO_CONVERGE
  (``live_migration_permit_auto_converge``, only without post-copy) and
  PARALLEL (``live_migration_parallel_connections``, newer releases);
- guest.py ``Guest.migrate``: ``virDomainMigrateToURI3`` with the typed
  parameters ``destination_xml``, ``persistent_xml``, ``bandwidth`` and
  ``migrate_uri``;
- driver.py ``_live_migration_monitor``: ``jobStats`` polled twice a second
  while the call runs in another thread.

Usage: nova_live_migrate.py DOMAIN DEST_URI [--inbound-addr ADDR]
       [--connect URI] [--tunnelled] [--postcopy] [--auto-converge]
       [--parallel N] [--json]
Exit 0 when the migration completed; 1 with one line on stderr otherwise.
"""

import argparse
import json
import sys
import threading
import time

import libvirt

BASE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)

FLAG_NAMES = [
    name
    for name in dir(libvirt)
    if name.startswith("VIR_MIGRATE_") and isinstance(getattr(libvirt, name), int)
]


def flag_names(flags):
    return sorted(
        n[len("VIR_MIGRATE_"):]
        for n in FLAG_NAMES
        if getattr(libvirt, n) and flags & getattr(libvirt, n) == getattr(libvirt, n)
        and bin(getattr(libvirt, n)).count("1") == 1
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("domain")
    ap.add_argument("dest_uri", help="e.g. qemu+tls://host-b/system")
    ap.add_argument("--inbound-addr", help="live_migration_inbound_addr of the destination")
    ap.add_argument("--connect", default="qemu:///system")
    ap.add_argument("--tunnelled", action="store_true")
    ap.add_argument("--postcopy", action="store_true")
    ap.add_argument("--auto-converge", action="store_true")
    ap.add_argument("--parallel", type=int, metavar="N")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    # Errors are reported once, by us, not also printed by libvirt.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(a.connect)
        dom = conn.lookupByName(a.domain)
    except libvirt.libvirtError as e:
        print(f"nova_live_migrate: {e.get_error_message()}", file=sys.stderr)
        return 1

    flags = BASE_FLAGS
    if a.tunnelled:
        flags |= libvirt.VIR_MIGRATE_TUNNELLED
    if a.postcopy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    elif a.auto_converge:
        flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    params = {
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 0,
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml,
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: xml,
    }
    if a.inbound_addr and not a.tunnelled:
        addr = a.inbound_addr
        if ":" in addr and not addr.startswith("["):
            addr = f"[{addr}]"
        params[libvirt.VIR_MIGRATE_PARAM_URI] = f"tcp://{addr}"
    if a.parallel:
        flags |= libvirt.VIR_MIGRATE_PARALLEL
        params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = a.parallel

    result = {}

    def run():
        try:
            dom.migrateToURI3(a.dest_uri, params, flags)
            result["ok"] = True
        except libvirt.libvirtError as e:
            result["error"] = e.get_error_message()

    t0 = time.monotonic()
    worker = threading.Thread(target=run)
    worker.start()
    while worker.is_alive():
        try:
            st = dom.jobStats()
            total = st.get("data_total", 0)
            if total:
                done = st.get("data_processed", 0)
                print(
                    f"nova_live_migrate: {done >> 20} of {total >> 20} MiB",
                    file=sys.stderr,
                )
        except libvirt.libvirtError:
            pass  # the domain may already be gone from this host
        worker.join(0.5)
    seconds = time.monotonic() - t0

    if "error" in result:
        print(f"nova_live_migrate: {result['error']}", file=sys.stderr)
        return 1
    if a.json:
        print(
            json.dumps(
                {
                    "domain": a.domain,
                    "dest": a.dest_uri,
                    "flags": flag_names(flags),
                    "params": sorted(params),
                    "seconds": round(seconds, 2),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
