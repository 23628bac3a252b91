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

{{/* With Strimzi, the KafkaUser's name is the SCRAM user name. */}}
{{- define "vtp.saslUsername" -}}
{{- if .Values.kafka.strimzi.enabled -}}
{{ include "vtp.fullname" . }}
{{- else -}}
{{ .Values.kafka.sasl.username }}
{{- end -}}
{{- end -}}

{{/* librdkafka keys (VTP_KAFKA_EXTRA); the password is a file (VTP_KAFKA_SASL_PASSWORD_FILE). */}}
{{- define "vtp.kafkaExtra" -}}
{{- $extra := dict "security.protocol" "SSL" "ssl.ca.location" "/etc/vtp/kafka-ca/ca.crt" -}}
{{- if .Values.kafka.sasl.enabled -}}
{{- $_ := set $extra "security.protocol" "SASL_SSL" -}}
{{- $_ := set $extra "sasl.mechanism" .Values.kafka.sasl.mechanism -}}
{{- $_ := set $extra "sasl.username" (include "vtp.saslUsername" .) -}}
{{- end -}}
{{- $extra | toJson -}}
{{- end -}}

{{/*
What the schema cannot say: checked before anything renders. A release never changes
region (its topics, keys and data are that region's); Strimzi's listener wants SCRAM and
its own Secrets; a write needs at most as many in-sync replicas as there are replicas,
and there are at most as many replicas as brokers.
*/}}
{{- define "vtp.checks" -}}
{{- $account := lookup "v1" "ServiceAccount" .Release.Namespace (include "vtp.fullname" .) -}}
{{- if $account -}}
{{- $was := index ($account.metadata.labels | default dict) "vtp.io/region" | default "" -}}
{{- if and $was (ne $was .Values.region) -}}
{{- fail (printf "release %s serves region %s, not %s: install another region as a release of its own" .Release.Name $was .Values.region) -}}
{{- end -}}
{{- end -}}
{{- if gt (int .Values.topics.minInsync) (int .Values.topics.replication) -}}
{{- fail "topics.minInsync is more than topics.replication: no write could ever be acknowledged" -}}
{{- end -}}
{{- if .Values.kafka.strimzi.enabled -}}
{{- if gt (int .Values.topics.replication) (int .Values.kafka.strimzi.brokers) -}}
{{- fail "topics.replication is more than kafka.strimzi.brokers" -}}
{{- end -}}
{{- if or (not .Values.kafka.sasl.enabled) (ne .Values.kafka.sasl.mechanism "SCRAM-SHA-512") (ne .Values.kafka.sasl.passwordSecret.key "password") (ne .Values.kafka.caSecret.key "ca.crt") -}}
{{- fail "kafka.strimzi.enabled: the Strimzi listener wants SCRAM-SHA-512 with the KafkaUser's Secret (key password) and the cluster CA (key ca.crt)" -}}
{{- end -}}
{{- end -}}
{{- if eq (int .Values.serve.port) (int .Values.metrics.port) -}}
{{- fail "serve.port and metrics.port must differ" -}}
{{- end -}}
{{- if and .Values.gateway.enabled (eq (int .Values.gateway.port) (int .Values.metrics.port)) -}}
{{- fail "gateway.port and metrics.port must differ" -}}
{{- end -}}
{{- end -}}

{{/* The release's long-running processes, as a JSON list: the gateway when enabled. */}}
{{- define "vtp.components" -}}
{{- $components := list "worker" "sink" "serve" -}}
{{- if .Values.gateway.enabled -}}
{{- $components = append $components "gateway" -}}
{{- end -}}
{{- toJson $components -}}
{{- end -}}

{{- define "vtp.env" -}}
- name: VTP_REGION
  value: {{ .Values.region | quote }}
- name: VTP_KAFKA_BOOTSTRAP
  value: {{ include "vtp.bootstrap" . | quote }}
{{- if .Values.kafka.sasl.enabled }}
- name: VTP_KAFKA_SASL_PASSWORD_FILE
  value: /etc/vtp/kafka-sasl/password
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
{{- with .Values.clickhouse.cluster }}
- name: VTP_WAREHOUSE_CLUSTER
  value: {{ . | quote }}
{{- end }}
{{- end -}}


{{/* The Kafka CA, and the SASL password as a file: every Kafka client's volumes. */}}
{{- define "vtp.kafkaVolumes" -}}
- name: kafka-ca
  secret:
    secretName: {{ include "vtp.caSecret" . }}
    items:
      - key: {{ .Values.kafka.caSecret.key }}
        path: ca.crt
{{- if .Values.kafka.sasl.enabled }}
- name: kafka-sasl
  secret:
    secretName: {{ include "vtp.saslSecret" . }}
    defaultMode: 0400
    items:
      - key: {{ .Values.kafka.sasl.passwordSecret.key }}
        path: password
{{- end }}
{{- end -}}

{{- define "vtp.kafkaMounts" -}}
- name: kafka-ca
  mountPath: /etc/vtp/kafka-ca
  readOnly: true
{{- if .Values.kafka.sasl.enabled }}
- name: kafka-sasl
  mountPath: /etc/vtp/kafka-sasl
  readOnly: true
{{- end }}
{{- end -}}
