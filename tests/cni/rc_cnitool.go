// rc-cnitool add|check|del|gc|status <net> <netns>: upstream cnitool's CLI on Debian's libcni (not packaged).
// Env: NETCONFPATH CNI_PATH CNI_IFNAME CNI_ARGS CAP_ARGS CNI_CONTAINERID CNI_CACHE_DIR.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

func env(k, d string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return d
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: rc-cnitool add|check|del <net> <netns>")
		os.Exit(2)
	}
	ns := os.Args[3]
	if ns != "" {
		ns, _ = filepath.Abs(ns)
	}
	list, err := libcni.LoadConfList(env("NETCONFPATH", "/etc/cni/net.d"), os.Args[2])
	if err == nil {
		rt := &libcni.RuntimeConf{NetNS: ns, IfName: env("CNI_IFNAME", "eth0"),
			ContainerID: env("CNI_CONTAINERID", fmt.Sprintf("rccni-%x", sha256.Sum256([]byte(ns)))[:22])}
		for _, kv := range strings.Split(os.Getenv("CNI_ARGS"), ";") {
			if p := strings.SplitN(kv, "=", 2); len(p) == 2 {
				rt.Args = append(rt.Args, [2]string{p[0], p[1]})
			}
		}
		if c := os.Getenv("CAP_ARGS"); c != "" {
			err = json.Unmarshal([]byte(c), &rt.CapabilityArgs)
		}
		cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv("CNI_PATH")), env("CNI_CACHE_DIR", "/var/lib/cni"), nil)
		ctx := context.Background()
		if err == nil {
			switch os.Args[1] {
			case "add":
				var r interface{ Print() error }
				if r, err = cni.AddNetworkList(ctx, list, rt); r != nil {
					_ = r.Print()
				}
			case "check":
				err = cni.CheckNetworkList(ctx, list, rt)
			case "del":
				err = cni.DelNetworkList(ctx, list, rt)
			default:
				err = fmt.Errorf("unknown command %q", os.Args[1])
			}
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "rc-cnitool:", err)
		os.Exit(1)
	}
}
