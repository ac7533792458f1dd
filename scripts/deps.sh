#!/usr/bin/env bash
# Installs what building and testing xl-postcopy needs on Debian 12, as root.
# Idempotent and quick when everything is there already.
set -euo pipefail

need=()
dpkg -s libxen-dev >/dev/null 2>&1 || need+=(libxen-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v tc >/dev/null 2>&1 || need+=(iproute2)
command -v make >/dev/null 2>&1 || need+=(make)
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "deps: missing Debian packages: ${need[*]} — run as root (apt-get install -y ${need[*]})" >&2
		exit 1
	fi
	echo "deps: installing ${need[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1 && [ ! -x /usr/local/go/bin/go ]; then
	echo "deps: Go is not installed: install Go 1.26 or newer (https://go.dev/dl) into /usr/local/go" >&2
	exit 1
fi

# The linter make test runs, pinned so that a new release's checks cannot
# turn a clean tree red overnight; installed once, into GOPATH/bin.
STATICCHECK_VERSION=2026.2.2 # what -version prints; the module version is:
STATICCHECK_MODULE=v0.8.2
export PATH="/usr/local/go/bin:$PATH"
sc="$(go env GOPATH)/bin/staticcheck"
if ! "$sc" -version 2>/dev/null | grep -q "^staticcheck $STATICCHECK_VERSION "; then
	echo "deps: installing staticcheck $STATICCHECK_VERSION" >&2
	go install "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_MODULE"
fi
