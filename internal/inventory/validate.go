package inventory

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"unicode"
)

var (
	dns1123Label = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
	versionRE    = regexp.MustCompile(`^v[0-9]+\.[0-9]+(\.[0-9]+)?(-[0-9A-Za-z.]+)?$`)
)

// validate checks what the file sets. Fields left empty are not errors here:
// applyDefaults fills them afterwards.
func (d *decoder) validate(inv *Inventory) {
	switch {
	case !d.isSet("apiVersion"):
		d.errorf(pos{1, 1}, "apiVersion", "missing; the first lines must be \"apiVersion: %s\" and \"kind: %s\"", APIVersion, Kind)
	case inv.APIVersion != APIVersion:
		d.fieldf("apiVersion", "%q is not supported; use %q", inv.APIVersion, APIVersion)
	}
	switch {
	case !d.isSet("kind"):
		d.errorf(pos{1, 1}, "kind", "missing; set \"kind: %s\"", Kind)
	case inv.Kind != Kind:
		d.fieldf("kind", "%q is not supported; use %q", inv.Kind, Kind)
	}

	d.validateCluster(&inv.Cluster)

	s := &inv.SSH
	d.checkUser("ssh.user", s.User)
	d.checkPort("ssh.port", s.Port)
	if s.ConnectTimeout.Duration < 0 {
		d.fieldf("ssh.connectTimeout", "%s must not be negative", s.ConnectTimeout)
	}
	if s.CommandTimeout.Duration < 0 {
		d.fieldf("ssh.commandTimeout", "%s must not be negative", s.CommandTimeout)
	}
	d.checkBastion("ssh.bastion", s.Bastion)

	d.validateHosts(inv.Hosts)
}

func (d *decoder) validateCluster(c *Cluster) {
	if c.Name != "" && !isLabel(c.Name) {
		d.fieldf("cluster.name", "%q is not a valid name: %s", c.Name, labelRules)
	}
	if c.KubernetesVersion != "" && !versionRE.MatchString(c.KubernetesVersion) {
		d.fieldf("cluster.kubernetesVersion", "%q is not a version such as v1.34.4 or v1.34", c.KubernetesVersion)
	}
	pod, podOK := d.checkCIDR("cluster.podCIDR", c.PodCIDR, DefaultPodCIDR)
	svc, svcOK := d.checkCIDR("cluster.serviceCIDR", c.ServiceCIDR, DefaultServiceCIDR)
	if podOK && svcOK {
		// Report on a field the file sets: the service CIDR when both are.
		field, self, other, otherName := "cluster.serviceCIDR", svc, pod, "podCIDR"
		if !d.isSet(field) {
			field, self, other, otherName = "cluster.podCIDR", pod, svc, "serviceCIDR"
		}
		otherDesc := fmt.Sprintf("%s %s", otherName, other)
		if !d.isSet("cluster." + otherName) {
			otherDesc += " (the default)"
		}
		switch {
		case pod.Overlaps(svc):
			d.fieldf(field, "%s overlaps %s", self, otherDesc)
		case pod.Addr().Is4() != svc.Addr().Is4():
			d.fieldf(field, "%s is not in the same IP family as %s", self, otherDesc)
		}
	}
	if c.ControlPlaneEndpoint != "" {
		if msg := checkEndpoint(c.ControlPlaneEndpoint); msg != "" {
			d.fieldf("cluster.controlPlaneEndpoint", "%q %s", c.ControlPlaneEndpoint, msg)
		}
	}
}

// checkCIDR parses the CIDR at field, or def when the field is empty.
func (d *decoder) checkCIDR(field, s, def string) (netip.Prefix, bool) {
	if s == "" {
		s = def
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		d.fieldf(field, "%q is not a CIDR such as %s", s, def)
		return p, false
	}
	if p != p.Masked() {
		d.fieldf(field, "%q has host bits set; did you mean %s?", s, p.Masked())
		return p, false
	}
	return p, true
}

func (d *decoder) validateHosts(hosts []Host) {
	if len(hosts) == 0 {
		d.fieldf("hosts", "no hosts: list at least one control-plane host")
		return
	}
	names := map[string]int{}
	addrs := map[string]int{}
	controlPlanes := 0
	for i, h := range hosts {
		p := fmt.Sprintf("hosts[%d]", i)
		switch {
		case h.Name == "":
			d.fieldf(p+".name", "missing")
		case !isLabel(h.Name):
			d.fieldf(p+".name", "%q is not a valid host name: %s", h.Name, labelRules)
		default:
			if j, dup := names[h.Name]; dup {
				d.fieldf(p+".name", "%q is already used by hosts[%d] (line %d)", h.Name, j, d.at(fmt.Sprintf("hosts[%d]", j)).line)
			} else {
				names[h.Name] = i
			}
		}
		switch {
		case h.Address == "":
			d.fieldf(p+".address", "missing")
		case checkAddress(h.Address) != "":
			d.fieldf(p+".address", "%q %s", h.Address, checkAddress(h.Address))
		default:
			key := addressKey(h.Address)
			if j, dup := addrs[key]; dup {
				d.fieldf(p+".address", "%q is already used by hosts[%d] (%s)", h.Address, j, hosts[j].Name)
			} else {
				addrs[key] = i
			}
		}
		switch h.Role {
		case RoleControlPlane:
			controlPlanes++
		case RoleWorker:
		case "":
			d.fieldf(p+".role", "missing; set %s or %s", RoleControlPlane, RoleWorker)
		default:
			d.fieldf(p+".role", "%q is not a role; use %s or %s", h.Role, RoleControlPlane, RoleWorker)
		}
		d.checkPort(p+".port", h.Port)
		d.checkUser(p+".user", h.User)
		d.checkBastion(p+".bastion", h.Bastion)
	}
	if controlPlanes == 0 {
		d.fieldf("hosts", "no host has role %s; at least one is needed", RoleControlPlane)
	}
}

func (d *decoder) checkBastion(field string, b *Endpoint) {
	if b == nil {
		return
	}
	if b.Address == "" {
		d.fieldf(field+".address", "missing: a bastion needs an address")
	} else if msg := checkAddress(b.Address); msg != "" {
		d.fieldf(field+".address", "%q %s", b.Address, msg)
	}
	d.checkPort(field+".port", b.Port)
	d.checkUser(field+".user", b.User)
}

// checkUser rejects user names that no SSH server accepts.
func (d *decoder) checkUser(field, user string) {
	if strings.ContainsFunc(user, unicode.IsSpace) {
		d.fieldf(field, "%q is not a user name: it contains a space", user)
	}
}

// checkPort accepts 0 only when the port was not written (it then defaults).
func (d *decoder) checkPort(field string, port int) {
	if (port != 0 || d.isSet(field)) && (port < 1 || port > 65535) {
		d.fieldf(field, "%d is not a port: use 1 to 65535", port)
	}
}

const labelRules = "use at most 63 lower-case letters, digits and '-', starting and ending with a letter or digit"

func isLabel(s string) bool {
	return len(s) <= 63 && dns1123Label.MatchString(s)
}

// checkAddress returns "" when s is an IP address or a hostname, else what is
// wrong with it, to follow the quoted address.
func checkAddress(s string) string {
	if _, err := netip.ParseAddr(s); err == nil {
		return ""
	}
	if isHostname(s) {
		return ""
	}
	if h, p, err := net.SplitHostPort(s); err == nil && p != "" && (isHostname(h) || isIP(h)) {
		return "is not an IP address or hostname: write the port in the port field"
	}
	if strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]") && isIP(s[1:len(s)-1]) {
		return "is not an IP address or hostname: write IPv6 addresses without brackets"
	}
	return "is not an IP address or hostname"
}

func isIP(s string) bool {
	_, err := netip.ParseAddr(s)
	return err == nil
}

// isHostname accepts RFC 1123 hostnames whose last label is not all digits,
// so that a mistyped IPv4 address such as 10.0.0.300 is not a hostname.
func isHostname(s string) bool {
	if len(s) == 0 || len(s) > 253 {
		return false
	}
	labels := strings.Split(strings.ToLower(s), ".")
	for _, l := range labels {
		if !isLabel(l) {
			return false
		}
	}
	last := labels[len(labels)-1]
	return strings.Trim(last, "0123456789") != ""
}

// addressKey is the form of an address used to find duplicates.
func addressKey(s string) string {
	if a, err := netip.ParseAddr(s); err == nil {
		return a.String()
	}
	return strings.ToLower(s)
}

// checkEndpoint checks a host[:port] API server endpoint and returns "" or
// what is wrong with it, to follow the quoted endpoint.
func checkEndpoint(s string) string {
	const want = "is not host[:port], such as 10.0.0.10:6443 or [fd00::10]:6443"
	if checkAddress(s) == "" {
		return ""
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil || checkAddress(host) != "" {
		return want
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 {
		return fmt.Sprintf("has port %q: use 1 to 65535", port)
	}
	return ""
}
