// Throwaway: measures bulk Service+EndpointSlice creation against kubeenv.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kpfree/kpfree/test/kubeenv"
)

func vipOf(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(100 + i>>16), byte(i >> 8), byte(i)})
}

func createOne(ctx context.Context, cs kubernetes.Interface, i int) error {
	name := fmt.Sprintf("svc-%06d", i)
	vip := vipOf(i).String()
	_, err := cs.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{ClusterIP: vip, ClusterIPs: []string{vip},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("svc %d: %w", i, err)
	}
	port, pname, tcp := int32(8080), "http", corev1.ProtocolTCP
	ready := true
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &pname, Port: &port, Protocol: &tcp}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.1.0.2"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}},
			{Addresses: []string{"10.1.0.3"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}},
		},
	}
	if _, err := cs.DiscoveryV1().EndpointSlices("default").Create(ctx, es, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("slice %d: %w", i, err)
	}
	return nil
}

// children returns "name=cpu-seconds rssMiB" of this process's children.
func children() string {
	me := strconv.Itoa(os.Getpid())
	ents, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		s := string(b)
		r := strings.LastIndexByte(s, ')')
		if r < 0 {
			continue
		}
		f := strings.Fields(s[r+2:])
		if len(f) < 22 || f[1] != me {
			continue
		}
		name := s[strings.IndexByte(s, '(')+1 : r]
		ut, _ := strconv.Atoi(f[11])
		st, _ := strconv.Atoi(f[12])
		rss, _ := strconv.Atoi(f[21])
		out = append(out, fmt.Sprintf("%s=%.0fs/%dMiB", name, float64(ut+st)/100, rss*4096>>20))
	}
	out = append(out, "self="+selfCPU())
	return strings.Join(out, " ")
}

func selfCPU() string {
	b, _ := os.ReadFile("/proc/self/stat")
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return fmt.Sprintf("%.0fs", float64(ut+st)/100)
}

func dbSize(dir string) string {
	fi, err := os.Stat(filepath.Join(dir, "kube", "etcd", "member", "snap", "db"))
	if err != nil {
		return "?"
	}
	return fmt.Sprintf("%dMiB", fi.Size()>>20)
}

func main() {
	n := flag.Int("n", 15000, "Services")
	workers := flag.Int("workers", 16, "workers")
	every := flag.Int("every", 2000, "report every")
	bulk := flag.Bool("bulk", false, "Options.BulkServices")
	keep := flag.Bool("keep", false, "keep running at the end (until SIGINT) for kubectl")
	flag.Parse()
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "bulkprobe-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	t0 := time.Now()
	cp, err := kubeenv.Start(ctx, bulkOpts(kubeenv.Options{Dir: filepath.Join(dir, "kube")}, *bulk))
	if err != nil {
		fmt.Println("start:", err)
		out, _ := os.ReadFile(filepath.Join(dir, "kube", "kube-apiserver.log"))
		fmt.Println(string(out[max(0, len(out)-3000):]))
		return
	}
	defer cp.Stop()
	fmt.Printf("ready after %s, dir %s kubeconfig %s\n", time.Since(t0).Round(time.Millisecond), dir, cp.Kubeconfig)
	cfg, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		panic(err)
	}
	cfg.QPS, cfg.Burst = 100000, 100000
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		panic(err)
	}
	var next, done atomic.Int64
	var errs atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	last := start
	var mu sync.Mutex
	for range *workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= *n {
					return
				}
				if err := createOne(ctx, cs, i); err != nil {
					if errs.Add(1) < 10 {
						fmt.Println("error:", err)
					}
					continue
				}
				if d := done.Add(1); d%int64(*every) == 0 {
					mu.Lock()
					now := time.Now()
					fmt.Printf("%6d Services  t=%6.0fs  rate %6.1f/s (last %d)  avg %6.1f/s  db %s  %s\n", d, now.Sub(start).Seconds(),
						float64(*every)/now.Sub(last).Seconds(), *every, float64(d)/now.Sub(start).Seconds(), dbSize(dir), children())
					last = now
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	fmt.Printf("DONE %d Services + slices in %s (%.1f/s), errors %d\n", done.Load(), el.Round(time.Second), float64(done.Load())/el.Seconds(), errs.Load())
	kubectl, _ := kubeenv.Binary("kubectl")
	t1 := time.Now()
	out, err := exec.Command("sh", "-c", kubectl+" --kubeconfig "+cp.Kubeconfig+" get svc -A --no-headers | wc -l").CombinedOutput()
	fmt.Printf("kubectl get svc -A | wc -l: %s (%v, %s)\n", strings.TrimSpace(string(out)), err, time.Since(t1).Round(time.Millisecond))
	t1 = time.Now()
	out, err = exec.Command("sh", "-c", kubectl+" --kubeconfig "+cp.Kubeconfig+" get endpointslices -A --no-headers | wc -l").CombinedOutput()
	fmt.Printf("kubectl get endpointslices -A | wc -l: %s (%v, %s)\n", strings.TrimSpace(string(out)), err, time.Since(t1).Round(time.Millisecond))
	// Watch: from a fresh list's RV, create one more Service and see it.
	t1 = time.Now()
	l, err := cs.CoreV1().Services("").List(ctx, metav1.ListOptions{Limit: 500})
	if err != nil {
		fmt.Println("list:", err)
	} else {
		w, err := cs.CoreV1().Services("").Watch(ctx, metav1.ListOptions{ResourceVersion: l.ResourceVersion})
		if err != nil {
			fmt.Println("watch:", err)
		} else {
			if err := createOne(ctx, cs, *n); err != nil {
				fmt.Println("create extra:", err)
			}
			tm := time.After(30 * time.Second)
		loop:
			for {
				select {
				case ev := <-w.ResultChan():
					if s, ok := ev.Object.(*corev1.Service); ok && s.Name == fmt.Sprintf("svc-%06d", *n) {
						fmt.Printf("watch: %s %s %s after %s\n", ev.Type, s.Name, s.Spec.ClusterIP, time.Since(t1).Round(time.Millisecond))
						break loop
					}
				case <-tm:
					fmt.Println("watch: no event in 30s")
					break loop
				}
			}
			w.Stop()
		}
	}
	if *keep {
		fmt.Println("keeping; send SIGINT")
		sctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
		<-sctx.Done()
		stop()
	}
}
