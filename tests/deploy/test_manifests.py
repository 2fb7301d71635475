"""What a platform engineer relies on in the rendered manifests: they are valid for the
Kubernetes versions we support, probes and drain fit the server's own behaviour, secrets
stay out of plain text, GPUs only where asked for, adapters shared, pods locked down."""

import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tandem.server.api.grpc_server import ABORT_WAIT_SECONDS, SERVICES
from tandem.server.openai_api.front import CLOSE_GRACE_SECONDS
from tandem.server.cli import ENGINE_FLAGS, SERVER_FLAGS, build_parser, env_name
from tandem.server.config import EngineConfig, ServerConfig
from tests.deploy.conftest import DEFAULT, K8S, REPO, RENDERINGS, TOKENS, config_map, container, find, tandem_workloads

SCHEMAS = REPO / "deploy" / "schemas"
CUSTOM_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-inference.networking.k8s.io-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-gateway.networking.k8s.io-v1.json",
    ("networking.istio.io/v1", "DestinationRule"): "destinationrule-networking.istio.io-v1.json",
}
# The oldest Kubernetes we support (native gRPC probes are GA from 1.27) and the newest
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
READINESS_SERVICE = next(s for s in SERVICES if s.startswith("tandem.v1.Generation"))
METRICS_SOURCE = (REPO / "tandem" / "server" / "metrics.py").read_text()
# Measured: `tandem serve` on the embedded SmolLM2 in float32 was resident 3.54 GB once ready
# with a 256 MiB KV cache, a 512 MiB prefaulted adapter cache and 8 slots of rank 64 (625 MB):
# the model, what its load leaves and torch are the other ~2.1 GB. Room for requests on top.
MODEL_AND_RUNTIME_BYTES = 2_100_000_000 + (1 << 29)
# An adapter slot's floats per unit of rank: SmolLM2's 30 layers, each projection's inputs +
# outputs (q, k, v, o, gate, up, down).
SLOT_FLOATS_PER_RANK = 30 * (1152 + 768 + 768 + 1152 + 2112 + 2112 + 2112)
# The smallest GPU the gpu overlay must start on: a 16 GB card (T4: 15360 MiB usable; V100
# 16GB: 16160 MiB). On it, beside what the server allocates whole at start, an estimate (not
# measured): the CUDA context and cuBLAS workspaces (~0.5-1 GB), SmolLM2-135M in float16
# (0.27 GB), decode CUDA graphs and one iteration's activations.
SMALLEST_GPU_BYTES = 15360 << 20
GPU_MODEL_AND_RUNTIME_BYTES = 2 << 30
# A fine-tuning job's parsed dataset per byte of its file, held while it is queued or running,
# and at the peak of its parse, for the densest files a limit must admit: numbers, which
# SmolLM2's tokenizer splits into digits (0.95 tokens a byte: 8.1x and 10.2x, measured as
# bench/dataset_memory.py measures, on 12 MB of JSONL of integers and decimals). Its prose
# file, at 0.25 tokens a byte, gives 2.4x and 4.2x (bench/results/dataset_memory.json).
DATASET_HELD_PER_FILE_BYTE, DATASET_PEAK_PER_FILE_BYTE = 8.1, 10.5


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("4Gi", "512Mi", "1000000") in bytes."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, scale in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * scale
    return int(quantity)


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_rendering_is_valid_against_the_kubernetes_and_crd_schemas(rendered, name):
    for obj in rendered[name]:
        key = (obj["apiVersion"], obj["kind"])
        if key in CUSTOM_SCHEMAS:
            schema = json.loads((SCHEMAS / CUSTOM_SCHEMAS[key]).read_text())
            jsonschema.validate(obj, schema, cls=jsonschema.Draft202012Validator)
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_deploy_k8s_itself_is_the_laptop_deployment(rendered):
    assert rendered[DEFAULT] == rendered["cpu"]


def test_a_misspelt_field_fails_validation(rendered):
    # The check above is only worth something if it rejects what the API server would.
    pool = find(rendered["gpu"], "InferencePool")[0]
    pool = {**pool, "spec": {**pool["spec"], "targetPort": [{"number": 8000}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, json.loads((SCHEMAS / CUSTOM_SCHEMAS[("inference.networking.k8s.io/v1", "InferencePool")]).read_text()))
    workload = tandem_workloads(rendered["cpu"])[0]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**workload, "spec": {**workload["spec"], "replica": 1}}, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_probes_ask_the_grpc_port_about_the_generation_service(rendered, name):
    for workload in tandem_workloads(rendered[name]):
        c = container(workload)
        grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        assert int(config_map(rendered[name])["TANDEM_PORT"]) == grpc_port
        for probe in ("startupProbe", "readinessProbe"):
            assert c[probe]["grpc"] == {"port": grpc_port, "service": READINESS_SERVICE}
        # Liveness asks about the process, which is SERVING even while it drains.
        assert c["livenessProbe"]["grpc"]["port"] == grpc_port
        assert c["livenessProbe"]["grpc"].get("service", "") == ""


def test_with_tls_the_probes_run_tandem_health_inside_the_pod(rendered):
    # The kubelet's gRPC probes cannot speak TLS.
    data = config_map(rendered["cpu-tls"])
    for workload in tandem_workloads(rendered["cpu-tls"]):
        c = container(workload)
        readiness = c["readinessProbe"]["exec"]["command"]
        assert readiness[:2] == ["tandem", "health"] and readiness[-2:] == ["--service", READINESS_SERVICE]
        assert "--ca-cert" in readiness and "grpc" not in c["startupProbe"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # mutual TLS asks them for a certificate
            command = c[probe]["exec"]["command"]
            assert command[command.index("--client-cert") + 1] == data["TANDEM_TLS_CERT"]
            assert command[command.index("--client-key") + 1] == data["TANDEM_TLS_KEY"]
    assert data["TANDEM_TLS_CERT"].startswith("/etc/tandem/tls/") and data["TANDEM_TLS_KEY"].startswith("/etc/tandem/tls/")


@pytest.mark.parametrize("name", RENDERINGS)
def test_probes_wait_longer_than_the_default_second(rendered, name):
    """The health answer comes from the event loop that streams every token: with the
    default 1 s timeout, start-up and readiness probes took pods under load out of service."""
    for workload in tandem_workloads(rendered[name]):
        c = container(workload)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe].get("timeoutSeconds", 1) >= 5, (workload["metadata"]["name"], probe)


# After the HTTP front closes, the engine stops: its iteration ends, and on the trainer the
# running job's last step is checkpointed (a GPU model's adapter and optimizer state, fsynced).
ENGINE_STOP_SECONDS = {"server": 10, "trainer": 40}


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_grace_period_outlasts_the_whole_shutdown(rendered, name):
    """preStop, the drain, the aborted generations' end, the HTTP front's close and the
    engine's stop: a budget that left out the last two let the kubelet kill a trainer
    writing its checkpoint."""
    drain = float(config_map(rendered[name])["TANDEM_DRAIN_GRACE_SECONDS"])
    for workload in tandem_workloads(rendered[name]):
        c = container(workload)
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop = float(command[1])
        assert pre_stop >= 5, "endpoints need a few seconds to drop the pod before it drains"
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        role = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        assert grace >= pre_stop + drain + ABORT_WAIT_SECONDS + CLOSE_GRACE_SECONDS + ENGINE_STOP_SECONDS[role], role


def test_the_endpoint_picker_outlasts_the_pools_pods(rendered):
    objects = rendered["gpu"]
    (picker,) = find(objects, "Deployment", "tandem-endpoint-picker")
    longest = max(w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] for w in tandem_workloads(objects))
    assert picker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= longest


@pytest.mark.parametrize("name", RENDERINGS)
def test_no_secret_value_is_written_into_the_manifests(rendered, name):
    sensitive = re.compile(r"TOKEN|SECRET|PASSWORD|KEY$", re.IGNORECASE)
    objects = rendered[name]
    for workload in tandem_workloads(objects):
        for var in container(workload).get("env", []):
            assert not (sensitive.search(var["name"]) and "value" in var), f"{var['name']} is inlined"
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["auth"]["secret"]["secretName"].startswith("tandem-auth-")
    tokens = [line.split()[1] for line in TOKENS.splitlines()]
    plain = yaml.safe_dump([o for o in objects if o["kind"] != "Secret"])
    assert not any(token in plain for token in tokens)
    for value in config_map(objects).values():
        assert not any(token in value for token in tokens)
    (auth,) = [s for s in find(objects, "Secret") if s["metadata"]["name"].startswith("tandem-auth-")]
    assert set(auth["data"]) == {"tokens"}


def test_the_gpu_overlays_tokens_are_never_committed():
    path = K8S / "overlays" / "gpu" / "tokens"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
    assert ignored.returncode == 0, f"{path} must be ignored by git: it holds the production tokens"


def test_gpus_are_asked_for_in_the_gpu_overlay_only(rendered):
    assert "nvidia.com/gpu" not in yaml.safe_dump(rendered["cpu"])
    for workload in tandem_workloads(rendered["gpu"]):
        resources = container(workload)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        spec = workload["spec"]["template"]["spec"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        # The GPU request places the pods: a node label only GPU Feature Discovery sets kept
        # them Pending on managed GPU pools with the device plugin alone.
        assert "nodeSelector" not in spec
    assert config_map(rendered["gpu"])["TANDEM_DEVICE"] == "cuda"


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_every_replica_shares_the_adapters_volume_and_only_the_trainer_writes_it(rendered, name):
    objects = rendered[name]
    adapters_dir = config_map(objects)["TANDEM_ADAPTERS_DIR"]
    writers = []
    for workload in tandem_workloads(objects):
        spec = workload["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "tandem-adapters"]
        (mount,) = [m for m in container(workload)["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["mountPath"] == adapters_dir
        read_only = mount.get("readOnly", False) or volume["persistentVolumeClaim"].get("readOnly", False)
        env = {v["name"]: v for v in container(workload).get("env", [])}
        if not read_only:
            writers.append(workload)
        # Fine-tuning (a data dir) exactly where the adapters are writable.
        assert ("TANDEM_DATA_DIR" in env) == (not read_only)
    assert [(w["kind"], w["metadata"]["name"], w["spec"]["replicas"]) for w in writers] == [("StatefulSet", "tandem-trainer", 1)]
    (claim,) = find(objects, "PersistentVolumeClaim", "tandem-adapters")
    assert claim["spec"]["accessModes"] == (["ReadWriteMany"] if name == "gpu" else ["ReadWriteOnce"])


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_pod_runs_locked_down(rendered, name):
    for workload in [o for o in rendered[name] if o["kind"] in ("Deployment", "StatefulSet")]:
        spec = workload["spec"]["template"]["spec"]
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and isinstance(pod["runAsUser"], int) and pod["runAsUser"] > 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        emptydirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
        if workload in tandem_workloads(rendered[name]):
            # The server writes temporary files and compiler caches under /tmp only.
            (tmp,) = [m for m in container(workload)["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp["name"] in emptydirs


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_config_holds_only_variables_tandem_serve_reads(rendered, name):
    known = {env_name(flag) for flag, _, _ in ENGINE_FLAGS + SERVER_FLAGS}
    assert set(config_map(rendered[name])) <= known
    for workload in tandem_workloads(rendered[name]):
        assert {v["name"] for v in container(workload)["env"]} <= known


def serve_config(objects: list[dict], workload: dict, monkeypatch, **added: str) -> tuple[EngineConfig, ServerConfig]:
    """What `tandem serve` makes of the pod's environment (it refuses a bad value), with the
    variables `added` (what a user adds to the config map) on top."""
    def fields(args, flags) -> dict:
        return {f.lstrip("-").replace("-", "_"): getattr(args, f.lstrip("-").replace("-", "_")) for f, _, _ in flags}

    env = dict(config_map(objects))
    # Values from the downward API (the thread count) stand in as "2".
    env.update({v["name"]: v.get("value", "2") for v in container(workload)["env"]})
    env.update(added)
    for var in [v for v in os.environ if v.startswith("TANDEM_")]:
        monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    args = build_parser().parse_args(["serve"])
    return EngineConfig(**fields(args, ENGINE_FLAGS)), ServerConfig(**fields(args, SERVER_FLAGS))


@pytest.mark.parametrize("name", RENDERINGS)
def test_every_pods_environment_is_a_valid_serve_configuration(rendered, name, monkeypatch):
    # What `tandem serve` would refuse at start: a bad value, fine-tuning without adapters.
    for workload in tandem_workloads(rendered[name]):
        engine, server = serve_config(rendered[name], workload, monkeypatch)
        assert engine.adapters_dir == "/adapters" and server.auth_tokens_file == "/etc/tandem/auth/tokens"
        assert (engine.data_dir is not None) == (workload["kind"] == "StatefulSet")
        # What the server touches at start (KV cache, the prefaulted adapter cache, the
        # adapter slots) must leave the model and the runtime room under the limit, or the
        # pod is killed at start; on CPU the trainer's co-served activations (at most their
        # cap) come on top, or its first micro-batch beside requests could be.
        slots = min(engine.lora_pool_bytes, engine.max_loras * engine.max_lora_rank * SLOT_FLOATS_PER_RANK * 4)
        reserved = engine.kv_cache_bytes + engine.adapter_cache_prefault * engine.adapter_cache_bytes + slots
        if engine.data_dir is not None and engine.device != "cuda":
            reserved += engine.finetune_activation_bytes
        if engine.data_dir is not None:
            # Every active job's dataset, and one more being parsed (a restart reads them all).
            held = (engine.max_active_jobs - 1) * DATASET_HELD_PER_FILE_BYTE + DATASET_PEAK_PER_FILE_BYTE
            reserved += int(held * engine.max_training_file_bytes)
        assert reserved + MODEL_AND_RUNTIME_BYTES <= memory_bytes(container(workload)["resources"]["limits"]["memory"])


def test_the_tls_component_with_mutual_tls_added_is_a_valid_serve_configuration(rendered, monkeypatch):
    """Its comment invites TANDEM_TLS_CLIENT_CA. The server refuses mutual TLS beside an HTTP
    front without tokens (the plaintext front would serve anyone): the base sets the tokens."""
    for workload in tandem_workloads(rendered["cpu-tls"]):
        _, server = serve_config(rendered["cpu-tls"], workload, monkeypatch, TANDEM_TLS_CLIENT_CA="/etc/tandem/tls/ca.crt")
        assert server.tls_client_ca is not None and server.http_port is not None and server.auth_tokens_file is not None


def test_a_gpu_replica_starts_on_a_16_gb_gpu(rendered, monkeypatch):
    """The KV cache, the adapter slots (float16 or bfloat16 on CUDA) and, on the trainer,
    fine-tuning's activations are GPU memory; the KV cache is allocated whole at start. A
    16 GiB cache crash-looped every pod on a 16 GB card with the default model."""
    for workload in tandem_workloads(rendered["gpu"]):
        engine, _ = serve_config(rendered["gpu"], workload, monkeypatch)
        assert engine.device == "cuda"
        slots = min(engine.lora_pool_bytes, engine.max_loras * engine.max_lora_rank * SLOT_FLOATS_PER_RANK * 2)
        reserved = engine.kv_cache_bytes + slots + (engine.finetune_activation_bytes if engine.data_dir else 0)
        assert reserved + GPU_MODEL_AND_RUNTIME_BYTES <= SMALLEST_GPU_BYTES, workload["metadata"]["name"]


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_torch_threads_follow_the_cpu_request(rendered, name):
    for workload in tandem_workloads(rendered[name]):
        (threads,) = [v for v in container(workload)["env"] if v["name"] == "TANDEM_NUM_THREADS"]
        assert threads["valueFrom"]["resourceFieldRef"] == {"containerName": "tandem", "resource": "requests.cpu", "divisor": "1"}


def test_images_are_pinned_and_the_laptop_never_pulls(rendered):
    for name in RENDERINGS:
        for workload in [o for o in rendered[name] if o["kind"] in ("Deployment", "StatefulSet")]:
            for c in workload["spec"]["template"]["spec"]["containers"]:
                tag = c["image"].rpartition(":")[2]
                assert "/" not in tag and tag not in ("", "latest"), c["image"]
                if name == "cpu" and workload in tandem_workloads(rendered[name]):
                    assert c["imagePullPolicy"] == "IfNotPresent"
    assert all(container(w)["image"].endswith("-cuda") for w in tandem_workloads(rendered["gpu"]))


def test_services_balance_per_request_or_per_replica(rendered):
    objects = rendered["cpu"]
    (main,) = find(objects, "Service", "tandem")
    (headless,) = find(objects, "Service", "tandem-headless")
    grpc = next(p for p in main["spec"]["ports"] if p["name"] == "grpc")
    assert grpc["appProtocol"] == "kubernetes.io/h2c"
    assert headless["spec"]["clusterIP"] == "None"
    (trainer,) = find(objects, "Service", "tandem-trainer")
    assert trainer["spec"]["selector"]["app.kubernetes.io/component"] == "trainer"


def mesh_protocol(port: dict) -> str:
    """The protocol Istio reads for a Service port: its appProtocol, else its name's
    prefix (<protocol>[-<suffix>])."""
    return port.get("appProtocol") or port["name"].split("-")[0]


def test_with_tls_meshes_pass_the_grpc_port_through_as_tls(rendered):
    """Removing h2c left the port's name, grpc, which Istio reads as plaintext gRPC: its
    sidecars parsed the TLS bytes as HTTP/2 and every meshed call failed."""
    plain = {s["metadata"]["name"]: s for s in find(rendered["cpu"], "Service")}
    services = find(rendered["cpu-tls"], "Service")
    assert {s["metadata"]["name"] for s in services} == set(plain)
    for service in services:
        for port, before in zip(service["spec"]["ports"], plain[service["metadata"]["name"]]["spec"]["ports"], strict=True):
            if port["targetPort"] == "grpc":
                assert mesh_protocol(before) == "kubernetes.io/h2c"
                assert mesh_protocol(port) in ("https", "tls"), service["metadata"]["name"]
            else:  # HTTP and metrics stay plaintext
                assert port == before


def test_prometheus_selects_the_service_monitor(rendered):
    """A default kube-prometheus-stack selects ServiceMonitors by its release label: without
    one nothing was scraped and the autoscaler never scaled."""
    (monitor,) = find(rendered["gpu"], "ServiceMonitor")
    assert monitor["metadata"]["labels"].get("release")
    readme = (REPO / "deploy" / "README.md").read_text()
    assert "release" in readme and "service-monitor.yaml" in readme, "the GPU steps must say to set it"


def test_the_autoscaler_scales_the_servers_on_a_metric_the_adapter_serves(rendered):
    objects = rendered["gpu"]
    (hpa,) = find(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tandem"}
    (servers,) = find(objects, "Deployment", "tandem")
    assert "replicas" not in servers["spec"], "an apply would reset the count the autoscaler chose"
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name == "tandem:num_requests_waiting" and f'"{name}"' in METRICS_SOURCE
    values = yaml.safe_load((K8S / "components" / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == name and rule["seriesQuery"].startswith(name + "{")
    (monitor,) = find(objects, "ServiceMonitor")
    scraped = [s for s in find(objects, "Service") if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in scraped] == ["tandem"], "each pod must be scraped once"


def test_the_endpoint_picker_reads_metrics_the_server_exports(rendered):
    objects = rendered["gpu"]
    (pool,) = find(objects, "InferencePool")
    (picker,) = find(objects, "Deployment", "tandem-endpoint-picker")
    args = dict(a.removeprefix("--").split("=", 1) for a in container(picker, "epp")["args"])
    for flag in ("total-queued-requests-metric", "kv-cache-usage-percentage-metric", "lora-info-metric"):
        assert f'"{args[flag]}"' in METRICS_SOURCE, f"the server exports no {args[flag]}"
    data = config_map(objects)
    assert args["model-server-metrics-port"] == data["TANDEM_METRICS_PORT"]
    assert pool["spec"]["targetPorts"] == [{"number": int(data["TANDEM_HTTP_PORT"])}]
    assert pool["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "tandem"}
    (service,) = find(objects, "Service", pool["spec"]["endpointPickerRef"]["name"])
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] in [p["port"] for p in service["spec"]["ports"]]


def test_the_endpoint_picker_watches_the_pool_in_its_own_namespace(rendered):
    """The v1.0 picker takes the pool's namespace from --pool-namespace only ("default"
    without it), and its Role grants reads in the namespace it is deployed to."""
    (picker,) = find(rendered["gpu"], "Deployment", "tandem-endpoint-picker")
    epp = container(picker, "epp")
    args = dict(a.removeprefix("--").split("=", 1) for a in epp["args"])
    assert args["pool-name"] == "tandem" and args["pool-namespace"] == "$(NAMESPACE)"
    (namespace,) = [e for e in epp["env"] if e["name"] == "NAMESPACE"]
    assert namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_behind_istio_the_gateway_speaks_tls_to_the_picker(rendered):
    """The v1.0 picker serves ext-proc with TLS alone (--secure-serving, on by default, on a
    certificate it signs itself): Istio's gateway, which speaks plaintext to a Service unless
    a DestinationRule says otherwise, failed every request through the pool."""
    (picker,) = find(rendered["gpu-istio"], "Deployment", "tandem-endpoint-picker")
    assert not any(a.startswith("--secure-serving") for a in container(picker, "epp")["args"])
    (pool,) = find(rendered["gpu-istio"], "InferencePool")
    (rule,) = find(rendered["gpu-istio"], "DestinationRule")
    assert rule["spec"]["host"] == pool["spec"]["endpointPickerRef"]["name"]
    assert rule["spec"]["trafficPolicy"]["tls"] == {"mode": "SIMPLE", "insecureSkipVerify": True}
    assert not find(rendered["gpu"], "DestinationRule")  # Istio's CRDs are not everyone's


# The namespace the manifests are applied to, in the NetworkPolicy checks below.
OWN_NAMESPACE = "tandem"


def network_allows(objects: list[dict], direction: str, namespace: str, port: int, protocol: str = "TCP") -> bool:
    """Whether the rendered NetworkPolicies let a Tandem server pod take (Ingress) or open
    (Egress) a connection with a pod of `namespace` on `port`, as the API defines them:
    unselected, everything passes; selected, what any rule of any policy allows."""
    (server,) = find(objects, "Deployment", "tandem")
    labels = server["spec"]["template"]["metadata"]["labels"]
    named = {p["name"]: p["containerPort"] for c in server["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    rules, selected = [], False
    for policy in find(objects, "NetworkPolicy"):
        spec = policy["spec"]
        if direction in spec["policyTypes"] and spec["podSelector"]["matchLabels"].items() <= labels.items():
            selected = True
            rules += spec.get(direction.lower(), [])

    def peer_matches(peer: dict) -> bool:
        if "namespaceSelector" not in peer:  # a podSelector alone: this namespace's pods
            return namespace == OWN_NAMESPACE and "ipBlock" not in peer
        return peer["namespaceSelector"].get("matchLabels", {}).items() <= {"kubernetes.io/metadata.name": namespace}.items()

    def port_matches(rule_port: dict) -> bool:
        number = named.get(rule_port["port"], rule_port["port"]) if direction == "Ingress" else rule_port["port"]
        return number == port and rule_port.get("protocol", "TCP") == protocol

    peers = "from" if direction == "Ingress" else "to"
    return not selected or any(
        (not rule.get("ports") or any(port_matches(p) for p in rule["ports"]))
        and (not rule.get(peers) or any(peer_matches(p) for p in rule[peers]))
        for rule in rules
    )


def test_without_a_mesh_the_pods_talk_to_dns_and_take_their_own_ports_only(rendered):
    objects = rendered["cpu"]
    assert network_allows(objects, "Egress", "kube-system", 53, "UDP")
    assert network_allows(objects, "Ingress", "anywhere", 50051) and network_allows(objects, "Ingress", "anywhere", 8000)
    assert network_allows(objects, "Ingress", "monitoring", 9090) and not network_allows(objects, "Ingress", "anywhere", 9090)
    assert not network_allows(objects, "Egress", "istio-system", 15012)
    assert not network_allows(objects, "Ingress", "anywhere", 15008)
    assert not network_allows(objects, "Egress", "linkerd", 8086)
    assert not network_allows(objects, "Ingress", "anywhere", 4143)


def test_the_istio_mesh_component_lets_sidecars_and_ambient_through(rendered):
    """The README leaves encryption to a mesh's mutual TLS: behind the base policy alone an
    Istio sidecar never reached istiod (its pod never got ready) and ambient's tunnel was dropped."""
    objects = rendered["cpu-mesh-istio"]
    assert network_allows(objects, "Egress", "istio-system", 15012)
    for port in (15008, 15021):  # HBONE; the sidecar's health
        assert network_allows(objects, "Ingress", "anywhere", port)
    for port in (15020, 15090):  # the sidecar's metrics, to Prometheus only, as Tandem's
        assert network_allows(objects, "Ingress", "monitoring", port) and not network_allows(objects, "Ingress", "anywhere", port)
    # Nothing else opens: Tandem still makes no connection of its own.
    assert not network_allows(objects, "Egress", "anywhere", 15012)
    assert not network_allows(objects, "Egress", "istio-system", 443)
    assert not network_allows(objects, "Ingress", "anywhere", 4143)


def test_the_linkerd_mesh_component_lets_the_proxy_through(rendered):
    objects = rendered["gpu-mesh-linkerd"]
    for port in (8080, 8086, 8090):  # identity, destination, policy
        assert network_allows(objects, "Egress", "linkerd", port)
        assert not network_allows(objects, "Egress", "anywhere", port)
    assert network_allows(objects, "Ingress", "anywhere", 4143)  # every meshed call arrives here
    assert network_allows(objects, "Ingress", "linkerd-viz", 4191) and not network_allows(objects, "Ingress", "anywhere", 4191)
    assert not network_allows(objects, "Egress", "istio-system", 15012)


def test_the_readme_names_the_mesh_components_where_it_suggests_a_mesh():
    readme = (REPO / "deploy" / "README.md").read_text()
    assert "mutual TLS" in readme
    for component in ("components/mesh-istio", "components/mesh-linkerd"):
        assert (K8S / component / "kustomization.yaml").exists() and component in readme
