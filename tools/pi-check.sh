#!/usr/bin/env bash
# Emulated Raspberry Pi check: the device install and loop on 64-bit ARM (Debian bookworm arm64, the
# userland of 64-bit Raspberry Pi OS, Python 3.11) under qemu user-mode emulation on this x86-64 host.
#
#   sudo bash tools/pi-check.sh            # as root; first run builds the root (~3 min), each run ~10 min
#
# What it does:
#   1. builds (or reuses) a bookworm arm64 root in $PI_ROOT (default /var/cache/edgepatch-pi/…, outside
#      the repository), registers qemu-aarch64 with binfmt_misc;
#   2. copies this checkout into it and installs edgepatch[device] into a fresh venv there (pip, PyPI);
#   3. checks the device path imports no torch/TensorFlow (and neither is installed);
#   4. on the host: exports two bundles (`edgepatch export`), makes device data, starts Mosquitto on a
#      free loopback port and announces bundle B (retained), as the companion would;
#   5. in the arm64 root: `edgepatch device run --config …` for $PI_ROUNDS rounds starting on bundle A
#      (φ patches go to the host's broker; bundle B is fetched, verified and adopted), then
#      `device status` and `device predict`;
#   6. writes results/pi_check.json and prints the table. Every figure is an EMULATION figure (qemu on
#      x86-64), not a Raspberry Pi measurement.
# Needs: root, apt packages qemu-user-static binfmt-support debootstrap mosquitto (installed if missing),
# the project installed on the host (`pip install -e '.[all,dev]'`). Not part of the default CI run.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PI_ROUNDS=${PI_ROUNDS:-3}
PI_STEPS=${PI_STEPS:-20}
OUT=${PI_OUT:-$REPO/results/pi_check.json}
HOST_PY=${HOST_PY:-python3}
# shellcheck source=tools/pi-root.sh
source "$HERE/pi-root.sh"

[ "$(id -u)" = 0 ] || pi_die "run as root (debootstrap, chroot, binfmt_misc)"
need=()
for pair in qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support debootstrap:debootstrap \
            mosquitto:mosquitto; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "pi-check: installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

pi_binfmt
pi_build_root
trap 'pi_umount; [ -n "${BROKER_PID:-}" ] && kill "$BROKER_PID" 2>/dev/null; true' EXIT
pi_mount

W=/opt/pi-check            # inside the root
HW=$PI_ROOT$W              # the same folder seen from the host
rm -rf "$HW"
mkdir -p "$HW"
VPY=/opt/edgepatch-venv/bin/python
DEV=/opt/pi-check/pi_check_device.py
cp "$HERE/pi_check_device.py" "$HW/"
SAVED_INSTALL="$PI_ROOT/opt/edgepatch-venv.install.json"
if [ "${PI_REUSE_VENV:-0}" = 1 ] && [ -x "$PI_ROOT$VPY" ] && [ -e "$SAVED_INSTALL" ]; then
  echo "pi-check: [1-2/6] PI_REUSE_VENV=1: reusing the installed venv and its recorded install size"
else
  rm -rf "$PI_ROOT/opt/edgepatch-src" "$PI_ROOT/opt/edgepatch-venv" "$SAVED_INSTALL"
  mkdir -p "$PI_ROOT/opt/edgepatch-src"
  echo "pi-check: [1/6] copying the checkout (working tree) into the arm64 root"
  tar -C "$REPO" --exclude=.git --exclude=results --exclude='__pycache__' --exclude='*.egg-info' \
      --exclude=build --exclude='edgepatch-*' -cf - . | tar -C "$PI_ROOT/opt/edgepatch-src" -xf -
  # pip inside trusts what pip on the host trusts (a host may reach PyPI through a TLS-inspecting proxy).
  HOST_CA=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
  cp -L "$HOST_CA" "$PI_ROOT/etc/ssl/certs/host-ca-bundle.crt"
  echo "pi-check: [2/6] pip install edgepatch[device] into a fresh venv (arm64, emulated; several minutes)"
  pi_chroot python3 -m venv /opt/edgepatch-venv
  EMPTY_MB=$(du -sm "$PI_ROOT/opt/edgepatch-venv" | cut -f1)
  t0=$(date +%s)
  pi_chroot PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    /opt/edgepatch-venv/bin/pip install -q '/opt/edgepatch-src[device]' >"$HW/pip.log" 2>&1 \
    || { tail -20 "$HW/pip.log"; pi_die "pip install failed (log: $HW/pip.log)"; }
  echo "pi-check:       installed in $(( $(date +%s) - t0 )) s"
  pi_chroot PI_EMPTY_VENV_MB="$EMPTY_MB" "$VPY" "$DEV" install /opt/edgepatch-venv /opt/edgepatch-venv.install.json
fi
cp "$SAVED_INSTALL" "$HW/install.json"

echo "pi-check: [3/6] import test (no torch, no TensorFlow on the device path)"
pi_chroot "$VPY" "$DEV" imports "$W/import.json"

echo "pi-check: [4/6] host: export bundles A and B, device data, Mosquitto, announce B"
if [ -n "${PI_BUNDLES:-}" ]; then  # reuse earlier exports: PI_BUNDLES=/dir/with/bundle-a,bundle-b
  cp -r "$PI_BUNDLES/bundle-a" "$PI_BUNDLES/bundle-b" "$HW/"
else
  (cd "$REPO" && edgepatch export --out "$HW/bundle-a" --runtimes litert --variants 1,0.5 --seed 0 >"$HW/export-a.log" 2>&1) \
    || pi_die "export of bundle A failed ($HW/export-a.log)"
  (cd "$REPO" && edgepatch export --out "$HW/bundle-b" --runtimes litert --variants 1,0.5 --seed 1 >"$HW/export-b.log" 2>&1) \
    || pi_die "export of bundle B failed ($HW/export-b.log)"
fi
"$HOST_PY" "$HERE/pi_check_host.py" data "$HW/data"
PORT=$("$HOST_PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mosquitto -p "$PORT" >"$HW/mosquitto.log" 2>&1 &
BROKER_PID=$!
for _ in $(seq 50); do (echo >/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break; sleep 0.1; done
"$HOST_PY" "$HERE/pi_check_host.py" announce "$PORT" pi "$HW/bundle-b" "file://$W/bundle-b" >"$HW/bundle-b.version"
"$HOST_PY" "$HERE/pi_check_host.py" listen "$PORT" pi 1800 "$HW/heard.json" &
LISTEN_PID=$!
cat >"$HW/device.toml" <<EOF
# written by tools/pi-check.sh
device_id = "pi-emulated"
fleet = "pi"
profile = "raspberry_pi_4"
data_dir = "data"
state_dir = "state"
bundle = "bundle-a"
rounds = $PI_ROUNDS
steps = $PI_STEPS
log_level = "WARNING"

[broker]
url = "mqtt://127.0.0.1:$PORT"
EOF

echo "pi-check: [5/6] arm64: device run --config ($PI_ROUNDS rounds x $PI_STEPS steps), status, predict"
pi_chroot "$VPY" "$DEV" run "$W/run.json" "$W/run.log" -- \
  /opt/edgepatch-venv/bin/edgepatch device run --config "$W/device.toml"
cat "$HW/run.log"
touch "$HW/heard.stop"; wait "$LISTEN_PID" || true
pi_chroot /opt/edgepatch-venv/bin/edgepatch device status --config "$W/device.toml" >"$HW/status.json"
pi_chroot /opt/edgepatch-venv/bin/edgepatch device status --config "$W/device.toml" --text
pi_chroot /opt/edgepatch-venv/bin/edgepatch device predict "$W/predict-x.npz" --state-dir "$W/state" >"$HW/predict.json"

echo "pi-check: [5b/6] arm64: SIGTERM mid-round (as systemctl stop): must exit 0 within TimeoutStopSec"
sed -e 's/^rounds = .*/rounds = 0/' -e 's/^steps = .*/steps = 500/' "$HW/device.toml" >"$HW/device-run-forever.toml"
rm -f "$HW/state/service.json"
pi_chroot "$VPY" "$DEV" run "$W/sigterm.json" "$W/sigterm.log" -- \
  /opt/edgepatch-venv/bin/edgepatch device run --config "$W/device-run-forever.toml" &
RUN_JOB=$!
for _ in $(seq 600); do grep -q '"running"' "$HW/state/service.json" 2>/dev/null && break; sleep 0.5; done
sleep "${PI_SIGTERM_AFTER:-20}"   # some emulated steps into the round
DEVICE_PID=$("$HOST_PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$HW/state/service.json")
t0=$(date +%s.%N)
kill -TERM "$DEVICE_PID"   # qemu-user shares the host's pid namespace: the guest pid is this pid
wait "$RUN_JOB" || true
"$HOST_PY" -c 'import json, sys, time; print(json.dumps({"stop_seconds": time.time() - float(sys.argv[1])}))' \
  "$t0" >"$HW/sigterm-stop.json"
cat "$HW/sigterm.log"

echo "pi-check: [6/6] report"
PI_QEMU_VERSION=$(qemu-aarch64-static --version | head -1) PI_QEMU_CPU=$PI_QEMU_CPU \
  "$HOST_PY" "$HERE/pi_check_host.py" report "$HW" "$OUT"
echo "pi-check: wrote $OUT"
