package devices

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func addrs(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, x := range s {
		out = append(out, netip.MustParseAddr(x))
	}
	return out
}

var cmpAddr = cmp.Comparer(func(a, b netip.Addr) bool { return a == b })

func TestChoose(t *testing.T) {
	links := []link{
		{name: "lo", index: 1, up: true, loopback: true, addrs: addrs("127.0.0.1")},
		{name: "eth1", index: 3, up: true, addrs: addrs("2001:db8::b", "198.18.6.2", "10.0.0.7")},
		{name: "eth0", index: 2, up: true, addrs: addrs("198.18.5.2"), defaultRoute: []string{"IPv4", "IPv6"}},
		{name: "eth2", index: 4, up: false, addrs: addrs("198.18.7.2"), defaultRoute: []string{"IPv4"}},
		{name: "ll0", index: 5, up: true, defaultRoute: []string{"IPv6"}},
		{name: "br0", index: 6, up: true, addrs: addrs("10.244.0.1")},
		{name: "veth1", index: 7, up: true, enslaved: true},
		{name: "bond0s", index: 8, up: true, enslaved: true, addrs: addrs("198.18.6.9")},
	}
	tests := []struct {
		name    string
		spec    []string
		nodeIPs []netip.Addr
		want    []Device
		err     []string
	}{
		{
			name: "auto", nodeIPs: addrs("198.18.6.2", "198.18.6.9"),
			want: []Device{
				{Name: "eth0", Index: 2, Addrs: addrs("198.18.5.2"), Reason: "carries the IPv4 and IPv6 default route"},
				{Name: "eth1", Index: 3, Addrs: addrs("10.0.0.7", "198.18.6.2", "2001:db8::b"), NodeIPs: addrs("198.18.6.2"), Reason: "holds node IP 198.18.6.2"},
			},
		},
		{
			name: "auto, node IP given as IPv4-mapped IPv6", nodeIPs: addrs("::ffff:198.18.5.2"),
			want: []Device{
				{Name: "eth0", Index: 2, Addrs: addrs("198.18.5.2"), NodeIPs: addrs("198.18.5.2"), Reason: "holds node IP 198.18.5.2"},
			},
		},
		{
			name: "glob skips down and enslaved devices", spec: []string{"eth*", "b*"},
			want: []Device{
				{Name: "br0", Index: 6, Addrs: addrs("10.244.0.1"), Reason: "matches b*"},
				{Name: "eth0", Index: 2, Addrs: addrs("198.18.5.2"), Reason: "matches eth*"},
				{Name: "eth1", Index: 3, Addrs: addrs("10.0.0.7", "198.18.6.2", "2001:db8::b"), Reason: "matches eth*"},
			},
		},
		{
			name: "a plain name takes a down device; duplicates once", spec: []string{"eth2", "eth?", "eth2"},
			want: []Device{
				{Name: "eth0", Index: 2, Addrs: addrs("198.18.5.2"), Reason: "matches eth?"},
				{Name: "eth1", Index: 3, Addrs: addrs("10.0.0.7", "198.18.6.2", "2001:db8::b"), Reason: "matches eth?"},
				{Name: "eth2", Index: 4, Addrs: addrs("198.18.7.2"), Reason: "named"},
			},
		},
		{
			name: "unknown names", spec: []string{"eth0", "wlan0", "ens*"},
			err: []string{`no device matches "wlan0", "ens*"`, "existing devices: bond0s, br0, eth0, eth1, eth2 (down), ll0, lo, veth1"},
		},
		{
			name: "bad glob", spec: []string{"eth["},
			err: []string{`bad device pattern "eth["`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := choose(append([]link(nil), links...), tt.spec, tt.nodeIPs)
			if len(tt.err) > 0 {
				if err == nil {
					t.Fatalf("no error, got %+v", got)
				}
				for _, w := range tt.err {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q lacks %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got, cmpAddr); diff != "" {
				t.Errorf("selection (-want +got):\n%s", diff)
			}
		})
	}
}

func TestChooseNothingInAuto(t *testing.T) {
	_, err := choose([]link{{name: "lo", up: true, loopback: true, addrs: addrs("127.0.0.1")}, {name: "br0", up: true, addrs: addrs("10.244.0.1")}}, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "name the devices explicitly (existing: br0, lo)") {
		t.Fatalf("err = %v", err)
	}
}

func TestNodeAddrsAndSNAT(t *testing.T) {
	devs := []Device{
		{Name: "eth0", Addrs: addrs("198.18.5.2", "198.18.5.3", "2001:db8::2")},
		{Name: "eth1", Addrs: addrs("10.0.0.7", "198.18.5.3"), NodeIPs: addrs("198.18.5.3")},
	}
	if diff := cmp.Diff(addrs("10.0.0.7", "198.18.5.2", "198.18.5.3", "2001:db8::2"), NodeAddrs(devs), cmpAddr); diff != "" {
		t.Errorf("NodeAddrs (-want +got):\n%s", diff)
	}
	if v4, v6 := SNATAddrs(devs[0]); v4 != netip.MustParseAddr("198.18.5.2") || v6 != netip.MustParseAddr("2001:db8::2") {
		t.Errorf("SNATAddrs(eth0) = %v, %v", v4, v6)
	}
	if v4, v6 := SNATAddrs(devs[1]); v4 != netip.MustParseAddr("198.18.5.3") || v6.IsValid() {
		t.Errorf("SNATAddrs(eth1) = %v, %v; want the node IP and no IPv6", v4, v6)
	}
	if !Equal(devs, []Device{devs[0], devs[1]}) || Equal(devs, devs[:1]) {
		t.Error("Equal")
	}
	changed := []Device{devs[0], {Name: "eth1", Addrs: addrs("10.0.0.7"), NodeIPs: addrs("198.18.5.3")}}
	if Equal(devs, changed) {
		t.Error("Equal ignores a removed address")
	}
}
