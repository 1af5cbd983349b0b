{{/*
One Deployment of the bridge. Pass (dict "root" $ "component" NAME "values" .Values.api|.Values.worker
"args" LIST "http" BOOL).
*/}}
{{- define "bridge.deployment" -}}
{{- $root := .root }}
{{- $v := .values }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "bridge.fullname" $root }}-{{ .component }}
  labels:
    {{- include "bridge.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  replicas: {{ $v.replicas }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "bridge.selectorLabels" (dict "root" $root "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "bridge.selectorLabels" (dict "root" $root "component" .component) | nindent 8 }}
      annotations:
        # Roll the pods when the settings change.
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        checksum/secret: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "bridge.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      {{- if $v.terminationGracePeriodSeconds }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- end }}
      {{- $front := and .http $root.Values.front.enabled }}
      {{- if $front }}
      initContainers:
        # The front's nginx configuration, written from this pod's settings (it holds the shared secret).
        - name: front-config
          image: {{ include "bridge.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            - front-config
            - --output
            - /etc/bridge-front/nginx.conf
            - --listen
            - {{ printf "0.0.0.0:%d" (int $root.Values.front.port) | quote }}
            - --bridge
            - {{ printf "http://127.0.0.1:%d" (int $root.Values.api.port) | quote }}
            - --state-dir
            - /var/run/bridge-front
            - --workers
            - {{ $root.Values.front.workers | quote }}
          envFrom:
            - configMapRef:
                name: {{ include "bridge.fullname" $root }}-settings
            - secretRef:
                name: {{ include "bridge.secretName" $root }}
          resources:
            {{- toYaml $root.Values.front.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: front-config
              mountPath: /etc/bridge-front
      {{- end }}
      containers:
        - name: bridge
          image: {{ include "bridge.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            {{- toYaml (concat .args $v.extraArgs) | nindent 12 }}
          envFrom:
            - configMapRef:
                name: {{ include "bridge.fullname" $root }}-settings
            - secretRef:
                name: {{ include "bridge.secretName" $root }}
          {{- if .http }}
          ports:
            - name: http
              containerPort: {{ $root.Values.api.port }}
              protocol: TCP
          {{- end }}
          {{- if .http }}
          {{- with $v.startupProbe }}
          startupProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $v.livenessProbe }}
          livenessProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $v.readinessProbe }}
          readinessProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- else }}
          {{- if $v.metricsPort }}
          # `bridge worker` serves no API: its metrics server is its one HTTP port, for Prometheus and
          # the liveness probe, on the pod's addresses (the bridge's default is loopback only).
          ports:
            - name: metrics
              containerPort: {{ int $v.metricsPort }}
              protocol: TCP
          env:
            - name: BRIDGE_METRICS_PORT
              value: {{ int $v.metricsPort | quote }}
            - name: BRIDGE_METRICS_HOST
              value: "0.0.0.0"
          {{- end }}
          {{- with $v.livenessProbe }}
          livenessProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- end }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            - name: data
              mountPath: /var/lib/bridge
        {{- if $front }}
        - name: front
          image: {{ printf "%s:%s" $root.Values.front.image.repository $root.Values.front.image.tag | quote }}
          imagePullPolicy: {{ $root.Values.front.image.pullPolicy }}
          command: ["nginx", "-e", "stderr", "-c", "/etc/bridge-front/nginx.conf"]
          ports:
            - name: front
              containerPort: {{ $root.Values.front.port }}
              protocol: TCP
          readinessProbe:
            tcpSocket: {port: front}
            periodSeconds: 10
          livenessProbe:
            tcpSocket: {port: front}
            periodSeconds: 10
          resources:
            {{- toYaml $root.Values.front.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: front-config
              mountPath: /etc/bridge-front
              readOnly: true
            - name: front-state
              mountPath: /var/run/bridge-front
        {{- end }}
      volumes:
        - name: tmp
          emptyDir: {}
        - name: data
          emptyDir: {}
        {{- if $front }}
        # In memory: the configuration holds the shared secret, and the grant cache callers' credentials.
        - name: front-config
          emptyDir: {medium: Memory, sizeLimit: 1Mi}
        - name: front-state
          emptyDir: {medium: Memory, sizeLimit: 64Mi}
        {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
