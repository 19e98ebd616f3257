package templates

import (
	"embed"
	"fmt"
	"io/fs"
)

// KubeadmDir is the directory of the kubeadm configuration templates in this
// package: one init and one join template per kubeadm config API version
// (init-v1beta4.yaml.tmpl, join-v1beta3.yaml.tmpl, ...), rendered by
// bootstrap with text/template.
const KubeadmDir = "kubeadm"

//go:embed all:kubeadm
var kubeadmTemplates embed.FS

// Kubeadm returns the kubeadm templates, rooted at KubeadmDir.
func Kubeadm() fs.FS {
	sub, err := fs.Sub(kubeadmTemplates, KubeadmDir)
	if err != nil {
		panic(err) // the directory is embedded: cannot happen
	}
	return sub
}

// KubeadmTemplate returns the text of one kubeadm template, e.g.
// "init-v1beta4.yaml.tmpl".
func KubeadmTemplate(name string) (string, error) {
	b, err := fs.ReadFile(Kubeadm(), name)
	if err != nil {
		return "", fmt.Errorf("kubeadm template %s: %w", name, err)
	}
	return string(b), nil
}
