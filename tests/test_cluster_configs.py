"""cluster/: the deployment files parse, validate, agree with the project and keep the cluster closed.

No cloud and no Kubernetes here: the launcher config goes through the schema and the config
preparation `ray up` runs before it talks to AWS; the KubeRay specs are read and checked against
the project (entrypoint, image, config, resources, identities) and against each other.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shlex

import pytest
import yaml

from cafi import autoscale
from cafi.config import load_config
from cafi.stages import specs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(REPO, "cluster")
BUCKET, ACCOUNT, REGION = "my-cafi-bucket", "123456789012", "us-west-2"
PREFIXES = {"input": "inputs/", "weights": "weights/", "output": "scores/"}


def _docs(rel: str) -> list[dict]:
    with open(os.path.join(CLUSTER, rel)) as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _one(rel: str, kind: str) -> dict:
    found = [d for d in _docs(rel) if d.get("kind") == kind]
    assert len(found) == 1, f"{rel}: expected one {kind}"
    return found[0]


def _json(rel: str) -> dict:
    with open(os.path.join(CLUSTER, rel)) as fh:
        return json.load(fh)


def _read(rel: str) -> str:
    with open(os.path.join(CLUSTER, rel)) as fh:
        return fh.read()


def _project_version() -> str:
    text = open(os.path.join(REPO, "pyproject.toml")).read()
    return re.search(r'^version\s*=\s*"([^"]+)"', text, re.M).group(1)


def _image() -> str:
    return f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/cafi:{_project_version()}"


def _dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)", _read("Dockerfile"), re.M).group(1)


def _cluster_specs() -> dict[str, dict]:
    job = _one("kuberay/rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]
    return {"rayjob": job, "raycluster": _one("kuberay/raycluster.yaml", "RayCluster")["spec"]}


def _containers(spec: dict):
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        for container in group["template"]["spec"]["containers"]:
            yield name, group, container


def _job_config(tmp_path):
    """configs/cluster.yaml + the ConfigMap's job.yaml, as the RayJob's entrypoint loads them."""
    job_yaml = _one("kuberay/rayjob.yaml", "ConfigMap")["data"]["job.yaml"]
    path = tmp_path / "job.yaml"
    path.write_text(job_yaml)
    return load_config([os.path.join(REPO, "configs", "cluster.yaml"), str(path)])


# ---------------------------------------------------------------- everything parses

def test_every_yaml_and_json_under_cluster_parses():
    yamls = glob.glob(os.path.join(CLUSTER, "**", "*.yaml"), recursive=True)
    jsons = glob.glob(os.path.join(CLUSTER, "**", "*.json"), recursive=True)
    assert len(yamls) >= 4 and len(jsons) >= 4
    for path in yamls:
        with open(path) as fh:
            assert [d for d in yaml.safe_load_all(fh) if d is not None], path
    for path in jsons:
        with open(path) as fh:
            json.load(fh)
    for path in (os.path.join(CLUSTER, "Dockerfile"), os.path.join(CLUSTER, "README.md")):
        assert os.path.getsize(path) > 0


# ---------------------------------------------------------------- cluster launcher

def test_launcher_config_validates_against_the_schema_in_the_installed_ray():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _docs("aws.yaml")[0]
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as fh:
        schema = json.load(fh)
    jsonschema.validate(config, schema)
    # What `ray up` does before it talks to AWS: merge ray's AWS defaults, validate again.
    prepared = prepare_config(config)
    validate_config(prepared)
    assert prepared["available_node_types"]["gpu"]["min_workers"] == 0


def test_launcher_node_types_cpu_and_gpu_from_zero_spot_workers_idle_head():
    config = _docs("aws.yaml")[0]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head does no work
    assert "InstanceMarketOptions" not in head["node_config"]  # ...and is not spot
    assert types["cpu"]["min_workers"] == 0 and not types["cpu"]["resources"].get("GPU")
    assert types["gpu"]["min_workers"] == 0 and types["gpu"]["resources"]["GPU"] >= 1
    for name in ("cpu", "gpu"):
        assert types[name]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert config["docker"]["image"] == _image()
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for n, t in types.items() if n != "head")


def test_launcher_cluster_is_closed_to_the_internet():
    config = _docs("aws.yaml")[0]
    assert config["provider"]["use_internal_ips"] is True
    for name, node_type in config["available_node_types"].items():
        nc = node_type["node_config"]
        # Our own security group: without SecurityGroupIds the launcher creates one that admits
        # SSH from 0.0.0.0/0.
        assert nc.get("SecurityGroupIds"), name
        assert "instance-profile/cafi-ray-" in nc["IamInstanceProfile"]["Arn"], name
        assert nc["MetadataOptions"]["HttpTokens"] == "required", name
    assert "security_group" not in config["provider"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard` (SSH tunnel)
    assert "--num-cpus=0" in head_start
    assert any("RAY_AUTH_MODE=token" in opt for opt in config["docker"]["run_options"])
    assert "~/.ray/auth_token" in config["file_mounts"]


# ---------------------------------------------------------------- KubeRay

def test_rayjob_runs_the_projects_entrypoint_with_its_configs(tmp_path):
    job = _one("kuberay/rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] > 0

    argv = shlex.split(spec["entrypoint"])
    workdir = re.search(r"^WORKDIR (\S+)", _read("Dockerfile"), re.M).group(1)
    assert argv[0] == "python" and argv[1] == f"{workdir}/jobs/score.py"
    assert os.path.exists(os.path.join(REPO, "jobs", "score.py"))
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    assert configs == [f"{workdir}/configs/cluster.yaml", "/etc/cafi/job.yaml"]
    assert os.path.exists(os.path.join(REPO, "configs", "cluster.yaml"))
    dockerfile = _read("Dockerfile")
    for copied in ("jobs", "configs", "cafi"):
        assert re.search(rf"^COPY .*\b{copied} \./{copied}$", dockerfile, re.M), copied

    # /etc/cafi/job.yaml is the ConfigMap, mounted in the head container that runs the driver.
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/cafi")
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    config_map = _one("kuberay/rayjob.yaml", "ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert "job.yaml" in config_map["data"]

    cfg = _job_config(tmp_path)  # loads and validates like the job does
    assert cfg.input.manifest == f"s3://{BUCKET}/{PREFIXES['input']}crops.parquet"
    assert cfg.output.uri == f"s3://{BUCKET}/{PREFIXES['output']}"
    assert cfg.ray.scale_gpu_pools in ("always", "auto")


def test_rayjob_weights_block_is_what_cafi_weights_fetch_prints(tmp_path):
    from cafi.models.registry import published

    cfg = _job_config(tmp_path)
    m = cfg.models
    archs = {"detector": m.detector.arch, "parser": m.parser.arch, "serfiq": m.serfiq.arch, "dbcnn": m.dbcnn.arch}
    for key, arch in archs.items():
        rec = published(arch)
        weights = getattr(m, key).weights
        assert weights.uri == f"s3://{BUCKET}/{PREFIXES['weights']}{rec.file_name}", key
        assert weights.sha256 == rec.sha256, key
        assert not weights.synthetic


def test_kuberay_clusters_head_idle_autoscaler_v2_token_auth_and_zero_based_groups():
    for name, spec in _cluster_specs().items():
        assert spec["rayVersion"] == _dockerfile_arg("RAY_VERSION"), name
        assert spec["enableInTreeAutoscaling"] is True, name
        assert spec["autoscalerOptions"]["version"] == "v2", name
        assert spec["authOptions"]["mode"] == "token", name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", name
        for _, _, container in _containers(spec):
            env = {e["name"] for e in container.get("env", [])}
            # KubeRay rejects the env var together with autoscalerOptions.version
            assert "RAY_enable_autoscaler_v2" not in env, name
            assert container["image"] == _image(), name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name

        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        gpu, cpu = groups["gpu"], groups["cpu"]
        for group in (gpu, cpu):
            assert group["minReplicas"] == 0 and group.get("replicas", 0) == 0, name
            assert group["maxReplicas"] > 0, name
        gpu_pod = gpu["template"]["spec"]
        limits = gpu_pod["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, name
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule"
                   for t in gpu_pod["tolerations"]), name
        assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"], name


def test_rayjob_and_raycluster_describe_the_same_cluster():
    specs = _cluster_specs()
    job, long_lived = specs["rayjob"], specs["raycluster"]
    for key in ("rayVersion", "enableInTreeAutoscaling", "authOptions"):
        assert job[key] == long_lived[key], key
    assert job["headGroupSpec"]["rayStartParams"] == long_lived["headGroupSpec"]["rayStartParams"]

    def shape(spec):
        out = {}
        for g in spec["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            out[g["groupName"]] = (g["maxReplicas"], pod["containers"][0]["resources"],
                                   pod.get("tolerations"), pod["serviceAccountName"])
        return out

    assert shape(job) == shape(long_lived)


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _fits(bundles: list[dict], node: dict[str, float], nodes: int) -> bool:
    """First-fit the actor bundles into `nodes` nodes of `node` resources."""
    free = [dict(node) for _ in range(nodes)]
    for bundle in sorted(bundles, key=lambda b: -b.get("GPU", 0)):
        for slot in free:
            if all(slot.get(k, 0) + 1e-9 >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    slot[k] -= v
                break
        else:
            return False
    return True


def test_gpu_and_cpu_groups_hold_the_configured_pools_at_full_size(tmp_path):
    cfg = _job_config(tmp_path)
    gpu_bundles = autoscale.bundles_at_max(cfg)
    assert gpu_bundles and all(b["GPU"] > 0 for b in gpu_bundles)
    m = cfg.models
    cpu_demand = sum(s.num_cpus * s.max_actors for s in (m.detector, m.parser) if s.num_gpus == 0)

    for name, spec in _cluster_specs().items():
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        node = {"CPU": _quantity(limits["cpu"]), "GPU": _quantity(limits["nvidia.com/gpu"])}
        assert _fits(gpu_bundles, node, groups["gpu"]["maxReplicas"]), name
        cpu_limits = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert _quantity(cpu_limits["cpu"]) * groups["cpu"]["maxReplicas"] >= cpu_demand, name

    types = _docs("aws.yaml")[0]["available_node_types"]
    gpu_node = {k: float(v) for k, v in types["gpu"]["resources"].items()}
    assert _fits(gpu_bundles, gpu_node, types["gpu"]["max_workers"])
    assert types["cpu"]["resources"]["CPU"] * types["cpu"]["max_workers"] >= cpu_demand
    # the GPU pools alone need every GPU worker: fewer would leave pinned actors pending forever
    gpus = types["gpu"]["max_workers"] * types["gpu"]["resources"]["GPU"]
    assert math.ceil(sum(b["GPU"] for b in gpu_bundles)) <= gpus


# ---------------------------------------------------------------- nobody else gets in

def test_no_ray_port_is_exposed_beyond_the_cluster_network():
    for rel in ("kuberay/rayjob.yaml", "kuberay/raycluster.yaml", "kuberay/access.yaml"):
        for doc in _docs(rel):
            assert doc["kind"] not in ("Service", "Ingress"), rel
            text = json.dumps(doc)
            assert "LoadBalancer" not in text and "NodePort" not in text, rel
    for name, spec in _cluster_specs().items():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        assert not head.get("enableIngress", False) and "headService" not in head, name
        for _, group, _ in _containers(spec):
            assert group["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cafi", name
    policy = _one("kuberay/access.yaml", "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "cafi"}
    assert policy["policyTypes"] == ["Ingress"]
    intra, api = policy["ingress"]
    assert intra["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "cafi"}}}]
    assert "ports" not in intra
    assert api["ports"] == [{"protocol": "TCP", "port": 8265}]  # only the token-guarded dashboard/job API
    for path in glob.glob(os.path.join(CLUSTER, "**", "*.yaml"), recursive=True) + \
            glob.glob(os.path.join(CLUSTER, "**", "*.json"), recursive=True):
        with open(path) as fh:
            values = list(yaml.safe_load_all(fh))  # the data, not the comments that explain it
        assert "0.0.0.0/0" not in json.dumps(values), path


def test_no_credentials_in_any_cluster_file():
    literal = r"[\"']?[A-Za-z0-9+/=_-]{16,}"  # a token written out, not a path or a reference to one
    secrets = re.compile(r"(AKIA|ASIA)[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY\s*[:=]|"
                         rf"auth_token[\"']?\s*[:=]\s*{literal}|RAY_AUTH_TOKEN\s*[:=]\s*{literal}|"
                         r"BEGIN [A-Z ]*PRIVATE KEY", re.I)
    for path in glob.glob(os.path.join(CLUSTER, "**", "*"), recursive=True):
        if os.path.isfile(path):
            assert not secrets.search(open(path).read()), path


def test_pod_identities_are_irsa_and_the_workers_get_no_kubernetes_token():
    accounts = {d["metadata"]["name"]: d for d in _docs("kuberay/access.yaml")
                if d["kind"] == "ServiceAccount"}
    role = f"arn:aws:iam::{ACCOUNT}:role/cafi-job"
    assert {a["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] for a in accounts.values()} == {role}
    assert accounts["cafi-worker"]["automountServiceAccountToken"] is False
    for name, spec in _cluster_specs().items():
        assert spec["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == "cafi-head", name
        for group in spec["workerGroupSpecs"]:
            assert group["template"]["spec"]["serviceAccountName"] == "cafi-worker", name
    trust = _json("iam/irsa-trust-policy.json")["Statement"]
    assert len(trust) == 1 and trust[0]["Action"] == "sts:AssumeRoleWithWebIdentity"
    subjects = next(v for k, v in trust[0]["Condition"]["StringEquals"].items() if k.endswith(":sub"))
    assert sorted(subjects) == sorted(f"system:serviceaccount:cafi:{a}" for a in accounts)


def test_job_identity_reads_inputs_and_weights_writes_scores_and_nothing_more(tmp_path):
    policy = _json("iam/cafi-data-policy.json")
    bucket = f"arn:aws:s3:::{BUCKET}"
    allowed: dict[str, set[str]] = {}
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        for action in actions:
            assert action.startswith("s3:") and "*" not in action, action
            allowed.setdefault(action, set()).update(resources)
        if "s3:ListBucket" in actions:
            prefixes = st["Condition"]["StringLike"]["s3:prefix"]
            assert sorted(prefixes) == sorted(p + "*" for p in PREFIXES.values())
    assert set(allowed) == {"s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject", "s3:PutObject",
                            "s3:AbortMultipartUpload", "s3:DeleteObject"}
    assert allowed["s3:ListBucket"] == allowed["s3:GetBucketLocation"] == {bucket}
    assert allowed["s3:GetObject"] == {f"{bucket}/{p}*" for p in PREFIXES.values()}
    for write in ("s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject"):
        assert allowed[write] == {f"{bucket}/{PREFIXES['output']}*"}, write

    # ...and they are the prefixes the shipped job config uses
    cfg = _job_config(tmp_path)
    assert cfg.input.manifest.startswith(f"s3://{BUCKET}/{PREFIXES['input']}")
    assert cfg.output.uri.startswith(f"s3://{BUCKET}/{PREFIXES['output']}")
    for key in {s.section for s in specs.specs_for(cfg) if s.arch is not None}:
        assert getattr(cfg.models, key).weights.uri.startswith(f"s3://{BUCKET}/{PREFIXES['weights']}")


def test_launcher_head_may_manage_only_this_clusters_instances():
    policy = _json("iam/ray-head-launcher-policy.json")
    for st in policy["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        assert all(a.startswith(("ec2:", "iam:PassRole")) for a in actions), actions
        if "ec2:TerminateInstances" in actions:
            assert st["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == "cafi"
        if actions == ["iam:PassRole"]:
            assert st["Resource"].endswith(":role/cafi-ray-worker")
        if st["Resource"] == "*":
            assert all(a.startswith("ec2:Describe") for a in actions), actions
    types = {t["node_config"]["InstanceType"] for n, t in _docs("aws.yaml")[0]["available_node_types"].items()
             if n != "head"}
    launch = next(st for st in policy["Statement"]
                  if "ec2:InstanceType" in st.get("Condition", {}).get("StringEquals", {}))
    assert sorted(launch["Condition"]["StringEquals"]["ec2:InstanceType"]) == sorted(types)
    ecr = _json("iam/ecr-pull-policy.json")
    repo = next(st["Resource"] for st in ecr["Statement"] if st["Resource"] != "*")
    assert repo == f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/cafi"


# ---------------------------------------------------------------- the image and the docs

def test_dockerfile_installs_the_project_cuda_torch_and_facexlib_without_deps():
    text = _read("Dockerfile")
    steps = [ln for ln in text.splitlines() if ln.startswith(("RUN", "FROM", "COPY", " &&"))]
    joined = "\n".join(steps)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-cu\d+", joined, re.M)
    import ray

    assert _dockerfile_arg("RAY_VERSION") == ray.__version__
    torch_at = joined.index("TORCH_INDEX_URL")
    project_at = joined.index("pip install .")
    facexlib_at = joined.index("--no-deps")
    assert torch_at < project_at < facexlib_at  # CUDA torch first; facexlib after the project, no deps
    assert '"facexlib==${FACEXLIB_VERSION}"' in joined
    assert "whl/cu" in _dockerfile_arg("TORCH_INDEX_URL")
    ignore = _read("Dockerfile.dockerignore").split()
    assert ignore[0] == "*" or "*" in ignore


def test_readme_walks_from_zero_to_a_scored_bucket():
    text = _read("README.md")
    for command in (
        "docker build -f cluster/Dockerfile -t $IMAGE .", "docker push $IMAGE",
        "cafi weights fetch s3://$BUCKET/weights/ --config configs/cluster.yaml",
        "aws iam create-policy --policy-name cafi-data",
        "render cluster/kuberay/access.yaml | kubectl -n cafi apply -f -",
        "render cluster/kuberay/rayjob.yaml | kubectl -n cafi apply -f -",
        "render cluster/kuberay/raycluster.yaml | kubectl -n cafi apply -f -",
        "kubectl -n cafi create secret generic cafi-ray-auth", "kubectl -n cafi port-forward",
        "kubectl -n cafi get rayjob cafi-score -w",
        "ray job submit --address http://127.0.0.1:8265 --working-dir .",
        "render cluster/aws.yaml > ~/cafi-aws.yaml", "ray up ~/cafi-aws.yaml",
        "ray dashboard ~/cafi-aws.yaml",
        "manifest.read(", "summary.json", "scale_gpu_pools", "RAY_AUTH_MODE=token",
    ):
        assert command in text, command
    # every placeholder the files use is one `render` replaces
    placeholders = {"123456789012", "us-west-2", "my-cafi-bucket", "subnet-0123456789abcdef0",
                    "subnet-0fedcba9876543210", "sg-0123456789abcdef0", "ami-0123456789abcdef0",
                    "EXAMPLED539D4633E53DE1B71EXAMPLE"}
    render = text[text.index("render() {"):text.index("\n}\n", text.index("render() {"))]
    for placeholder in placeholders:
        assert f"s/{placeholder}/" in render, placeholder
    ids = re.compile(r"\b(?:subnet|sg|ami|vpc)-[0-9a-f]{8,17}\b")
    for rel in ("aws.yaml", "kuberay/rayjob.yaml", "kuberay/raycluster.yaml", "kuberay/access.yaml"):
        assert set(ids.findall(_read(rel))) <= placeholders, rel
    for path in glob.glob(os.path.join(CLUSTER, "**", "*"), recursive=True):
        rel = os.path.relpath(path, CLUSTER)
        if os.path.isfile(path) and rel != "README.md":
            assert rel in text or os.path.basename(rel) in text, f"README does not mention {rel}"


@pytest.mark.parametrize("rel", ["kuberay/rayjob.yaml", "kuberay/raycluster.yaml", "aws.yaml", "Dockerfile"])
def test_the_image_the_docs_build_is_the_image_the_specs_run(rel):
    assert _image() in _read(rel)
    line = re.search(r"^export IMAGE=(\S+)", _read("README.md"), re.M).group(1)
    assert line.replace("$ACCOUNT", ACCOUNT).replace("$REGION", REGION) == _image()
