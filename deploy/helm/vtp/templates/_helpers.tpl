{{/* Names, labels and the settings every vtp process of this release shares. */}}

{{- define "vtp.fullname" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "vtp.labels" -}}
app.kubernetes.io/name: vtp
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
vtp.io/region: {{ .Values.region }}
{{- end -}}

{{- define "vtp.selector" -}}
app.kubernetes.io/name: vtp
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vtp.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end -}}

{{- define "vtp.kafkaCluster" -}}
{{ include "vtp.fullname" . }}-kafka
{{- end -}}

{{- define "vtp.bootstrap" -}}
{{- if .Values.kafka.strimzi.enabled -}}
{{ include "vtp.kafkaCluster" . }}-kafka-bootstrap:9093
{{- else -}}
{{ required "kafka.bootstrap: the existing cluster's host:port (or kafka.strimzi.enabled)" .Values.kafka.bootstrap }}
{{- end -}}
{{- end -}}

{{- define "vtp.caSecret" -}}
{{- if .Values.kafka.strimzi.enabled -}}
{{ include "vtp.kafkaCluster" . }}-cluster-ca-cert
{{- else -}}
{{ required "kafka.caSecret.name: the Secret of the brokers' CA" .Values.kafka.caSecret.name }}
{{- end -}}
{{- end -}}

{{- define "vtp.saslSecret" -}}
{{- if .Values.kafka.strimzi.enabled -}}
{{ include "vtp.fullname" . }}
{{- else -}}
{{ required "kafka.sasl.passwordSecret.name: the Secret of vtp's Kafka password" .Values.kafka.sasl.passwordSecret.name }}
{{- end -}}
{{- end -}}

{{/* librdkafka keys (VTP_KAFKA_EXTRA); the password comes from the env var before it. */}}
{{- define "vtp.kafkaExtra" -}}
{{- $extra := dict "security.protocol" "SSL" "ssl.ca.location" "/etc/vtp/kafka-ca/ca.crt" -}}
{{- if .Values.kafka.sasl.enabled -}}
{{- $_ := set $extra "security.protocol" "SASL_SSL" -}}
{{- $_ := set $extra "sasl.mechanism" .Values.kafka.sasl.mechanism -}}
{{- $_ := set $extra "sasl.username" .Values.kafka.sasl.username -}}
{{- $_ := set $extra "sasl.password" "$(VTP_KAFKA_SASL_PASSWORD)" -}}
{{- end -}}
{{- $extra | toJson -}}
{{- end -}}

{{- define "vtp.env" -}}
- name: VTP_REGION
  value: {{ .Values.region | quote }}
- name: VTP_KAFKA_BOOTSTRAP
  value: {{ include "vtp.bootstrap" . | quote }}
{{- if .Values.kafka.sasl.enabled }}
- name: VTP_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "vtp.saslSecret" . }}
      key: {{ .Values.kafka.sasl.passwordSecret.key }}
{{- end }}
- name: VTP_KAFKA_EXTRA
  value: {{ include "vtp.kafkaExtra" . | quote }}
- name: VTP_TOPIC_PREFIX
  value: {{ .Values.topics.prefix | quote }}
- name: VTP_TOPIC_PARTITIONS
  value: {{ .Values.topics.partitions | quote }}
- name: VTP_TOPIC_REPLICATION
  value: {{ .Values.topics.replication | quote }}
- name: VTP_TOPIC_MIN_INSYNC
  value: {{ .Values.topics.minInsync | quote }}
- name: VTP_CHANGELOG_COMPACTION_LAG_S
  value: {{ .Values.topics.changelogCompactionLagSeconds | quote }}
- name: VTP_DATA_DIR
  value: /var/lib/vtp
- name: VTP_KEYS_DIR
  value: /etc/vtp/keys
- name: VTP_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
- name: VTP_METRICS_HOST
  value: 0.0.0.0
{{- end -}}


{{- define "vtp.warehouseEnv" -}}
- name: VTP_WAREHOUSE
  valueFrom:
    secretKeyRef:
      name: {{ required "clickhouse.urlSecret.name: the Secret holding the warehouse URL" .Values.clickhouse.urlSecret.name }}
      key: {{ .Values.clickhouse.urlSecret.key }}
{{- end -}}
