package inventory

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// oneHost ends a file that has no other mistake in its hosts.
const oneHost = `hosts:
  - name: cp1
    address: 10.0.0.1
    role: control-plane
`

// mistakes are inventories with one kind of error each, and the exact error
// Parse must return for them (file "hosts.yaml"). FuzzParse uses them as
// seeds too.
var mistakes = []struct {
	name string
	yaml string
	want string // one line per *Error
}{
	{
		name: "empty file",
		yaml: ``,
		want: `hosts.yaml:1:1: file is empty: expected apiVersion, kind, cluster, ssh and hosts`,
	},
	{
		name: "only comments",
		yaml: "# nothing yet\n",
		want: `hosts.yaml:1:1: file is empty: expected apiVersion, kind, cluster, ssh and hosts`,
	},
	{
		name: "tab indentation",
		yaml: "apiVersion: kpfree.io/v1alpha1\nkind: Inventory\nhosts:\n\t- name: cp1\n",
		want: `hosts.yaml:4:1: invalid YAML: found character '	' that cannot start any token`,
	},
	{
		name: "unclosed flow list",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts: [
`,
		want: `hosts.yaml:3:8: invalid YAML: sequence end token ']' not found`,
	},
	{
		name: "several documents",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
---
hosts: []
`,
		want: `hosts.yaml:4:1: only one YAML document is allowed`,
	},
	{
		name: "top level is a list",
		yaml: `- name: cp1
`,
		want: `hosts.yaml:1:1: top level: expected a mapping with apiVersion, kind, cluster, ssh, hosts, got a list`,
	},
	{
		name: "missing apiVersion and kind",
		yaml: `hosts:
  - name: cp1
    address: 10.0.0.1
    role: control-plane
`,
		want: `hosts.yaml:1:1: apiVersion: missing; the first lines must be "apiVersion: kpfree.io/v1alpha1" and "kind: Inventory"
hosts.yaml:1:1: kind: missing; set "kind: Inventory"`,
	},
	{
		name: "wrong apiVersion and kind",
		yaml: `apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
hosts:
  - name: cp1
    address: 10.0.0.1
    role: control-plane
`,
		want: `hosts.yaml:1:13: apiVersion: "kubeadm.k8s.io/v1beta4" is not supported; use "kpfree.io/v1alpha1"
hosts.yaml:2:7: kind: "ClusterConfiguration" is not supported; use "Inventory"`,
	},
	{
		name: "unknown top-level field",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
host:
  - name: cp1
`,
		want: `hosts.yaml:3:1: host: unknown field (did you mean "hosts"?)`,
	},
	{
		name: "unknown host field",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts:
  - name: cp1
    adress: 10.0.0.1
    role: control-plane
`,
		want: `hosts.yaml:5:5: hosts[0].adress: unknown field (did you mean "address"?)`,
	},
	{
		name: "unknown nested field without a close match",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
ssh:
  bastion:
    address: 10.0.0.254
    password: hunter2
`,
		want: `hosts.yaml:6:5: ssh.bastion.password: unknown field; known fields: address, port, user, identityFile`,
	},
	{
		name: "duplicate key",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts:
  - name: cp1
    address: 10.0.0.1
    role: worker
    role: control-plane
`,
		want: `hosts.yaml:7:5: hosts[0].role: duplicate key (first set on line 6)`,
	},
	{
		name: "string where an integer is expected",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
ssh:
  port: "22"
`,
		want: `hosts.yaml:4:9: ssh.port: expected an integer, got the string "22"`,
	},
	{
		name: "integer out of range",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
ssh:
  port: 99999999999
`,
		want: `hosts.yaml:4:9: ssh.port: 99999999999 is out of range`,
	},
	{
		name: "list where a mapping is expected",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster: [a, b]
`,
		want: `hosts.yaml:3:10: cluster: expected a mapping with name, kubernetesVersion, podCIDR, serviceCIDR, controlPlaneEndpoint, got a list`,
	},
	{
		name: "string where a boolean is expected",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
ssh:
  useAgent: "yes"
`,
		want: `hosts.yaml:4:13: ssh.useAgent: expected true or false, got the string "yes"`,
	},
	{
		name: "control character",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
ssh:
  identityFile: "/keys/id\tab"
` + oneHost,
		want: `hosts.yaml:4:17: ssh.identityFile: "/keys/id\tab" contains a control character or invalid UTF-8`,
	},
	{
		name: "user with a space",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts:
  - name: cp1
    address: 10.0.0.1
    role: control-plane
    user: core os
`,
		want: `hosts.yaml:7:11: hosts[0].user: "core os" is not a user name: it contains a space`,
	},
	{
		name: "anchors and aliases",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
ssh:
  user: &u admin
  bastion:
    address: 10.0.0.254
    user: *u
`,
		want: `hosts.yaml:4:9: ssh.user: YAML anchors, aliases, merge keys and tags are not supported
hosts.yaml:7:11: ssh.bastion.user: YAML anchors, aliases, merge keys and tags are not supported`,
	},
	{
		name: "missing hosts",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster:
  name: lab
`,
		want: `hosts.yaml:1:1: hosts: no hosts: list at least one control-plane host`,
	},
	{
		name: "empty hosts",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts: []
`,
		want: `hosts.yaml:3:8: hosts: no hosts: list at least one control-plane host`,
	},
	{
		name: "missing host name and address",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts:
  - name: cp1
    address: 10.0.0.1
    role: control-plane
  - role: worker
`,
		want: `hosts.yaml:7:5: hosts[1].name: missing
hosts.yaml:7:5: hosts[1].address: missing`,
	},
	{
		name: "host name not a DNS-1123 label",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts:
  - name: CP_1
    address: 10.0.0.1
    role: control-plane
`,
		want: `hosts.yaml:4:11: hosts[0].name: "CP_1" is not a valid host name: use at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit`,
	},
	{
		name: "duplicate host name",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts:
  - name: cp1
    address: 10.0.0.1
    role: control-plane
  - name: cp1
    address: 10.0.0.2
    role: worker
`,
		want: `hosts.yaml:7:11: hosts[1].name: "cp1" is already used by hosts[0] (line 4)`,
	},
	{
		name: "bad address",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts:
  - name: cp1
    address: 10.0.0.1
    role: control-plane
  - name: w1
    address: 10.0.0.2
    role: worker
  - name: w2
    address: 10.0.0.300
    role: worker
`,
		want: `hosts.yaml:11:14: hosts[2].address: "10.0.0.300" is not an IP address or hostname`,
	},
	{
		name: "address with a port",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts:
  - name: cp1
    address: node1.example.com:2222
    role: control-plane
`,
		want: `hosts.yaml:5:14: hosts[0].address: "node1.example.com:2222" is not an IP address or hostname: write the port in the port field`,
	},
	{
		name: "duplicate address",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts:
  - name: cp1
    address: fd00::1
    role: control-plane
  - name: w1
    address: fd00:0::1
    role: worker
`,
		want: `hosts.yaml:8:14: hosts[1].address: "fd00:0::1" is already used by hosts[0] (cp1)`,
	},
	{
		name: "bad and missing role",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts:
  - name: cp1
    address: 10.0.0.1
    role: master
  - name: w1
    address: 10.0.0.2
`,
		want: `hosts.yaml:4:3: hosts: no host has role control-plane; at least one is needed
hosts.yaml:6:11: hosts[0].role: "master" is not a role; use control-plane or worker
hosts.yaml:7:5: hosts[1].role: missing; set control-plane or worker`,
	},
	{
		name: "no control plane",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts:
  - name: w1
    address: 10.0.0.1
    role: worker
`,
		want: `hosts.yaml:4:3: hosts: no host has role control-plane; at least one is needed`,
	},
	{
		name: "bad ports",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
ssh:
  port: 0
hosts:
  - name: cp1
    address: 10.0.0.1
    role: control-plane
    port: 65536
    bastion:
      address: 10.0.0.254
      port: -22
`,
		want: `hosts.yaml:4:9: ssh.port: 0 is not a port: use 1 to 65535
hosts.yaml:9:11: hosts[0].port: 65536 is not a port: use 1 to 65535
hosts.yaml:12:13: hosts[0].bastion.port: -22 is not a port: use 1 to 65535`,
	},
	{
		name: "bad pod CIDR",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster:
  podCIDR: 10.244.0.0/33
` + oneHost,
		want: `hosts.yaml:4:12: cluster.podCIDR: "10.244.0.0/33" is not a CIDR such as 10.244.0.0/16`,
	},
	{
		name: "service CIDR with host bits",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster:
  serviceCIDR: 10.96.0.1/12
` + oneHost,
		want: `hosts.yaml:4:16: cluster.serviceCIDR: "10.96.0.1/12" has host bits set; did you mean 10.96.0.0/12?`,
	},
	{
		name: "overlapping CIDRs",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster:
  podCIDR: 10.0.0.0/8
  serviceCIDR: 10.96.0.0/12
` + oneHost,
		want: `hosts.yaml:5:16: cluster.serviceCIDR: 10.96.0.0/12 overlaps podCIDR 10.0.0.0/8`,
	},
	{
		name: "service CIDR overlapping the default pod CIDR",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster:
  serviceCIDR: 10.244.128.0/20
` + oneHost,
		want: `hosts.yaml:4:16: cluster.serviceCIDR: 10.244.128.0/20 overlaps podCIDR 10.244.0.0/16 (the default)`,
	},
	{
		name: "CIDRs of different IP families",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster:
  podCIDR: fd00:10:244::/56
` + oneHost,
		want: `hosts.yaml:4:12: cluster.podCIDR: fd00:10:244::/56 is not in the same IP family as serviceCIDR 10.96.0.0/12 (the default)`,
	},
	{
		name: "bad Kubernetes version",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster:
  kubernetesVersion: 1.34
` + oneHost,
		want: `hosts.yaml:4:22: cluster.kubernetesVersion: "1.34" is not a version such as v1.34.4 or v1.34`,
	},
	{
		name: "bad control-plane endpoint",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster:
  controlPlaneEndpoint: https://api.example.com:6443
` + oneHost,
		want: `hosts.yaml:4:25: cluster.controlPlaneEndpoint: "https://api.example.com:6443" is not host[:port], such as 10.0.0.10:6443 or [fd00::10]:6443`,
	},
	{
		name: "control-plane endpoint port out of range",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster:
  controlPlaneEndpoint: api.example.com:0
` + oneHost,
		want: `hosts.yaml:4:25: cluster.controlPlaneEndpoint: "api.example.com:0" has port "0": use 1 to 65535`,
	},
	{
		name: "bad durations",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
ssh:
  connectTimeout: 10
  commandTimeout: 10 minutes
`,
		want: `hosts.yaml:4:19: ssh.connectTimeout: expected a duration such as "10s" or "5m", got the number 10
hosts.yaml:5:19: ssh.commandTimeout: "10 minutes" is not a duration such as "10s" or "5m"`,
	},
	{
		name: "negative timeouts",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
ssh:
  connectTimeout: -5s
  commandTimeout: -1h
hosts:
  - name: cp1
    address: 10.0.0.1
    role: control-plane
`,
		want: `hosts.yaml:4:19: ssh.connectTimeout: -5s must not be negative
hosts.yaml:5:19: ssh.commandTimeout: -1h0m0s must not be negative`,
	},
	{
		name: "bastion without address",
		yaml: `apiVersion: kpfree.io/v1alpha1
kind: Inventory
ssh:
  bastion:
    user: jump
hosts:
  - name: cp1
    address: 10.0.0.1
    role: control-plane
`,
		want: `hosts.yaml:5:5: ssh.bastion.address: missing: a bastion needs an address`,
	},
}

func TestParseMistakes(t *testing.T) {
	t.Setenv("HOME", "/home/test")
	for _, tc := range mistakes {
		t.Run(tc.name, func(t *testing.T) {
			inv, err := Parse("hosts.yaml", []byte(tc.yaml))
			if err == nil {
				t.Fatalf("Parse succeeded, want error:\n%s\ninventory: %+v", tc.want, inv)
			}
			if got := err.Error(); got != tc.want {
				t.Errorf("Parse error:\n%s\nwant:\n%s", got, tc.want)
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Errorf("error %T is not an *Error", err)
			}
		})
	}
}

func TestErrorFormat(t *testing.T) {
	e := &Error{File: "hosts.yaml", Line: 14, Column: 5, Field: "hosts[2].address", Msg: `"10.0.0.300" is not an IP address or hostname`}
	want := `hosts.yaml:14:5: hosts[2].address: "10.0.0.300" is not an IP address or hostname`
	if got := e.Error(); got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	e.Field = ""
	if got, want := e.Error(), `hosts.yaml:14:5: "10.0.0.300" is not an IP address or hostname`; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "hosts.yaml")
	data := "apiVersion: kpfree.io/v1alpha1\nkind: Inventory\nhosts:\n  - name: cp1\n    address: 10.0.0.1\n    role: control-plane\n"
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	inv, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if inv.Path != path {
		t.Errorf("Path = %q, want %q", inv.Path, path)
	}

	if _, err := Load(filepath.Join(dir, "missing.yaml")); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load of a missing file: %v, want a not-exist error", err)
	}

	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte(strings.Replace(data, "10.0.0.1", "10.0.0.300", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = Load(bad)
	if err == nil || !strings.HasPrefix(err.Error(), bad+":5:14: hosts[0].address: ") {
		t.Errorf("Load of a bad file: %v, want an error at %s:5:14", err, bad)
	}
}
