package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/lab"
	labtest "github.com/kpfree/kpfree/test/lab"
)

// These tests run the real kpfree binary against lab nodes: network
// namespaces running Debian's OpenSSH sshd.

type result struct {
	code           int
	stdout, stderr string
	elapsed        time.Duration
}

func runKpfree(t *testing.T, bin string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	r := result{stdout: out.String(), stderr: errb.String(), elapsed: time.Since(start)}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run kpfree %v: %v", args, err)
	}
	return r
}

type preflightJSON struct {
	OK    bool `json:"ok"`
	Hosts []struct {
		Host  string `json:"host"`
		Worst string `json:"worst"`
		Error string `json:"error"`
	} `json:"hosts"`
	Findings []struct {
		Host, Check, Status, Seen, Remedy string
	} `json:"findings"`
}

func parsePreflight(t *testing.T, r result) preflightJSON {
	t.Helper()
	var p preflightJSON
	if err := json.Unmarshal([]byte(r.stdout), &p); err != nil {
		t.Fatalf("stdout is not one JSON document: %v\nstdout:\n%s\nstderr:\n%s", err, r.stdout, r.stderr)
	}
	return p
}

func (p preflightJSON) finding(host, check string) (status, seen string) {
	for _, f := range p.Findings {
		if f.Host == host && f.Check == check {
			return f.Status, f.Seen
		}
	}
	return "", ""
}

// writeInventory loads the lab's hosts.yaml, lets edit change it and writes
// it next to the test's other files.
func writeInventory(t *testing.T, s *lab.State, edit func(inv *inventory.Inventory)) string {
	t.Helper()
	inv, err := inventory.Load(s.InventoryFile())
	if err != nil {
		t.Fatal(err)
	}
	edit(inv)
	b, err := inv.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "hosts.yaml")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// enableForwarding sets ip_forward in every node's own network namespace,
// as a kubeadm host would have it, so the only failures are the ones a
// test provokes.
func enableForwarding(t *testing.T, s *lab.State) {
	t.Helper()
	for _, n := range s.NodeNames() {
		if out, err := s.Exec(context.Background(), n, "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
			t.Fatalf("%s: %v %s", n, err, out)
		}
	}
}

func assertReached(t *testing.T, p preflightJSON, hosts ...string) {
	t.Helper()
	for _, h := range hosts {
		found := false
		for _, hs := range p.Hosts {
			if hs.Host == h {
				found = true
				if hs.Error != "" || hs.Worst == "fail" {
					t.Errorf("%s: worst %s, error %q", h, hs.Worst, hs.Error)
				}
			}
		}
		if !found {
			t.Errorf("%s: not in the report", h)
		}
		if st, seen := p.finding(h, "kernel.version"); st != "pass" {
			t.Errorf("%s: kernel.version %s (%s)", h, st, seen)
		}
	}
}

func TestIntegrationPreflight(t *testing.T) {
	s := labtest.New(t, 3)
	bin := labtest.KpfreeBin(t)
	enableForwarding(t, s)

	t.Run("root", func(t *testing.T) {
		r := runKpfree(t, bin, "preflight", "--nodes", s.InventoryFile(), "-o", "json")
		p := parsePreflight(t, r)
		if r.code != 0 || !p.OK {
			t.Fatalf("exit %d, ok=%v; stderr:\n%s", r.code, p.OK, r.stderr)
		}
		assertReached(t, p, "node1", "node2", "node3")
		if st, _ := p.finding("node2", "cluster.hostname-unique"); st != "pass" {
			t.Errorf("hostname-unique: %s", st)
		}
	})

	t.Run("sudo-user", func(t *testing.T) {
		inv := writeInventory(t, s, func(inv *inventory.Inventory) { inv.SSH.User = lab.AdminUser })
		r := runKpfree(t, bin, "preflight", "--nodes", inv, "-o", "json", "-v")
		p := parsePreflight(t, r)
		if r.code != 0 {
			t.Fatalf("exit %d; stderr:\n%s", r.code, r.stderr)
		}
		assertReached(t, p, "node1", "node2", "node3")
		if !strings.Contains(r.stderr, "as "+lab.AdminUser) {
			t.Errorf("stderr does not show the connection as %s:\n%s", lab.AdminUser, r.stderr)
		}
	})

	t.Run("sudo-needs-password", func(t *testing.T) {
		inv := writeInventory(t, s, func(inv *inventory.Inventory) { inv.Hosts[1].User = lab.NoPasswordUser })
		r := runKpfree(t, bin, "preflight", "--nodes", inv, "-o", "json")
		p := parsePreflight(t, r)
		if r.code != 1 {
			t.Fatalf("exit %d, want 1; stderr:\n%s", r.code, r.stderr)
		}
		assertReached(t, p, "node1", "node3")
		st, seen := p.finding("node2", "ssh.reachable")
		if st != "fail" || !strings.Contains(seen, "passwordless sudo") || !strings.Contains(seen, lab.NoPasswordUser) {
			t.Errorf("node2 ssh.reachable = %s %q, want a fail naming the user and passwordless sudo", st, seen)
		}
	})

	t.Run("unreachable-host", func(t *testing.T) {
		// An address in the lab subnet that no node has: only that host
		// fails, within its connect timeout.
		ghost := s.Subnet.Addr().As4()
		ghost[3] = 250
		inv := writeInventory(t, s, func(inv *inventory.Inventory) {
			inv.SSH.ConnectTimeout = inventory.Duration{Duration: 2 * time.Second}
			inv.Hosts = append(inv.Hosts, inventory.Host{Name: "ghost", Address: netip.AddrFrom4(ghost).String(), Role: inventory.RoleWorker})
		})
		r := runKpfree(t, bin, "preflight", "--nodes", inv, "-o", "json")
		p := parsePreflight(t, r)
		if r.code != 1 {
			t.Fatalf("exit %d, want 1; stderr:\n%s", r.code, r.stderr)
		}
		assertReached(t, p, "node1", "node2", "node3")
		if st, seen := p.finding("ghost", "ssh.reachable"); st != "fail" || !strings.Contains(seen, "198.19.") {
			t.Errorf("ghost ssh.reachable = %s %q", st, seen)
		}
		// Connect timeout 2 s, plus the other hosts' checks: well under 2x.
		if r.elapsed > 6*time.Second {
			t.Errorf("took %s with a 2s connect timeout", r.elapsed)
		}
		t.Logf("preflight with an unreachable host took %s", r.elapsed)
	})

	t.Run("bastion", func(t *testing.T) {
		// node3 drops SSH from the host (the lab gateway): reachable only
		// through node1.
		rules := "table inet kpfreetest {\n chain input {\n  type filter hook input priority 0;\n  ip saddr " +
			s.Gateway.String() + " tcp dport 22 drop\n }\n}\n"
		if out, err := s.ExecInput(context.Background(), "node3", []byte(rules), "nft", "-f", "-"); err != nil {
			t.Fatalf("nft: %v %s", err, out)
		}
		defer s.Exec(context.Background(), "node3", "nft", "delete", "table", "inet", "kpfreetest")

		direct := writeInventory(t, s, func(inv *inventory.Inventory) {
			inv.SSH.ConnectTimeout = inventory.Duration{Duration: 2 * time.Second}
		})
		r := runKpfree(t, bin, "preflight", "--nodes", direct, "-o", "json")
		p := parsePreflight(t, r)
		if st, seen := p.finding("node3", "ssh.reachable"); r.code != 1 || st != "fail" || !strings.Contains(seen, "timed out") {
			t.Fatalf("direct to a filtered node3: exit %d, ssh.reachable %s %q", r.code, st, seen)
		}
		if r.elapsed > 6*time.Second {
			t.Errorf("filtered host took %s with a 2s connect timeout", r.elapsed)
		}

		via := writeInventory(t, s, func(inv *inventory.Inventory) {
			inv.Hosts[2].Bastion = &inventory.Endpoint{Address: inv.Hosts[0].Address}
		})
		r = runKpfree(t, bin, "preflight", "--nodes", via, "-o", "json")
		p = parsePreflight(t, r)
		if r.code != 0 {
			t.Fatalf("through the bastion: exit %d; stderr:\n%s", r.code, r.stderr)
		}
		assertReached(t, p, "node1", "node2", "node3")
	})

	t.Run("changed-host-key", func(t *testing.T) {
		if err := s.RotateHostKey(context.Background(), "node2"); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := s.WriteKnownHosts(); err != nil {
				t.Error(err)
			}
		}()
		r := runKpfree(t, bin, "preflight", "--nodes", s.InventoryFile(), "-o", "json")
		p := parsePreflight(t, r)
		if r.code != 1 {
			t.Fatalf("exit %d, want 1; stderr:\n%s", r.code, r.stderr)
		}
		assertReached(t, p, "node1", "node3")
		st, seen := p.finding("node2", "ssh.reachable")
		if st != "fail" || !strings.Contains(seen, "changed") || !strings.Contains(seen, s.KnownHostsFile()) {
			t.Errorf("node2 ssh.reachable = %s %q, want a refusal naming the changed key and the known_hosts file", st, seen)
		}
	})
}

func TestIntegrationBadInventoryExits2(t *testing.T) {
	labtest.Skip(t)
	bin := labtest.KpfreeBin(t)
	p := filepath.Join(t.TempDir(), "hosts.yaml")
	os.WriteFile(p, []byte("apiVersion: kpfree.io/v1alpha1\nkind: Inventory\nhosts:\n  - name: a\n    address: 10.0.0.300\n    role: control-plane\n"), 0o600)
	r := runKpfree(t, bin, "preflight", "--nodes", p)
	if r.code != 2 || !strings.Contains(r.stderr, "hosts.yaml:5:") || !strings.Contains(r.stderr, "address") {
		t.Fatalf("exit %d, stderr %q: want 2 and an error naming line 5 and the field", r.code, r.stderr)
	}
	if r.stdout != "" {
		t.Errorf("stdout should be empty on a usage error, got %q", r.stdout)
	}
}
