#!/usr/bin/python3
"""Replay OpenStack Nova's libvirt live-migration calls against one domain.

vmcrypt's tests use it to show that a migration started the way Nova starts
one is encrypted by vmcrypt with no Nova-specific support. Re-implemented
from a reading of openstack/nova at 00a030403f672b975364c855b7d25b40ef83e757
(master, `git describe` 33.0.0-373-g00a030403f); no Nova code is copied.
What it mirrors (docs/nova.md has the details):

- driver.py `_prepare_migration_flags` + `_parse_migration_flags`: flags
  LIVE|PEER2PEER|UNDEFINE_SOURCE|PERSIST_DEST, plus TUNNELLED
  (live_migration_tunnelled), TLS (live_migration_with_native_tls), POSTCOPY
  (live_migration_permit_post_copy), AUTO_CONVERGE
  (live_migration_permit_auto_converge, only without POSTCOPY), PARALLEL
  (live_migration_parallel_connections > 1); `_live_migration_operation`
  drops POSTCOPY for a paused guest.
- driver.py `_live_migration_operation` + `_migrate_uri`: migrate_uri
  `tcp://ADDR` (no port; IPv6 in brackets) from the destination's
  live_migration_inbound_addr, only when not tunnelled. Nova then also puts
  ADDR in DEST_URI (`_live_migration_uri`: qemu+SCHEME://ADDR/system); pass
  that URI yourself.
- migration.py `get_updated_guest_xml` + guest.py `Guest.migrate`:
  XMLDesc(VIR_DOMAIN_XML_MIGRATABLE) (no SECURE) as destination_xml and
  persistent_xml (Nova rewrites only its own devices: volumes, VIFs, NUMA...;
  here unchanged), bandwidth always, parallel.connections only when > 1,
  then virDomainMigrateToURI3(DEST_URI, params, flags) in a thread.
- driver.py `_live_migration_monitor` + migration.py `downtime_steps`,
  `update_downtime`, `should_trigger_timeout_action`, `run_tasks`: jobStats
  every 0.5 s; migrateSetMaxDowntime stepped up to live_migration_downtime;
  after live_migration_completion_timeout x data GiB, abortJob, or with
  force_complete migrateStartPostCopy (POSTCOPY set) else suspend.

Exit 0 when migrateToURI3 returned; 1 with one line on stderr otherwise.
"""

import argparse
import ipaddress
import json
import sys
import threading
import time

import libvirt

POLL = 0.5  # seconds between jobStats calls, as Nova's monitor


def fail(what, err):
    msg = err.get_error_message() if isinstance(err, libvirt.libvirtError) else str(err)
    print(f"nova_live_migrate: {what}: {' '.join(str(msg).split())}", file=sys.stderr)
    return 1


def flag_names(flags):
    return sorted(n[len("VIR_MIGRATE_"):] for n in dir(libvirt)
                  if n.startswith("VIR_MIGRATE_") and isinstance(getattr(libvirt, n), int)
                  and flags & getattr(libvirt, n))


def nova_flags(a, paused):
    f = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
         | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE | libvirt.VIR_MIGRATE_PERSIST_DEST)
    if a.tunnelled:
        f |= libvirt.VIR_MIGRATE_TUNNELLED
    if a.native_tls:
        f |= libvirt.VIR_MIGRATE_TLS
    if a.postcopy and not paused:
        f |= libvirt.VIR_MIGRATE_POSTCOPY
    elif a.auto_converge and not a.postcopy:
        f |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
    if a.parallel > 1:
        f |= libvirt.VIR_MIGRATE_PARALLEL
    return f


def migrate_uri(addr):
    try:
        if ipaddress.ip_address(addr).version == 6:
            addr = f"[{addr}]"
    except ValueError:
        pass  # a host name
    return f"tcp://{addr}"


def monitor(dom, worker, flags, a, t0):
    """Nova's monitor loop, while migrateToURI3 runs in `worker`."""
    data_gb = max(2.0, dom.maxMemory() / 1024 ** 2)  # flavor RAM, >= 2 GiB
    delay = int(a.downtime_delay * data_gb)
    base = a.downtime / a.downtime_steps
    step = (a.downtime - base) / a.downtime_steps
    steps = [(int(delay * i), int(base + step * i)) for i in range(a.downtime_steps + 1)]
    timeout = int(a.completion_timeout * data_gb)
    downtime, acted, shown = None, False, -1.0
    while worker.is_alive():
        try:
            st = dom.jobStats()
        except libvirt.libvirtError:
            st = {}  # gone from this host (finished), or no job stats here
        if st.get("type") == libvirt.VIR_DOMAIN_JOB_UNBOUNDED:
            elapsed = time.monotonic() - t0
            if timeout and not acted and elapsed > timeout:
                acted = True
                try:
                    if a.timeout_action == "abort":
                        print("nova_live_migrate: completion timeout: abortJob", file=sys.stderr)
                        dom.abortJob()
                    elif flags & libvirt.VIR_MIGRATE_POSTCOPY:
                        print("nova_live_migrate: completion timeout: migrateStartPostCopy", file=sys.stderr)
                        dom.migrateStartPostCopy()
                    else:
                        print("nova_live_migrate: completion timeout: suspend", file=sys.stderr)
                        dom.suspend()
                except libvirt.libvirtError as e:
                    fail("timeout action", e)
            want = [ms for at, ms in steps if elapsed > at]
            if want and want[-1] != downtime:
                try:
                    dom.migrateSetMaxDowntime(want[-1], 0)
                except libvirt.libvirtError as e:
                    fail("migrateSetMaxDowntime", e)  # Nova only logs it
                downtime = want[-1]
            if elapsed - shown >= 1.0:
                shown = elapsed
                total, left = st.get("memory_total", 0), st.get("memory_remaining", 0)
                pct = round(left * 100 / total) if total else 100
                print(f"nova_live_migrate: {elapsed:.1f} s: memory {pct}% remaining "
                      f"(processed {st.get('memory_processed', 0) >> 20} MiB, "
                      f"remaining {left >> 20} MiB, total {total >> 20} MiB), "
                      f"max downtime {downtime} ms", file=sys.stderr)
        worker.join(POLL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("domain", metavar="DOMAIN")
    ap.add_argument("dest_uri", metavar="DEST_URI", help="as Nova builds it: qemu+SCHEME://ADDR/system")
    ap.add_argument("--inbound-addr", metavar="ADDR", help="the destination's live_migration_inbound_addr")
    ap.add_argument("--connect", default="qemu:///system", metavar="URI", help="source (default %(default)s)")
    ap.add_argument("--tunnelled", action="store_true", help="live_migration_tunnelled = True")
    ap.add_argument("--native-tls", action="store_true", help="live_migration_with_native_tls = True")
    ap.add_argument("--postcopy", action="store_true", help="live_migration_permit_post_copy = True")
    ap.add_argument("--auto-converge", action="store_true", help="live_migration_permit_auto_converge = True")
    ap.add_argument("--parallel", type=int, default=1, metavar="N", help="live_migration_parallel_connections")
    ap.add_argument("--bandwidth", type=int, default=0, metavar="MIB_S", help="live_migration_bandwidth")
    ap.add_argument("--downtime", type=int, default=500, metavar="MS", help="live_migration_downtime")
    ap.add_argument("--downtime-steps", type=int, default=10, metavar="N",
                    help="live_migration_downtime_steps")
    ap.add_argument("--downtime-delay", type=int, default=75, metavar="S_PER_GIB",
                    help="live_migration_downtime_delay")
    ap.add_argument("--completion-timeout", type=int, default=800, metavar="S_PER_GIB",
                    help="live_migration_completion_timeout (0: none)")
    ap.add_argument("--timeout-action", choices=("abort", "force_complete"), default="abort",
                    help="live_migration_timeout_action")
    ap.add_argument("--json", action="store_true", help="one JSON line on stdout on success")
    a = ap.parse_args()
    if a.tunnelled and a.native_tls:
        ap.error("Nova refuses live_migration_tunnelled with live_migration_with_native_tls")

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # we report errors once
    try:
        conn = libvirt.open(a.connect)
    except libvirt.libvirtError as e:
        return fail(f"open {a.connect}", e)
    try:
        dom = conn.lookupByName(a.domain)
        paused = dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    except libvirt.libvirtError as e:
        return fail(f"domain {a.domain} on {a.connect}", e)

    flags = nova_flags(a, paused)
    params = {
        libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: a.bandwidth,
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: xml,
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: xml,
    }
    if a.inbound_addr and not flags & libvirt.VIR_MIGRATE_TUNNELLED:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = migrate_uri(a.inbound_addr)
    if a.parallel > 1:
        params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = a.parallel
    shown = {k: v for k, v in params.items() if "xml" not in k}
    print(f"nova_live_migrate: migrateToURI3({a.dest_uri}, {shown} + destination_xml, "
          f"persistent_xml, {flags} = {'|'.join(flag_names(flags))})", file=sys.stderr)

    result = {}

    def run():
        try:
            dom.migrateToURI3(a.dest_uri, params, flags)
        except libvirt.libvirtError as e:
            result["error"] = e

    t0 = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        monitor(dom, worker, flags, a, t0)
    except KeyboardInterrupt:  # Nova aborts the job when its monitor fails
        try:
            dom.abortJob()
        except libvirt.libvirtError:
            pass
        worker.join()
        return fail("interrupted", "abortJob sent")
    seconds = time.monotonic() - t0

    if "error" in result:
        return fail(f"migrateToURI3 to {a.dest_uri}", result["error"])
    if a.json:
        print(json.dumps({"domain": a.domain, "dest": a.dest_uri, "flags": flag_names(flags),
                          "flags_value": flags, "params": sorted(params),
                          "seconds": round(seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
