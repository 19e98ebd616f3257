{{/*
Name of every object: the release name, or RELEASE-kpfree-agent when the
release name does not contain the chart name.
*/}}
{{- define "kpfree-agent.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kpfree-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kpfree-agent.labels" -}}
{{ include "kpfree-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: service-load-balancer
app.kubernetes.io/part-of: kpfree
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "kpfree-agent.image" -}}
{{- $i := .Values.image -}}
{{- if $i.digest -}}
{{- printf "%s@%s" $i.repository $i.digest -}}
{{- else -}}
{{- printf "%s:%s" $i.repository (default .Chart.AppVersion $i.tag) -}}
{{- end -}}
{{- end -}}

{{/* https://HOST:PORT, with IPv6 literals in brackets; empty without a host. */}}
{{- define "kpfree-agent.apiServer" -}}
{{- with .Values.k8sServiceHost -}}
{{- if contains ":" . -}}
{{- printf "https://[%s]:%d" . (int $.Values.k8sServicePort) -}}
{{- else -}}
{{- printf "https://%s:%d" . (int $.Values.k8sServicePort) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Where the host's cgroup2 mount appears in the pod, and the agent's
--cgroup-root there: cgroupRoot must be cgroupMount or below it.
*/}}
{{- define "kpfree-agent.cgroupMountPath" -}}/run/kpfree/cgroupv2{{- end -}}

{{- define "kpfree-agent.cgroupRoot" -}}
{{- $mount := trimSuffix "/" .Values.cgroupMount -}}
{{- $root := trimSuffix "/" .Values.cgroupRoot -}}
{{- if eq $root $mount -}}
{{- include "kpfree-agent.cgroupMountPath" . -}}
{{- else if hasPrefix (printf "%s/" $mount) $root -}}
{{- printf "%s%s" (include "kpfree-agent.cgroupMountPath" .) (trimPrefix $mount $root) -}}
{{- else -}}
{{- fail (printf "cgroupRoot %q must be cgroupMount %q or a directory below it" .Values.cgroupRoot .Values.cgroupMount) -}}
{{- end -}}
{{- end -}}

{{/* The NodePort range, checked: FIRST-LAST with 1 <= FIRST < LAST <= 65535. */}}
{{- define "kpfree-agent.nodePortRange" -}}
{{- $parts := splitList "-" .Values.nodePortRange -}}
{{- $first := index $parts 0 | atoi -}}
{{- $last := index $parts 1 | atoi -}}
{{- if or (lt $first 1) (gt $last 65535) (ge $first $last) -}}
{{- fail (printf "nodePortRange %q: want FIRST-LAST with 1 <= FIRST < LAST <= 65535" .Values.nodePortRange) -}}
{{- end -}}
{{- printf "%d-%d" $first $last -}}
{{- end -}}

{{/* The agent's command line, as a YAML list. */}}
{{- define "kpfree-agent.args" -}}
{{- $v := .Values -}}
{{- $args := list "run" -}}
{{- with include "kpfree-agent.apiServer" . -}}
{{- $args = append $args (printf "--k8s-api-server=%s" .) -}}
{{- end -}}
{{- $args = append $args "--node-name=$(NODE_NAME)" -}}
{{- $args = append $args (printf "--cgroup-root=%s" (include "kpfree-agent.cgroupRoot" .)) -}}
{{- $args = append $args (printf "--bpffs=%s" $v.bpffs) -}}
{{- $args = append $args (printf "--strict=%t" $v.strict) -}}
{{- $args = append $args (printf "--force-prog-attach=%t" $v.forceProgAttach) -}}
{{- $args = append $args (printf "--health-addr=:%d" (int $v.healthPort)) -}}
{{- with $v.proxyName -}}
{{- $args = append $args (printf "--proxy-name=%s" .) -}}
{{- end -}}
{{- $args = append $args (printf "--nodeport=%t" $v.nodePort) -}}
{{- with $v.devices -}}
{{- $args = append $args (printf "--devices=%s" (join "," .)) -}}
{{- end -}}
{{- $args = append $args "--proc-sys=/host/proc/sys" -}}
{{- $args = append $args (printf "--nodeport-range=%s" (include "kpfree-agent.nodePortRange" .)) -}}
{{- $args = append $args (printf "--lb-algorithm=%s" $v.lbAlgorithm) -}}
{{- $args = append $args (printf "--lb-map-max=%d" (int $v.lbMapMax)) -}}
{{- $args = append $args (printf "--ct-map-max=%d" (int $v.ctMapMax)) -}}
{{- $args = concat $args $v.extraArgs -}}
{{- toYaml $args -}}
{{- end -}}
