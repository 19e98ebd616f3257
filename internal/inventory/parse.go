package inventory

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"reflect"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/goccy/go-yaml"
	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
)

// Error is one problem in an inventory file. It prints as
// "hosts.yaml:14:5: hosts[2].address: message".
type Error struct {
	File   string
	Line   int
	Column int
	Field  string // YAML path such as "hosts[2].address"; "" for syntax errors
	Msg    string
}

func (e *Error) Error() string {
	if e.Field == "" {
		return fmt.Sprintf("%s:%d:%d: %s", e.File, e.Line, e.Column, e.Msg)
	}
	return fmt.Sprintf("%s:%d:%d: %s: %s", e.File, e.Line, e.Column, e.Field, e.Msg)
}

// Load reads, validates and defaults the inventory at path.
func Load(path string) (*Inventory, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read inventory: %w", err)
	}
	inv, err := Parse(path, data)
	if err != nil {
		return nil, err
	}
	inv.Path = path
	return inv, nil
}

// Parse decodes data strictly, validates it and applies the defaults. name is
// used in error messages, and its directory is the base of relative file
// paths in the inventory. Every problem found is reported, sorted by
// position; each is an *Error (use errors.As).
func Parse(name string, data []byte) (*Inventory, error) {
	var inv Inventory
	d := &decoder{file: name, pos: map[string]pos{}}
	d.document(data, &inv)
	if len(d.errs) == 0 {
		d.validate(&inv)
	}
	if len(d.errs) == 0 {
		d.applyDefaults(&inv, name)
	}
	if len(d.errs) > 0 {
		slices.SortStableFunc(d.errs, func(a, b *Error) int {
			return cmp.Or(cmp.Compare(a.Line, b.Line), cmp.Compare(a.Column, b.Column))
		})
		errs := make([]error, len(d.errs))
		for i, e := range d.errs {
			errs[i] = e
		}
		return nil, errors.Join(errs...)
	}
	return &inv, nil
}

type pos struct{ line, col int }

// decoder walks the goccy/go-yaml AST into the inventory types, using their
// yaml tags, and remembers where each field was written so that validation
// errors can point at it.
type decoder struct {
	file string
	pos  map[string]pos // YAML path -> position of its value
	errs []*Error
}

// errorf records a problem at an explicit position.
func (d *decoder) errorf(p pos, field, format string, args ...any) {
	d.errs = append(d.errs, &Error{File: d.file, Line: p.line, Column: p.col, Field: field, Msg: fmt.Sprintf(format, args...)})
}

// fieldf records a problem with field, at the field's position or, when it
// was not written in the file, at its nearest written parent.
func (d *decoder) fieldf(field, format string, args ...any) {
	d.errorf(d.at(field), field, format, args...)
}

func (d *decoder) at(path string) pos {
	for path != "" {
		if p, ok := d.pos[path]; ok {
			return p
		}
		i := strings.LastIndexAny(path, ".[")
		if i < 0 {
			break
		}
		path = path[:i]
	}
	return pos{1, 1}
}

// isSet reports whether path was written in the file (even as an empty value).
func (d *decoder) isSet(path string) bool {
	_, ok := d.pos[path]
	return ok
}

func position(n ast.Node) pos {
	if m, ok := n.(*ast.MappingNode); ok && len(m.Values) > 0 {
		n = m.Values[0].Key
	}
	if tk := n.GetToken(); tk != nil && tk.Position != nil {
		return pos{tk.Position.Line, tk.Position.Column}
	}
	return pos{1, 1}
}

func (d *decoder) document(data []byte, inv *Inventory) {
	// Duplicate keys are reported by the decoder, with the field's path.
	f, err := parser.ParseBytes(data, 0, parser.AllowDuplicateMapKey())
	if err != nil {
		var ye yaml.Error
		if errors.As(err, &ye) && ye.GetToken() != nil && ye.GetToken().Position != nil {
			p := ye.GetToken().Position
			d.errorf(pos{p.Line, p.Column}, "", "invalid YAML: %s", ye.GetMessage())
		} else {
			d.errorf(pos{1, 1}, "", "invalid YAML: %v", err)
		}
		return
	}
	var bodies []ast.Node
	for _, doc := range f.Docs {
		if doc.Body != nil {
			bodies = append(bodies, doc.Body)
		}
	}
	switch len(bodies) {
	case 0:
		d.errorf(pos{1, 1}, "", "file is empty: expected apiVersion, kind, cluster, ssh and hosts")
		return
	case 1:
	default:
		d.errorf(position(bodies[1]), "", "only one YAML document is allowed")
		return
	}
	d.decode(bodies[0], reflect.ValueOf(inv).Elem(), "")
	for i := range inv.Hosts {
		inv.Hosts[i].Line = d.at(fmt.Sprintf("hosts[%d]", i)).line
	}
}

var durationType = reflect.TypeFor[Duration]()

// decode stores node n in v. path is n's YAML path ("" for the top level).
func (d *decoder) decode(n ast.Node, v reflect.Value, path string) {
	name := path
	if name == "" {
		name = "top level"
	}
	switch n.(type) {
	case nil:
		return
	case *ast.AnchorNode, *ast.AliasNode, *ast.TagNode, *ast.MergeKeyNode:
		d.errorf(position(n), name, "YAML anchors, aliases, merge keys and tags are not supported")
		return
	}
	if path != "" {
		d.pos[path] = position(n)
	}
	if _, ok := n.(*ast.NullNode); ok {
		return // null leaves the zero value: the field counts as not set
	}
	t := v.Type()
	switch {
	case t == durationType:
		s, ok := n.(*ast.StringNode)
		if !ok {
			d.errorf(position(n), name, "expected a duration such as \"10s\" or \"5m\", got %s", describe(n))
			return
		}
		dur, err := time.ParseDuration(s.Value)
		if err != nil {
			d.errorf(position(n), name, "%q is not a duration such as \"10s\" or \"5m\"", s.Value)
			return
		}
		v.Set(reflect.ValueOf(Duration{dur}))
	case t.Kind() == reflect.Struct:
		d.mapping(n, v, path, name)
	case t.Kind() == reflect.Pointer:
		elem := reflect.New(t.Elem())
		before := len(d.errs)
		d.decode(n, elem.Elem(), path)
		if len(d.errs) == before {
			v.Set(elem)
		}
	case t.Kind() == reflect.Slice:
		seq, ok := n.(*ast.SequenceNode)
		if !ok {
			d.errorf(position(n), name, "expected a list, got %s", describe(n))
			return
		}
		s := reflect.MakeSlice(t, len(seq.Values), len(seq.Values))
		for i, item := range seq.Values {
			d.decode(item, s.Index(i), fmt.Sprintf("%s[%d]", path, i))
		}
		v.Set(s)
	case t.Kind() == reflect.String:
		var s string
		switch n := n.(type) {
		case *ast.StringNode:
			s = n.Value
		case *ast.LiteralNode: // a | or > block
			if n.Value != nil {
				s = n.Value.Value
			}
		case *ast.IntegerNode, *ast.FloatNode, *ast.InfinityNode, *ast.NanNode:
			// Written without quotes, such as a version "1.34": keep the
			// text and let validation judge it.
			s = n.GetToken().Value
		default:
			d.errorf(position(n), name, "expected a string, got %s", describe(n))
			return
		}
		// No field has a use for them, and YAML writers do not always
		// quote them (goccy/go-yaml leaves a trailing tab bare).
		if !utf8.ValidString(s) || strings.ContainsFunc(s, unicode.IsControl) {
			d.errorf(position(n), name, "%q contains a control character or invalid UTF-8", s)
			return
		}
		v.SetString(s)
	case t.Kind() == reflect.Int:
		i, ok := n.(*ast.IntegerNode)
		if !ok {
			d.errorf(position(n), name, "expected an integer, got %s", describe(n))
			return
		}
		var x int64
		switch val := i.Value.(type) {
		case int64:
			x = val
		case uint64:
			x = int64(min(val, 1<<31))
		default:
			d.errorf(position(n), name, "expected an integer, got %s", describe(n))
			return
		}
		if x < -1<<31 || x >= 1<<31 {
			d.errorf(position(n), name, "%s is out of range", i.GetToken().Value)
			return
		}
		v.SetInt(x)
	case t.Kind() == reflect.Bool:
		b, ok := n.(*ast.BoolNode)
		if !ok {
			d.errorf(position(n), name, "expected true or false, got %s", describe(n))
			return
		}
		v.SetBool(b.Value)
	default:
		panic(fmt.Sprintf("inventory: no decoder for %s", t))
	}
}

// mapping decodes a YAML mapping into struct v, field by field, rejecting
// unknown and duplicate keys.
func (d *decoder) mapping(n ast.Node, v reflect.Value, path, name string) {
	m, ok := n.(*ast.MappingNode)
	if !ok {
		d.errorf(position(n), name, "expected a mapping with %s, got %s", strings.Join(fieldNames(v.Type()), ", "), describe(n))
		return
	}
	fields := fieldNames(v.Type())
	seen := map[string]pos{}
	for _, mv := range m.Values {
		kp := position(mv.Key)
		key, ok := mv.Key.(*ast.StringNode)
		if !ok {
			if _, merge := mv.Key.(*ast.MergeKeyNode); merge {
				d.errorf(kp, path, "YAML anchors, aliases, merge keys and tags are not supported")
			} else {
				d.errorf(kp, path, "unexpected key %s", describe(mv.Key))
			}
			continue
		}
		field := key.Value
		if path != "" {
			field = path + "." + key.Value
		}
		if first, dup := seen[key.Value]; dup {
			d.errorf(kp, field, "duplicate key (first set on line %d)", first.line)
			continue
		}
		seen[key.Value] = kp
		i := fieldIndex(v.Type(), key.Value)
		if i < 0 {
			msg := "unknown field"
			if s := suggest(key.Value, fields); s != "" {
				msg += fmt.Sprintf(" (did you mean %q?)", s)
			} else {
				msg += "; known fields: " + strings.Join(fields, ", ")
			}
			d.errorf(kp, field, "%s", msg)
			continue
		}
		d.decode(mv.Value, v.Field(i), field)
	}
}

// fieldNames lists the YAML names of struct type t, in declaration order.
func fieldNames(t reflect.Type) []string {
	var names []string
	for i := range t.NumField() {
		if n := yamlName(t.Field(i)); n != "" {
			names = append(names, n)
		}
	}
	return names
}

func fieldIndex(t reflect.Type, name string) int {
	for i := range t.NumField() {
		if yamlName(t.Field(i)) == name {
			return i
		}
	}
	return -1
}

func yamlName(f reflect.StructField) string {
	n, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	if n == "-" || !f.IsExported() {
		return ""
	}
	return n
}

// describe names the kind of a node for "expected X, got Y" messages.
func describe(n ast.Node) string {
	switch n := n.(type) {
	case *ast.StringNode:
		return fmt.Sprintf("the string %q", n.Value)
	case *ast.IntegerNode, *ast.FloatNode, *ast.InfinityNode, *ast.NanNode:
		return "the number " + n.GetToken().Value
	case *ast.BoolNode:
		return n.GetToken().Value
	case *ast.NullNode:
		return "null"
	case *ast.MappingNode:
		return "a mapping"
	case *ast.SequenceNode:
		return "a list"
	case *ast.LiteralNode:
		return "a block of text"
	default:
		return strings.ToLower(n.Type().String())
	}
}

// suggest returns the field name closest to key: same letters ignoring case,
// or at most two edits away.
func suggest(key string, fields []string) string {
	best, bestDist := "", 3
	for _, f := range fields {
		if strings.EqualFold(f, key) {
			return f
		}
		if dist := editDistance(strings.ToLower(key), strings.ToLower(f)); dist < bestDist {
			best, bestDist = f, dist
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
