# shellcheck shell=bash
# Shared functions of the nested Xen lab (sourced by lab-test.sh and lab-shell.sh).
#
# Every step writes its output under $LAB_CACHE and skips itself when that output is
# already there and still matches its inputs (a stamp file records a hash of them), so
# a second run only boots QEMU.

LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB_REPO=$(cd "$LAB_DIR/../.." && pwd)
LAB_CACHE=${LAB_CACHE:-$LAB_REPO/.lab-cache}

# Debian's source package of the hypervisor we rebuild (the security suite's newer
# source is not served; its 4.17.5 hypervisor runs the 4.17.7 tools fine).
LAB_XEN_SRC_VERSION=${LAB_XEN_SRC_VERSION:-4.17.5+72-g01140da4e8-1}
LAB_XEN_CONFIG_EXTRA=(CONFIG_SHADOW_PAGING=y CONFIG_UNSUPPORTED=y CONFIG_MEM_PAGING=y)

LAB_PACKAGES=(
	qemu-system-x86 xen-hypervisor-4.17-amd64 xen-utils-4.17 linux-image-amd64
	busybox-static libxen-dev flex bison python3 build-essential cpio xz-utils
	gzip kmod file xenstore-utils dpkg-dev patch ca-certificates
)

log() { printf '[lab %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
	printf '[lab] ERROR: %s\n' "$*" >&2
	exit 1
}

lab_require_root() {
	[[ $(id -u) -eq 0 ]] || die "the lab installs packages and builds initramfs images: run it as root (sudo $0)"
}

# stamp_ok NAME HASH: true when step NAME was last completed with inputs hashing to HASH.
stamp_ok() { [[ -f $LAB_CACHE/stamps/$1 && $(cat "$LAB_CACHE/stamps/$1") == "$2" ]]; }
stamp_set() {
	mkdir -p "$LAB_CACHE/stamps"
	printf '%s\n' "$2" >"$LAB_CACHE/stamps/$1"
}
hash_of() { sha256sum | cut -c1-16; }

# lab_install_packages installs the Debian packages the lab needs. It asks apt only when
# one is missing, so an installed machine pays nothing.
lab_install_packages() {
	local missing=() p src=/etc/apt/sources.list.d/xl-postcopy-lab-src.sources
	for p in "${LAB_PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	local need_src=0
	[[ -f $LAB_CACHE/xen.elf ]] || need_src=1
	if [[ $need_src -eq 1 && ! -f $src ]]; then
		# The hypervisor rebuild needs Debian's xen source package: add a deb-src entry for
		# the bookworm suite (only bookworm's source of 4.17.5 is reachable).
		log "adding deb-src entry $src"
		cat >"$src" <<-'EOF'
			# Added by xl-postcopy scripts/lab: source of Debian's xen package for the lab hypervisor.
			Types: deb-src
			URIs: http://deb.debian.org/debian
			Suites: bookworm
			Components: main
			Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
		EOF
		missing+=(--update-needed)
	fi
	if [[ ${#missing[@]} -eq 0 ]]; then
		log "packages: all installed"
		return
	fi
	log "packages: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >"$LAB_CACHE/apt-update.log" 2>&1 ||
		die "apt-get update failed (see $LAB_CACHE/apt-update.log): check the Debian mirror in /etc/apt/sources.list.d"
	local pkgs=()
	for p in "${missing[@]}"; do [[ $p == --update-needed ]] || pkgs+=("$p"); done
	if [[ ${#pkgs[@]} -gt 0 ]]; then
		# The xen-utils postinst prints "Can't find hypervisor information in sysfs!": harmless.
		apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$LAB_CACHE/apt-install.log" 2>&1 ||
			die "apt-get install ${pkgs[*]} failed (see $LAB_CACHE/apt-install.log)"
	fi
	log "packages: done"
}

# lab_kernel prints the path of the newest installed Debian kernel (used for dom0 and domU).
lab_kernel() {
	local k
	k=$(find /boot -maxdepth 1 -name 'vmlinuz-*-amd64' | sort -V | tail -n1)
	[[ -n $k ]] || die "no /boot/vmlinuz-*-amd64: install linux-image-amd64"
	printf '%s\n' "$k"
}

# lab_build_xen rebuilds Debian's hypervisor with shadow paging (PV log-dirty) and
# vm_event memory paging, into $LAB_CACHE/xen.elf.
lab_build_xen() {
	local out=$LAB_CACHE/xen.elf key
	[[ -f /boot/xen-4.17-amd64.config ]] || die "/boot/xen-4.17-amd64.config missing: install xen-hypervisor-4.17-amd64"
	lab_xen_patch_list
	key=$( {
		echo "$LAB_XEN_SRC_VERSION ${LAB_XEN_CONFIG_EXTRA[*]}"
		cat /boot/xen-4.17-amd64.config
		local p
		for p in "${LAB_XEN_PATCH_FILES[@]}"; do
			basename "$p"
			cat "$p"
		done
	} | hash_of)
	if [[ -f $out ]] && stamp_ok xen "$key"; then
		log "hypervisor: cached $out"
		return
	fi
	local bdir=$LAB_CACHE/xen-build
	if [[ ! -d $bdir/src/xen ]]; then
		log "hypervisor: fetching Debian source xen=$LAB_XEN_SRC_VERSION"
		rm -rf "$bdir"
		mkdir -p "$bdir/dl"
		(cd "$bdir/dl" && apt-get source -q "xen=$LAB_XEN_SRC_VERSION") >"$LAB_CACHE/xen-source.log" 2>&1 || {
			# The deb-src list may be stale or missing: refresh once and retry.
			apt-get update -q >>"$LAB_CACHE/xen-source.log" 2>&1 || true
			(cd "$bdir/dl" && apt-get source -q "xen=$LAB_XEN_SRC_VERSION") >>"$LAB_CACHE/xen-source.log" 2>&1 ||
				die "apt-get source xen=$LAB_XEN_SRC_VERSION failed (see $LAB_CACHE/xen-source.log): is the deb-src entry for bookworm present?"
		}
		local d
		d=$(find "$bdir/dl" -mindepth 1 -maxdepth 1 -type d -name 'xen-*' | head -n1)
		[[ -n $d ]] || die "apt-get source unpacked no xen-* directory in $bdir/dl"
		mv "$d" "$bdir/src"
		rm -rf "$bdir/dl"
	fi
	lab_patch_xen "$bdir"
	log "hypervisor: configuring and building (about 2 minutes on 2 cores)"
	cp /boot/xen-4.17-amd64.config "$bdir/src/xen/.config"
	printf '%s\n' "${LAB_XEN_CONFIG_EXTRA[@]}" >>"$bdir/src/xen/.config"
	# Debian's python3 first: the hypervisor build runs python scripts.
	(
		export PATH=/usr/bin:/bin:$PATH
		make -C "$bdir/src/xen" olddefconfig &&
			make -C "$bdir/src/xen" -j"$(nproc)"
	) >"$LAB_CACHE/xen-build.log" 2>&1 || die "hypervisor build failed: see $LAB_CACHE/xen-build.log"
	local o
	for o in "${LAB_XEN_CONFIG_EXTRA[@]}"; do
		grep -qx "$o" "$bdir/src/xen/.config" || die "hypervisor .config lost $o after olddefconfig (see $bdir/src/xen/.config)"
	done
	cp "$bdir/src/xen/xen" "$out.tmp"
	mv "$out.tmp" "$out"
	stamp_set xen "$key"
	log "hypervisor: built $out"
}

# lab_xen_patch_list sets LAB_XEN_PATCH_FILES to the project's hypervisor patches
# (scripts/xen-patches/*.patch) when LAB_XEN_PATCHES is 1 (the default), to none when 0.
lab_xen_patch_list() {
	[[ ${LAB_XEN_PATCHES:-1} =~ ^[01]$ ]] || die "LAB_XEN_PATCHES must be 0 or 1, not '$LAB_XEN_PATCHES'"
	LAB_XEN_PATCH_FILES=()
	if [[ ${LAB_XEN_PATCHES:-1} == 1 ]]; then
		local p
		for p in "$LAB_REPO"/scripts/xen-patches/*.patch; do
			[[ -f $p ]] && LAB_XEN_PATCH_FILES+=("$p")
		done
	fi
}

# lab_patch_xen BDIR makes the source tree in BDIR/src carry exactly the patches of
# LAB_XEN_PATCH_FILES: a copy of each applied patch is kept in BDIR/applied, so a
# patch that changed or is no longer wanted is reversed with the text it was applied with.
lab_patch_xen() {
	local bdir=$1 p name want
	mkdir -p "$bdir/applied"
	for p in "$bdir"/applied/*.patch; do
		[[ -f $p ]] || continue
		name=$(basename "$p")
		want=
		local q
		for q in "${LAB_XEN_PATCH_FILES[@]}"; do
			[[ $(basename "$q") == "$name" ]] && cmp -s "$q" "$p" && want=1
		done
		[[ -n $want ]] && continue
		log "hypervisor: reversing $name"
		patch -d "$bdir/src" -p1 -R -s <"$p" >>"$LAB_CACHE/xen-patch.log" 2>&1 ||
			die "reversing the hypervisor patch $name failed: remove $bdir to start from a fresh source"
		rm -f "$p"
	done
	for p in "${LAB_XEN_PATCH_FILES[@]}"; do
		name=$(basename "$p")
		[[ -f $bdir/applied/$name ]] && continue
		log "hypervisor: applying $name"
		patch -d "$bdir/src" -p1 -N -s <"$p" >>"$LAB_CACHE/xen-patch.log" 2>&1 ||
			die "the hypervisor patch $name does not apply to xen=$LAB_XEN_SRC_VERSION (see $LAB_CACHE/xen-patch.log)"
		cp "$p" "$bdir/applied/$name"
	done
}

# ---- initramfs images -------------------------------------------------------------------

# lab_go prints the go command (CI's root may not have /usr/local/go/bin on PATH).
lab_go() {
	if command -v go >/dev/null 2>&1; then
		command -v go
	elif [[ -x /usr/local/go/bin/go ]]; then
		echo /usr/local/go/bin/go
	else
		die "no go toolchain found (PATH or /usr/local/go/bin/go): it builds the guest workload"
	fi
}

# lab_build_guestprog builds the static guest workload into $LAB_CACHE/bin/guestprog (go's
# own build cache makes this about a second when nothing changed).
lab_build_guestprog() {
	mkdir -p "$LAB_CACHE/bin"
	(cd "$LAB_REPO" && CGO_ENABLED=0 "$(lab_go)" build -trimpath -ldflags='-s -w' \
		-o "$LAB_CACHE/bin/guestprog.tmp" ./scripts/lab/guestprog) ||
		die "building scripts/lab/guestprog failed"
	if cmp -s "$LAB_CACHE/bin/guestprog.tmp" "$LAB_CACHE/bin/guestprog"; then
		rm -f "$LAB_CACHE/bin/guestprog.tmp"
	else
		mv "$LAB_CACHE/bin/guestprog.tmp" "$LAB_CACHE/bin/guestprog"
	fi
}

# lab_build_project_bins builds this project's binaries the built-in scenarios use:
# $LAB_CACHE/bin/xl-postcopy for dom0 (cgo with libxen-dev, so dynamically linked: the
# dom0 image gets its ldd libraries like the Xen tools) and $LAB_CACHE/bin/guest-balloon
# for the guests (pure Go, static). -trimpath makes the output depend only on the
# sources, and a file is replaced only when it changed, so the image stamps stay valid.
lab_build_project_bins() {
	mkdir -p "$LAB_CACHE/bin"
	local go
	go=$(lab_go)
	(cd "$LAB_REPO" && "$go" build -trimpath -o "$LAB_CACHE/bin/xl-postcopy.tmp" ./cmd/xl-postcopy) ||
		die "building cmd/xl-postcopy failed (cgo: needs gcc and libxen-dev)"
	(cd "$LAB_REPO" && CGO_ENABLED=0 "$go" build -trimpath -ldflags='-s -w' \
		-o "$LAB_CACHE/bin/guest-balloon.tmp" ./guest-balloon) ||
		die "building guest-balloon failed"
	local b
	for b in xl-postcopy guest-balloon; do
		if cmp -s "$LAB_CACHE/bin/$b.tmp" "$LAB_CACHE/bin/$b"; then
			rm -f "$LAB_CACHE/bin/$b.tmp"
		else
			mv "$LAB_CACHE/bin/$b.tmp" "$LAB_CACHE/bin/$b"
		fi
	done
}

# The guest-balloon arguments when LAB_GUEST_BALLOON_ARGS is unset. The built-in
# balloon-migrate scenario compares a migration without DSB against one after an
# explicit `xl-postcopy balloon`, so the daemon must not give memory back on its own:
# one period per hour leaves only the step at start-up, which --step-mb 1 bounds to
# 2 % of the guest (2.6 MiB of 128). The reserve (20 MiB of MemAvailable kept) is what
# keeps guestprog alive: with 4 MiB a balloon request left the guest so tight that the
# kernel OOM-killed guestprog during the request (seen at loglevel 6), which looked like
# a guest gone silent after its migration. The floor (80 MiB) is no protection by itself.
LAB_GUEST_BALLOON_DEFAULT_ARGS='--period 1h --step-mb 1 --reserve-mb 20 --reserve-fraction 0.1'

# lab_guest_balloon_args prints the guest-balloon arguments packed into the guest image.
lab_guest_balloon_args() { printf '%s\n' "${LAB_GUEST_BALLOON_ARGS-$LAB_GUEST_BALLOON_DEFAULT_ARGS}"; }

# rootfs_dest PATH maps a host path into the merged-/usr layout of the images.
rootfs_dest() {
	case $1 in
	/bin/* | /sbin/* | /lib/* | /lib64/*) printf '/usr%s\n' "$1" ;;
	*) printf '%s\n' "$1" ;;
	esac
}

# rootfs_put ROOT SRC [DEST] copies SRC (following symlinks) to ROOT/DEST.
rootfs_put() {
	local root=$1 src=$2 dest=${3:-$(rootfs_dest "$2")}
	mkdir -p "$root$(dirname "$dest")"
	cp -L "$src" "$root$dest"
}

# rootfs_libs ROOT FILE... copies the shared libraries the ELF files need (ldd) into ROOT.
rootfs_libs() {
	local root=$1 f lib
	shift
	for f in "$@"; do
		file -L "$f" 2>/dev/null | grep -q 'ELF.*dynamically linked' || continue
		while read -r lib; do
			[[ -e $root$(rootfs_dest "$lib") ]] || rootfs_put "$root" "$lib"
		done < <(ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
	done
}

# rootfs_skeleton ROOT makes the merged-/usr layout and installs busybox with its applets.
rootfs_skeleton() {
	local root=$1 a
	rm -rf "$root"
	mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,etc,proc,sys,dev,run,tmp,root,var/log}
	ln -s usr/bin "$root/bin"
	ln -s usr/sbin "$root/sbin"
	ln -s usr/lib "$root/lib"
	ln -s usr/lib64 "$root/lib64"
	ln -s ../run "$root/var/run"
	cp /bin/busybox "$root/usr/bin/busybox"
	file -L /bin/busybox | grep -q 'statically linked' || die "/bin/busybox is not static: install busybox-static"
	for a in $(/bin/busybox --list); do
		[[ $a == busybox || -e $root/usr/bin/$a ]] || ln -s busybox "$root/usr/bin/$a"
	done
}

# rootfs_pack ROOT OUT writes ROOT as a gzip'ed newc cpio archive.
rootfs_pack() {
	(cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0) |
		gzip -6 >"$2.tmp"
	mv "$2.tmp" "$2"
}

# files_hash FILE... hashes names and contents of files (missing files hash as such).
files_hash() {
	local f
	for f in "$@"; do
		printf '%s ' "$f"
		if [[ -f $f ]]; then sha256sum <"$f"; else echo missing; fi
	done | hash_of
}

# lab_build_guest_initrd packs the domU initramfs: busybox, guestprog, guest-balloon
# (started by the guest's init with lab_guest_balloon_args), $LAB_GUEST_BINS (a
# guest-balloon among them replaces the built one).
lab_build_guest_initrd() {
	local out=$LAB_CACHE/guest-initrd.gz key b balloon_args
	local bins=() user_bins=()
	[[ ${LAB_GUEST_BALLOON:-1} == 0 ]] || bins+=("$LAB_CACHE/bin/guest-balloon")
	read -r -a user_bins <<<"${LAB_GUEST_BINS:-}"
	for b in "${user_bins[@]}"; do
		[[ -f $b && -x $b ]] || die "LAB_GUEST_BINS: $b is not an executable file"
	done
	bins+=("${user_bins[@]}")
	balloon_args=$(lab_guest_balloon_args)
	key=$( {
		files_hash /bin/busybox "$LAB_CACHE/bin/guestprog" "$LAB_DIR/guest/init" "${bins[@]}"
		echo "$balloon_args"
	} | hash_of)
	if [[ -f $out ]] && stamp_ok guest-initrd "$key"; then
		log "guest initrd: cached $out"
		return
	fi
	local root=$LAB_CACHE/guest-root
	rootfs_skeleton "$root"
	cp "$LAB_DIR/guest/init" "$root/init"
	chmod 755 "$root/init"
	cp "$LAB_CACHE/bin/guestprog" "$root/usr/local/bin/guestprog"
	for b in "${bins[@]}"; do
		cp -L "$b" "$root/usr/local/bin/$(basename "$b")"
		rootfs_libs "$root" "$b"
	done
	[[ -z $balloon_args ]] || printf '%s\n' "$balloon_args" >"$root/etc/guest-balloon.args"
	rootfs_pack "$root" "$out"
	stamp_set guest-initrd "$key"
	log "guest initrd: built $out ($(du -h "$out" | cut -f1))"
}

# Modules dom0 needs for the toolstack; xenfs needs xen-privcmd first.
LAB_DOM0_MODULES=(xen-evtchn xen-privcmd xenfs xen-gntdev xen-gntalloc)

# lab_build_dom0_initrd packs dom0: busybox, the Xen tools and their libraries, the Xen
# modules, the guest kernel and initrd, the scenario library and scenarios,
# $LAB_EXTRA_BINS and $LAB_EXTRA_SCENARIOS.
lab_build_dom0_initrd() {
	local out=$LAB_CACHE/dom0-initrd.gz kernel kver key f
	kernel=$(lab_kernel)
	kver=${kernel#/boot/vmlinuz-}
	local extra_bins=() extra_sc=()
	read -r -a extra_bins <<<"${LAB_EXTRA_BINS:-}"
	# The built-in scenarios run xl-postcopy: ship ours first, so an xl-postcopy in
	# $LAB_EXTRA_BINS (copied later) replaces it.
	extra_bins=("$LAB_CACHE/bin/xl-postcopy" "${extra_bins[@]}")
	read -r -a extra_sc <<<"${LAB_EXTRA_SCENARIOS:-}"
	for f in "${extra_bins[@]}"; do
		[[ -f $f && -x $f ]] || die "LAB_EXTRA_BINS: $f is not an executable file"
	done
	for f in "${extra_sc[@]}"; do
		[[ -f $f ]] || die "LAB_EXTRA_SCENARIOS: $f is not a file"
	done
	key=$( {
		dpkg-query -W xen-utils-4.17 libxenmisc4.17 busybox-static 2>/dev/null
		echo "$kver"
		files_hash "$kernel" "$LAB_CACHE/guest-initrd.gz" "$LAB_CACHE/bin/guestprog" "$LAB_DIR/dom0/init" "$LAB_DIR/dom0/lab-lib.sh" \
			"$LAB_DIR/dom0/run-scenarios" "$LAB_DIR"/dom0/scenarios/*.sh "${extra_bins[@]}" "${extra_sc[@]}"
	} | hash_of)
	if [[ -f $out ]] && stamp_ok dom0-initrd "$key"; then
		log "dom0 initrd: cached $out"
		return
	fi
	local root=$LAB_CACHE/dom0-root
	rootfs_skeleton "$root"
	mkdir -p "$root"/{lab/modules,lab/builtin-scenarios,scenarios,var/lib/xen,var/log/xen/console,etc/xen}

	# Xen tools at their own path (libxl finds libxl-save-helper there), plus xenstore-*.
	cp -a /usr/lib/xen-4.17 "$root/usr/lib/xen-4.17"
	for f in /usr/bin/xenstore*; do
		[[ -L $f ]] || cp "$f" "$root/usr/bin/$(basename "$f")"
	done
	cp -a /etc/xen/. "$root/etc/xen/"
	local elves=()
	while IFS= read -r -d '' f; do elves+=("$f"); done < <(find /usr/lib/xen-4.17 -type f -print0)
	elves+=(/usr/bin/xenstore)
	rootfs_libs "$root" "${elves[@]}"
	# glibc dlopen()s libgcc_s for pthread_cancel: xl aborts without it.
	rootfs_put "$root" /lib/x86_64-linux-gnu/libgcc_s.so.1

	# Kernel modules, decompressed so busybox insmod can load them.
	local m path
	: >"$root/lab/modules.order"
	for m in "${LAB_DOM0_MODULES[@]}"; do
		path=$(modinfo -k "$kver" -F filename "$m" 2>/dev/null) ||
			die "kernel $kver has no module $m: is linux-image-amd64 installed fully?"
		case $path in
		*.ko.xz) xz -dc "$path" >"$root/lab/modules/$m.ko" ;;
		*.ko.zst) zstd -dcq "$path" >"$root/lab/modules/$m.ko" ;;
		*.ko.gz) gzip -dc "$path" >"$root/lab/modules/$m.ko" ;;
		*.ko) cp "$path" "$root/lab/modules/$m.ko" ;;
		*) die "unexpected module file $path" ;;
		esac
		echo "$m" >>"$root/lab/modules.order"
	done

	cp "$kernel" "$root/lab/vmlinuz"
	cp "$LAB_CACHE/guest-initrd.gz" "$root/lab/guest-initrd.gz"
	# guestprog -relay-count measures migration streams in dom0.
	cp "$LAB_CACHE/bin/guestprog" "$root/lab/guestprog"
	install -m 755 "$LAB_DIR/dom0/init" "$root/init"
	install -m 755 "$LAB_DIR/dom0/run-scenarios" "$root/lab/run-scenarios"
	install -m 644 "$LAB_DIR/dom0/lab-lib.sh" "$root/lab/lab-lib.sh"
	# Login shells (lab-shell.sh) get the scenario helpers too.
	printf '%s\n' 'export PATH=/usr/local/bin:/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
		'. /lab/lab-lib.sh' >"$root/etc/profile"
	install -m 755 "$LAB_DIR"/dom0/scenarios/*.sh "$root/lab/builtin-scenarios/"
	for f in "${extra_bins[@]}"; do
		cp -L "$f" "$root/usr/local/bin/$(basename "$f")"
		chmod 755 "$root/usr/local/bin/$(basename "$f")"
	done
	rootfs_libs "$root" "${extra_bins[@]}"
	for f in "${extra_sc[@]}"; do
		# The runner picks up /scenarios/*.sh: give every scenario that suffix.
		install -m 755 "$f" "$root/scenarios/$(basename "$f" .sh).sh"
	done
	rootfs_pack "$root" "$out"
	stamp_set dom0-initrd "$key"
	log "dom0 initrd: built $out ($(du -h "$out" | cut -f1))"
}

# lab_build_all runs every build step (each skips itself when cached).
lab_build_all() {
	mkdir -p "$LAB_CACHE"
	lab_install_packages
	lab_build_xen
	lab_build_guestprog
	lab_build_project_bins
	lab_build_guest_initrd
	lab_build_dom0_initrd
}

# ---- booting ------------------------------------------------------------------------------

# lab_qemu_args MODE fills the array LAB_QEMU with the QEMU command line that boots Xen
# and dom0 under TCG. Every CPU flag here is needed; LAB.md says why.
lab_qemu_args() {
	local mode=$1 kernel
	kernel=$(lab_kernel)
	[[ ${LAB_BUILTIN:-1} =~ ^[01]$ ]] || die "LAB_BUILTIN must be 0 or 1, not '$LAB_BUILTIN'"
	[[ ${LAB_SCENARIO_TIMEOUT:-480} =~ ^[0-9]+$ ]] || die "LAB_SCENARIO_TIMEOUT must be seconds, not '$LAB_SCENARIO_TIMEOUT'"
	local pol=${LAB_PC_POLICIES:-dual}
	[[ $pol =~ ^[a-z+]+(:[a-z+]+)*$ ]] || die "LAB_PC_POLICIES must be --prepaging policies joined by ':' (e.g. dual:record+lr+dbscan), not '$pol'"
	case "$kernel $LAB_CACHE" in
	*,* | *' '*' '*) die "QEMU splits -initrd at commas and spaces: use a LAB_CACHE path without them ($LAB_CACHE)" ;;
	esac
	# -avx,-avx2: QEMU 7.2 is the first TCG with AVX; with it, glibc programs in dom0 (xl's save
	# helper, cgo binaries) aborted with heap corruption and xl migrate read garbage pfn types
	# (0x3fe999999999a1c4 is the double 0.8): suspected AVX/XSAVE emulation bugs, so the guest CPU
	# offers no AVX and glibc takes its SSE2 paths. LAB_CPU overrides.
	# spec-ctrl=eager-fpu (Xen): on this AMD CPU model Xen switches FPU state lazily (CR0.TS
	# and #NM), and under TCG's SVM emulation guest FPU/XMM state leaked into dom0 processes
	# whenever an HVM/PVH guest ran: busybox and glibc died of GPFs, xc read doubles as pfn
	# types. Eager switching ended it (first clean post-copy run). asid=0 makes Xen flush
	# the TLB on every VMRUN instead of trusting TCG with ASID-tagged entries. LAB_XEN_ARGS
	# replaces both.
	# shellcheck disable=SC2034,SC2054 # used by the callers; commas belong to QEMU options
	LAB_QEMU=(
		qemu-system-x86_64 -machine pc -accel "tcg,thread=${LAB_TCG_THREAD:-multi}"
		-cpu "${LAB_CPU:-EPYC,+svm,+npt,-monitor,-rdtscp,-avx,-avx2}" -smp "${LAB_SMP:-1}" -m "${LAB_QEMU_MEM:-2048}"
		-display none -vga none -net none -no-reboot -monitor none
		-kernel "$LAB_CACHE/xen.elf"
		-append "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M loglvl=all guest_loglvl=all smap=0 ${LAB_XEN_ARGS-spec-ctrl=eager-fpu asid=0}"
		-initrd "$kernel console=hvc0 earlyprintk=xen rdinit=/init lab.mode=$mode lab.builtin=${LAB_BUILTIN:-1} lab.scenario_timeout=${LAB_SCENARIO_TIMEOUT:-480} lab.pc_policies=$pol lab.xen_patches=${LAB_XEN_PATCHES:-1},$LAB_CACHE/dom0-initrd.gz"
	)
}
