#!/usr/bin/env bash
# Installs what building and testing Basalt needs on Debian 12, and nothing that is already there: the Debian
# packages below (through apt-get) and the Go modules in go.sum (through the Go module proxy). Safe to run again
# and again; it downloads no binaries of its own.
set -euo pipefail

# Every package is used by the build or the tests: protoc for `make proto`; QEMU, the NBD tools and fio are the
# real clients the block-layer tests and benchmarks drive; the kernel and busybox build the test guest; iproute2,
# arping and iperf3 drive the network tests.
packages=(
  build-essential git ca-certificates
  protobuf-compiler libprotobuf-dev
  qemu-system-x86 qemu-utils nbdkit libnbd-bin fio
  busybox-static linux-image-cloud-amd64 ovmf
  iproute2 iputils-arping iperf3
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    sudo=sudo
  fi
  echo "deps: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Go itself is not a Debian package we can use (Debian 12 ships Go 1.19; Basalt needs 1.26).
if ! command -v go >/dev/null; then
  echo "deps: Go 1.26 is not on PATH (looked in PATH and /usr/local/go/bin); install Go 1.26 first" >&2
  exit 1
fi
gover=$(go env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n' 1.26 "$gover" | sort -V | head -n1)" != "1.26" ]; then
  echo "deps: Go $gover is too old; Basalt needs Go 1.26 or newer" >&2
  exit 1
fi
go mod download
