#!/bin/sh
# What `make test` needs from Debian: chromium (and a font), for the browser tests
# (tests/ui/, driven by Playwright with executable_path; no browser is downloaded).
# As root it installs what is missing (apt-get update first); as another user it only says
# what is missing, and the browser tests skip with that reason (never in CI: CI runs as root).
set -eu

CHROMIUM="${CHATSTREAM_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_test_deps: $CHROMIUM is missing and this is not root; the browser tests" \
         "will be skipped (as root: apt-get install chromium)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_test_deps: $CHROMIUM is missing and there is no apt-get to install it" >&2
    exit 1
fi
echo "install_test_deps: installing chromium (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends chromium fonts-liberation
