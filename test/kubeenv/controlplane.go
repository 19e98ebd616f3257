// Package kubeenv starts a real etcd and kube-apiserver (the binaries built
// by test/k8s/build.sh) with a throwaway PKI, for integration tests and
// benchmarks. Nothing here is a fake: the API server is the real one.
package kubeenv

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// KubernetesVersion is the version test/k8s/build.sh builds.
const KubernetesVersion = "v1.34.4"

// BinDir returns where the Kubernetes binaries are: $KPFREE_K8S_BIN, else
// the build cache ($KPFREE_CACHE or ~/.cache/kpfree)/k8s/VERSION/bin.
func BinDir() string {
	if d := os.Getenv("KPFREE_K8S_BIN"); d != "" {
		return d
	}
	cache := os.Getenv("KPFREE_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "kpfree")
	}
	return filepath.Join(cache, "k8s", KubernetesVersion, "bin")
}

// Binary returns the path of a Kubernetes binary, or an error that says how to build it.
func Binary(name string) (string, error) {
	p := filepath.Join(BinDir(), name)
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("%s not found in %s: build the Kubernetes binaries with 'make k8s-binaries'", name, BinDir())
	}
	return p, nil
}

// Options for a control plane.
type Options struct {
	// Dir holds the PKI, etcd data and logs.
	Dir string
	// BindAddress is where kube-apiserver serves (default 127.0.0.1). Lab
	// nodes in network namespaces cannot reach the host's loopback: use the
	// lab bridge address for them.
	BindAddress string
	// ServiceCIDR is the Service ClusterIP range (default 10.96.0.0/12).
	ServiceCIDR string
	// ExtraSANs are added to the serving certificate.
	ExtraSANs []string
	// BulkServices sets the control plane up for benchmarks that create
	// tens of thousands of Services; leave it off otherwise.
	//
	// kube-apiserver 1.34 allocates ClusterIPs with the IPAddress allocator
	// (MultiCIDRServiceAllocator, locked on in 1.34), which after every
	// allocation lists all IPAddress objects twice for its metrics
	// (ipallocator.Allocator.Used): each create costs O(N), N creates
	// O(N²) (measured: ~330 Services/s at the start, ~45/s at 13,000).
	// BulkServices makes kube-apiserver emulate Kubernetes 1.33, where that
	// gate can still be turned off, and turns it off: the bitmap allocator
	// (one RangeAllocation object) stays flat at ~250-420 Services/s up to
	// 50,000. Every allocation rewrites that object (36-128 KiB for a /12),
	// gigabytes of etcd history in a bulk create, so kube-apiserver
	// compacts every minute (not 5) and etcd's quota is 8 GiB (not 2). A
	// paginated list that takes longer than a minute may then fail with
	// 410 Expired. The 1.34 defaults of the gates that decide how lists are
	// served are kept (WatchList and ListFromCacheSnapshot on), so clients
	// list as they would from a real 1.34 API server.
	BulkServices bool
	// NoWatchList turns kube-apiserver's WatchList off (streamed initial
	// lists, on by default in 1.34), so clients fall back to a LIST.
	NoWatchList bool
}

// ControlPlane is a running etcd + kube-apiserver.
type ControlPlane struct {
	Opts       Options
	PKI        *PKI
	URL        string // https://ADDR:PORT
	Kubeconfig string // admin (system:masters)

	etcd, apiserver *exec.Cmd
}

// Start starts etcd and kube-apiserver and waits until /readyz answers.
func Start(ctx context.Context, o Options) (*ControlPlane, error) {
	if o.BindAddress == "" {
		o.BindAddress = "127.0.0.1"
	}
	if o.ServiceCIDR == "" {
		o.ServiceCIDR = "10.96.0.0/12"
	}
	etcdBin, err := Binary("etcd")
	if err != nil {
		return nil, err
	}
	apiBin, err := Binary("kube-apiserver")
	if err != nil {
		return nil, err
	}
	pki, err := NewPKI(filepath.Join(o.Dir, "pki"))
	if err != nil {
		return nil, err
	}
	sans := append([]string{"127.0.0.1", o.BindAddress, "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", firstIP(o.ServiceCIDR)}, o.ExtraSANs...)
	if err := pki.Issue("apiserver", "kube-apiserver", nil, sans, true); err != nil {
		return nil, err
	}
	if err := pki.Issue("admin", "kubernetes-admin", []string{"system:masters"}, nil, false); err != nil {
		return nil, err
	}
	cp := &ControlPlane{Opts: o, PKI: pki}
	ports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	cp.etcd = exec.Command(etcdBin,
		"--name=kpfree-test",
		"--data-dir="+filepath.Join(o.Dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		fmt.Sprintf("--listen-peer-urls=http://127.0.0.1:%d", ports[1]),
		fmt.Sprintf("--initial-advertise-peer-urls=http://127.0.0.1:%d", ports[1]),
		fmt.Sprintf("--initial-cluster=kpfree-test=http://127.0.0.1:%d", ports[1]),
		"--unsafe-no-fsync", "--log-level=warn")
	if o.BulkServices {
		cp.etcd.Args = append(cp.etcd.Args, "--quota-backend-bytes=8589934592")
	}
	if err := startLogged(cp.etcd, filepath.Join(o.Dir, "etcd.log")); err != nil {
		return nil, fmt.Errorf("start etcd: %w", err)
	}
	apiPort, err := freePortOn(o.BindAddress)
	if err != nil {
		cp.Stop()
		return nil, err
	}
	cp.URL = "https://" + net.JoinHostPort(o.BindAddress, strconv.Itoa(apiPort))
	cp.apiserver = exec.Command(apiBin,
		"--etcd-servers="+etcdURL,
		"--bind-address="+o.BindAddress,
		"--advertise-address="+advertise(o.BindAddress),
		fmt.Sprintf("--secure-port=%d", apiPort),
		"--tls-cert-file="+pki.CertFile("apiserver"), "--tls-private-key-file="+pki.KeyFile("apiserver"),
		"--client-ca-file="+pki.CAFile(),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+pki.SAPubFile(),
		"--service-account-signing-key-file="+pki.SAKeyFile(),
		"--service-cluster-ip-range="+o.ServiceCIDR,
		"--authorization-mode=Node,RBAC",
		"--allow-privileged=true",
		"--enable-priority-and-fairness=false",
		"--profiling=false",
		"--cert-dir="+filepath.Join(o.Dir, "certs"),
		"--v=0")
	var gates []string
	if o.BulkServices {
		cp.apiserver.Args = append(cp.apiserver.Args, "--emulated-version=1.33", "--etcd-compaction-interval=1m")
		gates = append(gates, "MultiCIDRServiceAllocator=false", "ListFromCacheSnapshot=true")
		if !o.NoWatchList {
			gates = append(gates, "WatchList=true")
		}
	}
	if o.NoWatchList {
		gates = append(gates, "WatchList=false")
	}
	if len(gates) > 0 {
		cp.apiserver.Args = append(cp.apiserver.Args, "--feature-gates="+strings.Join(gates, ","))
	}
	if err := startLogged(cp.apiserver, filepath.Join(o.Dir, "kube-apiserver.log")); err != nil {
		cp.Stop()
		return nil, fmt.Errorf("start kube-apiserver: %w", err)
	}
	cp.Kubeconfig = filepath.Join(o.Dir, "admin.kubeconfig")
	if err := cp.WriteKubeconfig(cp.Kubeconfig, "admin"); err != nil {
		cp.Stop()
		return nil, err
	}
	if err := cp.waitReady(ctx, 60*time.Second); err != nil {
		cp.Stop()
		return nil, err
	}
	return cp, nil
}

// IssueUser writes a client certificate for a user (CN) in groups and a
// kubeconfig for it, and returns the kubeconfig's path.
func (cp *ControlPlane) IssueUser(name, cn string, groups ...string) (string, error) {
	if err := cp.PKI.Issue(name, cn, groups, nil, false); err != nil {
		return "", err
	}
	p := filepath.Join(cp.Opts.Dir, name+".kubeconfig")
	return p, cp.WriteKubeconfig(p, name)
}

// WriteKubeconfig writes a kubeconfig that uses certificate NAME, with the
// certificates embedded so it can be copied into a lab node.
func (cp *ControlPlane) WriteKubeconfig(path, name string) error {
	ca, err := os.ReadFile(cp.PKI.CAFile())
	if err != nil {
		return err
	}
	crt, err := os.ReadFile(cp.PKI.CertFile(name))
	if err != nil {
		return err
	}
	key, err := os.ReadFile(cp.PKI.KeyFile(name))
	if err != nil {
		return err
	}
	b64 := base64.StdEncoding.EncodeToString
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: test
  context: {cluster: test, user: %s}
current-context: test
`, cp.URL, b64(ca), name, b64(crt), b64(key), name)
	return os.WriteFile(path, []byte(cfg), 0o600)
}

func (cp *ControlPlane) waitReady(ctx context.Context, limit time.Duration) error {
	cert, err := tls.LoadX509KeyPair(cp.PKI.CertFile("admin"), cp.PKI.KeyFile("admin"))
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	ca, _ := os.ReadFile(cp.PKI.CAFile())
	pool.AppendCertsFromPEM(ca)
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}}}}
	deadline := time.Now().Add(limit)
	var last string
	for time.Now().Before(deadline) {
		if err := ctx.Err(); err != nil {
			return err
		}
		if cp.apiserver.ProcessState != nil {
			break
		}
		resp, err := hc.Get(cp.URL + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("kube-apiserver at %s not ready after %s (last: %s); see %s", cp.URL, limit, last, filepath.Join(cp.Opts.Dir, "kube-apiserver.log"))
}

// Stop kills kube-apiserver and etcd (the processes Start started) and waits for them.
func (cp *ControlPlane) Stop() {
	for _, c := range []*exec.Cmd{cp.apiserver, cp.etcd} {
		if c == nil || c.Process == nil {
			continue
		}
		_ = c.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = c.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = c.Process.Kill()
			<-done
		}
	}
}

func procOf(c *exec.Cmd) *os.Process {
	if c == nil {
		return nil
	}
	return c.Process
}

func startLogged(c *exec.Cmd, logPath string) error {
	f, err := os.Create(logPath)
	if err != nil {
		return err
	}
	c.Stdout, c.Stderr = f, f
	// No Pdeathsig: it fires when the starting OS thread exits, not the
	// process, and tests that enter network namespaces end threads on
	// purpose. Stop (registered as cleanup) ends these processes.
	if err := c.Start(); err != nil {
		f.Close()
		return err
	}
	go func() { _ = c.Wait(); f.Close() }()
	return nil
}

func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var out []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		out = append(out, l.Addr().(*net.TCPAddr).Port)
	}
	return out, nil
}

func freePortOn(addr string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(addr, "0"))
	if err != nil {
		return 0, fmt.Errorf("no free port on %s: %w", addr, err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// advertise returns an address kube-apiserver accepts as --advertise-address
// (it must not be loopback); the address is only published in the
// "kubernetes" Endpoints, which these tests do not use from loopback.
func advertise(bind string) string {
	if ip := net.ParseIP(bind); ip != nil && !ip.IsLoopback() && !ip.IsUnspecified() {
		return bind
	}
	return "198.18.0.1"
}

func firstIP(cidr string) string {
	_, n, err := net.ParseCIDR(cidr)
	if err != nil {
		return "10.96.0.1"
	}
	ip := n.IP.To16()
	ip[len(ip)-1]++
	return ip.String()
}
