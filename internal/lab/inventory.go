package lab

import (
	"bytes"
	"regexp"
	"strconv"
	"text/template"
)

// inventoryTemplate is the lab's hosts.yaml, in the format of
// internal/inventory: node1 is the control plane, the others are workers.
var inventoryTemplate = template.Must(template.New("hosts.yaml").Funcs(template.FuncMap{"q": yamlString}).Parse(
	`# kpfree lab: {{len .Nodes}} node(s) on bridge {{.Bridge}} ({{.Subnet}}), written by "kpfree lab up".
# "kpfree lab down" removes the lab and this file.
apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster:
  name: {{q .ClusterName}}
  kubernetesVersion: {{q .KubernetesVersion}}
  podCIDR: 10.244.0.0/16
  serviceCIDR: 10.96.0.0/12
  controlPlaneEndpoint: {{q .Endpoint}}
ssh:
  user: root
  port: 22
  identityFile: {{q .IdentityFile}}
  knownHostsFile: {{q .KnownHostsFile}}
  acceptNewHostKeys: false
  connectTimeout: 10s
  commandTimeout: 10m
hosts:
{{- range $i, $n := .Nodes}}
  - name: {{q $n.Name}}
    address: {{$n.Address}}
    role: {{if eq $i 0}}control-plane{{else}}worker{{end}}
{{- end}}
`))

// inventory renders hosts.yaml for the lab's nodes.
func (s *State) inventory() ([]byte, error) {
	data := struct {
		*State
		ClusterName, Endpoint, IdentityFile, KnownHostsFile string
	}{State: s, ClusterName: s.Prefix + "-lab", IdentityFile: s.IdentityFile(), KnownHostsFile: s.KnownHostsFile()}
	if len(s.Nodes) > 0 {
		data.Endpoint = s.Nodes[0].Address.String() + ":6443"
	}
	var b bytes.Buffer
	if err := inventoryTemplate.Execute(&b, data); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

var plainYAML = regexp.MustCompile(`^[A-Za-z/][A-Za-z0-9_./:-]*$`)

// yamlString writes s as a YAML scalar: plain when that is unambiguous, else
// double-quoted (a JSON string is a valid YAML double-quoted scalar).
func yamlString(s string) string {
	if plainYAML.MatchString(s) && !ambiguousYAML[s] {
		return s
	}
	return strconv.Quote(s)
}

var ambiguousYAML = map[string]bool{"true": true, "false": true, "yes": true, "no": true, "on": true, "off": true, "null": true, "~": true, "y": true, "n": true}
