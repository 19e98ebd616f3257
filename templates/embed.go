// Package templates holds what kpfree renders onto a cluster, embedded in the
// binary: the kpfree-agent Helm chart (kpfree-agent/), and later the kubeadm
// configuration templates (kubeadm/).
package templates

import (
	"embed"
	"fmt"
	"io/fs"
	"strings"

	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chart/loader"
)

// AgentChartDir is the kpfree-agent chart's directory in this package.
const AgentChartDir = "kpfree-agent"

// "all:" keeps the files whose names start with "_" or ".", like _helpers.tpl.
//
//go:embed all:kpfree-agent
var agentChart embed.FS

// AgentChart loads the embedded kpfree-agent chart. Every call returns a new
// chart, so a caller may change it.
func AgentChart() (*chart.Chart, error) {
	return LoadChart(agentChart, AgentChartDir)
}

// LoadChart loads the Helm chart in directory dir of fsys.
func LoadChart(fsys fs.FS, dir string) (*chart.Chart, error) {
	var files []*loader.BufferedFile
	err := fs.WalkDir(fsys, dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := fs.ReadFile(fsys, p)
		if err != nil {
			return err
		}
		files = append(files, &loader.BufferedFile{Name: strings.TrimPrefix(p, dir+"/"), Data: data})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("chart %s: %w", dir, err)
	}
	c, err := loader.LoadFiles(files)
	if err != nil {
		return nil, fmt.Errorf("chart %s: %w", dir, err)
	}
	return c, nil
}
