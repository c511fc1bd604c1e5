#!/usr/bin/env bash
# mkimage.sh OUT REF CMDJSON: a docker-archive of busybox-static (deterministic) that both `ctr image import`
# and `podman load` accept; no registry is needed.

set -e
out=$1; ref=$2; cmd=$3
t=$(mktemp -d); r=$t/rootfs
mkdir -p $r/bin $r/sbin $r/usr/bin $r/usr/sbin $r/etc $r/proc $r/sys $r/dev $r/tmp $r/root $r/run
cp /bin/busybox $r/bin/busybox
for a in $(/bin/busybox --list-full); do [ "$a" = bin/busybox ] || ln -sf /bin/busybox "$r/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > $r/etc/passwd; echo 'root:x:0:' > $r/etc/group
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C $r -cf $t/layer.tar .
l=$(sha256sum $t/layer.tar | cut -d' ' -f1); mkdir -p $t/img/$l; mv $t/layer.tar $t/img/$l/
printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":%s},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$cmd" $l > $t/cfg.json
c=$(sha256sum $t/cfg.json | cut -d' ' -f1); mv $t/cfg.json $t/img/$c.json
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' $c "$ref" $l > $t/img/manifest.json
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C $t/img -cf "$out.tmp" .; rm -rf $t
mv "$out.tmp" "$out"
