package image

// AgentRepository is where a release publishes the kpfree-agent image; the
// Helm chart's default image.repository.
const AgentRepository = "ghcr.io/kpfree/kpfree-agent"

// AgentSpec is the kpfree-agent image: the static agent binary on PATH
// (the chart runs `kpfree-agent run ...`) over the base files, nothing else.
func AgentSpec(bin, ref string) Spec {
	return Spec{
		Ref:        ref,
		Base:       BaseFiles(),
		Files:      []File{{Src: bin, Dst: "/usr/local/bin/kpfree-agent", Mode: 0o755}},
		Entrypoint: []string{"/usr/local/bin/kpfree-agent"},
		Labels: map[string]string{
			"org.opencontainers.image.title":  "kpfree-agent",
			"org.opencontainers.image.source": "https://github.com/kpfree/kpfree",
		},
	}
}
