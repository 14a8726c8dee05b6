{{/* The labels every object carries. */}}
{{- define "rp.labels" -}}
app.kubernetes.io/name: resilience-proxy
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "rp.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* A Secret's token: the value set, else the one already in the cluster, else a new random one (kept on
upgrade through lookup; `helm template` has no cluster, so there it is new each time). */}}
{{- define "rp.token" -}}
{{- $s := index . 0 -}}{{- $ns := index . 1 -}}
{{- if $s.value -}}
{{ $s.value }}
{{- else -}}
{{- $old := lookup "v1" "Secret" $ns $s.name -}}
{{- if and $old $old.data (index $old.data "token") -}}
{{ index $old.data "token" | b64dec }}
{{- else -}}
{{ randAlphaNum 48 }}
{{- end -}}
{{- end -}}
{{- end -}}
