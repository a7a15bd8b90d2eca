#!/usr/bin/env bash
# Install the Debian packages honeyfleet's tests and `honeyfleet up` need, if missing.
# Idempotent and quiet when everything is already there; needs root (or sudo) otherwise.
set -euo pipefail

packages=(
    # Python and the build of libvirt-python
    python3 python3-venv python3-dev gcc pkg-config make
    # The PostgreSQL event store's tests run a throwaway server of their own
    postgresql
    # libvirt + QEMU (TCG) for the pool node's guests, started by hand in the VM tests
    # (tests/e2e/netns_notes.md); libvirt-dev builds libvirt-python
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-config-nwfilter libvirt-clients
    qemu-system-x86 dnsmasq-base iptables ebtables libvirt-dev
    # The guest image builder (poolnode.image.HOST_PACKAGES)
    apt binutils coreutils dpkg e2fsprogs kmod mmdebstrap openssl qemu-utils
    # VM test clients and the network namespace; procps has sysctl and pgrep; busybox's
    # tftp and wget are the egress tests' guest clients outside VMs
    openssh-client sshpass iproute2 telnet procps busybox
    # The stealth tests run Debian's own sshd and telnetd next to the sensor, and nmap -sV
    # against both
    openssh-server inetutils-telnetd nmap
    # Disk diffs of destroyed guests (poolnode.diskdiff): libguestfs for Debian's python3,
    # and a kernel for its appliance (supermin builds it from the host's packages)
    python3-guestfs linux-image-amd64
)
if [ "$#" -gt 0 ]; then
    packages+=("$@")
fi

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
# The guest image builder fetches .debs with `apt-get download`, which needs package lists.
lists_missing=0
compgen -G "/var/lib/apt/lists/*Packages*" >/dev/null || lists_missing=1
[ "${#missing[@]}" -eq 0 ] && [ "$lists_missing" -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "need root to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
[ "${#missing[@]}" -eq 0 ] && exit 0
echo "installing system packages: ${missing[*]}"
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
