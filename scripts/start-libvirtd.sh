#!/usr/bin/env bash
# Start virtlogd and libvirtd by hand if libvirt is not answering (hosts without
# systemd units for it, as `make up` installs it). Idempotent; needs root.
set -euo pipefail

answers() { virsh -c qemu:///system version >/dev/null 2>&1; }
answers && exit 0
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 50); do
    answers && exit 0
    sleep 0.2
done
echo "libvirtd did not come up; see /var/log/libvirt/ or run 'libvirtd' in a terminal" >&2
exit 1
