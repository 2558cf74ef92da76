"""Inferoxy's settings: defaults, then a YAML file, then ``INFEROXY_*`` environment variables.

The YAML file is named by ``INFEROXY_CONFIG`` (or ``inferoxy --config``); its keys are the
field names below in lower case. Every variable is listed with its default in
``.env.example``.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

RuntimeKind = Literal["process", "docker", "kubernetes"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFEROXY_", extra="ignore")

    # Where clients reach the bridges.
    bind_host: str = Field(
        "127.0.0.1", description="Address the REST, gRPC and ZeroMQ bridges listen on; 0.0.0.0 for every address "
        "(the proxy image sets it)."
    )
    rest_port: int = 8698
    grpc_port: int = 50051
    zmq_port: int = 7787

    bridges: str = Field("rest,zmq,grpc", description="Comma-separated bridges `inferoxy serve` starts.")

    # TLS on the REST and gRPC bridges (docs/SECURITY.md); the ZeroMQ bridge has no TLS.
    tls_cert_file: str | None = Field(
        None, description="PEM certificate (chain) REST and gRPC serve TLS with; set with tls_key_file."
    )
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str | None = Field(
        None, description="PEM CA bundle: set, REST and gRPC clients must present a certificate it signed."
    )

    # The internal bus. Any ZeroMQ URL: tcp://, ipc://, or inproc:// when components share a process.
    # Left unset, `inferoxy serve` puts these two on ipc:// in a private directory of its own (supervisor.py);
    # the defaults below are for components run apart (`inferoxy run`) and `serve --in-process`.
    batch_manager_url: str = Field("tcp://127.0.0.1:7790", description="Bridges -> batch manager; unset under "
                                   "`serve`: ipc:// in a private directory.")
    task_manager_url: str = Field("tcp://127.0.0.1:7791", description="Batch manager -> task manager; unset under "
                                  "`serve`: ipc:// in a private directory.")
    replica_bind_url: str = Field("tcp://127.0.0.1:7792", description="Task manager binds; replicas dial. Unset under "
                                  "`serve` with process replicas: ipc:// in its private directory, no CURVE.")
    replica_connect_url: str | None = Field(
        None, description="The address replicas dial, when it differs from replica_bind_url (containers, pods)."
    )

    # Who may use the bus (docs/SECURITY.md). `serve` makes the secret at start when none is set.
    bus_curve: bool = Field(True, description="Authenticate every tcp:// and ipc:// bus link with CURVE (not an "
                            "ipc:// socket in a directory only this uid can enter); off only to debug the bus.")
    bus_secret: SecretStr | None = Field(
        None, description="Secret the bus's CURVE keys derive from; unset: `serve` makes one. Components run "
        "apart (`inferoxy run`) need the same one.")
    zmq_curve_secret_key: SecretStr | None = Field(
        None, description="CURVE secret key (z85) that encrypts the ZeroMQ clients port; clients then need its "
        "public key. Unset: plain.")

    # Model registry.
    redis_url: str | None = Field(None, description="Unset: an embedded Redis-protocol server is started.")
    redis_prefix: str = "inferoxy"
    embedded_redis_port: int = Field(0, description="Embedded Redis port; 0 picks a free one (printed at start).")
    embedded_redis_password: SecretStr | None = Field(
        None, description="Password of the embedded Redis; unset: `serve` makes a random one at start.")
    models_file: str | None = Field("models.yaml", description="Seeds the registry at start; empty to skip.")
    models_overwrite: bool = Field(
        False, description="models.yaml replaces specs Redis already holds (default: it only adds missing ones)."
    )
    registry_resync_s: float = Field(
        2.0, gt=0, description="How often components re-check the registry's revision (pub/sub is immediate)."
    )
    admin_key: str | None = Field(
        None, description="Key admin API calls must carry; unset: admin calls only from loopback clients."
    )
    auth: Literal["off", "required", "auto"] = Field(
        "auto", description="API keys for inference: off, required, or auto (required once a key exists)."
    )
    auth_metadata: bool = Field(
        False, description="Model metadata needs a key too (with auth on); health endpoints always stay open."
    )

    # Replicas.
    runtime: RuntimeKind = Field("process", description="Where replicas run: process, docker or kubernetes.")
    instance: str = Field("inferoxy", description="Names and labels this proxy's replicas.")
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    replica_start_timeout_s: float = 120.0
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    shutdown_drain_s: float = Field(
        1.0, ge=0, description="At shutdown, how long replicas may finish the batches they hold before they are "
        "killed (containers removed); keep the whole stop inside docker stop's 10 s."
    )
    crash_loop_failures: int = Field(
        3, ge=1, description="Failed starts in a row (none served for restart_backoff_max_s) that mark a model failed."
    )
    cpu_slots: int = Field(64, ge=0, description="Most replicas not on a GPU that this task manager runs at once.")
    gpus: str | None = Field(None, description="GPU ids for replicas (e.g. 0,1,3); unset: nvidia-smi; none: no GPU.")
    gpu_sharing: bool = Field(False, description="Let replicas of different models share a GPU.")

    # The docker runtime.
    docker_url: str | None = Field(None, description="Docker engine; unset: DOCKER_HOST, else the local socket.")
    docker_network: str = Field("host", description="host, or the Docker network replicas join.")
    docker_pull_policy: Literal["if-not-present", "always", "never"] = "if-not-present"
    onnx_image: str = Field("inferoxy/onnx-base", description="Image of format-onnx models that name none "
                            "(docker and kubernetes runtimes; docker/onnx-base).")
    registry_server: str | None = Field(None, description="Registry the credentials below are for.")
    registry_username: str | None = None
    registry_password: str | None = None

    # The kubernetes runtime (docs/KUBERNETES.md).
    kube_namespace: str | None = Field(
        None, description="Namespace of the replica pods; unset: the proxy's own (in a pod), else default.")
    kube_kubeconfig: str | None = Field(
        None, description="kubeconfig file to reach the API server; unset: the in-cluster service account, else "
        "~/.kube/config.")
    kube_context: str | None = Field(None, description="Context in kube_kubeconfig; unset: its current one.")
    kube_pull_policy: Literal["if-not-present", "always", "never"] = Field(
        "if-not-present", description="Replica pods' imagePullPolicy unless the spec sets pull_policy.")
    kube_image_pull_secrets: str = Field(
        "", description="Comma-separated Secrets (in kube_namespace) replica pods pull their images with.")
    kube_pod_name: str | None = Field(
        None, description="The proxy's own pod (downward API metadata.name): owner of the replica pods, so "
        "deleting it deletes them. Set with kube_pod_uid.")
    kube_pod_uid: str | None = Field(None, description="The proxy's own pod's metadata.uid (downward API).")

    # Requests.
    request_timeout_s: float = 30.0
    max_queue_size: int = Field(10_000, ge=1, description="Queue bound per model version unless its spec sets one.")
    priority_aging_ms: float = Field(100.0, ge=0, description="Head start of each priority level over the next.")
    max_message_bytes: int = 64 * 1024 * 1024

    # What one client may have buffered in a bridge (docs/PROTOCOL.md, "Limits"); beyond it: overloaded.
    client_max_outstanding: int = Field(
        1000, ge=1, description="Requests (and unread replies) per ZeroMQ peer, gRPC stream or gRPC connection."
    )
    client_max_buffered_bytes: int = Field(
        128 * 1024 * 1024, ge=1, description="Bytes of requests and unread replies per ZeroMQ peer or gRPC stream."
    )
    http_keep_alive_s: float = Field(5.0, gt=0, description="REST: an idle keep-alive connection is closed after this.")
    http_header_timeout_s: float = Field(
        10.0, gt=0, description="REST: a connection that has not sent a complete request head within this is closed."
    )

    bridge_event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="The event loop of a bridge run as its own process: auto (uvloop for the REST bridge, "
        "where it was measured to save CPU; asyncio's for gRPC and ZeroMQ, where it saved none), uvloop (every "
        "bridge; needs uvloop installed) or asyncio. Other components, and `serve --in-process`, use asyncio's."
    )

    # Jobs (docs/JOBS.md): the job_worker component and POST /v2/jobs.
    jobs_max_running: int = Field(2, ge=1, description="Jobs one job_worker runs at once; the rest wait queued.")
    jobs_max_queued: int = Field(1000, ge=1, description="Jobs queued or running at most; POST /v2/jobs past it: 429.")
    jobs_max_attempts: int = Field(3, ge=1, description="Runs a job gets (its own failures, a worker that died) "
                                   "before it is failed.")
    jobs_retry_backoff_s: float = Field(5.0, gt=0, description="Wait before a failed job's first retry; doubles.")
    jobs_retry_backoff_max_s: float = Field(300.0, gt=0, description="The longest wait between a job's retries.")
    jobs_lease_s: float = Field(30.0, gt=0, description="A worker's claim on a job, renewed while it runs; a job "
                                "whose worker died is claimed again this long after its last renewal.")
    jobs_local_root: str | None = Field(None, description="The folder under which POST /v2/jobs may read and write "
                                        "local paths; unset: only s3:// URLs are accepted over the API.")
    jobs_idempotency_ttl_s: float = Field(86400.0, gt=0, description="How long an Idempotency-Key returns its job.")
    jobs_retention_s: float = Field(604800.0, gt=0, description="How long a finished job's record is kept.")

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or json: one JSON object per line (time, level, component, model, request id, "
        "message) from every component and replica."
    )
    metrics: bool = Field(
        True, description="Record Prometheus metrics (GET /metrics); false makes every metric a no-op."
    )

    @field_validator("replica_bind_url")
    @classmethod
    def _replicas_are_other_processes(cls, url: str) -> str:
        if url.startswith("inproc://"):
            raise ValueError("replicas run in their own processes, so replica_bind_url cannot be inproc://")
        return url

    @model_validator(mode="after")
    def _tls_needs_both_files(self) -> Settings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("TLS needs both INFEROXY_TLS_CERT_FILE and INFEROXY_TLS_KEY_FILE")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("INFEROXY_TLS_CLIENT_CA_FILE needs TLS on: set INFEROXY_TLS_CERT_FILE and _KEY_FILE")
        return self

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def bridge_names(self) -> list[str]:
        return [name.strip() for name in self.bridges.split(",") if name.strip()]

    @property
    def bus_key_secret(self) -> str | None:
        """The secret the bus's CURVE keys derive from, or None when the bus runs plain."""
        if not self.bus_curve or self.bus_secret is None:
            return None
        return self.bus_secret.get_secret_value()

    @property
    def replica_url(self) -> str:
        """The address handed to replicas."""
        return self.replica_connect_url or self.replica_bind_url

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("INFEROXY_CONFIG")
        if config_file:
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"INFEROXY_CONFIG names {config_file}, which does not exist")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


def load_settings() -> Settings:
    return Settings()
