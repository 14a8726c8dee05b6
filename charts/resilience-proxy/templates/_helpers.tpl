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

{{/* Render the Secret named (index . 1) from the value spec (index . 0)? Yes when a value is given, or
generate is on — unless a Secret of that name exists that this release does not own: it is the user's
own (created out of band), and stays theirs. Prints "yes" or nothing. */}}
{{- define "rp.ownSecret" -}}
{{- $s := index . 0 -}}{{- $name := index . 1 -}}{{- $root := index . 2 -}}
{{- $old := lookup "v1" "Secret" $root.Release.Namespace $name -}}
{{- $theirs := and $old (ne (dig "metadata" "annotations" "meta.helm.sh/release-name" "" $old) $root.Release.Name) -}}
{{- if and (or $s.value $s.generate) (not $theirs) -}}yes{{- end -}}
{{- end -}}

{{/* A Secret's token: the value set, else the one already in the cluster, else a new random one (kept on
upgrade through lookup; `helm template` has no cluster, so there it is new each time). */}}
{{- define "rp.token" -}}
{{- $s := index . 0 -}}{{- $name := index . 1 -}}{{- $ns := index . 2 -}}
{{- if $s.value -}}
{{ $s.value }}
{{- else -}}
{{- $old := lookup "v1" "Secret" $ns $name -}}
{{- if and $old $old.data (index $old.data "token") -}}
{{ index $old.data "token" | b64dec }}
{{- else -}}
{{ randAlphaNum 48 }}
{{- end -}}
{{- end -}}
{{- end -}}
