#!/usr/bin/env bash
# Installs the Debian packages the tests start for real (CI runs as root on a fresh Debian; a
# developer's machine that already has them skips apt entirely). One line per package: the
# command it provides, then the package. scripts/test.sh calls it before building.
set -euo pipefail

# command   package     what needs it
wanted=(
  ip iproute2          # tests/tests/netns_faults.rs: namespaces, veth pairs, the bridge
  iptables iptables    # tests/tests/netns_faults.rs: NFQUEUE and loss rules on client links
  prometheus prometheus  # tests/tests/observability.rs: a real Prometheus scrapes /metrics (promtool too)
  chromium chromium  # tests/tests/observability.rs: headless browser loads the status page
)

missing=()
for ((i = 0; i < ${#wanted[@]}; i += 2)); do
  command -v "${wanted[i]}" >/dev/null || missing+=("${wanted[i + 1]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "system-deps: missing ${missing[*]}; install them (apt-get install ${missing[*]}) or run as root" >&2
    exit 1
  fi
  echo "system-deps: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
