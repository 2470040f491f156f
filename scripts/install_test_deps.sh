#!/bin/sh
# What `make test` needs from Debian: chromium (and a font) for the browser tests (tests/ui/,
# driven by Playwright with executable_path; no browser is downloaded), and curl and openssl,
# which the docs test (tests/docs/) runs the docs' shell blocks with.
# As root it installs what is missing (apt-get update first); as another user it only says
# what is missing, and the tests that need it fail or skip with that reason (never in CI: CI
# runs as root).
set -eu

CHROMIUM="${CHATSTREAM_CHROMIUM:-/usr/bin/chromium}"

missing=""
[ -x "$CHROMIUM" ] || missing="$missing chromium fonts-liberation"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"

if [ -z "$missing" ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_test_deps: missing:$missing, and this is not root; as root:" \
         "apt-get install$missing" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_test_deps: missing:$missing, and there is no apt-get to install it" >&2
    exit 1
fi
echo "install_test_deps: installing$missing (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update
# shellcheck disable=SC2086 # one word per package
apt-get install -y --no-install-recommends $missing
