package watch

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

func TestTrimDropsWhatTheAgentNeverReads(t *testing.T) {
	meta := func() metav1.ObjectMeta {
		return metav1.ObjectMeta{
			Name: "web", Namespace: "default", Labels: map[string]string{"app": "web"},
			Annotations:   map[string]string{"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}},
		}
	}
	svc := &corev1.Service{ObjectMeta: meta(), Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.10"}}
	es := &discoveryv1.EndpointSlice{ObjectMeta: meta(), Endpoints: []discoveryv1.Endpoint{
		{Addresses: []string{"10.244.1.5"}, DeprecatedTopology: map[string]string{"zone": "a"}},
	}}
	node := &corev1.Node{ObjectMeta: meta(), Status: corev1.NodeStatus{
		Images:    []corev1.ContainerImage{{Names: []string{"pause"}}},
		Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "198.18.0.2"}},
	}}
	for _, obj := range []metav1.Object{svc, es, node} {
		if _, err := Trim(obj); err != nil {
			t.Fatal(err)
		}
		if obj.GetManagedFields() != nil || obj.GetAnnotations() != nil {
			t.Errorf("%T: managed fields or annotations kept", obj)
		}
		if obj.GetLabels()["app"] != "web" || obj.GetName() != "web" {
			t.Errorf("%T: labels or name lost", obj)
		}
	}
	if svc.Spec.ClusterIP != "10.96.0.10" {
		t.Error("service spec changed")
	}
	if es.Endpoints[0].DeprecatedTopology != nil || es.Endpoints[0].Addresses[0] != "10.244.1.5" {
		t.Errorf("endpoint: %+v", es.Endpoints[0])
	}
	if node.Status.Images != nil || len(node.Status.Addresses) != 1 {
		t.Errorf("node status: %+v", node.Status)
	}
	tomb := cache.DeletedFinalStateUnknown{Key: "default/web"}
	if out, err := Trim(tomb); err != nil || out != tomb {
		t.Errorf("tombstone: %v %v", out, err)
	}
}
