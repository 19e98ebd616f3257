package inventory

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
)

// Targets returns one Target per host, in file order: the shared ssh:
// settings with the host's overrides applied. A host's bastion, or else the
// shared one, becomes Target.Bastion; its user and identity file default to
// the shared ssh: ones (not the host's overrides).
func (inv *Inventory) Targets() []Target {
	targets := make([]Target, len(inv.Hosts))
	for i, h := range inv.Hosts {
		targets[i] = inv.target(h)
	}
	return targets
}

// ControlPlanes returns the Targets of the control-plane hosts, in file order.
func (inv *Inventory) ControlPlanes() []Target { return inv.withRole(RoleControlPlane) }

// Workers returns the Targets of the worker hosts, in file order.
func (inv *Inventory) Workers() []Target { return inv.withRole(RoleWorker) }

// FirstControlPlane returns the Target of the first control-plane host, the
// one that runs kubeadm init. A validated inventory always has one; an
// inventory without any gets the zero Target.
func (inv *Inventory) FirstControlPlane() Target {
	for _, h := range inv.Hosts {
		if h.Role == RoleControlPlane {
			return inv.target(h)
		}
	}
	return Target{}
}

func (inv *Inventory) withRole(r Role) []Target {
	var targets []Target
	for _, h := range inv.Hosts {
		if h.Role == r {
			targets = append(targets, inv.target(h))
		}
	}
	return targets
}

func (inv *Inventory) target(h Host) Target {
	s := inv.SSH
	t := Target{
		Name:              h.Name,
		Address:           h.Address,
		Role:              h.Role,
		Port:              first(h.Port, s.Port),
		User:              first(h.User, s.User),
		IdentityFile:      first(h.IdentityFile, s.IdentityFile),
		UseAgent:          s.UseAgent == nil || *s.UseAgent,
		KnownHostsFile:    s.KnownHostsFile,
		AcceptNewHostKeys: s.AcceptNewHostKeys,
		ConnectTimeout:    s.ConnectTimeout.Duration,
		CommandTimeout:    s.CommandTimeout.Duration,
	}
	if b := first(h.Bastion, s.Bastion); b != nil {
		bt := t                          // same agent, known_hosts and timeouts
		bt.Name = "bastion " + b.Address // as internal/ssh names them
		bt.Address = b.Address
		bt.Role = ""
		bt.Port = first(b.Port, DefaultPort)
		bt.User = first(b.User, s.User)
		bt.IdentityFile = first(b.IdentityFile, s.IdentityFile)
		t.Bastion = &bt
	}
	return t
}

// first returns a unless it is the zero value, else b.
func first[T comparable](a, b T) T {
	var zero T
	if a != zero {
		return a
	}
	return b
}

// Marshal writes the inventory as hosts.yaml, with apiVersion and kind, in a
// form Parse reads back. Fields left empty are left out and get their
// defaults when the file is parsed. A string with a control character or
// invalid UTF-8, which Parse would reject, is an error.
func (inv *Inventory) Marshal() ([]byte, error) {
	out := *inv
	out.APIVersion = APIVersion
	out.Kind = Kind
	if err := checkStrings(reflect.ValueOf(out), ""); err != nil {
		return nil, err
	}
	return yaml.MarshalWithOptions(&out, yaml.Indent(2), yaml.IndentSequence(true),
		yaml.CustomMarshaler[string](scalar),
		yaml.CustomMarshaler[Role](func(r Role) ([]byte, error) { return scalar(string(r)) }))
}

// scalar writes s plain when that reads back as the same string, else
// double-quoted: goccy/go-yaml's own choice misses cases such as "? x".
func scalar(s string) ([]byte, error) {
	if f, err := parser.ParseBytes([]byte(s), 0); err == nil && len(f.Docs) == 1 {
		if n, ok := f.Docs[0].Body.(*ast.StringNode); ok && n.Value == s {
			return []byte(s), nil
		}
	}
	// checkStrings has ruled out control characters and invalid UTF-8, so
	// Go's escapes are all valid in a YAML double-quoted scalar.
	return []byte(strconv.Quote(s)), nil
}

// checkStrings finds the strings Marshal must not write: goccy/go-yaml
// writes some of them in a form that reads back differently ("\r" becomes
// an empty block).
func checkStrings(v reflect.Value, path string) error {
	switch v.Kind() {
	case reflect.String:
		if s := v.String(); !utf8.ValidString(s) || strings.ContainsFunc(s, unicode.IsControl) {
			return fmt.Errorf("marshal inventory: %s: %q contains a control character or invalid UTF-8", path, s)
		}
	case reflect.Pointer:
		if !v.IsNil() {
			return checkStrings(v.Elem(), path)
		}
	case reflect.Slice:
		for i := range v.Len() {
			if err := checkStrings(v.Index(i), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case reflect.Struct:
		for i := range v.NumField() {
			name := yamlName(v.Type().Field(i))
			if name == "" {
				continue
			}
			if path != "" {
				name = path + "." + name
			}
			if err := checkStrings(v.Field(i), name); err != nil {
				return err
			}
		}
	}
	return nil
}
