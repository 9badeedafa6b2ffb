{{/* The chart's name. */}}
{{- define "npd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The objects' name: the release name, with the chart's name unless it holds it already. */}}
{{- define "npd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "npd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* What selects the pods (immutable in a DaemonSet: never change it). */}}
{{- define "npd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "npd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "npd.labels" -}}
{{ include "npd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "npd.chart" . }}
{{- end }}

{{- define "npd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "npd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "npd.configMapName" -}}
{{- printf "%s-config" (include "npd.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "npd.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The rule files in the rules ConfigMap, in load order, as a JSON list of file names: the
defaults (settings.default_monitors) in the order the agent embeds them (structured.json uses
conditions declared before it; a default added later to files/rules/ comes after them), then
settings.custom_monitor_definitions by name. A custom file named like a default replaces it
in place.
*/}}
{{- define "npd.ruleFileNames" -}}
{{- $names := list }}
{{- if .Values.settings.default_monitors }}
{{- $order := list "kernel-monitor.json" "readonly-monitor.json" "kernel-monitor-current.json" "structured.json" }}
{{- $shipped := list }}
{{- range $path, $_ := .Files.Glob "files/rules/*.json" }}
{{- $shipped = append $shipped (base $path) }}
{{- end }}
{{- range $order }}
{{- if has . $shipped }}
{{- $names = append $names . }}
{{- end }}
{{- end }}
{{- range $shipped }}
{{- if not (has . $names) }}
{{- $names = append $names . }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name := keys .Values.settings.custom_monitor_definitions | sortAlpha }}
{{- if not (has $name $names) }}
{{- $names = append $names $name }}
{{- end }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/*
The rule and plugin-monitor files the agent loads from /etc/npd/ with --config, as a JSON list
of file names: the ConfigMap's *.json files (other files, such as plugin scripts, are only
mounted), except those settings.log_monitors or settings.custom_plugin_monitors already name by
path (/etc/npd/<name>, or /custom-config/<name> as in deliveryhero's chart), so that no file is
loaded twice.
*/}}
{{- define "npd.loadedRuleFiles" -}}
{{- $named := concat .Values.settings.log_monitors .Values.settings.custom_plugin_monitors }}
{{- $names := list }}
{{- range $name := include "npd.ruleFileNames" . | fromJsonArray }}
{{- if and (hasSuffix ".json" $name) (not (has (printf "/etc/npd/%s" $name) $named)) (not (has (printf "/custom-config/%s" $name) $named)) }}
{{- $names = append $names $name }}
{{- end }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* The content of rule file $name (a default, or the custom file of that name). */}}
{{- define "npd.ruleFile" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- if hasKey $root.Values.settings.custom_monitor_definitions $name }}
{{- index $root.Values.settings.custom_monitor_definitions $name }}
{{- else }}
{{- $root.Files.Get (printf "files/rules/%s" $name) }}
{{- end }}
{{- end }}

{{/* Fails when no rule file would be given to the agent. */}}
{{- define "npd.checkRules" -}}
{{- if and (eq (len (include "npd.loadedRuleFiles" . | fromJsonArray)) 0) (not .Values.settings.log_monitors) (not .Values.settings.custom_plugin_monitors) }}
{{- fail "settings.default_monitors is false and no rule file is given (settings.custom_monitor_definitions, settings.log_monitors, settings.custom_plugin_monitors): the agent would fall back to its embedded defaults" }}
{{- end }}
{{- end }}

{{/*
The problems the loaded rule files can report, as JSON: {"reasons": [...], "conditions":
[{"type": T, "reason": R}, ...]}, from the ConfigMap's *.json files, rule files and plugin
monitor files alike (for the alerts; every one of them is loaded, by --config or by the path a
setting names).
*/}}
{{- define "npd.problems" -}}
{{- $root := . }}
{{- $reasons := list }}
{{- $conditions := list }}
{{- range $name := include "npd.ruleFileNames" . | fromJsonArray }}
{{- if hasSuffix ".json" $name }}
{{- $file := include "npd.ruleFile" (list $root $name) | fromJson }}
{{- if hasKey $file "Error" }}
{{- fail (printf "rule file %s is not JSON: %s" $name $file.Error) }}
{{- end }}
{{- range $rule := $file.rules | default list }}
{{- if not (has $rule.reason $reasons) }}
{{- $reasons = append $reasons $rule.reason }}
{{- end }}
{{- if and (eq $rule.type "permanent") $rule.condition }}
{{- $c := dict "type" $rule.condition "reason" $rule.reason }}
{{- if not (has $c $conditions) }}
{{- $conditions = append $conditions $c }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson (dict "reasons" $reasons "conditions" $conditions) }}
{{- end }}
