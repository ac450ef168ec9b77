{{- define "kmmr.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kmmr.serviceAccountName" -}}
{{- default (include "kmmr.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "kmmr.selectorLabels" -}}
app.kubernetes.io/name: kmmr-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kmmr.labels" -}}
{{ include "kmmr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kmmr
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}


{{- /*
The operator's image reference. values.schema.json refuses a moving tag first; this refuses it
again for installs that skip schema validation (--skip-schema-validation).
*/ -}}
{{- define "kmmr.image" -}}
{{- $tag := toString .Values.image.tag -}}
{{- if eq (lower $tag) "latest" -}}
{{- fail (printf "image.tag=%s is refused: a moving tag defeats node image caches (kind load docker-image, air-gapped nodes) and makes upgrades unreproducible. Set a fixed tag, e.g. --set image.tag=%s (the chart's appVersion)" $tag .Chart.AppVersion) -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
