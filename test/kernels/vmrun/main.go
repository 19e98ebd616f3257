// Command vmrun runs Go test binaries inside Debian kernels under qemu (TCG):
// the kernel matrix behind `make test-kernels`. See test/kernels/README.md.
//
//	vmrun [flags] BINARY... [-- TESTFLAG...]
//
// For each kernel it builds an initramfs (busybox-static, the binaries, the
// kernel's sch_ingress/cls_bpf/veth modules, a generated /init), boots it,
// streams the console prefixed with the kernel name, and exits non-zero
// unless every binary on every kernel exited 0 with go test's PASS.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"
)

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

type options struct {
	kernels   []string
	cacheDir  string
	timeout   time.Duration
	memMB     int
	jobs      int
	qemu      string
	busybox   string
	logDir    string
	keep      bool
	env       []string
	bins      []testBinary
	testFlags []string
	extraArgs []string
	cmdline   string
}

var out = struct {
	sync.Mutex
	w io.Writer
}{w: os.Stdout}

func printf(format string, args ...any) {
	out.Lock()
	defer out.Unlock()
	fmt.Fprintf(out.w, format, args...)
}

func defaultCache() string {
	if c := os.Getenv("KPFREE_CACHE"); c != "" {
		return c
	}
	home, err := os.UserHomeDir()
	if err != nil {
		home = os.TempDir()
	}
	return filepath.Join(home, ".cache", "kpfree")
}

var safeName = regexp.MustCompile(`[^A-Za-z0-9._-]`)

func parseArgs(args []string) (*options, error) {
	fs := flag.NewFlagSet("vmrun", flag.ContinueOnError)
	o := &options{}
	kernels := fs.String("kernel", "5.10,6.1", "comma-separated kernel names from the cache (5.10, 6.1, 6.12), or \"all\" for every fetched kernel")
	fs.StringVar(&o.cacheDir, "cache", defaultCache(), "cache root ($KPFREE_CACHE); kernels are in <cache>/kernels/<name>")
	fs.DurationVar(&o.timeout, "timeout", 5*time.Minute, "hard limit per kernel, boot to poweroff")
	fs.IntVar(&o.memMB, "mem", 1024, "guest memory in MiB")
	fs.IntVar(&o.jobs, "j", 1, "kernels booted in parallel (TCG uses one host core per VM)")
	fs.StringVar(&o.qemu, "qemu", "qemu-system-x86_64", "qemu binary")
	fs.StringVar(&o.busybox, "busybox", "/bin/busybox", "a static busybox (Debian: busybox-static)")
	fs.StringVar(&o.logDir, "log-dir", "", "also write each kernel's raw console to DIR/<kernel>.log")
	fs.StringVar(&o.cmdline, "append", "", "extra kernel command line (after \"console=ttyS0 panic=-1 quiet\")")
	fs.BoolVar(&o.keep, "keep", false, "keep the generated initramfs (path is printed)")
	var env, qargs multiFlag
	fs.Var(&env, "env", "KEY=VALUE exported in the guest before the tests (repeatable)")
	fs.Var(&qargs, "qemu-arg", "extra qemu argument (repeatable)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: vmrun [flags] TEST-BINARY... [-- TESTFLAG...]\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	o.env, o.extraArgs = env, qargs
	for _, kv := range o.env {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || !regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`).MatchString(k) {
			return nil, fmt.Errorf("-env %q: want KEY=VALUE", kv)
		}
	}
	rest := fs.Args()
	var binPaths []string
	for i, a := range rest {
		if a == "--" {
			o.testFlags = rest[i+1:]
			break
		}
		binPaths = append(binPaths, a)
	}
	if len(binPaths) == 0 {
		fs.Usage()
		return nil, errors.New("no test binaries given")
	}
	used := map[string]bool{}
	for _, p := range binPaths {
		if err := checkStatic(p, "build it with CGO_ENABLED=0 go test -c"); err != nil {
			return nil, err
		}
		abs, err := filepath.Abs(p)
		if err != nil {
			return nil, err
		}
		name := safeName.ReplaceAllString(filepath.Base(p), "_")
		for i := 2; used[name]; i++ {
			name = fmt.Sprintf("%s.%d", safeName.ReplaceAllString(filepath.Base(p), "_"), i)
		}
		used[name] = true
		o.bins = append(o.bins, testBinary{Host: abs, Name: name})
	}
	if err := checkStatic(o.busybox, "install busybox-static"); err != nil {
		return nil, err
	}
	kroot := filepath.Join(o.cacheDir, "kernels")
	if *kernels == "all" {
		ents, _ := os.ReadDir(kroot)
		for _, e := range ents {
			if _, err := os.Stat(filepath.Join(kroot, e.Name(), ".complete")); err == nil {
				o.kernels = append(o.kernels, e.Name())
			}
		}
		sort.Slice(o.kernels, func(i, j int) bool { return versionLess(o.kernels[i], o.kernels[j]) })
		if len(o.kernels) == 0 {
			return nil, fmt.Errorf("no kernels in %s: run test/kernels/fetch.sh", kroot)
		}
	} else {
		for _, k := range strings.Split(*kernels, ",") {
			if k = strings.TrimSpace(k); k == "" {
				continue
			}
			if _, err := os.Stat(filepath.Join(kroot, k, ".complete")); err != nil {
				return nil, fmt.Errorf("kernel %s is not in %s: run test/kernels/fetch.sh %s", k, kroot, k)
			}
			o.kernels = append(o.kernels, k)
		}
	}
	if o.jobs < 1 {
		o.jobs = 1
	}
	return o, nil
}

// versionLess orders "5.10" < "6.1" < "6.12".
func versionLess(a, b string) bool {
	pa, pb := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < len(pa) && i < len(pb); i++ {
		var x, y int
		fmt.Sscanf(pa[i], "%d", &x)
		fmt.Sscanf(pb[i], "%d", &y)
		if x != y {
			return x < y
		}
	}
	return len(pa) < len(pb)
}

func readLines(path string) []string {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var l []string
	for _, s := range strings.Split(string(data), "\n") {
		if s = strings.TrimSpace(s); s != "" {
			l = append(l, s)
		}
	}
	return l
}

// testTimeout leaves the guest time to print go test's goroutine dump and
// power off before the hard qemu limit.
func testTimeout(total time.Duration) string {
	t := total - 45*time.Second
	if t < 30*time.Second {
		t = total * 3 / 4
	}
	return t.Round(time.Second).String()
}

func runKernel(ctx context.Context, o *options, kernel string) *vmResult {
	kdir := filepath.Join(o.cacheDir, "kernels", kernel)
	release := strings.TrimSpace(strings.Join(readLines(filepath.Join(kdir, "release")), ""))
	start := time.Now()
	res := newVMResult(kernel, release, o.bins, start)

	var tok [8]byte
	_, _ = rand.Read(tok[:])
	cfg := initConfig{
		Token:       hex.EncodeToString(tok[:]),
		Kernel:      kernel,
		Modules:     readLines(filepath.Join(kdir, "modules.load")),
		Env:         o.env,
		Binaries:    o.bins,
		TestFlags:   o.testFlags,
		TestTimeout: testTimeout(o.timeout),
	}
	tmp, err := os.MkdirTemp("", "kpfree-vmrun-")
	if err != nil {
		res.QemuErr = err
		return res
	}
	if !o.keep {
		defer os.RemoveAll(tmp)
	}
	initrd := filepath.Join(tmp, "initramfs-"+kernel+".cpio")
	if err := buildInitramfs(initrd, o.busybox, kdir, cfg); err != nil {
		res.QemuErr = fmt.Errorf("initramfs: %w", err)
		return res
	}
	if o.keep {
		printf("[%s] initramfs kept at %s\n", kernel, initrd)
	}

	args := []string{
		"-accel", "tcg", "-cpu", "max", "-m", fmt.Sprint(o.memMB), "-smp", "1",
		"-nographic", "-no-reboot",
		"-kernel", filepath.Join(kdir, "vmlinuz"),
		"-initrd", initrd,
		"-append", strings.TrimSpace("console=ttyS0 panic=-1 quiet " + o.cmdline),
	}
	args = append(args, o.extraArgs...)
	printf("[%s] boot %s (%s) with %d test binar%s, timeout %s\n", kernel, release,
		strings.Join(readLines(filepath.Join(kdir, "source")), ""), len(o.bins), plural(len(o.bins), "y", "ies"), o.timeout)

	vctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	cmd := exec.CommandContext(vctx, o.qemu, args...)
	cmd.Stdin = nil // /dev/null: qemu leaves the terminal alone
	cmd.WaitDelay = 5 * time.Second
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw

	var logf *os.File
	if o.logDir != "" {
		if err := os.MkdirAll(o.logDir, 0o755); err == nil {
			logf, _ = os.Create(filepath.Join(o.logDir, kernel+".log"))
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		rd := bufio.NewReaderSize(pr, 1<<16)
		for {
			line, err := rd.ReadString('\n')
			if line != "" {
				line = stripANSI(strings.TrimRight(line, "\r\n"))
				now := time.Now()
				res.Feed(line, cfg.Token, now)
				printf("[%s] %s\n", kernel, line)
				if logf != nil {
					fmt.Fprintln(logf, line)
				}
			}
			if err != nil {
				return
			}
		}
	}()
	if err := cmd.Start(); err != nil {
		pw.Close()
		<-done
		res.QemuErr = err
		return res
	}
	err = cmd.Wait()
	pw.Close()
	<-done
	if logf != nil {
		logf.Close()
	}
	res.Total = time.Since(start)
	if errors.Is(vctx.Err(), context.DeadlineExceeded) {
		res.TimedOut = true
	}
	res.QemuErr = err
	return res
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

func main() {
	o, err := parseArgs(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "vmrun:", err)
		os.Exit(2)
	}
	if _, err := exec.LookPath(o.qemu); err != nil {
		fmt.Fprintf(os.Stderr, "vmrun: %s not found: apt-get install --no-install-recommends qemu-system-x86\n", o.qemu)
		os.Exit(2)
	}

	results := make([]*vmResult, len(o.kernels))
	sem := make(chan struct{}, o.jobs)
	var wg sync.WaitGroup
	for i, k := range o.kernels {
		sem <- struct{}{} // in order: kernels boot in the order given
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			results[i] = runKernel(context.Background(), o, k)
		}()
	}
	wg.Wait()

	passed, failed := 0, 0
	printf("\n=== kernel matrix summary\n")
	for _, r := range results {
		printf("kernel %-5s %-32s boot %5.1fs  total %6.1fs\n", r.Kernel, orDash(r.Release), r.Boot.Seconds(), r.Total.Seconds())
		for _, n := range r.order {
			b := r.Bins[n]
			v := b.Verdict()
			if r.Passed(n) {
				passed++
			} else {
				failed++
			}
			exit := "-"
			if b.Ended {
				exit = fmt.Sprint(b.Exit)
			}
			printf("  %-7s %-24s exit=%-3s %6.1fs  tests: %d passed, %d failed, %d skipped\n",
				v, n, exit, b.Duration.Seconds(), len(b.Passed), len(b.Failed), len(b.Skipped))
			for _, f := range b.Failed {
				printf("          FAIL %s\n", f)
			}
			for _, s := range b.Skipped {
				printf("          skip %s\n", s)
			}
		}
		for _, p := range r.Problems() {
			printf("  problem: %s\n", p)
		}
	}
	printf("test-kernels: %d passed, %d failed\n", passed, failed)
	if failed > 0 {
		os.Exit(1)
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// stripANSI drops terminal escape sequences (SeaBIOS clears the screen) and
// other control characters but tabs from a console line.
func stripANSI(s string) string {
	if !strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 && r != '\t' || r == 0x7f }) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == 0x1b && i+1 < len(s) && s[i+1] == '[':
			// CSI: parameters and intermediates, then one final byte 0x40..0x7e.
			j := i + 2
			for j < len(s) && (s[j] < 0x40 || s[j] > 0x7e) {
				j++
			}
			i = j
		case c == 0x1b:
			i++ // two-byte escape such as ESC c
		case c < 0x20 && c != '\t' || c == 0x7f:
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}
