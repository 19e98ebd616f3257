package inventory

import (
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

const examplePath = "../../docs/examples/hosts.yaml"

func ptr[T any](v T) *T { return &v }

func TestDefaults(t *testing.T) {
	t.Setenv("HOME", "/home/test")
	inv, err := Parse("/etc/kpfree/hosts.yaml", []byte(`apiVersion: kpfree.io/v1alpha1
kind: Inventory
hosts:
  - name: cp1
    address: fd00::11
    role: control-plane
  - name: w1
    address: fd00::21
    role: worker
`))
	if err != nil {
		t.Fatal(err)
	}
	want := &Inventory{
		APIVersion: APIVersion,
		Kind:       Kind,
		Cluster: Cluster{
			Name:                 "kpfree",
			KubernetesVersion:    "v1.34.4",
			PodCIDR:              "10.244.0.0/16",
			ServiceCIDR:          "10.96.0.0/12",
			ControlPlaneEndpoint: "[fd00::11]:6443",
		},
		SSH: SSH{
			User:           "root",
			Port:           22,
			UseAgent:       ptr(true),
			KnownHostsFile: "/home/test/.ssh/known_hosts",
			ConnectTimeout: Duration{10 * time.Second},
			CommandTimeout: Duration{10 * time.Minute},
		},
		Hosts: []Host{
			{Name: "cp1", Address: "fd00::11", Role: RoleControlPlane, Line: 4},
			{Name: "w1", Address: "fd00::21", Role: RoleWorker, Line: 7},
		},
	}
	if diff := cmp.Diff(want, inv); diff != "" {
		t.Errorf("defaults (-want +got):\n%s", diff)
	}
}

func TestPathsAndEndpoint(t *testing.T) {
	t.Setenv("HOME", "/home/test")
	inv, err := Parse("/etc/kpfree/hosts.yaml", []byte(`apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster:
  controlPlaneEndpoint: api.lab.example
ssh:
  identityFile: keys/id_ed25519
  knownHostsFile: /var/lib/kpfree/known_hosts
  useAgent: false
  bastion:
    address: jump.example
    identityFile: ~/.ssh/jump
hosts:
  - name: cp1
    address: 10.0.0.1
    role: control-plane
    identityFile: ~
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ field, got, want string }{
		{"cluster.controlPlaneEndpoint", inv.Cluster.ControlPlaneEndpoint, "api.lab.example:6443"},
		{"ssh.identityFile", inv.SSH.IdentityFile, "/etc/kpfree/keys/id_ed25519"},
		{"ssh.knownHostsFile", inv.SSH.KnownHostsFile, "/var/lib/kpfree/known_hosts"},
		{"ssh.bastion.identityFile", inv.SSH.Bastion.IdentityFile, "/home/test/.ssh/jump"},
		// "~" alone is YAML null: the host inherits the shared identity.
		{"hosts[0].identityFile", inv.Hosts[0].IdentityFile, ""},
	} {
		if c.got != c.want {
			t.Errorf("%s = %q, want %q", c.field, c.got, c.want)
		}
	}
	if *inv.SSH.UseAgent {
		t.Errorf("ssh.useAgent: false was overridden by the default")
	}
}

func TestHomeNotSet(t *testing.T) {
	t.Setenv("HOME", "")
	_, err := Parse("hosts.yaml", []byte("apiVersion: kpfree.io/v1alpha1\nkind: Inventory\n"+oneHost))
	want := `hosts.yaml:1:1: ssh.knownHostsFile: cannot expand "~/.ssh/known_hosts": $HOME is not set`
	if err == nil || err.Error() != want {
		t.Errorf("got %v, want %s", err, want)
	}
}

func TestTargets(t *testing.T) {
	t.Setenv("HOME", "/home/test")
	inv, err := Load(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	if inv.Path != examplePath || inv.Hosts[4].Line != 38 {
		t.Errorf("Path %q, hosts[4] on line %d; want %q, line 38", inv.Path, inv.Hosts[4].Line, examplePath)
	}

	bastion := &Target{
		Name: "bastion bastion.prod-eu1.example.com", Address: "bastion.prod-eu1.example.com", Port: 2222,
		User: "kpfree", IdentityFile: "/home/test/.ssh/kpfree_ed25519", UseAgent: true,
		KnownHostsFile: "/home/test/.ssh/known_hosts",
		ConnectTimeout: 15 * time.Second, CommandTimeout: 20 * time.Minute,
	}
	target := func(name, addr string, role Role) Target {
		return Target{
			Name: name, Address: addr, Role: role, Port: 22,
			User: "kpfree", IdentityFile: "/home/test/.ssh/kpfree_ed25519", UseAgent: true,
			KnownHostsFile: "/home/test/.ssh/known_hosts",
			ConnectTimeout: 15 * time.Second, CommandTimeout: 20 * time.Minute,
			Bastion: bastion,
		}
	}
	w2 := target("worker2", "10.10.1.22", RoleWorker)
	w2.User = "debian"
	w2.IdentityFile = "/home/test/.ssh/legacy_rsa" // the bastion keeps the shared key
	cps := []Target{
		target("cp1", "10.10.0.11", RoleControlPlane),
		target("cp2", "10.10.0.12", RoleControlPlane),
		target("cp3", "10.10.0.13", RoleControlPlane),
	}
	workers := []Target{target("worker1", "10.10.1.21", RoleWorker), w2}

	if diff := cmp.Diff(append(append([]Target{}, cps...), workers...), inv.Targets()); diff != "" {
		t.Errorf("Targets (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(cps, inv.ControlPlanes()); diff != "" {
		t.Errorf("ControlPlanes (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(workers, inv.Workers()); diff != "" {
		t.Errorf("Workers (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(cps[0], inv.FirstControlPlane()); diff != "" {
		t.Errorf("FirstControlPlane (-want +got):\n%s", diff)
	}
	if got := (&Inventory{}).FirstControlPlane(); got != (Target{}) {
		t.Errorf("FirstControlPlane of an empty inventory = %+v, want the zero Target", got)
	}
}

func TestHostBastionOverride(t *testing.T) {
	t.Setenv("HOME", "/home/test")
	inv, err := Parse("/inv/hosts.yaml", []byte(`apiVersion: kpfree.io/v1alpha1
kind: Inventory
ssh:
  user: admin
  bastion:
    address: 192.0.2.1
hosts:
  - name: cp1
    address: 10.0.0.1
    role: control-plane
    port: 2200
    user: core
  - name: edge
    address: 10.9.0.1
    role: worker
    bastion:
      address: 192.0.2.99
      user: jump
      identityFile: jump_key
`))
	if err != nil {
		t.Fatal(err)
	}
	targets := inv.Targets()
	cp, edge := targets[0], targets[1]
	if cp.Port != 2200 || cp.User != "core" || cp.Bastion == nil ||
		cp.Bastion.Address != "192.0.2.1" || cp.Bastion.User != "admin" || cp.Bastion.Port != 22 {
		t.Errorf("cp1 = %+v, bastion %+v", cp, cp.Bastion)
	}
	if edge.Port != 22 || edge.User != "admin" || edge.Bastion == nil ||
		edge.Bastion.Address != "192.0.2.99" || edge.Bastion.User != "jump" || edge.Bastion.IdentityFile != "/inv/jump_key" {
		t.Errorf("edge = %+v, bastion %+v", edge, edge.Bastion)
	}
}

// roundTrip checks that Marshal writes what Parse reads back unchanged.
func roundTrip(t testing.TB, inv *Inventory) {
	t.Helper()
	data, err := inv.Marshal()
	if err != nil {
		t.Fatalf("Marshal: %v", err)
	}
	again, err := Parse("hosts.yaml", data)
	if err != nil {
		t.Fatalf("Parse of Marshal output: %v\n%s", err, data)
	}
	opts := cmp.Options{
		cmpopts.IgnoreFields(Inventory{}, "Path"),
		cmpopts.IgnoreFields(Host{}, "Line"),
	}
	if diff := cmp.Diff(inv, again, opts); diff != "" {
		t.Fatalf("round trip (-before +after):\n%s\n%s", diff, data)
	}
}

func TestMarshalRoundTrip(t *testing.T) {
	t.Setenv("HOME", "/home/test")
	inv, err := Load(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	roundTrip(t, inv)
}

// TestMarshalBuilt covers the lab's use: an Inventory built in code, with
// only the fields it cares about, written as hosts.yaml.
func TestMarshalBuilt(t *testing.T) {
	t.Setenv("HOME", "/home/test")
	built := &Inventory{
		SSH: SSH{User: "root", Port: 2222, IdentityFile: "/tmp/lab/id_ed25519", KnownHostsFile: "/tmp/lab/known_hosts", AcceptNewHostKeys: true},
		Hosts: []Host{
			{Name: "node1", Address: "198.18.0.11", Role: RoleControlPlane},
			{Name: "node2", Address: "198.18.0.12", Role: RoleWorker},
		},
	}
	data, err := built.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	want := `apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster: {}
ssh:
  user: root
  port: 2222
  identityFile: /tmp/lab/id_ed25519
  knownHostsFile: /tmp/lab/known_hosts
  acceptNewHostKeys: true
hosts:
  - name: node1
    address: 198.18.0.11
    role: control-plane
  - name: node2
    address: 198.18.0.12
    role: worker
`
	if diff := cmp.Diff(want, string(data)); diff != "" {
		t.Errorf("Marshal (-want +got):\n%s", diff)
	}
	inv, err := Parse("hosts.yaml", data)
	if err != nil {
		t.Fatal(err)
	}
	if got := inv.FirstControlPlane(); got.Address != "198.18.0.11" || got.Port != 2222 || !got.AcceptNewHostKeys {
		t.Errorf("FirstControlPlane = %+v", got)
	}
	roundTrip(t, inv)
}

func TestDurationMarshal(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0:                                  "0s",
		10 * time.Second:                   "10s",
		20 * time.Minute:                   "20m",
		90 * time.Second:                   "1m30s",
		2 * time.Hour:                      "2h",
		time.Hour + 30*time.Minute:         "1h30m",
		time.Hour + 10*time.Second:         "1h0m10s",
		1500 * time.Millisecond:            "1.5s",
		-(time.Hour + 30*time.Minute):      "-1h30m",
		time.Minute + 500*time.Microsecond: "1m0.0005s",
	} {
		got, err := Duration{d}.MarshalYAML()
		if err != nil || got != want {
			t.Errorf("Duration{%v}.MarshalYAML() = %v, %v; want %q", d, got, err, want)
		}
	}
}

// TestMarshalQuoting writes strings that YAML would read as another type or
// as syntax, and checks that they come back as the same strings.
func TestMarshalQuoting(t *testing.T) {
	t.Setenv("HOME", "/home/test")
	// Valid as host names, addresses and versions, but YAML would read them
	// as booleans, numbers or null when written without quotes.
	for _, s := range []string{"true", "false", "null", "yes", "on", "123", "1e3", "0x1f", "0o17", "0b1", "1-2"} {
		inv := &Inventory{Hosts: []Host{{Name: s, Address: s, Role: RoleControlPlane}}}
		if _, err := Parse("hosts.yaml", mustMarshal(t, inv)); err != nil && !isAddressError(err) {
			t.Errorf("%q: %v", s, err)
		}
	}
	// The user is hardly validated: anything without spaces must survive.
	for _, s := range []string{"~", "null", "true", "12", "1.5", ".inf", "-x", "a:b", "#x", "'", `"`, "é", "{}", "[]", "*x", "&x", "!x", "%x", "@x", "`x", "|", ">", "---x", "..."} {
		inv := &Inventory{SSH: SSH{User: s}, Hosts: []Host{{Name: "cp1", Address: "10.0.0.1", Role: RoleControlPlane}}}
		got, err := Parse("hosts.yaml", mustMarshal(t, inv))
		if err != nil {
			t.Errorf("user %q: %v\n%s", s, err, mustMarshal(t, inv))
			continue
		}
		if got.SSH.User != s {
			t.Errorf("user %q came back as %q\n%s", s, got.SSH.User, mustMarshal(t, inv))
		}
	}
	// File paths are absolute after Parse, but may hold spaces.
	for _, s := range []string{"/a b", "/x ", "/ ", "/a: b", "/ #x", "/'", `/"`} {
		inv := &Inventory{SSH: SSH{IdentityFile: s}, Hosts: []Host{{Name: "cp1", Address: "10.0.0.1", Role: RoleControlPlane}}}
		got, err := Parse("hosts.yaml", mustMarshal(t, inv))
		if err != nil {
			t.Errorf("identityFile %q: %v\n%s", s, err, mustMarshal(t, inv))
			continue
		}
		if got.SSH.IdentityFile != s {
			t.Errorf("identityFile %q came back as %q\n%s", s, got.SSH.IdentityFile, mustMarshal(t, inv))
		}
	}
}

func mustMarshal(t *testing.T, inv *Inventory) []byte {
	t.Helper()
	data, err := inv.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// isAddressError allows names such as "123" that are not valid addresses.
func isAddressError(err error) bool {
	return strings.Contains(err.Error(), "is not an IP address or hostname")
}

// TestDocs checks that docs/inventory.md documents every field and that its
// YAML examples parse.
func TestDocs(t *testing.T) {
	t.Setenv("HOME", "/home/test")
	doc, err := os.ReadFile("../../docs/inventory.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range []reflect.Type{reflect.TypeFor[Inventory](), reflect.TypeFor[Cluster](), reflect.TypeFor[SSH](), reflect.TypeFor[Endpoint](), reflect.TypeFor[Host]()} {
		for _, name := range fieldNames(typ) {
			if !strings.Contains(string(doc), "| `"+name+"` |") {
				t.Errorf("docs/inventory.md has no table row for %s.%s", typ.Name(), name)
			}
		}
	}
	blocks := strings.Split(string(doc), "```yaml\n")[1:]
	if len(blocks) == 0 {
		t.Fatal("no yaml example in docs/inventory.md")
	}
	for _, b := range blocks {
		example, _, _ := strings.Cut(b, "```")
		if _, err := Parse("inventory.md", []byte(example)); err != nil {
			t.Errorf("example does not parse: %v\n%s", err, example)
		}
	}
}
