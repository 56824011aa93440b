#!/usr/bin/env bash
# The main job: a local 3-agent ferry cluster on loopback that live-migrates
# a real container. Installs what it needs (runc, CRIU 4), starts three
# agents with their own data dirs, launches a busybox container that keeps a
# counter in a shell variable, moves it live to another member and back, and
# shows the in-memory counter carried on; launches an OCI image it writes
# itself; then it kills the Raft leader and shows the cluster carrying on.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
cargo build --locked --release --bin ferry
ferry=$PWD/target/release/ferry

work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for dir in "$work"/n*/runc; do
    [ -d "$dir" ] || continue
    for id in $(runc --root "$dir" list -q 2>/dev/null); do runc --root "$dir" delete --force "$id"; done
  done
  # Layered rootfs (overlayfs) and network namespaces are mounted there.
  awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r |
    while read -r at; do umount -l "$at" || true; done
  echo "logs and data dirs are in $work"
}
trap cleanup EXIT

# Start an agent in the background and wait for its ready line.
start_agent() {
  local name=$1; shift
  "$ferry" --data-dir "$work/$name" agent --listen 127.0.0.1:0 --name "$name" "$@" \
    >"$work/$name.out" 2>"$work/$name.log" &
  pids+=($!)
  for _ in $(seq 1 300); do
    if grep -q " ready on " "$work/$name.out" 2>/dev/null; then
      cat "$work/$name.out"; return 0
    fi
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "agent $name did not start; its log:" >&2
  cat "$work/$name.log" >&2
  return 1
}

# An OCI image layout of the tree $1 at $2, as `skopeo copy IMAGE oci:DIR`
# writes one: the tree as one gzipped layer, a config naming the process
# (environment, working dir, command), a manifest and an index.
oci_layout() {
  local tree=$1 out=$2 diff_id layer layer_size config config_size manifest manifest_size
  mkdir -p "$out/blobs/sha256"
  tar -C "$tree" -cf "$out/layer.tar" .
  diff_id=$(sha256sum "$out/layer.tar" | cut -d' ' -f1)
  gzip -n "$out/layer.tar"
  blob() {
    local sum; sum=$(sha256sum "$1" | cut -d' ' -f1)
    mv "$1" "$out/blobs/sha256/$sum"
    echo "$sum $(stat -c %s "$out/blobs/sha256/$sum")"
  }
  read -r layer layer_size < <(blob "$out/layer.tar.gz")
  printf '{"architecture":"%s","os":"linux","config":{"Env":["GREETING=hello from an OCI image"],"WorkingDir":"/tmp","Cmd":["sh","-c","echo \\"$GREETING, in $(pwd)\\" > hello; exec sleep 1000000"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$(dpkg --print-architecture)" "$diff_id" >"$out/config.json"
  read -r config config_size < <(blob "$out/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
    "$config" "$config_size" "$layer" "$layer_size" >"$out/manifest.json"
  read -r manifest manifest_size < <(blob "$out/manifest.json")
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s}]}' \
    "$manifest" "$manifest_size" >"$out/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$out/oci-layout"
}

echo "== bootstrap n1 and join n2, n3"
start_agent n1 --bootstrap
for name in n2 n3; do
  token=$("$ferry" --data-dir "$work/n1" cluster token create "$name" --ttl 10m)
  start_agent "$name" --join "$token"
done

# Wait until all three are voters.
for _ in $(seq 1 100); do
  voters=$("$ferry" --data-dir "$work/n1" cluster list --format json | grep -c '"role": "voter"' || true)
  [ "$voters" = 3 ] && break
  sleep 0.2
done
echo "== cluster list (asked on n3)"
"$ferry" --data-dir "$work/n3" cluster list
echo "== host facts of n2"
"$ferry" --data-dir "$work/n1" cluster show n2

echo "== launch a busybox container on n2: a shell counter in memory, written to /counter"
root="$work/rootfs"
mkdir -p "$root"/{bin,proc,dev,sys,tmp,etc}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"; done
"$ferry" --data-dir "$work/n1" launch c1 --rootfs "$root" --target n2 -- \
  sh -c 'i=0; while true; do i=$((i+1)); echo $i > /counter; sleep 0.1; done'
sleep 1
"$ferry" --data-dir "$work/n1" list
# The workload rewrites /counter ten times a second: a read between the
# truncate and the write sees it empty, so read again.
counter() {
  local value=""
  for _ in 1 2 3 4 5; do
    value=$("$ferry" --data-dir "$work/n1" exec c1 -- cat /counter) && [ -n "$value" ] && break
    sleep 0.05
  done
  echo "$value"
}
echo "counter on n2: $(counter)"
echo "== compatibility check for n3 (dry run)"
"$ferry" --data-dir "$work/n1" move c1 --target n3 --dry-run
echo "== live move to n3"
"$ferry" --data-dir "$work/n1" move c1 --target n3
echo "counter on n3: $(counter) (it carried on: a restart would count from 1)"
echo "== and back to n2"
"$ferry" --data-dir "$work/n1" move c1 --target n2
echo "counter on n2: $(counter)"
"$ferry" --data-dir "$work/n1" list
"$ferry" --data-dir "$work/n1" job list

echo "== an OCI image (a layout written here from the busybox tree) launched on n3 with the image's own process"
oci_layout "$root" "$work/image"
"$ferry" --data-dir "$work/n1" launch web --image "$work/image" --target n3
hello=""
for _ in $(seq 1 50); do
  hello=$("$ferry" --data-dir "$work/n1" exec web -- cat /tmp/hello 2>/dev/null) && [ -n "$hello" ] && break
  sleep 0.1
done
echo "web wrote: $hello"
"$ferry" --data-dir "$work/n1" show web | grep -E '^(rootfs|layers|command)'

leader=$("$ferry" --data-dir "$work/n1" cluster list --format json \
  | python3 -c 'import json,sys; print([m["name"] for m in json.load(sys.stdin) if m["leader"]][0])')
echo "== kill -9 the leader ($leader)"
idx=$(( ${leader#n} - 1 ))
kill -9 "${pids[$idx]}"
survivor=n1; [ "$leader" = n1 ] && survivor=n2
start=$(date +%s%N)
"$ferry" --data-dir "$work/$survivor" cluster token create n4 --ttl 1m >/dev/null
echo "a write committed $(( ($(date +%s%N) - start) / 1000000 )) ms after the leader died"
# Gossip: suspect first, then dead once the suspicion is confirmed.
for _ in $(seq 1 150); do
  "$ferry" --data-dir "$work/$survivor" cluster list --format json \
    | python3 -c "import json,sys; sys.exit(0 if any(m['name']=='$leader' and m['liveness']=='dead' for m in json.load(sys.stdin)) else 1)" && break
  sleep 0.2
done
echo "gossip reported $leader dead $(( ($(date +%s%N) - start) / 1000000 )) ms after its kill"
"$ferry" --data-dir "$work/$survivor" cluster list
echo "== restart $leader from its data dir alone"
start_agent "$leader"
for _ in $(seq 1 150); do
  "$ferry" --data-dir "$work/$leader" cluster list --format json \
    | python3 -c "import json,sys; sys.exit(0 if all(m['liveness']=='alive' for m in json.load(sys.stdin)) else 1)" && break
  sleep 0.2
done
"$ferry" --data-dir "$work/$leader" cluster list
echo "counter after the leader's death: $(counter)"
echo "demo done"
