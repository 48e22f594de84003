{{/* The name of the chart's objects: the release name, or `tether` for a release of that name. */}}
{{- define "tether.fullname" -}}
{{- if contains "tether" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-tether" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tether.labels" -}}
app.kubernetes.io/name: tether
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | quote }}
{{- end -}}

{{- define "tether.selectorLabels" -}}
app.kubernetes.io/name: tether
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/component: tetherd
{{- end -}}

{{- define "tether.serviceAccountName" -}}
{{- default "tether" .Values.serviceAccount.name -}}
{{- end -}}

{{- define "tether.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The built-in policies the chart ships, from files/policies (byte-identical to policies/ built). */}}
{{- define "tether.builtinPolicies" -}}
kubevirt statefulset stateless
{{- end -}}

{{/* The ConfigMap of policy NAME. */}}
{{- define "tether.policyConfigMap" -}}
{{- printf "tether-policy-%s" . -}}
{{- end -}}

{{/* --chain: every name as the ConfigMap that carries it. */}}
{{- define "tether.chain" -}}
{{- $out := list -}}
{{- range .Values.policies.chain -}}
{{- $out = append $out (printf "configmap:%s" (include "tether.policyConfigMap" .)) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{/* The address of the TCP listener: the node's addresses with metrics on, loopback without. */}}
{{- define "tether.metricsAddress" -}}
{{- if .Values.metrics.enabled -}}
{{- printf "0.0.0.0:%d" (int .Values.metrics.port) -}}
{{- else -}}
{{- printf "127.0.0.1:%d" (int .Values.metrics.port) -}}
{{- end -}}
{{- end -}}
