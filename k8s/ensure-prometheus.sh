#!/usr/bin/env bash
# Install Debian's prometheus package (prometheus + promtool) when either binary is missing. Used by the
# Makefile / CI before the tests, and by the tests themselves as a last resort. Never starts the daemon.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-prometheus: no apt-get here; install prometheus (with promtool) by hand" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "ensure-prometheus: not root and no sudo: apt-get install prometheus by hand" >&2; exit 1; fi
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: the package's postinst must not start a prometheus daemon (it would listen on 0.0.0.0)
had_policy=0
if [ -e /usr/sbin/policy-rc.d ]; then had_policy=1; fi
if [ "$had_policy" = 0 ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
fi
cleanup() { if [ "$had_policy" = 0 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
$SUDO apt-get clean  # the .deb files: CI disks can be tight
command -v prometheus >/dev/null && command -v promtool >/dev/null
echo "ensure-prometheus: $(prometheus --version 2>&1 | head -1)"
