package verify

import (
	"bytes"
	"context"
	"errors"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/remotecommand"
)

// PodAccess reaches into pods. The probes from pods are HTTP requests to the
// echo pods' netexec server (its /dial endpoint makes the pod itself connect
// somewhere), sent through the API server's pod proxy, so kpfree needs no
// route to the pod network.
type PodAccess interface {
	// ProxyGet sends GET path?params to port of a pod and returns the body;
	// a non-2xx answer is an error carrying the body.
	ProxyGet(ctx context.Context, namespace, pod string, port int, path string, params map[string]string) ([]byte, error)
	// Exec runs cmd in a container and returns its stdout and stderr.
	Exec(ctx context.Context, namespace, pod, container string, cmd []string) (stdout, stderr []byte, err error)
}

// APIPods is PodAccess through the API server.
type APIPods struct {
	Client kubernetes.Interface
	// Config is needed for Exec.
	Config *rest.Config
}

// ErrNoExec: Exec needs a rest.Config.
var ErrNoExec = errors.New("exec into pods needs a REST config")

func (a *APIPods) ProxyGet(ctx context.Context, namespace, pod string, port int, path string, params map[string]string) ([]byte, error) {
	return a.Client.CoreV1().Pods(namespace).ProxyGet("http", pod, strconv.Itoa(port), path, params).DoRaw(ctx)
}

func (a *APIPods) Exec(ctx context.Context, namespace, pod, container string, cmd []string) ([]byte, []byte, error) {
	if a.Config == nil {
		return nil, nil, ErrNoExec
	}
	req := a.Client.CoreV1().RESTClient().Post().Resource("pods").Namespace(namespace).Name(pod).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Container: container, Command: cmd, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	spdy, err := remotecommand.NewSPDYExecutor(a.Config, "POST", req.URL())
	if err != nil {
		return nil, nil, err
	}
	ws, err := remotecommand.NewWebSocketExecutor(a.Config, "GET", req.URL().String())
	if err != nil {
		return nil, nil, err
	}
	ex, err := remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
	if err != nil {
		return nil, nil, err
	}
	var out, errb bytes.Buffer
	err = ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &out, Stderr: &errb})
	return out.Bytes(), errb.Bytes(), err
}
