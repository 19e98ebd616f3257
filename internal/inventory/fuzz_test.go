package inventory

import (
	"cmp"
	"errors"
	"os"
	"strings"
	"testing"
)

// FuzzParse checks that Parse never panics, that every error it returns is
// an *Error in the file:line:col format, and that any inventory it accepts
// survives Marshal and Parse unchanged.
func FuzzParse(f *testing.F) {
	f.Setenv("HOME", "/home/fuzz")
	example, err := os.ReadFile(examplePath)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	f.Add([]byte("apiVersion: kpfree.io/v1alpha1\nkind: Inventory\n" + oneHost))
	f.Add([]byte(`{apiVersion: kpfree.io/v1alpha1, kind: Inventory, cluster: {name: "123"}, ssh: {port: 0x16, useAgent: false}, hosts: [{name: a, address: "::1", role: control-plane, bastion: {address: b}}]}`))
	f.Add([]byte(`apiVersion: "kpfree.io/v1alpha1"
kind: 'Inventory'
ssh:
  user: '.inf'
  identityFile: "/k\x41 "
  knownHostsFile: |-
    /kh
  connectTimeout: "1h0m0.5s"
` + oneHost))
	for _, m := range mistakes {
		f.Add([]byte(m.yaml))
	}

	f.Fuzz(func(t *testing.T, data []byte) {
		inv, err := Parse("fuzz.yaml", data)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error %T is not an *Error: %v", err, err)
			}
			for line := range strings.SplitSeq(err.Error(), "\n") {
				if !strings.HasPrefix(line, "fuzz.yaml:") {
					t.Fatalf("error line without file:line:col: %q", line)
				}
			}
			return
		}
		roundTrip(t, inv)
	})
}

// FuzzRoundTrip builds inventories from fuzzed field values: Marshal must
// write them so that Parse reads back the same strings (values that fail
// validation may be rejected, but never misread as another YAML type).
func FuzzRoundTrip(f *testing.F) {
	f.Setenv("HOME", "/home/fuzz")
	f.Add("cp1", "10.0.0.1", "root", "/keys/id", "v1.34.4", "api.example:6443", 22)
	f.Add("true", "null", ".inf", "/x\t", "1.34", "[::1]:6443", 0)
	f.Add("0x1f", "fd00::1", "'", "/a: b", "v1.35.0-rc.1", "~", 65536)
	f.Fuzz(func(t *testing.T, name, address, user, identityFile, version, endpoint string, port int) {
		inv := &Inventory{
			Cluster: Cluster{KubernetesVersion: version, ControlPlaneEndpoint: endpoint},
			SSH:     SSH{User: user, IdentityFile: "/" + identityFile, Port: port},
			Hosts:   []Host{{Name: name, Address: address, Role: RoleControlPlane}},
		}
		data, err := inv.Marshal()
		if err != nil {
			if !strings.Contains(err.Error(), "control character") {
				t.Fatalf("Marshal: %v", err)
			}
			return
		}
		got, err := Parse("fuzz.yaml", data)
		if err != nil {
			for line := range strings.SplitSeq(err.Error(), "\n") {
				misread := strings.Contains(line, "invalid YAML") || strings.Contains(line, ": expected ") ||
					strings.Contains(line, ": missing") && name != "" && address != ""
				if misread {
					t.Fatalf("Marshal wrote what Parse misreads: %s\n%s", line, data)
				}
			}
			return
		}
		h := got.Hosts[0]
		if h.Name != name || h.Address != address || got.SSH.User != cmp.Or(user, DefaultUser) ||
			got.SSH.IdentityFile != "/"+identityFile || got.Cluster.KubernetesVersion != cmp.Or(version, DefaultKubernetesVersion) {
			t.Fatalf("values changed:\n%s\ngot %+v", data, got)
		}
		roundTrip(t, got)
	})
}
