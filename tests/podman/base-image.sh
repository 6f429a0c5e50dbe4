#!/usr/bin/env bash
# Build machines cannot pull from Docker Hub. BentoML's generated Dockerfile starts
# `FROM python:3.11-slim`, so make a local stand-in under that name from Debian's own
# packages (bookworm: Python 3.11), as ../shared/README.md describes. Idempotent.
set -euo pipefail
image=docker.io/library/python:3.11-slim
podman image exists "$image" && exit 0
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >/dev/null
# Package installs inside image builds go through this machine's TLS route: its CA bundle.
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
ln -sf python3 "$rootfs/usr/bin/python"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb
# As Debian's official images do: apt deletes downloaded packages after installing them
# (BentoML's Dockerfile runs apt-get install on top of this image).
cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
APT
bundle=/etc/ssl/certs/ca-certificates.crt
tar -C "$rootfs" -c . | podman import \
  --change "ENV SSL_CERT_FILE=$bundle" --change "ENV PIP_CERT=$bundle" \
  --change "ENV REQUESTS_CA_BUNDLE=$bundle" --change 'CMD ["python3"]' - "$image" >/dev/null
