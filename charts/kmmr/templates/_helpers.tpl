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
