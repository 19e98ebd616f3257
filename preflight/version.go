package preflight

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Version is an upstream kernel version.
type Version struct {
	Major int `json:"major"`
	Minor int `json:"minor"`
	Patch int `json:"patch"`
}

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch) }

// Short is "major.minor", how feature versions are usually quoted.
func (v Version) Short() string { return fmt.Sprintf("%d.%d", v.Major, v.Minor) }

// Compare returns -1, 0 or +1.
func (v Version) Compare(o Version) int {
	for _, d := range [...]int{v.Major - o.Major, v.Minor - o.Minor, v.Patch - o.Patch} {
		if d < 0 {
			return -1
		}
		if d > 0 {
			return 1
		}
	}
	return 0
}

// AtLeast reports v >= o.
func (v Version) AtLeast(o Version) bool { return v.Compare(o) >= 0 }

var versionRE = regexp.MustCompile(`^(\d+)\.(\d+)(?:\.(\d+))?`)

// ParseVersion reads the leading "X.Y[.Z]" of s.
func ParseVersion(s string) (Version, bool) {
	m := versionRE.FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		return Version{}, false
	}
	var v Version
	v.Major, _ = strconv.Atoi(m[1])
	v.Minor, _ = strconv.Atoi(m[2])
	if m[3] != "" {
		v.Patch, _ = strconv.Atoi(m[3])
	}
	return v, true
}

var (
	debianBuildRE = regexp.MustCompile(`Debian (\d+\.\d+\.\d+)`)
	// Ubuntu: "Ubuntu 5.4.0-100.113-generic 5.4.166": the last field is upstream.
	ubuntuSigRE = regexp.MustCompile(`(\d+\.\d+\.\d+)\s*$`)
)

// KernelVersion returns the upstream version of a kernel. uname -r is not
// always enough: Debian and Ubuntu keep the sublevel at 0 in the release
// ("4.19.0-27-amd64" is 4.19.316), and the sublevel matters for backports
// (recvmsg hooks reached 4.19 in 4.19.57). Debian's real version is in
// uname -v ("... Debian 4.19.316-1 ..."), Ubuntu's in /proc/version_signature.
// A refinement is used only when its major.minor matches the release.
func KernelVersion(release, build, signature string) (Version, bool) {
	v, ok := ParseVersion(release)
	if !ok {
		return v, false
	}
	for _, cand := range []string{
		submatch(debianBuildRE, build),
		submatch(ubuntuSigRE, signature),
	} {
		if r, ok := ParseVersion(cand); ok && r.Major == v.Major && r.Minor == v.Minor && r.Patch > v.Patch {
			v = r
		}
	}
	return v, true
}

func submatch(re *regexp.Regexp, s string) string {
	if m := re.FindStringSubmatch(s); m != nil {
		return m[1]
	}
	return ""
}

// since reports whether v has a feature that arrived in mainline at main and
// was backported to the stable branches in backports (same major.minor,
// sublevel at least the backport's).
func since(v Version, main Version, backports ...Version) bool {
	if v.AtLeast(main) {
		return true
	}
	for _, b := range backports {
		if v.Major == b.Major && v.Minor == b.Minor && v.Patch >= b.Patch {
			return true
		}
	}
	return false
}

func ver(major, minor, patch int) Version { return Version{major, minor, patch} }
