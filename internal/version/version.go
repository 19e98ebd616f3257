// Package version reports which kpfree this is.
package version

import "runtime/debug"

// Version is set at build time with -ldflags "-X github.com/kpfree/kpfree/internal/version.Version=v0.1.0".
var Version = ""

// Get returns the build's version: the ldflags value, else the module version,
// else the VCS revision, else "dev".
func Get() string {
	if Version != "" {
		return Version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "dev"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	rev, dirty := "", false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev == "" {
		return "dev"
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if dirty {
		rev += "-dirty"
	}
	return "dev-" + rev
}
