package kubeproxy

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/client-go/kubernetes"

	"github.com/kpfree/kpfree/internal/lab"
	"github.com/kpfree/kpfree/test/kubeenv"
	labtest "github.com/kpfree/kpfree/test/lab"
)

// TestIntegrationKubeProxy runs the real kube-proxy in node1 of a two-node
// lab, in iptables mode and then nftables mode, against a real API server on
// the lab gateway, with agnhost on node2 as the backend, and checks that a
// Service works from node1, that its rules come and go, that Stop leaves the
// rules and `kube-proxy --cleanup` removes them, and that the host's own
// rules and sysctls are byte-identical before and after.
func TestIntegrationKubeProxy(t *testing.T) {
	labtest.Skip(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	// Registered first, so it runs last: after kube-proxy, agnhost, the
	// control plane and the lab are gone.
	hostBefore := hostState(t, ctx)
	t.Cleanup(func() {
		after := hostState(t, context.Background())
		if d := cmp.Diff(hostBefore, after); d != "" {
			t.Errorf("the host's rules or sysctls changed (-before +after):\n%s", d)
		} else {
			t.Logf("host unchanged: iptables-save, ip6tables-save, nft list ruleset (%d bytes) and %d sysctls identical",
				len(after.Rules.String()), len(after.Sysctls))
		}
	})

	s := labtest.New(t, 2)
	t0 := time.Now()
	cp, err := kubeenv.Start(ctx, kubeenv.Options{Dir: filepath.Join(t.TempDir(), "cp"), BindAddress: s.Gateway.String()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cp.Stop)
	t.Logf("control plane on %s ready in %s", cp.URL, time.Since(t0).Round(time.Millisecond))
	client, err := NewClient(cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	echo, err := StartEchoServer(ctx, s, "node2", 9376)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(echo.Stop)
	// A pod-like client address on node1 (inside the cluster CIDR, so not
	// masqueraded), and node2's route back to it. Both stay inside the nodes.
	if err := AddLocalAddress(ctx, s, "node1", podClient); err != nil {
		t.Fatal(err)
	}
	if err := AddRoute(ctx, s, "node2", netip.PrefixFrom(podClient, 24).Masked(), s.Node("node1").Address); err != nil {
		t.Fatal(err)
	}

	for _, mode := range []string{ModeIPTables, ModeNFTables} {
		t.Run(mode, func(t *testing.T) {
			testMode(t, ctx, s, cp, client, echo, mode)
		})
	}
}

// podClient is a pod-like source address for curl on node1.
var podClient = netip.MustParseAddr("10.244.1.10")

func testMode(t *testing.T, ctx context.Context, s *lab.State, cp *kubeenv.ControlPlane, client kubernetes.Interface, echo *Echo, mode string) {
	dir := filepath.Join(t.TempDir(), "kube-proxy")
	p, err := Start(ctx, Options{Lab: s, Node: "node1", ControlPlane: cp, Mode: mode, Dir: dir, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Stop()
		if t.Failed() {
			t.Logf("kube-proxy log tail:\n%s", p.LogTail(40))
		}
	})
	r, err := p.Rules(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v4, v6 := r.KubeLines()
	n4, n6 := r.NFTKubeLines()
	t.Logf("%s: start -> synced %s; rules with only default/kubernetes: KUBE lines iptables %d, ip6tables %d; nft kube-proxy table lines ip %d, ip6 %d",
		mode, p.SyncTime.Round(time.Millisecond), v4, v6, n4, n6)
	if !r.HasBaseRules(mode, "IPv4") {
		t.Fatalf("no %s base rules after sync:\n%s", mode, r)
	}
	// kube-proxy wrote its conntrack timeouts in the node's own netns; the
	// host keeps its value (the host check at the end covers it).
	want := map[string]string{"net/netfilter/nf_conntrack_tcp_timeout_established": "86400"}
	if mode == ModeIPTables {
		want["net/ipv4/conf/all/route_localnet"] = "1"
	}
	for name, w := range want {
		if v, err := NodeSysctl(ctx, s, "node1", name); err != nil || v != w {
			t.Errorf("node1 %s = %q, %v; want %s (set by kube-proxy in the node)", name, v, err, w)
		}
	}
	for _, l := range p.SysctlLog() {
		t.Logf("%s: kube-proxy log: %s", mode, l)
	}

	// A Service pointing at node2's agnhost.
	name := "echo-" + mode
	created := time.Now()
	vip, err := CreateService(ctx, client, name, 80, []netip.AddrPort{echo.Addr})
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	r, err = p.WaitSynced(wctx, func(r Ruleset) bool { return r.HasService(vip, 80) })
	cancel()
	if err != nil {
		t.Fatalf("ClusterIP %s never sent to endpoints in node1's rules: %v\n%s", vip, err, r)
	}
	v4, v6 = r.KubeLines()
	n4, n6 = r.NFTKubeLines()
	t.Logf("%s: Service %s -> %s: rules in %s; KUBE lines iptables %d, ip6tables %d; nft lines ip %d, ip6 %d",
		mode, vip, echo.Addr, time.Since(created).Round(time.Millisecond), v4, v6, n4, n6)
	url := fmt.Sprintf("http://%s/", netip.AddrPortFrom(vip, 80))
	got, err := Curl(ctx, s, "node1", url, netip.Addr{})
	if err != nil || got != "node2" {
		t.Fatalf("curl %s from node1 = %q, %v; want node2", url, got, err)
	}
	got, err = Curl(ctx, s, "node1", url, podClient)
	if err != nil || got != "node2" {
		t.Fatalf("curl --interface %s %s from node1 = %q, %v; want node2", podClient, url, got, err)
	}
	t.Logf("%s: curl %s from node1 -> %q (from the node address and from %s)", mode, url, got, podClient)

	// Delete it: the rules go within a few seconds.
	deleted := time.Now()
	if err := DeleteService(ctx, client, name); err != nil {
		t.Fatal(err)
	}
	wctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	_, err = p.WaitSynced(wctx, func(r Ruleset) bool { return !r.HasAddr(vip) })
	cancel()
	if err != nil {
		t.Fatalf("ClusterIP %s still in node1's rules 10 s after the Service was deleted: %v", vip, err)
	}
	t.Logf("%s: Service deleted: rules gone in %s", mode, time.Since(deleted).Round(time.Millisecond))
	if _, err := Curl(ctx, s, "node1", url, netip.Addr{}); err == nil {
		t.Errorf("curl %s still answers after the Service was deleted", url)
	}

	// SIGTERM: kube-proxy exits and leaves its rules, as the real one does.
	p.Stop()
	r, err = Dump(ctx, s, "node1")
	if err != nil {
		t.Fatal(err)
	}
	if !r.HasBaseRules(mode, "IPv4") {
		t.Errorf("%s rules gone after SIGTERM; kube-proxy is expected to leave them", mode)
	}
	v4, v6 = r.KubeLines()
	n4, n6 = r.NFTKubeLines()
	t.Logf("%s: after SIGTERM left: KUBE lines iptables %d, ip6tables %d; nft lines ip %d, ip6 %d", mode, v4, v6, n4, n6)

	// kube-proxy --cleanup removes them all.
	out, err := Cleanup(ctx, s, "node1")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cleanup.log"), []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
	r, err = Dump(ctx, s, "node1")
	if err != nil {
		t.Fatal(err)
	}
	// It leaves KUBE-FIREWALL (filter, IPv4 and IPv6: the "block incoming
	// localnet connections" rule that goes with route_localnet, a chain
	// kubelet creates too) and the jumps to it; nothing else.
	v4, v6 = r.KubeLines()
	n4, n6 = r.NFTKubeLines()
	left := r.KubeChains()
	t.Logf("%s: after kube-proxy --cleanup left: KUBE lines iptables %d, ip6tables %d; nft lines ip %d, ip6 %d; chains %v", mode, v4, v6, n4, n6, left)
	for _, c := range left {
		if !strings.HasSuffix(c, " filter KUBE-FIREWALL") {
			t.Errorf("kube-proxy --cleanup left %s:\n%s", c, r)
		}
	}
	if n4+n6 != 0 {
		t.Errorf("kube-proxy --cleanup left nftables kube-proxy tables:\n%s", r.NFT)
	}
}

// hostState is what must not change on the host: its rules, as the host's
// own tools print them, and the sysctls kube-proxy could write.
type hostSnapshot struct {
	Rules   Ruleset
	Sysctls map[string]string
}

func hostState(t *testing.T, ctx context.Context) hostSnapshot {
	t.Helper()
	r, err := DumpHost(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sys, err := HostSysctls()
	if err != nil {
		t.Fatal(err)
	}
	return hostSnapshot{Rules: r, Sysctls: sys}
}
