#!/usr/bin/env bash
# Prepare this host for a hand-started libvirtd (no systemd), as the VM tests and
# `honeyfleet up` run it: see tests/e2e/netns_notes.md, section 2. Idempotent; needs root.
#
# * The QEMU driver resolves its compiled-in default user, libvirt-qemu, before it
#   reads qemu.conf, so that user and group must exist (libvirt-daemon-system would
#   create them; honeyfleet does not install it).
# * qemu.conf: QEMU runs as root, with no security driver and no cgroup management
#   (there is no systemd/machined to place guests). libvirt 9.0 reads only
#   /etc/libvirt/qemu.conf (it has no drop-in directory), so this script keeps its
#   settings in a marked block at the end of that file and comments out any earlier
#   line that sets the same keys (libvirt takes the first assignment of a key).
# * The directories libvirtd and virtlogd write to exist: libvirt-daemon-system and
#   systemd (RuntimeDirectory) would make them; a hand-started virtlogd otherwise fails
#   with "failed to open /var/log/libvirt/virtlogd.log".
# * Bridged guest traffic must pass through iptables for the nwfilter egress lock
#   to apply: br_netfilter is loaded when the kernel has it as a module.
set -euo pipefail

CONF=${HONEYFLEET_QEMU_CONF:-/etc/libvirt/qemu.conf}
BEGIN="# BEGIN honeyfleet (scripts/setup-libvirt.sh)"
END="# END honeyfleet"
SETTINGS=(
    'user = "root"'
    'group = "root"'
    'swtpm_user = "root"'
    'swtpm_group = "root"'
    'security_driver = "none"'
    'cgroup_controllers = [ ]'
)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-libvirt.sh: needs root (it creates a system user and edits $CONF)" >&2
    exit 1
fi
export PATH="$PATH:/usr/sbin:/sbin"  # daemons and user tools live in sbin
for tool in libvirtd virtlogd qemu-system-x86_64 useradd modprobe; do
    command -v "$tool" >/dev/null || {
        echo "setup-libvirt.sh: $tool not found: run scripts/install-system-deps.sh first" >&2
        exit 1
    }
done

install -d -m 0700 /var/log/libvirt /var/log/libvirt/qemu
install -d -m 0755 /run/libvirt /var/lib/libvirt /var/lib/libvirt/qemu \
    /var/lib/libvirt/dnsmasq /var/lib/libvirt/network /var/cache/libvirt /var/cache/libvirt/qemu

getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
    useradd --system -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

mkdir -p "$(dirname "$CONF")"
touch "$CONF"
keys=()
for line in "${SETTINGS[@]}"; do
    keys+=("${line%% *}")
done
key_re="^($(IFS='|'; echo "${keys[*]}"))[[:space:]]*="
tmp=$(mktemp "$CONF.XXXXXX")
# Drop our previous block, comment out other assignments of our keys, append the block.
awk -v begin="$BEGIN" -v end="$END" -v re="$key_re" '
    $0 == begin { skip = 1; next }
    skip && $0 == end { skip = 0; next }
    skip { next }
    $0 ~ re { print "#honeyfleet# " $0; next }
    { print }
' "$CONF" >"$tmp"
{
    echo "$BEGIN"
    printf '%s\n' "${SETTINGS[@]}"
    echo "$END"
} >>"$tmp"
if cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
else
    chmod 0644 "$tmp"
    mv "$tmp" "$CONF"
    echo "setup-libvirt.sh: wrote honeyfleet settings to $CONF (restart libvirtd to apply)"
fi

if [ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
    modprobe br_netfilter 2>/dev/null || {
        echo "setup-libvirt.sh: cannot load br_netfilter: the guests' egress filter would" \
            "not apply to bridged traffic" >&2
        exit 1
    }
fi
