package lab

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// Leftovers lists what labs with the given name prefixes (default: the
// default prefix) have left on this machine: netns files <prefix>-*, links
// <prefix>-* (the bridge <prefix>-br0 and the veths), the cgroup <prefix>-lab
// in cgroup2 and in every cgroup v1 hierarchy, and live processes in those
// cgroups or named like a holder. After lab down it
// is empty. A bridge given a name outside the prefix is not seen.
func Leftovers(prefixes ...string) []string {
	if len(prefixes) == 0 {
		prefixes = []string{DefaultPrefix}
	}
	var out []string
	for _, p := range prefixes {
		out = append(out, leftovers(p)...)
	}
	return out
}

func leftovers(prefix string) []string {
	var out []string
	if entries, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), prefix+"-") {
				out = append(out, "netns "+e.Name())
			}
		}
	}
	for _, l := range linksWithPrefix(prefix + "-") {
		out = append(out, "link "+l)
	}
	cgName := prefix + "-lab"
	roots, _ := cgroupV1Roots()
	if root, err := findCgroup2(); err == nil {
		roots = append([]string{root}, roots...)
	}
	for _, root := range roots {
		if _, err := os.Stat(filepath.Join(root, cgName)); err == nil {
			out = append(out, "cgroup "+filepath.Join(root, cgName))
		}
	}
	procs, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range procs {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	for _, pid := range pids {
		pi, err := readProc(pid)
		if err != nil || pi.zombie {
			continue
		}
		inCgroup := false
		for _, cg := range pi.cgroups {
			inCgroup = inCgroup || cg == "/"+cgName || strings.HasPrefix(cg, "/"+cgName+"/")
		}
		holder := len(pi.argv) > 0 && strings.HasPrefix(pi.argv[0], HolderMarker+prefix+"-")
		if inCgroup || holder {
			out = append(out, fmt.Sprintf("process %d (%s)", pid, strings.Join(pi.argv, " ")))
		}
	}
	return out
}
