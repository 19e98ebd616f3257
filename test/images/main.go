// Command images builds the container images a kubeadm v1.34.4 lab cluster pulls, from the
// static binaries of test/k8s/build.sh and Debian's iptables/nftables/conntrack, without Docker
// or a registry:
//
//	go run ./test/images --bin-dir DIR --out FILE     write the images (docker-archive)
//	go run ./test/images --bin-dir DIR --images-list  print their refs
//
// The tarball is for `ctr -n k8s.io images import FILE`. kube-apiserver, kube-controller-manager,
// kube-scheduler, etcd (+ etcdctl) and kube-proxy are required; coredns and agnhost images are
// built when their binaries are in DIR. The pause image is our own static pause
// (test/images/pause), built here with `go build`. kube-proxy's image carries Debian's
// iptables (nft and legacy), nft and conntrack with their libraries.
//
// A run whose output exists, was made from the same recipe, and is newer than every input
// file does nothing (--force rebuilds).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
)

type options struct {
	binDir       string
	out          string
	format       string
	iptablesMode string
	force        bool
	list         bool
}

const (
	formatDocker    = "docker-archive"
	formatOCIArch   = "oci-archive"
	formatOCILayout = "oci-layout"
)

func defaultBinDir() string {
	cache := os.Getenv("KPFREE_CACHE")
	if cache == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return ""
		}
		cache = filepath.Join(home, ".cache", "kpfree")
	}
	return filepath.Join(cache, "k8s", KubernetesVersion, "bin")
}

func main() {
	var o options
	flag.StringVar(&o.binDir, "bin-dir", defaultBinDir(), "directory with the static binaries (test/k8s/build.sh --print-dir)")
	flag.StringVar(&o.out, "out", "", "output file (a directory for --format oci-layout)")
	flag.StringVar(&o.format, "format", formatDocker, "output format: docker-archive (for ctr import), oci-archive or oci-layout")
	flag.StringVar(&o.iptablesMode, "iptables-mode", "nft", "backend of the plain iptables names in the kube-proxy image: nft or legacy (match the nodes)")
	flag.BoolVar(&o.force, "force", false, "rebuild even if the output is up to date")
	flag.BoolVar(&o.list, "images-list", false, "print the refs of the images and exit")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: go run ./test/images [--bin-dir DIR] --out FILE | --images-list\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "images: error:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, o options, stdout, stderr io.Writer) error {
	if o.list {
		images, skipped, err := imageSet(o.binDir, "/pause", o.iptablesMode)
		if err != nil {
			return err
		}
		for _, s := range skipped {
			fmt.Fprintln(stderr, "images: skipping", s)
		}
		for _, img := range images {
			for _, r := range img.Refs() {
				fmt.Fprintln(stdout, r)
			}
		}
		return nil
	}
	if o.out == "" {
		return fmt.Errorf("--out is required (or --images-list)")
	}
	switch o.format {
	case formatDocker, formatOCIArch, formatOCILayout:
	default:
		return fmt.Errorf("--format %q: want %s, %s or %s", o.format, formatDocker, formatOCIArch, formatOCILayout)
	}
	return build(ctx, o, stdout, stderr)
}
