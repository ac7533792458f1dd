#!/usr/bin/env bash
# make deb: Debian 12 packages xl-postcopy (dom0: the tool, man pages, bash
# completion) and xl-postcopy-guest (guest-balloon and its systemd unit),
# built with dpkg-buildpackage/debhelper from a copy of the tree with
# scripts/deb/debian as its debian/. Output: $1 (default bin/deb).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
out=$(mkdir -p "${1:-$top/bin/deb}" && cd "${1:-$top/bin/deb}" && pwd)
export PATH="/usr/local/go/bin:$PATH"

need=()
for p in debhelper dpkg-dev fakeroot; do
	dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		echo "deb: missing Debian packages: ${need[*]} — run as root (apt-get install -y ${need[*]})" >&2
		exit 1
	fi
	echo "deb: installing ${need[*]}" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null ||
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi

version=$(dpkg-parsechangelog -l "$top/scripts/deb/debian/changelog" -SVersion)
work=$(mktemp -d /tmp/xl-postcopy-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
src="$work/xl-postcopy-${version%-*}"
mkdir -p "$src"
# The tracked files (what a clone has), or the whole tree outside git.
if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
	(cd "$top" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$src" 2>/dev/null || true)
else
	(cd "$top" && tar --exclude=./bin --exclude='./.lab-cache*' -cf - .) | (cd "$src" && tar -xf -)
fi
rm -rf "$src/debian"
cp -r "$top/scripts/deb/debian" "$src/debian"

# Go's caches from this user, not debhelper's private HOME.
export GOCACHE="$(go env GOCACHE)" GOMODCACHE="$(go env GOMODCACHE)"
echo "deb: building xl-postcopy $version in $src" >&2
(cd "$src" && dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) || {
	tail -40 "$work/build.log" >&2
	echo "deb: dpkg-buildpackage failed (log above)" >&2
	exit 1
}
rm -f "$out"/*.deb
mv "$work"/*.deb "$out"/
# Smoke check of what was packed: the binary runs, the migrate page shows its
# flags, the unit starts the packaged daemon.
x="$work/x"
for d in "$out"/xl-postcopy_*.deb "$out"/xl-postcopy-guest_*.deb; do dpkg-deb -x "$d" "$x"; done
"$x/usr/sbin/xl-postcopy" --help >/dev/null 2>&1
zcat "$x/usr/share/man/man1/xl-postcopy-migrate.1.gz" | grep -q 'mode' ||
	{ echo "deb: xl-postcopy-migrate.1 does not show --mode" >&2; exit 1; }
grep -q '^ExecStart=/usr/sbin/guest-balloon' "$x/lib/systemd/system/guest-balloon.service" ||
	{ echo "deb: the guest-balloon unit does not start /usr/sbin/guest-balloon" >&2; exit 1; }
[ -x "$x/usr/sbin/guest-balloon" ] && ! readelf -l "$x/usr/sbin/guest-balloon" | grep -q INTERP ||
	{ echo "deb: guest-balloon is not a static binary" >&2; exit 1; }
for d in "$out"/*.deb; do
	echo "deb: $(basename "$d") ($(du -k "$d" | cut -f1) KiB)"
done
