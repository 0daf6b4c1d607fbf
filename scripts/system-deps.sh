#!/usr/bin/env bash
# Debian packages the test suite drives: Chromium (dashboard tests, through Playwright with
# executable_path; Playwright never downloads a browser) and pgbouncer (the pooler's reference).
# Installs what is missing when run as root; otherwise says what to install.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v pgbouncer >/dev/null 2>&1 || [[ -x /usr/sbin/pgbouncer ]] || missing+=(pgbouncer)
command -v pgbench >/dev/null 2>&1 || missing+=(postgresql-contrib)
if ((${#missing[@]} == 0)); then
    exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
    # Debian starts pgbouncer on 6432 after installing it; the tests start their own.
    if command -v systemctl >/dev/null 2>&1; then systemctl stop pgbouncer >/dev/null 2>&1 || true; fi
    pkill -x pgbouncer >/dev/null 2>&1 || true
else
    echo "Missing Debian packages: ${missing[*]} (install them with: sudo apt-get install ${missing[*]});" \
        "the tests that need them will skip." >&2
fi
