#!/usr/bin/env bash
# Build, once per machine, the Charliecloud directory image the container tests run extractors in:
#
#   scripts/build_test_image.sh [DIR]     (default /var/cache/clowder-hpc-agent/images/pyclowder-bookworm)
#
# 1. Base: `mmdebstrap --variant=apt` Debian bookworm with python3 and pip, pyclowder 3.0.8 from PyPI
#    installed inside with the image's own pip (ch-run -w, the host's CA bundle bound in), device
#    nodes deleted (a later copy of /dev/full would fill the disk). ~1-2 min, ~260 MB. Built into a
#    temporary folder next to DIR and renamed into place, so an interrupted build leaves no half image.
# 2. Extractor layer (cheap, redone when its files change): tests/plugins/container_probe copied to
#    /extractor as pyclowder's Dockerfiles lay an extractor out (WORKDIR /extractor, COPY *.py
#    extractor_info.json ./), plus the image metadata ch-image would write (ch/metadata.json with
#    "cwd" and "env", ch/environment), so the image can also serve as an image-only plugin, and
#    /etc/clowder-hpc-agent-test-image, a file no host has.
# Each step has a stamp file inside DIR/ch; quiet on success. Needs root, ch-run and mmdebstrap.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-/var/cache/clowder-hpc-agent/images/pyclowder-bookworm}"
PYCLOWDER_VERSION=3.0.8
SUITE=bookworm
MIRROR="deb http://deb.debian.org/debian $SUITE main"
LAYER_SRC="$REPO/tests/plugins/container_probe"
# The ENV lines of the Dockerfile this layer stands for (JSON), as ch-image would record them.
LAYER_ENV='{"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PROBE_IMAGE_DEFAULT": "from the image ENV", "PROBE_OVERRIDDEN": "image default"}'

source "$(dirname "${BASH_SOURCE[0]}")/script_helpers.sh"  # die, quiet

command -v mmdebstrap >/dev/null || die "mmdebstrap not installed (apt-get install mmdebstrap)"
command -v ch-run >/dev/null || die "ch-run not installed (apt-get install charliecloud-runtime)"
export USER="${USER:-$(id -un)}"   # ch-run refuses to start without it

# One build at a time per machine (two checkouts may run install.sh at once).
mkdir -p "$(dirname "$DIR")"
exec 9>"$(dirname "$DIR")/.build.lock"
flock 9

base_want="suite=$SUITE pyclowder=$PYCLOWDER_VERSION recipe=1"
if [[ "$(cat "$DIR/ch/base.stamp" 2>/dev/null || true)" != "$base_want" ]]; then
    parent="$(dirname "$DIR")"
    mkdir -p "$parent"
    tmp="$(mktemp -d "$parent/.build.XXXXXX")"
    trap 'rm -rf --one-file-system "$tmp"' EXIT
    quiet mmdebstrap --variant=apt --include=python3,python3-pip,ca-certificates \
        "$SUITE" "$tmp/img" "$MIRROR" || die "mmdebstrap failed"
    find "$tmp/img" -xdev \( -type c -o -type b \) -delete
    mkdir -p "$tmp/img/hostca" "$tmp/img/ch"
    quiet ch-run -w --unset-env='*' --set-env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --set-env=HOME=/root --set-env=PIP_CERT=/hostca/ca-certificates.crt \
        -b /etc/ssl/certs:/hostca "$tmp/img" -- \
        python3 -m pip install -q --no-cache-dir --break-system-packages \
        --disable-pip-version-check "pyclowder==$PYCLOWDER_VERSION" \
        || die "pip install pyclowder inside the image failed"
    echo "$base_want" >"$tmp/img/ch/base.stamp"
    rm -rf --one-file-system "$DIR"
    mv "$tmp/img" "$DIR"
    rm -rf "$tmp"
    trap - EXIT
fi

# Extractor layer: pyclowder's image layout under /extractor plus ch-image style metadata.
MARKER="clowder-hpc-agent test image (mmdebstrap bookworm, pyclowder $PYCLOWDER_VERSION)"
layer_want="$( (cd "$LAYER_SRC" && cat extractor_info.json ./*.py; echo "$LAYER_ENV"; echo "$MARKER") | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$DIR/ch/layer.stamp" 2>/dev/null || true)" != "$layer_want" ]]; then
    rm -rf "$DIR/extractor"
    mkdir -p "$DIR/extractor"
    cp "$LAYER_SRC"/extractor_info.json "$LAYER_SRC"/*.py "$DIR/extractor/"
    # ch-image writes the Dockerfile's WORKDIR and ENV here (metadata.json) and ENV again as
    # KEY=VALUE lines (environment).
    python3 - "$LAYER_ENV" "$DIR/ch" <<'PY'
import json, sys
env = json.loads(sys.argv[1])
with open(sys.argv[2] + "/metadata.json", "w") as f:
    json.dump({"arch": "amd64", "cwd": "/extractor", "env": env, "labels": {}, "shell": ["/bin/sh", "-c"],
               "volumes": []}, f, indent=2)
with open(sys.argv[2] + "/environment", "w") as f:
    f.writelines("%s=%s\n" % kv for kv in env.items())
PY
    # A file only the image has, so tests can tell the image from a host that runs the same Debian.
    echo "$MARKER" >"$DIR/etc/clowder-hpc-agent-test-image"
    echo "$layer_want" >"$DIR/ch/layer.stamp"
fi
