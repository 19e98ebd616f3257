package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/kpfree/kpfree/internal/image"
)

// Versions kubeadm v1.34.4 asks for (`kubeadm config images list --kubernetes-version v1.34.4`)
// and of the test server.
const (
	KubernetesVersion = "v1.34.4"
	EtcdTag           = "3.6.5-0"
	CoreDNSTag        = "v1.12.1"
	PauseTag          = "3.10.1"
	// AgnhostTag is what test/k8s/build.sh stamps into agnhost (test/images/agnhost/VERSION of
	// k8s.io/kubernetes v1.34.4). The same image is also tagged AgnhostAlias.
	AgnhostTag   = "2.56"
	AgnhostAlias = "2.53"

	Registry = "registry.k8s.io"
)

// Image is one image of the set: its spec and any further refs for the same image.
type Image struct {
	Spec    image.Spec
	Aliases []string
}

// Refs are the image's names: Spec.Ref first.
func (i Image) Refs() []string { return append([]string{i.Spec.Ref}, i.Aliases...) }

// Binaries the set is built from (names in --bin-dir). Optional ones only add their image.
var (
	requiredBinaries = []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "etcd"}
	optionalBinaries = []string{"etcdctl", "coredns", "agnhost"}
)

// iptablesModes: the backend behind the plain iptables, ip6tables, *-save and *-restore names
// in the kube-proxy image. Debian (and so the lab's kubelet) defaults to nft; kube-proxy must
// use the same backend as the node.
var iptablesModes = []string{"nft", "legacy"}

// Host paths of the kube-proxy tool set (Debian's iptables, nftables, conntrack, netbase).
var (
	iptablesVariants = []string{
		"iptables", "iptables-save", "iptables-restore",
		"ip6tables", "ip6tables-save", "ip6tables-restore",
	}
	kubeProxyHostPaths = func() []string {
		p := []string{
			"/usr/sbin/xtables-nft-multi",
			"/usr/sbin/xtables-legacy-multi",
			"/usr/sbin/nft",
			"/usr/sbin/conntrack",
			// iptables' extensions are dlopen'd from here (with their own libraries).
			"/usr/lib/x86_64-linux-gnu/xtables",
			// Names for protocols, services and ether types, for iptables and nft rules.
			"/etc/protocols", "/etc/services", "/etc/ethertypes",
		}
		for _, v := range iptablesVariants {
			// Debian's own links: iptables-nft -> xtables-nft-multi, ...
			p = append(p, "/usr/sbin/"+strings.Replace(v, "tables", "tables-nft", 1))
			p = append(p, "/usr/sbin/"+strings.Replace(v, "tables", "tables-legacy", 1))
		}
		return p
	}()
)

// kubeProxyTools returns the tool set for kube-proxy's iptables and nftables modes, with the
// plain iptables names pointing at mode's variants.
func kubeProxyTools(mode string) ([]image.File, error) {
	files, err := image.HostFiles(kubeProxyHostPaths...)
	if err != nil {
		return nil, fmt.Errorf("kube-proxy tools (apt-get install iptables nftables conntrack netbase): %w", err)
	}
	for _, v := range iptablesVariants {
		files = append(files, image.File{
			Dst:  "/usr/sbin/" + v,
			Link: strings.Replace(v, "tables", "tables-"+mode, 1),
		})
	}
	return files, nil
}

// imageSet returns the images to build from the binaries in binDir and the pause binary, and
// a note for every optional image skipped. A missing required binary is an error.
func imageSet(binDir, pauseBin, iptablesMode string) (images []Image, skipped []string, err error) {
	if !slices.Contains(iptablesModes, iptablesMode) {
		return nil, nil, fmt.Errorf("iptables mode %q: want one of %s", iptablesMode, strings.Join(iptablesModes, ", "))
	}
	bin := func(name string) string { return filepath.Join(binDir, name) }
	var missing []string
	for _, b := range requiredBinaries {
		if !isFile(bin(b)) {
			missing = append(missing, b)
		}
	}
	if len(missing) > 0 {
		return nil, nil, fmt.Errorf("missing in %s: %s (build them with test/k8s/build.sh)",
			binDir, strings.Join(missing, ", "))
	}

	// One binary in /usr/local/bin over the shared base layer; kubeadm's static pod manifests
	// run the command by name, found through PATH.
	local := func(ref, name string, extra ...image.File) Image {
		dst := "/usr/local/bin/" + name
		return Image{Spec: image.Spec{
			Ref:        ref,
			Base:       image.BaseFiles(),
			Files:      append([]image.File{{Src: bin(name), Dst: dst, Mode: 0o755}}, extra...),
			Entrypoint: []string{dst},
		}}
	}
	for _, c := range []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler"} {
		images = append(images, local(Registry+"/"+c+":"+KubernetesVersion, c))
	}

	var etcdctl []image.File
	if isFile(bin("etcdctl")) {
		etcdctl = append(etcdctl, image.File{Src: bin("etcdctl"), Dst: "/usr/local/bin/etcdctl", Mode: 0o755})
	}
	images = append(images, local(Registry+"/etcd:"+EtcdTag, "etcd", etcdctl...))

	tools, err := kubeProxyTools(iptablesMode)
	if err != nil {
		return nil, nil, err
	}
	images = append(images, Image{Spec: image.Spec{
		Ref:        Registry + "/kube-proxy:" + KubernetesVersion,
		Base:       append(image.BaseFiles(), tools...),
		Files:      []image.File{{Src: bin("kube-proxy"), Dst: "/usr/local/bin/kube-proxy", Mode: 0o755}},
		Entrypoint: []string{"/usr/local/bin/kube-proxy"},
		Labels:     map[string]string{"io.kpfree.iptables-mode": iptablesMode},
	}})

	images = append(images, Image{Spec: image.Spec{
		Ref:        Registry + "/pause:" + PauseTag,
		Files:      []image.File{{Src: pauseBin, Dst: "/pause", Mode: 0o755}},
		Entrypoint: []string{"/pause"},
	}})

	root := func(ref, name string) Image {
		return Image{Spec: image.Spec{
			Ref:        ref,
			Base:       image.BaseFiles(),
			Files:      []image.File{{Src: bin(name), Dst: "/" + name, Mode: 0o755}},
			Entrypoint: []string{"/" + name},
		}}
	}
	if isFile(bin("coredns")) {
		images = append(images, root(Registry+"/coredns/coredns:"+CoreDNSTag, "coredns"))
	} else {
		skipped = append(skipped, fmt.Sprintf("%s/coredns/coredns:%s: no coredns in %s", Registry, CoreDNSTag, binDir))
	}
	if isFile(bin("agnhost")) {
		a := root(Registry+"/e2e-test-images/agnhost:"+AgnhostTag, "agnhost")
		a.Aliases = []string{Registry + "/e2e-test-images/agnhost:" + AgnhostAlias}
		images = append(images, a)
	} else {
		skipped = append(skipped, fmt.Sprintf("%s/e2e-test-images/agnhost:%s: no agnhost in %s", Registry, AgnhostTag, binDir))
	}
	return images, skipped, nil
}

func isFile(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}
