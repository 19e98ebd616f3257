package sysctl

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParsePorts(t *testing.T) {
	tests := []struct {
		in   string
		want []PortRange
		err  string
	}{
		{in: "\n"},
		{in: ""},
		{in: "8080\n", want: []PortRange{{8080, 8080}}},
		{in: "30000-32767,8080", want: []PortRange{{8080, 8080}, {30000, 32767}}},
		{in: " 1-3 , 4,10-12,11-20,65535", want: []PortRange{{1, 4}, {10, 20}, {65535, 65535}}},
		{in: "0-65535", want: []PortRange{{0, 65535}}},
		{in: "80,x", err: `bad port list entry "x"`},
		{in: "65536", err: `bad port list entry "65536": not a port`},
		{in: "90-80", err: "range ends before it starts"},
		{in: "80,,81", err: `bad port list entry ""`},
		{in: "1-2-3", err: `bad port list entry "1-2-3"`},
	}
	for _, tt := range tests {
		got, err := ParsePorts(tt.in)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("ParsePorts(%q) err = %v, want %q", tt.in, err, tt.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParsePorts(%q): %v", tt.in, err)
			continue
		}
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("ParsePorts(%q) (-want +got):\n%s", tt.in, diff)
		}
	}
}

func TestMergeAndFormat(t *testing.T) {
	np := PortRange{30000, 32767}
	tests := []struct {
		name    string
		have    string
		add     PortRange
		want    string
		changed bool
	}{
		{name: "empty", have: "", add: np, want: "30000-32767", changed: true},
		{name: "others kept", have: "8080,9000-9100", add: np, want: "8080,9000-9100,30000-32767", changed: true},
		{name: "already reserved", have: "8080,30000-32767", add: np, want: "8080,30000-32767"},
		{name: "inside a larger range", have: "20000-40000", add: np, want: "20000-40000"},
		{name: "overlap below", have: "29000-30500,32000", add: np, want: "29000-32767", changed: true},
		{name: "touching ranges join", have: "29999,32768-33000", add: np, want: "29999-33000", changed: true},
		{name: "partly reserved", have: "31000-31005", add: np, want: "30000-32767", changed: true},
		{name: "single port", have: "80", add: PortRange{81, 81}, want: "80-81", changed: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			have, err := ParsePorts(tt.have)
			if err != nil {
				t.Fatal(err)
			}
			got, changed := MergePorts(have, tt.add)
			if s := FormatPorts(got); s != tt.want || changed != tt.changed {
				t.Errorf("MergePorts(%q, %v) = %q, %v; want %q, %v", tt.have, tt.add, s, changed, tt.want, tt.changed)
			}
			// Nothing that was reserved is dropped.
			for _, r := range have {
				covered := false
				for _, m := range got {
					covered = covered || (m.Lo <= r.Lo && r.Hi <= m.Hi)
				}
				if !covered {
					t.Errorf("%v dropped", r)
				}
			}
		})
	}
}

func TestReserveInFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, ReservedPortsPath)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("8080\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	changed, err := ReserveNodePortRange(dir, 30000, 32767)
	if err != nil || !changed {
		t.Fatalf("first call: changed=%v err=%v", changed, err)
	}
	if b, _ := os.ReadFile(path); string(b) != "8080,30000-32767\n" {
		t.Errorf("file = %q", b)
	}
	// Nothing to add: no write. The file holds the same set spelt another
	// way, which a write would have normalized.
	if err := os.WriteFile(path, []byte("30000-32767, 8080\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if changed, err := ReserveNodePortRange(dir, 31000, 32767); err != nil || changed {
		t.Errorf("second call: changed=%v err=%v, want no write", changed, err)
	}
	if b, _ := os.ReadFile(path); string(b) != "30000-32767, 8080\n" {
		t.Errorf("file rewritten without a change: %q", b)
	}
	if _, err := ReserveNodePortRange(dir, 0, 10); err == nil {
		t.Error("range starting at 0 accepted")
	}
	if _, err := ReserveNodePortRange(dir, 10, 9); err == nil {
		t.Error("inverted range accepted")
	}
	if _, err := ReserveNodePortRange(filepath.Join(dir, "missing"), 1, 2); err == nil || !strings.Contains(err.Error(), "read reserved ports") {
		t.Errorf("missing file: err = %v", err)
	}
	if err := os.WriteFile(path, []byte("garbage\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := ReserveNodePortRange(dir, 1, 2); err == nil || !strings.Contains(err.Error(), `bad port list entry "garbage"`) {
		t.Errorf("garbage: err = %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "garbage\n" {
		t.Errorf("a file that cannot be parsed was overwritten: %q", b)
	}
}
