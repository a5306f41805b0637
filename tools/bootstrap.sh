#!/bin/bash
# Install what nova-thunder needs on a Debian 12 host (as root) and build
# the virtualenv .venv with the project (nova-thunder, what a compute node
# installs), its lab (nova-thunder-lab, lab/: emulated cluster, benchmark,
# simulator, guest harness) and the test dependencies.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "bootstrap: $*"; }

mapfile -t wanted < <(sed -e 's/#.*//' -e '/^\s*$/d' tools/debian-packages.txt \
                      | awk '{print $1}' | sort -u)
missing=()
for pkg in "${wanted[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null \
            | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        log "missing Debian packages: ${missing[*]} (run as root)" >&2
        exit 1
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's interpreter: python3-libnbd is built for it.
python=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $python"
    "$python" -m venv .venv
fi
stamp=.venv/.thunder-requirements
want=$(cat requirements.txt test-requirements.txt setup.cfg lab/pyproject.toml | sha256sum)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing Python packages into .venv (a few minutes the first time)"
    {
        .venv/bin/pip install -q --upgrade pip
        .venv/bin/pip install -q -r requirements.txt -r test-requirements.txt
        .venv/bin/pip install -q --no-deps -e .
        .venv/bin/pip install -q -e lab
    } > .venv/pip.log 2>&1 || { tail -n 30 .venv/pip.log >&2; exit 1; }
    echo "$want" > "$stamp"
fi
# libnbd's Python binding comes from Debian; make it visible in .venv.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for f in /usr/lib/python3/dist-packages/nbd.py \
         /usr/lib/python3/dist-packages/libnbdmod.cpython-311-*.so; do
    [ -e "$f" ] && ln -sf "$f" "$site/"
done
.venv/bin/python -W ignore -c 'import nbd, qemu.qmp, oslo_messaging, nova, thunder_lab' \
    || { log "the virtualenv is incomplete" >&2; exit 1; }
log "ready"
