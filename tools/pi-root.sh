#!/usr/bin/env bash
# Build (or reuse) a Debian bookworm arm64 root file system — the userland Raspberry Pi OS 64-bit is
# built on — and make it runnable here under qemu user emulation. Sourced by tools/pi-check.sh.
# Needs root, debootstrap and qemu-user-static (Debian packages). The root is cached outside the
# repository (PI_ROOT) and never committed.

PI_ROOT=${PI_ROOT:-/var/cache/edgepatch-pi/bookworm-arm64}
PI_MIRROR=${PI_MIRROR:-http://deb.debian.org/debian}
QEMU=/usr/bin/qemu-aarch64-static

pi_die() { echo "pi-check: $*" >&2; exit 1; }

# binfmt_misc lets the kernel hand every arm64 executable (python, pip's children, sh) to qemu; without
# it only the first process could be emulated, so pip and the CLI's subprocesses would fail.
pi_binfmt() {
  [ -x "$QEMU" ] || pi_die "qemu-aarch64-static missing: apt-get install -y qemu-user-static binfmt-support debootstrap"
  if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
      || pi_die "cannot mount binfmt_misc (/proc/sys/fs/binfmt_misc): arm64 programs cannot be run here"
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 2>/dev/null || true
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    # Register by hand, flag F: the kernel opens the interpreter now, so it need not exist in the chroot.
    echo ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$QEMU"':PF' \
      > /proc/sys/fs/binfmt_misc/register 2>/dev/null \
      || pi_die "cannot register qemu-aarch64 with binfmt_misc (read-only /proc/sys/fs/binfmt_misc?)"
  fi
  grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || pi_die "binfmt entry qemu-aarch64 is disabled"
}

# Without flag F the kernel looks the interpreter up inside the chroot: put it at the registered path.
pi_interp_into_root() {
  local interp
  interp=$(sed -n 's/^interpreter //p' /proc/sys/fs/binfmt_misc/qemu-aarch64)
  if ! grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64; then
    mkdir -p "$PI_ROOT$(dirname "$interp")"
    cp -L "$interp" "$PI_ROOT$interp"
  fi
}

pi_build_root() {
  if [ -x "$PI_ROOT/usr/bin/python3.11" ] && [ -e "$PI_ROOT/.edgepatch-root-ok" ]; then
    echo "pi-check: reusing root $PI_ROOT"
    return
  fi
  command -v debootstrap >/dev/null || pi_die "debootstrap missing: apt-get install -y debootstrap"
  echo "pi-check: building Debian bookworm arm64 root in $PI_ROOT (first run: several minutes)"
  rm -rf "$PI_ROOT"
  mkdir -p "$PI_ROOT"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$PI_ROOT" "$PI_MIRROR" >"$PI_ROOT.debootstrap.log" 2>&1 \
    || pi_die "debootstrap failed; see $PI_ROOT.debootstrap.log"
  touch "$PI_ROOT/.edgepatch-root-ok"
}

PI_MOUNTS=()
pi_mount() {
  pi_interp_into_root
  local m
  for m in proc sys dev dev/pts; do
    mountpoint -q "$PI_ROOT/$m" && continue
    case $m in
      proc) mount -t proc proc "$PI_ROOT/proc" ;;
      sys) mount -t sysfs sys "$PI_ROOT/sys" ;;
      *) mount --bind "/$m" "$PI_ROOT/$m" ;;
    esac
    PI_MOUNTS=("$PI_ROOT/$m" "${PI_MOUNTS[@]}")
  done
  cp -L /etc/resolv.conf "$PI_ROOT/etc/resolv.conf"
  # qemu 7.2 (bookworm) passes the host's x86 /proc/cpuinfo through; LiteRT's CPU detection (cpuinfo, for
  # XNNPACK) then finds no ARM core and crashes (SIGSEGV in Interpreter()). Show it a Pi 4's instead:
  # Cortex-A72 cores (one per host CPU, matching /sys), the same CPU qemu emulates (PI_QEMU_CPU).
  local fake="${PI_ROOT}.cpuinfo" i
  : >"$fake"
  for i in $(seq 0 $(( $(nproc) - 1 ))); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$i" >>"$fake"
  done
  printf 'Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B (emulated by qemu-aarch64)\n' >>"$fake"
  grep -q " $PI_ROOT/proc/cpuinfo " /proc/mounts && return
  mount --bind "$fake" "$PI_ROOT/proc/cpuinfo"
  PI_MOUNTS=("$PI_ROOT/proc/cpuinfo" "${PI_MOUNTS[@]}")
}

pi_umount() {
  local m
  for m in "${PI_MOUNTS[@]}"; do umount -l "$m" 2>/dev/null || true; done
  PI_MOUNTS=()
}

# Run a command inside the arm64 root (every process in it is emulated).
# QEMU_CPU: qemu-user emulates a Pi 4's core (no SVE/SME/dotprod), so kernels are chosen as on the Pi.
PI_QEMU_CPU=${PI_QEMU_CPU:-cortex-a72}
pi_chroot() {
  chroot "$PI_ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
    QEMU_CPU="$PI_QEMU_CPU" "$@"
}
