#!/bin/sh
# Install the peers the benchmark compares against (Debian bookworm, as root):
#   tshark (bookworm), Suricata 7 (bookworm-backports), py-spy (pip).
# bench/run.py --install runs this; the test suite never does.
set -eu
export DEBIAN_FRONTEND=noninteractive
if [ ! -f /etc/apt/sources.list.d/backports.list ]; then
    echo 'deb http://deb.debian.org/debian bookworm-backports main' \
        > /etc/apt/sources.list.d/backports.list
fi
apt-get update
apt-get install -y tshark time
apt-get install -y -t bookworm-backports suricata
"${PYTHON:-python3}" -m pip install --quiet py-spy
suricata -V
tshark --version | head -1
