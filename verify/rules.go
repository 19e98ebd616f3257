package verify

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"sync"

	"github.com/kpfree/kpfree/internal/ssh"
)

// RulesScript prints every ruleset kube-proxy may have left on a node, each
// after a "@@kpfree:TOOL" line: iptables and ip6tables through both
// backends (nft and legacy), and the nft tables. It changes nothing.
const RulesScript = `for t in iptables-save ip6tables-save iptables-legacy-save ip6tables-legacy-save; do
  if command -v "$t" >/dev/null 2>&1; then echo "@@kpfree:$t"; "$t" 2>/dev/null; fi
done
if command -v nft >/dev/null 2>&1; then echo "@@kpfree:nft"; nft list tables 2>/dev/null; fi
true`

// kubeletChains are the KUBE-* chains the kubelet itself keeps (1.28+):
// they are not kube-proxy's.
var kubeletChains = map[string]bool{
	"KUBE-IPTABLES-HINT":  true,
	"KUBE-FIREWALL":       true,
	"KUBE-KUBELET-CANARY": true,
}

var kubeChainRE = regexp.MustCompile(`KUBE-[A-Z0-9-]+`)

// RuleFinding is one kube-proxy leftover on a node.
type RuleFinding struct {
	Tool  string // iptables-save, ip6tables-legacy-save, nft
	Table string // nat, filter, ... ("" for nft)
	Line  string
}

func (f RuleFinding) String() string {
	if f.Table != "" {
		return fmt.Sprintf("%s (%s -t %s)", f.Line, f.Tool, f.Table)
	}
	return fmt.Sprintf("%s (%s)", f.Line, f.Tool)
}

// ParseRules finds kube-proxy's leftovers in RulesScript's output: iptables
// lines naming a KUBE-* chain other than the kubelet's, and nft tables
// called kube-proxy (any family). tools lists the tools that ran.
func ParseRules(out string) (found []RuleFinding, tools []string) {
	tool, table := "", ""
	for line := range strings.SplitSeq(out, "\n") {
		line = strings.TrimRight(line, "\r")
		if t, ok := strings.CutPrefix(line, "@@kpfree:"); ok {
			tool, table = t, ""
			tools = append(tools, t)
			continue
		}
		if tool == "nft" {
			f := strings.Fields(line)
			if len(f) == 3 && f[0] == "table" && f[2] == "kube-proxy" {
				found = append(found, RuleFinding{Tool: tool, Line: line})
			}
			continue
		}
		if t, ok := strings.CutPrefix(line, "*"); ok {
			table = t
			continue
		}
		if strings.HasPrefix(line, "#") {
			continue
		}
		for _, c := range kubeChainRE.FindAllString(line, -1) {
			if !kubeletChains[c] {
				found = append(found, RuleFinding{Tool: tool, Table: table, Line: line})
				break
			}
		}
	}
	return found, tools
}

// noKubeRules reads every node's rulesets over SSH, in parallel.
func (r *run) noKubeRules(ctx context.Context) Check {
	if len(r.o.Hosts) == 0 {
		return skip("no SSH access to the nodes (pass --nodes)")
	}
	type result struct {
		found []RuleFinding
		tools []string
	}
	var mu sync.Mutex
	res := map[string]result{}
	err := ssh.ForEach(ctx, r.o.Hosts, r.o.Concurrency, func(h Host) string { return h.Name },
		func(ctx context.Context, h Host) error {
			out, err := ssh.Output(ctx, h.Exec, RulesScript)
			if err != nil {
				return err
			}
			found, tools := ParseRules(string(out))
			mu.Lock()
			res[h.Name] = result{found, tools}
			mu.Unlock()
			return nil
		})
	var details, dirty []string
	first := ""
	for _, h := range r.o.Hosts {
		x, ok := res[h.Name]
		if !ok {
			continue
		}
		if len(x.tools) == 0 {
			details = append(details, h.Name+": no iptables-save, ip6tables-save or nft: nothing to check")
			continue
		}
		if len(x.found) == 0 {
			details = append(details, fmt.Sprintf("%s: clean (%s)", h.Name, strings.Join(x.tools, ", ")))
			continue
		}
		dirty = append(dirty, h.Name)
		if first == "" {
			first = fmt.Sprintf("%s has %s", h.Name, showRule(x.found))
			if len(x.found) > 1 {
				first += fmt.Sprintf(" and %d more lines", len(x.found)-1)
			}
		}
		for i, f := range x.found {
			if i == 10 {
				details = append(details, fmt.Sprintf("%s: ... %d more", h.Name, len(x.found)-10))
				break
			}
			details = append(details, fmt.Sprintf("%s: %s", h.Name, f))
		}
	}
	if err != nil {
		if me, ok := err.(*ssh.MultiError); ok {
			for _, f := range me.Failed {
				details = append(details, fmt.Sprintf("%s: cannot check: %v", f.Host, f.Err))
			}
		} else {
			details = append(details, "cannot check: "+err.Error())
		}
	}
	switch {
	case len(dirty) > 0:
		return fail(fmt.Sprintf("kube-proxy rules left on %s: %s", strings.Join(dirty, ", "), first), details...)
	case err != nil:
		return fail("could not read the rules of every node: "+oneLine(err.Error()), details...)
	}
	return pass(fmt.Sprintf("no kube-proxy KUBE-* rules or kube-proxy nft table on %s", plural(len(r.o.Hosts), "node")), details...)
}

// showRule picks the line that says most: a rule (-A ...) rather than a
// chain's declaration.
func showRule(found []RuleFinding) RuleFinding {
	for _, f := range found {
		if strings.HasPrefix(f.Line, "-A ") {
			return f
		}
	}
	return found[0]
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
