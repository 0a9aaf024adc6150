# Rendered by hpc-sandbox 0.1.0 from template nomad_job.hcl.j2, profile 'nomad-service', job key 'nomad-service'.
# Review it before it runs; to change it, change the profile or flags and render again.
#
# What runs: 2 node servers (`hpc_sandbox serve`, raw_exec, as the Nomad client's user), at most one per node, each running 8 slots with runtime apptainer and image /shared/images/swe-agent.sif.
# Ports: each node server listens on the static port 9100 of its node's Nomad address, nothing else.
# Files: only inside the allocation directory; the secrets come from the Nomad Variable nomad/jobs/nomad-service (keys token, tls_cert, tls_key) into the task's secrets dir (mode 0600).
job "nomad-service" {
  name = "rl-sandbox"
  type = "service"
  datacenters = ["*"]
  node_pool = "sandbox-pool"

  group "servers" {
    count = 2

    # One node server per node: each holds the static port below.
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    constraint {
      attribute = "${attr.kernel.name}"
      value     = "linux"
    }

    network {
      port "http" {
        static = 9100
      }
    }

    restart {
      attempts = 2
      interval = "30m"
      delay    = "15s"
      mode     = "delay"
    }

    task "serve" {
      driver = "raw_exec"

      config {
        command = "/opt/hpc-sandbox/venv/bin/python"
        args = [
          "-m", "hpc_sandbox", "serve",
          "--job-id", "nomad-service",
          "--state-dir", "${NOMAD_ALLOC_DIR}/hpc-sandbox",
          "--token-file", "${NOMAD_SECRETS_DIR}/token",
          "--slots", "8",
          "--runtime", "apptainer",
          "--image", "/shared/images/swe-agent.sif",
          "--tls-cert", "${NOMAD_SECRETS_DIR}/tls.crt",
          "--tls-key", "${NOMAD_SECRETS_DIR}/tls.key",
          "--port-range", "9100-9100",
          "--port-index", "0",
          "--host", "${NOMAD_IP_http}"
        ]
      }

      # The job's secrets (token, TLS certificate and key): Nomad renders them from the
      # job's own Variable into the secrets dir; they are never written in this file.
      template {
        data        = <<-EOT
        {{ with nomadVar "nomad/jobs/nomad-service" }}{{ .token }}{{ end }}
        EOT
        destination = "${NOMAD_SECRETS_DIR}/token"
        perms       = "0600"
      }
      template {
        data        = <<-EOT
        {{ with nomadVar "nomad/jobs/nomad-service" }}{{ .tls_cert }}{{ end }}
        EOT
        destination = "${NOMAD_SECRETS_DIR}/tls.crt"
        perms       = "0600"
      }
      template {
        data        = <<-EOT
        {{ with nomadVar "nomad/jobs/nomad-service" }}{{ .tls_key }}{{ end }}
        EOT
        destination = "${NOMAD_SECRETS_DIR}/tls.key"
        perms       = "0600"
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      resources {
        cores  = 16
        memory = 32768
      }
    }
  }
}
