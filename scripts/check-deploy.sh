#!/usr/bin/env bash
# Checks deploy/ the way the tools that run it would, after the workspace is built (.ci/run calls
# it after scripts/test.sh): `systemd-analyze verify` and an exposure ceiling on the systemd
# units, and every Kubernetes manifest against the Kubernetes API schemas (kubernetes-validate,
# installed once into its own venv under $FEDTUNE_HOME). Installs systemd's tools with apt-get
# where they are missing (CI runs as root on a fresh Debian). The flags the files pass are
# checked by `cargo test -p fedtune-tests --test deploy_flags`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

# The Kubernetes version the manifests target (they use nothing newer) and the validator's pin.
k8s_version=1.30.0
validator="kubernetes-validate==1.37.0"

if ! command -v systemd-analyze >/dev/null; then
  echo "check-deploy: installing systemd (for systemd-analyze)" >&2
  apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi
for bin in fedtune-coordinator fedtune-client; do
  [ -x "target/debug/$bin" ] || { echo "check-deploy: target/debug/$bin missing: run cargo build --workspace first" >&2; exit 1; }
done
# verify insists that ExecStart's binary exists: check copies whose only change is that path,
# pointing at the binaries just built instead of /usr/local/bin.
units="$(mktemp -d)"
trap 'rm -rf "$units"' EXIT
for unit in deploy/systemd/*.service; do
  sed "/^ExecStart=/s#=/usr/local/bin/#=$PWD/target/debug/#" "$unit" > "$units/$(basename "$unit")"
  cmp -s <(grep -v '^ExecStart=' "$unit") <(grep -v '^ExecStart=' "$units/$(basename "$unit")")
done
systemd-analyze verify "$units"/*.service
# "OK" is below 4.0 on systemd's 0–10 scale; both units score about 1.3. 2.0 keeps them hardened.
systemd-analyze security --offline=true --threshold=20 "$units"/*.service | grep "Overall exposure"

tools="$FEDTUNE_HOME/deploy-tools"
if [ ! -x "$tools/bin/kubernetes-validate" ] || [ "$(cat "$tools/.fedtune-requirements" 2>/dev/null)" != "$validator" ]; then
  echo "check-deploy: installing $validator into $tools" >&2
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet --disable-pip-version-check "$validator"
  echo "$validator" > "$tools/.fedtune-requirements"
fi
"$tools/bin/kubernetes-validate" -k "$k8s_version" --strict --quiet deploy/kubernetes/*.yaml
echo "check-deploy: systemd units and Kubernetes manifests valid"
