#!/usr/bin/env bash
# Installs what ferry needs at run time and for its tests on Debian bookworm:
#   - apt packages: runc, iptables (CRIU locks container networks with
#     iptables-restore), busybox-static (test rootfs), iproute2,
#     btrfs-progs (moves by btrfs send/receive where the data dir is on
#     btrfs; the tests make btrfs filesystems on loop devices);
#   - CRIU >= 4.2.1, built from source: bookworm's criu 3.17.1 fails
#     `criu check` on the kernels ferry runs on, and CRIU 4.1.1 cannot dump
#     a process holding an internet socket on kernels 6.16 and later
#     ("Can't get 1:16 opt", CRIU issue 2705); 4.2.1 can;
#   - QEMU (qemu-system-x86) from bookworm-backports: this machine image's
#     qemu-utils comes from there and Breaks bookworm's qemu-system 7.2;
#   - a guest kernel for test VMs: the .deb linux-image-cloud-amd64 depends
#     on, downloaded (not installed) into /var/cache/ferry-build/guest, for
#     scripts/make-test-guest.sh, and likewise qemu-guest-agent's .deb.
#
# CRIU's source comes from Debian's sid suite (criu_<ver>.orig.tar.xz),
# fetched with `apt-get source` through a sid `deb-src` entry whose mirror
# URI is taken from this machine's own apt sources at run time. Only a
# deb-src entry is added (in its own file), so no sid binary package can
# ever be installed from it; no pinning is done.
#
# Idempotent: a second run checks what is there and does nothing else (no
# `apt-get update`, no build) when everything is already in place.
# Run as root. Build output goes to a log file whose path is printed on
# failure.
set -Eeuo pipefail

# System paths only: the build must not pick up a user's toolchain shims.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

RUNTIME_PKGS=(runc iptables busybox-static iproute2 systemd btrfs-progs)
BUILD_PKGS=(
	build-essential pkg-config xz-utils
	libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
	python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev
	libnftables-dev libgnutls28-dev uuid-dev
)
CRIU_MIN_VERSION=4.2.1
CRIU_SRC_SUITE=sid
CRIU_DEST=/usr/local/sbin/criu
WORK_DIR=/var/cache/ferry-build
LOG="$WORK_DIR/install-deps.log"
SRC_LIST=/etc/apt/sources.list.d/ferry-criu-src.sources
GUEST_DIR=$WORK_DIR/guest

log() { printf '[install-deps] %s\n' "$*"; }

on_error() {
	local rc=$?
	log "FAILED (exit $rc) near line ${BASH_LINENO[0]}; build/apt log: $LOG"
	if [[ -s $LOG ]]; then
		log "last lines of $LOG:"
		tail -n 25 "$LOG" >&2 || true
	fi
	exit "$rc"
}
trap on_error ERR

if [[ $(id -u) -ne 0 ]]; then
	echo "install-deps.sh must run as root" >&2
	exit 1
fi

mkdir -p "$WORK_DIR"
: >>"$LOG"

# --- apt helpers -----------------------------------------------------------

APT_UPDATED=0
apt_update_once() {
	if [[ $APT_UPDATED -eq 0 ]]; then
		log "apt-get update"
		apt-get -qq update >>"$LOG" 2>&1
		APT_UPDATED=1
	fi
}

pkg_installed() {
	[[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

# Installs the packages given that are not installed yet; updates the apt
# lists first (once) only when something is missing.
apt_install_missing() {
	local missing=() p
	for p in "$@"; do
		pkg_installed "$p" || missing+=("$p")
	done
	if [[ ${#missing[@]} -eq 0 ]]; then
		return 0
	fi
	apt_update_once
	log "installing: ${missing[*]}"
	apt-get -qq install -y --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1
}

# --- CRIU helpers ----------------------------------------------------------

# Prints the version from `criu --version` ("Version: 4.1.1"), or nothing.
criu_version() {
	command -v criu >/dev/null 2>&1 || return 0
	criu --version 2>/dev/null | awk -F': *' '/^Version:/ { print $2; exit }'
}

criu_good() {
	local v
	v=$(criu_version)
	[[ -n $v ]] || return 1
	dpkg --compare-versions "$v" ge "$CRIU_MIN_VERSION" || return 1
	criu check >/dev/null 2>&1
}

# Prints the URI of the first enabled binary ("deb") source of this
# machine's own suite, from one-line *.list files and deb822 *.sources files.
own_mirror_uri() {
	local codename=$1 f
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
		[[ -f $f ]] || continue
		awk -v c="$codename" '
			/^[[:space:]]*#/ { next }
			$1 == "deb" {
				i = 2
				if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
				if ($(i + 1) == c) { print $i; exit }
			}' "$f"
	done
	for f in /etc/apt/sources.list.d/*.sources; do
		[[ -f $f && $f != "$SRC_LIST" ]] || continue
		awk -v c="$codename" '
			function flush() {
				if (!found && (" " types " ") ~ / deb / && enabled != "no" &&
				    (" " suites " ") ~ (" " c " ") && uris != "") {
					split(uris, u, " "); print u[1]; found = 1
				}
				types = ""; suites = ""; uris = ""; enabled = ""
			}
			/^[[:space:]]*$/ { flush(); next }
			/^[[:space:]]*#/ { next }
			/^[[:space:]]/ { next }  # continuation line of a multi-line field
			{
				key = tolower($0); sub(/:.*/, "", key)
				val = $0; sub(/^[^:]*:[[:space:]]*/, "", val); sub(/[[:space:]]+$/, "", val)
				if (key == "types") types = val
				else if (key == "uris") uris = val
				else if (key == "suites") suites = val
				else if (key == "enabled") enabled = tolower(val)
			}
			END { flush() }' "$f"
	done
}

fetch_criu_source() {
	local codename uri keyring=""
	codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
	[[ -n $codename ]] || { log "cannot tell this machine's Debian codename"; return 1; }
	uri=$(own_mirror_uri "$codename" | sed -n 1p)
	if [[ -z $uri ]]; then
		log "no enabled apt source for suite '$codename' found; cannot derive the mirror URI"
		return 1
	fi
	if [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]]; then
		keyring=/usr/share/keyrings/debian-archive-keyring.gpg
	fi
	log "adding deb-src $CRIU_SRC_SUITE main from $uri ($SRC_LIST)"
	{
		echo "# Added by ferry scripts/install-deps.sh: source packages only (CRIU >= $CRIU_MIN_VERSION)."
		echo "Types: deb-src"
		echo "URIs: $uri"
		echo "Suites: $CRIU_SRC_SUITE"
		echo "Components: main"
		if [[ -n $keyring ]]; then echo "Signed-By: $keyring"; fi
	} >"$SRC_LIST.tmp"
	mv "$SRC_LIST.tmp" "$SRC_LIST"

	# Refresh only that source's index: the rest of apt's lists stay as they are.
	log "apt-get update (only $SRC_LIST)"
	apt-get -qq update -o Dir::Etc::sourcelist="$SRC_LIST" \
		-o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0 >>"$LOG" 2>&1

	local src_dir="$WORK_DIR/src"
	mkdir -p "$src_dir"
	# `_apt` downloads unsandboxed otherwise (harmless, but noisy).
	chown _apt "$src_dir" 2>/dev/null || true
	log "downloading criu source from $CRIU_SRC_SUITE"
	# The orig tarball is all we need: a missing Debian diff is not fatal.
	(cd "$src_dir" && apt-get -qq source --download-only "criu/$CRIU_SRC_SUITE") >>"$LOG" 2>&1 ||
		log "apt-get source reported an error (see $LOG); using whatever it downloaded"
}

# The newest criu orig tarball in $1 if it is at least CRIU_MIN_VERSION.
good_tarball() {
	local tarball version
	tarball=$(find "$1" -maxdepth 1 -name 'criu_*.orig.tar.*' | sort -V | tail -n1)
	[[ -n $tarball ]] || return 0
	version=$(basename "$tarball" | sed -E 's/^criu_([^.]+\.[^.]+\.[^.]+)\.orig.*/\1/')
	if dpkg --compare-versions "$version" ge "$CRIU_MIN_VERSION"; then
		echo "$tarball"
	fi
}

build_criu() {
	local src_dir="$WORK_DIR/src" tarball build_dir
	mkdir -p "$src_dir"
	tarball=$(good_tarball "$src_dir")
	if [[ -z $tarball ]]; then
		fetch_criu_source
		tarball=$(good_tarball "$src_dir")
	fi
	if [[ -z $tarball ]]; then
		log "no criu orig tarball >= $CRIU_MIN_VERSION was downloaded into $src_dir"
		return 1
	fi
	log "using $(basename "$tarball")"
	build_dir="$WORK_DIR/build"
	rm -rf "$build_dir"
	mkdir -p "$build_dir"
	tar -xf "$tarball" -C "$build_dir" --strip-components=1
	log "building criu (make criu -j2; log: $LOG)"
	local start=$SECONDS
	make -C "$build_dir" criu -j2 >>"$LOG" 2>&1
	log "built in $((SECONDS - start)) s"
	install -m 0755 "$build_dir/criu/criu" "$CRIU_DEST"
	hash -r
	log "installed $CRIU_DEST"
}

# --- QEMU and the test guest's kernel --------------------------------------

# qemu-system-x86 from <codename>-backports, through a sources list of its
# own (nothing is added to /etc/apt).
install_qemu() {
	if command -v qemu-system-x86_64 >/dev/null 2>&1; then
		return 0
	fi
	local codename uri list="$WORK_DIR/backports.list" lists="$WORK_DIR/backports-lists"
	local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
	codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
	uri=$(own_mirror_uri "$codename" | sed -n 1p)
	[[ -n $uri ]] || { log "no apt source for '$codename' found; cannot install QEMU"; return 1; }
	printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$uri" "$codename" "$keyring" "$uri" "$codename-backports" >"$list"
	mkdir -p "$lists/partial"
	local opts=(-o Dir::Etc::sourcelist="$list" -o Dir::Etc::sourceparts=- -o Dir::State::lists="$lists")
	log "installing qemu-system-x86 from $codename-backports"
	apt-get -qq "${opts[@]}" update >>"$LOG" 2>&1
	apt-get -qq "${opts[@]}" install -y --no-install-recommends -t "$codename-backports" qemu-system-x86 >>"$LOG" 2>&1
}

fetch_guest_kernel() {
	local pkg
	pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image/ { print $2; exit }')
	[[ -n $pkg ]] || { log "no linux-image-cloud-amd64 in the apt lists"; return 1; }
	if compgen -G "$GUEST_DIR/${pkg}_*.deb" >/dev/null; then
		return 0
	fi
	mkdir -p "$GUEST_DIR"
	chown _apt "$GUEST_DIR" 2>/dev/null || true
	log "downloading $pkg (the test guest's kernel; not installed)"
	(cd "$GUEST_DIR" && apt-get -qq download "$pkg") >>"$LOG" 2>&1
}

# The test guest's QEMU guest agent (for `ferry exec` into a VM).
fetch_guest_agent() {
	if compgen -G "$GUEST_DIR/qemu-guest-agent_*.deb" >/dev/null; then
		return 0
	fi
	mkdir -p "$GUEST_DIR"
	chown _apt "$GUEST_DIR" 2>/dev/null || true
	log "downloading qemu-guest-agent (for the test guest; not installed)"
	(cd "$GUEST_DIR" && apt-get -qq download qemu-guest-agent) >>"$LOG" 2>&1
}

# CRIU's lazy page server (ferry move --lazy, on the source) grows a pipe
# to 819 pages; without CAP_SYS_RESOURCE the kernel refuses that past
# fs.pipe-max-size (1 MiB by default), and the move is refused at its check.
allow_lazy_pages() {
	local want=4194304 now
	now=$(cat /proc/sys/fs/pipe-max-size 2>/dev/null || echo 0)
	if [ "$now" -lt "$want" ]; then
		log "raising fs.pipe-max-size from $now to $want (CRIU lazy pages)"
		echo "$want" > /proc/sys/fs/pipe-max-size || log "cannot raise fs.pipe-max-size; ferry move --lazy will be refused"
	fi
}

# --- main ------------------------------------------------------------------

apt_install_missing "${RUNTIME_PKGS[@]}"

if criu_good; then
	log "criu $(criu_version) already installed and 'criu check' passes; skipping the build"
else
	log "criu >= $CRIU_MIN_VERSION with a passing 'criu check' not found (have: $(criu_version || true))"
	apt_install_missing "${BUILD_PKGS[@]}"
	build_criu
fi

install_qemu
fetch_guest_kernel
fetch_guest_agent
allow_lazy_pages

trap - ERR
echo
echo "runc: $(runc --version 2>/dev/null | sed -n 1p || echo missing)"
echo "criu: $(criu_version || true) ($(command -v criu || echo missing))"
echo "qemu: $(qemu-system-x86_64 --version 2>/dev/null | sed -n 1p || echo missing)"
echo "guest kernel: $(ls "$GUEST_DIR"/*.deb 2>/dev/null | sed -n 1p || echo missing)"
if check_out=$(criu check 2>&1); then
	echo "criu check: passed: $(printf '%s\n' "$check_out" | tail -n1)"
else
	echo "criu check: FAILED:"
	printf '%s\n' "$check_out" | tail -n 20
	exit 1
fi
