"""infra/ without a cluster: every YAML parses and carries what its kind needs, and everything it
names exists in this repository — scripts, modules, config files, import paths, command-line
flags, Makefile targets — and every manifest names the image that infra/README.md builds.

The checkers return lists of problems; the tests at the end run them on bad examples too, so a
checker that stopped looking would fail here. Static only (yaml, ast, the JSON schema that Ray
installs with itself): seconds, no imports of the code it checks.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
README = INFRA / "README.md"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
LAUNCHER = INFRA / "ray-cluster" / "aws.yaml"
NAMESPACE = "diffbir"
RAY_KINDS = {"RayCluster", "RayJob", "RayService"}


def yaml_files() -> list[Path]:
    return sorted(p for ext in ("*.yaml", "*.yml") for p in INFRA.rglob(ext))


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_docs() -> list[tuple[Path, dict]]:
    return [
        (p, d)
        for p in yaml_files()
        if p.parent.name in ("kuberay", "mlflow") and p.name != "docker-compose.yaml"
        for d in load_docs(p)
    ]


# ----------------------------------------------------------------------------- repository facts


def pyproject_version() -> str:
    return re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def pinned(name: str, path: Path) -> str:
    return re.search(rf"^{re.escape(name)}(?:\[[^\]]*\])?==(\S+)", path.read_text(), re.M | re.I).group(1)


def image_workdir() -> str:
    """The image's copy of the repository (the Dockerfile's WORKDIR)."""
    return re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)[-1]


def built_images() -> dict[str, str]:
    """Dockerfile path (relative) -> the tag `docker build -f <it> -t <tag>` gives in infra/README.md."""
    return {f: t for f, t in re.findall(r"docker build -f (\S+) -t (\S+) \.", README.read_text())}


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+):", (ROOT / "Makefile").read_text(), re.M))


# ------------------------------------------------------------------- paths, modules and flags


def repo_path(path: str) -> Path | None:
    """The repository file a path in a command or manifest means: relative paths from the root,
    paths under the image's copy of the repository likewise. None for what this repository
    cannot check (URLs, other absolute paths, shell variables)."""
    if "://" in path or "$" in path or "YOUR-" in path:
        return None
    workdir = image_workdir().rstrip("/")
    if path == workdir or path.startswith(workdir + "/"):
        return ROOT / path[len(workdir) :].lstrip("/")
    if path.startswith("/") or path.startswith("~"):
        return None
    return ROOT / path


def module_file(module: str) -> Path | None:
    base = ROOT / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_from(tree: ast.Module, name: str, here: Path) -> Path | None:
    """The repository module a top-level `from x import name` in `tree` takes `name` from."""
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            if node.level:  # relative import
                base = here.parent
                for _ in range(node.level - 1):
                    base = base.parent
                return module_file(
                    ".".join([*base.relative_to(ROOT).parts, *(node.module or "").split(".")]).strip(".")
                )
            return module_file(node.module or "")
    return None


def find_class(path: Path, name: str) -> tuple[Path, ast.ClassDef] | None:
    tree = parse(path)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return path, node
    source = _imported_from(tree, name, path)
    return find_class(source, name) if source else None


def class_fields(path: Path, name: str) -> dict[str, tuple[Path, ast.expr]]:
    """Annotated fields of a (pydantic) class and of its bases defined in this repository:
    name -> (the module that annotates it, the annotation)."""
    found = find_class(path, name)
    if not found:
        return {}
    where, cls = found
    fields = {}
    for base in cls.bases:
        if isinstance(base, ast.Name):
            fields |= class_fields(where, base.id)
    for n in cls.body:
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and not n.target.id.startswith("_"):
            fields[n.target.id] = (where, n.annotation)
    return fields


def config_flags(fields: dict[str, tuple[Path, ast.expr]], prefix: str = "") -> set[str]:
    """`--field` and `--no-field` for each field, and `--section.field` for each field of a nested
    section (a field annotated with a class of this repository), as diffbir.config builds them."""
    flags = set()
    for field, (where, annotation) in fields.items():
        name = prefix + field.replace("_", "-")
        flags |= {f"--{name}", f"--no-{name}"}
        if isinstance(annotation, ast.Name) and find_class(where, annotation.id):
            flags |= config_flags(class_fields(where, annotation.id), name + ".")
    return flags


def _literal_flags(tree: ast.Module) -> set[str]:
    return {
        a.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "add_argument"
        for a in n.args
        if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("-")
    }


def _model_fields_classes(tree: ast.Module) -> set[str]:
    return {
        n.value.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr == "model_fields" and isinstance(n.value, ast.Name)
    }


def flags_of(path: Path) -> set[str]:
    """The flags a script accepts: its literal add_argument flags, and `--config` plus one flag per
    field (and `--no-` forms) of the config class it hands to parse_config/build_parser (or the
    training scripts' run_from_command_line) — directly, inside the helper module it imports
    them from, or in the module whose main() it runs."""
    tree = parse(path)
    flags = _literal_flags(tree)
    classes: list[tuple[Path, str]] = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("parse_config", "build_parser", "run_from_command_line")
        ):
            continue
        if node.args and isinstance(node.args[0], ast.Name) and find_class(path, node.args[0].id):
            classes.append((path, node.args[0].id))
        elif helper := _imported_from(tree, node.func.id, path):
            flags |= _literal_flags(parse(helper))
            classes += [(helper, c) for c in _model_fields_classes(parse(helper))]
    for where, cls in classes:
        flags |= {"--config", *config_flags(class_fields(where, cls))}
    for node in ast.walk(tree):  # a package's __main__.py that runs another module's main()
        if isinstance(node, ast.ImportFrom) and node.module and any(a.name == "main" for a in node.names):
            if (target := module_file(node.module)) is not None and target.is_file():
                flags |= flags_of(target)
    return flags


PYTHON = re.compile(r"^python(3(\.\d+)?)?$")


def check_command(command: str) -> list[str]:
    """Problems with the `python ...` invocations in a shell command: the script or module must
    exist, every --flag must be one it accepts, and --config files it names must exist."""
    try:
        tokens = shlex.split(command.replace("\\\n", " "))
    except ValueError as e:
        return [f"{command!r}: {e}"]
    problems = []
    for i, token in enumerate(tokens):
        if not PYTHON.match(token) or i + 1 >= len(tokens):
            continue
        if tokens[i + 1] == "-m":
            target = module_file(tokens[i + 2]) if i + 2 < len(tokens) else None
            script = target.parent / "__main__.py" if target and target.name == "__init__.py" else target
            args = tokens[i + 3 :]
            if script is None or not script.is_file():
                problems.append(
                    f"no module {tokens[i + 2] if i + 2 < len(tokens) else ''!r} in the repository: {command!r}"
                )
                continue
        elif tokens[i + 1].endswith(".py"):
            script = repo_path(tokens[i + 1])
            args = tokens[i + 2 :]
            if script is None:
                continue
            if not script.is_file():
                problems.append(f"no script {tokens[i + 1]!r} in the repository: {command!r}")
                continue
        else:
            continue
        args = args[: next((j for j, a in enumerate(args) if a in ("&&", "||", ";", "|")), len(args))]
        accepted = flags_of(script)
        for j, arg in enumerate(args):
            if not arg.startswith("--"):
                continue
            flag, _, inline = arg.partition("=")
            if flag not in accepted:
                problems.append(f"{script.relative_to(ROOT)} has no flag {flag}: {command!r}")
            if flag == "--config":
                value = inline or (args[j + 1] if j + 1 < len(args) else "")
                target = repo_path(value)
                if target is not None and not target.is_file():
                    problems.append(f"config {value!r} does not exist: {command!r}")
    return problems


def check_import_path(import_path: str) -> list[str]:
    """`package.module:attribute` must name a module file of this repository that defines it."""
    module, _, attr = import_path.partition(":")
    path = module_file(module)
    if path is None:
        return [f"import path {import_path!r}: no module {module!r} in the repository"]
    if not attr:
        return [f"import path {import_path!r}: no attribute after ':'"]
    defined = {n.name for n in parse(path).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {
        t.id for n in parse(path).body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
    }
    return [] if attr in defined else [f"import path {import_path!r}: {module} defines no {attr!r}"]


def check_make_targets(text: str) -> list[str]:
    targets = makefile_targets()
    return [
        f"`make {t}`: no such Makefile target"
        for t in re.findall(r"\bmake ([a-z][a-z0-9_-]*)", text)
        if t not in targets
    ]


def shell_commands(text: str) -> list[str]:
    """Command lines of a README's or a YAML comment's examples (continuations joined)."""
    text = "\n".join(re.sub(r"^\s*#\s?", "", line) for line in text.splitlines())  # YAML comments
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if re.search(r"(^|\s)python3?\s", line)]


# ------------------------------------------------------------------------------ the checkers


def check_launcher(config: dict, image: str) -> list[str]:
    """A Ray cluster launcher config: Ray's own schema plus what this platform relies on."""
    problems = []
    spec = importlib.util.find_spec("ray")
    schema = json.loads((Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json").read_text())
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as e:
        problems.append(f"ray-schema.json: {e.message} at {list(e.absolute_path)}")
    for key in ("cluster_name", "max_workers", "head_node_type", "available_node_types", "provider"):
        if key not in config:
            problems.append(f"missing {key}")
    provider = config.get("provider", {})
    if provider.get("type") != "aws" or not provider.get("region"):
        problems.append("provider needs type aws and a region")
    types = config.get("available_node_types", {})
    if config.get("head_node_type") not in types:
        problems.append(f"head_node_type {config.get('head_node_type')!r} is not one of available_node_types")
    workers = {k: v for k, v in types.items() if k != config.get("head_node_type")}
    for name, node in types.items():
        if "resources" not in node or "node_config" not in node or "InstanceType" not in node.get("node_config", {}):
            problems.append(f"node type {name}: needs resources and node_config.InstanceType")
    for name, node in workers.items():
        if "min_workers" not in node or "max_workers" not in node or node["min_workers"] > node["max_workers"]:
            problems.append(f"worker type {name}: needs min_workers <= max_workers")
    if sum(n.get("min_workers", 0) for n in workers.values()) > config.get("max_workers", 0):
        problems.append("max_workers is below the sum of min_workers")
    if sum(n.get("max_workers", 0) for n in workers.values()) > config.get("max_workers", 0):
        problems.append("max_workers is below the sum of the worker types' max_workers")
    if not any(n.get("resources", {}).get("GPU") for n in workers.values()):
        problems.append("no GPU worker type")
    if not any(n.get("resources", {}).get("CPU") and not n.get("resources", {}).get("GPU") for n in workers.values()):
        problems.append("no CPU-only worker type (data pipeline)")
    head = types.get(config.get("head_node_type"), {})
    if head.get("resources", {}).get("CPU") != 0:
        problems.append("the head should take no tasks (resources: {CPU: 0})")
    if config.get("docker", {}).get("image") != image:
        problems.append(f"docker.image {config.get('docker', {}).get('image')!r} is not the built image {image!r}")
    for key in (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        for command in config.get(key) or []:
            problems += check_command(command)
    return problems


def _containers(pod_template: dict) -> list[dict]:
    return (pod_template or {}).get("spec", {}).get("containers") or []


def check_ray_cluster_spec(spec: dict, where: str, images: set[str], ray_version: str) -> list[str]:
    problems = []
    if spec.get("rayVersion") != ray_version:
        problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} is not the pinned ray {ray_version}")
    head = spec.get("headGroupSpec")
    groups = spec.get("workerGroupSpecs") or []
    if not head:
        problems.append(f"{where}: no headGroupSpec")
    if not groups:
        problems.append(f"{where}: no workerGroupSpecs")
    for label, group in [("head", head or {})] + [(g.get("groupName", "?"), g) for g in groups]:
        containers = _containers(group.get("template"))
        if not containers:
            problems.append(f"{where} {label}: no containers")
        for c in containers:
            if c.get("image") not in images:
                problems.append(f"{where} {label}: image {c.get('image')!r} is not the built image")
            res = c.get("resources", {})
            if not res.get("requests") or not res.get("limits"):
                problems.append(f"{where} {label}: container {c.get('name')} needs resource requests and limits")
        if label != "head":
            if not group.get("groupName"):
                problems.append(f"{where}: a worker group without groupName")
            lo, n, hi = group.get("minReplicas"), group.get("replicas"), group.get("maxReplicas")
            if None in (lo, n, hi) or not lo <= n <= hi:
                problems.append(f"{where} {label}: needs minReplicas <= replicas <= maxReplicas")
    return problems


def gpu_groups(spec: dict) -> list[str]:
    return [
        g["groupName"]
        for g in spec.get("workerGroupSpecs") or []
        if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in _containers(g.get("template")))
    ]


def check_serve_config(serve: dict, where: str) -> list[str]:
    problems = []
    apps = serve.get("applications") or []
    if not apps:
        problems.append(f"{where}: serveConfigV2 has no applications")
    if serve.get("http_options", {}).get("host") != "0.0.0.0":
        problems.append(f"{where}: http_options.host must be 0.0.0.0 in a pod")
    fields = (
        class_fields(ROOT / "serving" / "config.py", "ServeConfig")
        if (ROOT / "serving" / "config.py").is_file()
        else None
    )
    for app in apps:
        problems += [f"{where}: {p}" for p in check_import_path(app.get("import_path", ""))]
        args = app.get("args") or {}
        if fields is not None:
            problems += [
                f"{where}: {k!r} is not a ServeConfig field" for k in args if k != "config" and k not in fields
            ]
        if "config" in args:
            target = repo_path(args["config"])
            if target is None or not target.is_file():
                problems.append(f"{where}: args.config {args['config']!r} is not a file of the image's repository copy")
    return problems


def check_k8s(docs: list[tuple[Path, dict]], images: set[str], ray_version: str) -> list[str]:
    """Kubernetes objects: required fields per kind, commands and import paths, and references
    between objects (ConfigMaps, PVCs, service accounts) resolved inside infra/."""
    problems = []
    names = {(d.get("kind"), d.get("metadata", {}).get("name")) for _, d in docs}
    for path, d in docs:
        where = f"{path.relative_to(ROOT)} {d.get('kind')}/{d.get('metadata', {}).get('name')}"
        for key in ("apiVersion", "kind", "metadata"):
            if key not in d:
                problems.append(f"{where}: missing {key}")
        if d.get("kind") != "Namespace" and d.get("metadata", {}).get("namespace") != NAMESPACE:
            problems.append(f"{where}: not in namespace {NAMESPACE}")
        if d.get("kind") == "Secret":
            problems.append(f"{where}: secrets are created with kubectl, never kept in infra/")
        spec = d.get("spec", {})
        if d.get("kind") in RAY_KINDS:
            if d.get("apiVersion") != "ray.io/v1":
                problems.append(f"{where}: apiVersion must be ray.io/v1")
            cluster = {
                "RayCluster": spec,
                "RayJob": spec.get("rayClusterSpec"),
                "RayService": spec.get("rayClusterConfig"),
            }[d["kind"]]
            if not cluster:
                problems.append(f"{where}: no cluster spec")
                continue
            problems += check_ray_cluster_spec(cluster, where, images, ray_version)
        if d.get("kind") == "RayJob":
            if not spec.get("entrypoint"):
                problems.append(f"{where}: no entrypoint")
            problems += [f"{where}: {p}" for p in check_command(spec.get("entrypoint", ""))]
            if not re.search(r"(^|\s)python3?\s", spec.get("entrypoint", "")):
                problems.append(f"{where}: the entrypoint runs no python script or module")
            runtime = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
            if "working_dir" in runtime and repo_path(runtime["working_dir"]) != ROOT:
                problems.append(f"{where}: working_dir {runtime['working_dir']!r} is not the image's repository copy")
        if d.get("kind") == "RayService":
            try:
                serve = yaml.safe_load(spec.get("serveConfigV2") or "")
            except yaml.YAMLError as e:
                problems.append(f"{where}: serveConfigV2 does not parse: {e}")
                continue
            if not isinstance(serve, dict):
                problems.append(f"{where}: serveConfigV2 is not a mapping")
                continue
            problems += check_serve_config(serve, where)
            if not gpu_groups(spec.get("rayClusterConfig") or {}):
                problems.append(f"{where}: no worker group with nvidia.com/gpu")
        if d.get("kind") in ("Deployment", "StatefulSet"):
            for c in _containers(spec.get("template")):
                if (
                    not c.get("image")
                    or not c.get("resources", {}).get("requests")
                    or not c.get("resources", {}).get("limits")
                ):
                    problems.append(f"{where}: container {c.get('name')} needs image, resource requests and limits")
        # references to other objects
        for node in _walk(d):
            if isinstance(node, dict):
                if "configMapRef" in node and ("ConfigMap", node["configMapRef"].get("name")) not in names:
                    problems.append(
                        f"{where}: ConfigMap {node['configMapRef'].get('name')!r} is defined nowhere in infra/"
                    )
                if (
                    "persistentVolumeClaim" in node
                    and ("PersistentVolumeClaim", node["persistentVolumeClaim"].get("claimName")) not in names
                ):
                    problems.append(
                        f"{where}: PVC {node['persistentVolumeClaim'].get('claimName')!r} is defined nowhere in infra/"
                    )
                if "serviceAccountName" in node and ("ServiceAccount", node["serviceAccountName"]) not in names:
                    problems.append(
                        f"{where}: ServiceAccount {node['serviceAccountName']!r} is defined nowhere in infra/"
                    )
                if "secretKeyRef" in node and node["secretKeyRef"].get("name") not in README.read_text():
                    problems.append(
                        f"{where}: Secret {node['secretKeyRef'].get('name')!r} is not documented in infra/README.md"
                    )
    return problems


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def check_dockerfile(path: Path) -> list[str]:
    """COPY sources and requirement files exist; the install order is the Makefile's."""
    text = path.read_text()
    problems = []
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        for src in parts[:-1]:
            if not (ROOT / src).exists():
                problems.append(f"{path.relative_to(ROOT)}: COPY source {src!r} does not exist")
    for req in re.findall(r"(?:-r|-c)\s+(\S+\.txt)", text):
        candidates = [ROOT / req, ROOT / "requirements" / Path(req).name, path.parent / Path(req).name]
        if not any(c.is_file() for c in candidates):
            problems.append(f"{path.relative_to(ROOT)}: requirements file {req!r} does not exist")
    if not re.search(r"^FROM\s+\S+:\S+", text, re.M) and not re.search(r"^ARG\s+\w+=\S+:\S+", text, re.M):
        problems.append(f"{path.relative_to(ROOT)}: the base image has no tag")
    return problems


def image_references() -> list[tuple[Path, str]]:
    refs = []
    for path in yaml_files():
        for d in load_docs(path):
            refs += [(path, n["image"]) for n in _walk(d) if isinstance(n, dict) and isinstance(n.get("image"), str)]
    return refs


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(d, dict) for d in docs)


def test_expected_files_exist():
    for rel in (
        "ray-cluster/aws.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-train-gm.yaml",
        "kuberay/rayservice.yaml",
        "docker/Dockerfile",
        "mlflow/k8s.yaml",
        "README.md",
    ):
        assert (INFRA / rel).is_file(), rel
    assert (ROOT / ".dockerignore").is_file()
    assert (ROOT / "docs" / "capacity_plan.md").is_file()


def test_image_tags_match_the_build():
    built = built_images()
    platform = built.get("infra/docker/Dockerfile")
    mlflow_image = built.get("infra/mlflow/Dockerfile")
    assert platform and mlflow_image, "infra/README.md must build both images"
    assert platform.rsplit(":", 1)[1] == pyproject_version(), "the platform image tag is the project version"
    assert f'org.opencontainers.image.version="{pyproject_version()}"' in DOCKERFILE.read_text()
    assert f"-t {platform} ." in DOCKERFILE.read_text(), "the Dockerfile's build comment names the same tag"
    mlflow_version = pinned("mlflow", ROOT / "requirements" / "lock.txt")
    assert mlflow_image.rsplit(":", 1)[1] == mlflow_version, "the MLflow image tag is the locked MLflow version"
    assert pinned("mlflow", INFRA / "mlflow" / "requirements.txt") == mlflow_version
    refs = image_references()
    assert refs
    for path, image in refs:
        assert re.search(r":[\w.-]+$", image.split("/")[-1]), f"{path}: image {image!r} has no tag"
        repo = image.rsplit(":", 1)[0]
        if repo == platform.rsplit(":", 1)[0]:
            assert image == platform, f"{path}: {image} is not the image infra/README.md builds ({platform})"
        if repo == mlflow_image.rsplit(":", 1)[0]:
            assert image == mlflow_image, f"{path}: {image} is not {mlflow_image}"
    assert any(image == platform for _, image in refs)


def test_dockerfiles():
    assert check_dockerfile(DOCKERFILE) == []
    assert check_dockerfile(MLFLOW_DOCKERFILE) == []
    text = DOCKERFILE.read_text()
    # the Makefile's setup order: the torch pair, the locked rest, the no-deps set, the project
    steps = [
        text.index("pip install -q -r requirements/constraints.txt"),
        text.index("-c requirements/constraints.txt -c requirements/lock.txt"),
        text.index("--no-deps -r requirements/nodeps.txt"),
        text.index("--no-deps -e ."),
    ]
    assert steps == sorted(steps)
    constraints = ROOT / "requirements" / "constraints.txt"
    assert pinned("torch", constraints) and pinned("torchvision", constraints)  # the pair, exactly
    assert image_workdir() == "/home/ray/diffbir"


def test_launcher_config():
    config = load_docs(LAUNCHER)[0]
    assert check_launcher(config, built_images()["infra/docker/Dockerfile"]) == []


def test_kubernetes_manifests():
    docs = k8s_docs()
    kinds = {d["kind"] for _, d in docs}
    assert {
        "RayCluster",
        "RayJob",
        "RayService",
        "Deployment",
        "Service",
        "ConfigMap",
        "PersistentVolumeClaim",
    } <= kinds
    images = set(built_images().values())
    assert check_k8s(docs, images, pinned("ray", ROOT / "requirements" / "data.txt")) == []


def test_training_job_runs_the_multinode_config():
    (job,) = [d for p, d in k8s_docs() if p.name == "rayjob-train-gm.yaml" and d["kind"] == "RayJob"]
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:4] == ["python", "training/train_gm.py", "--config", "training/configs/gm_multinode.yaml"]
    cluster = job["spec"]["rayClusterSpec"]
    assert gpu_groups(cluster)
    config = yaml.safe_load((ROOT / "training/configs/gm_multinode.yaml").read_text())
    gpus = sum(
        g["replicas"] * int(c["resources"]["limits"]["nvidia.com/gpu"])
        for g in cluster["workerGroupSpecs"]
        for c in _containers(g["template"])
        if "nvidia.com/gpu" in c["resources"]["limits"]
    )
    workers = int(entry[entry.index("--num-workers") + 1]) if "--num-workers" in entry else config["num_workers"]
    assert gpus == workers == config["num_workers"], "one GPU per training rank"


def test_rayservice_serves_the_platform_app():
    (svc,) = [d for _, d in k8s_docs() if d["kind"] == "RayService"]
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert [a["import_path"] for a in serve["applications"]] == ["serving.app:build_app"]
    assert serve["applications"][0]["args"].get("num_gpus", 0) >= 1


def mlflow_deployment() -> dict:
    (deploy,) = [d for _, d in k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"]
    return deploy


def mlflow_compose() -> dict:
    return load_docs(INFRA / "mlflow" / "docker-compose.yaml")[0]


def container_env(container: dict) -> dict[str, str | None]:
    """A container's variables: name -> value (None when it comes from a Secret or ConfigMap)."""
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_mlflow_server_stores():
    deploy = mlflow_deployment()
    args = " ".join(_containers(deploy["spec"]["template"])[0]["args"])
    assert "--artifacts-destination $(ARTIFACTS_DESTINATION)" in args and "--serve-artifacts" in args
    (config,) = [d for _, d in k8s_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-config"]
    assert config["data"]["ARTIFACTS_DESTINATION"].startswith("s3://")
    compose = mlflow_compose()
    command = " ".join(compose["services"]["mlflow"]["command"])
    assert "--artifacts-destination s3://" in command and "--serve-artifacts" in command
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_DB_URI"].startswith("postgresql://")
    build = compose["services"]["mlflow"]["build"]
    assert ((INFRA / "mlflow" / build["context"]) / build["dockerfile"]).resolve() == MLFLOW_DOCKERFILE.resolve()
    raw = (INFRA / "mlflow" / "docker-compose.yaml").read_text()
    assert re.search(r"\$\{MINIO_ROOT_PASSWORD:\?", raw), "MINIO_ROOT_PASSWORD must come from the env file, required"


def test_mlflow_server_requires_auth():
    """The image's entrypoint runs MLflow's basic-auth app (tests/test_registry.py runs it for real)."""
    dockerfile = MLFLOW_DOCKERFILE.read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])$", dockerfile, re.M).group(1))
    assert entrypoint[:2] == ["python", "/usr/local/lib/mlflow-serve.py"]
    assert "COPY infra/mlflow/serve.py /usr/local/lib/mlflow-serve.py\n" in dockerfile
    assert '"--app-name", "basic-auth"' in (INFRA / "mlflow" / "serve.py").read_text()
    container = _containers(mlflow_deployment()["spec"]["template"])[0]
    for env in (container_env(container), mlflow_compose()["services"]["mlflow"]["environment"]):
        assert env["MLFLOW_AUTH_ADMIN_PASSWORD_FILE"].startswith("/run/secrets/")
        assert env["MLFLOW_AUTH_SECRET_KEY_FILE"].startswith("/run/secrets/")


def test_mlflow_passwords_come_from_secret_files():
    """No password in an argument, a URI or a plain variable: the database's and the admin's are files."""
    container = _containers(mlflow_deployment()["spec"]["template"])[0]
    compose = mlflow_compose()
    service = compose["services"]["mlflow"]
    for args, env in ((container["args"], container_env(container)), (service["command"], service["environment"])):
        assert not [a for a in args if re.search(r"password|://[^/@]*:[^/@]*@", a, re.I)], args
        assert re.fullmatch(r"postgresql://[^:@/]+@[^/@]+/[^/@]+", env["MLFLOW_DB_URI"]), "a URI without a password"
        assert env["MLFLOW_DB_PASSWORD_FILE"].startswith("/run/secrets/")
        assert not {k for k in env if k.endswith("PASSWORD")}
    files = [container_env(container)[f"MLFLOW_{k}_PASSWORD_FILE"] for k in ("DB", "AUTH_ADMIN")]
    assert {str(Path(f).parent) for f in files} <= {m["mountPath"] for m in container["volumeMounts"]}
    assert set(service["secrets"]) == {"db_password", "admin_password", "secret_key"} == set(compose["secrets"])
    assert all(Path(s["file"]).parts[0] == "secrets" for s in compose["secrets"].values())
    assert "secrets/" in (INFRA / "mlflow" / ".gitignore").read_text().split()
    postgres = compose["services"]["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD_FILE"] == "/run/secrets/db_password" and "POSTGRES_PASSWORD" not in postgres


def test_mlflow_compose_publishes_on_loopback_only():
    for name, service in mlflow_compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name} publishes {port!r} everywhere"


def test_commands_in_docs_and_comments():
    """Every `python ...` example in infra/ (README and YAML comments) names real scripts, modules,
    flags and configs; every `make X` is a Makefile target."""
    problems = []
    for path in [README, *yaml_files(), DOCKERFILE]:
        text = path.read_text()
        for command in shell_commands(text):
            problems += [f"{path.relative_to(ROOT)}: {p}" for p in check_command(command)]
        problems += [f"{path.relative_to(ROOT)}: {p}" for p in check_make_targets(text)]
    assert problems == []


def test_environment_variables_read_by_the_code_are_documented():
    readme = README.read_text()
    found = set()
    for part in ("diffbir", "pipelines", "training", "serving"):
        for path in (ROOT / part).rglob("*.py"):
            text = path.read_text()
            found |= set(re.findall(r"environ(?:\.get|\.setdefault)?\(\s*[\"']([A-Z_][A-Z0-9_]*)", text))
            found |= set(re.findall(r"environ\[\s*[\"']([A-Z_][A-Z0-9_]*)", text))
            found |= set(re.findall(r"getenv\(\s*[\"']([A-Z_][A-Z0-9_]*)", text))
            found |= set(re.findall(r"^[A-Z_]+_ENV\s*=\s*[\"']([A-Z_][A-Z0-9_]*)[\"']", text, re.M))
    assert {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"} <= found
    missing = sorted(v for v in found if f"`{v}`" not in readme)
    assert missing == [], f"environment variables read by the code but not in infra/README.md: {missing}"


# ------------------------------------------------------------- the checkers catch what is wrong


def test_check_command_catches_bad_references():
    good = "python training/train_gm.py --config training/configs/gm_multinode.yaml --num-workers 32 --use-gpu"
    assert check_command(good) == []
    assert check_command("python -m pipelines.filter_laion --metadata 's3://b/*.parquet' --output s3://b/out") == []
    assert check_command("python training/promote.py --config training/configs/promote.yaml --device cuda") == []
    assert check_command("python training/train_gmx.py --config training/configs/gm_multinode.yaml")
    assert check_command("python training/train_gm.py --config training/configs/gm_nope.yaml")
    assert check_command("python training/train_gm.py --config training/configs/gm_multinode.yaml --num-wrokers 32")
    assert check_command("python -m pipelines.filter_laoin --output s3://b/out")
    assert check_command("python -m pipelines.filter_laion --ouptut s3://b/out")
    assert check_command("python -m pipelines.filter_laion --prefilter.min-side 256 --no-prefilter.dedup-urls") == []
    assert check_command("python -m pipelines.filter_laion --prefilter.min-sides 256")
    assert check_command(f"python {image_workdir()}/training/train_nope.py")
    assert check_make_targets("make setup && make filter-laion") == []
    assert check_make_targets("make deploy-everything")


def test_check_import_path_catches_bad_references():
    assert check_import_path("training.config:TrainConfig") == []
    assert check_import_path("training.config:NoSuchThing")
    assert check_import_path("training.nope:build_app")
    assert check_import_path("training.config")


def test_check_k8s_catches_bad_manifests():
    docs = k8s_docs()
    images = set(built_images().values())
    version = pinned("ray", ROOT / "requirements" / "data.txt")

    def mutate(kind: str, change) -> list[str]:
        copied = [(p, json.loads(json.dumps(d))) for p, d in docs]
        change(next(d for _, d in copied if d["kind"] == kind))
        return check_k8s(copied, images, version)

    assert mutate(
        "RayJob",
        lambda d: d["spec"].update(entrypoint="python training/train_gm.py --config training/configs/missing.yaml"),
    )
    assert mutate("RayJob", lambda d: d["spec"].update(entrypoint="echo hello"))
    assert mutate(
        "RayService",
        lambda d: d["spec"].update(
            serveConfigV2=d["spec"]["serveConfigV2"].replace("serving.app:build_app", "serving.nope:build_app")
        ),
    )
    assert mutate("RayService", lambda d: d["spec"].update(serveConfigV2="applications: [unclosed"))
    assert mutate(
        "RayCluster",
        lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
            image=f"ghcr.io/your-org/diffbir-platform:{pyproject_version()}.dev0"  # not this version
        ),
    )
    assert mutate(
        "RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("resources")
    )
    assert mutate("RayCluster", lambda d: d.update(apiVersion="ray.io/v1alpha1"))
    ray_version = pinned("ray", ROOT / "requirements" / "data.txt")
    assert mutate("RayCluster", lambda d: d["spec"].update(rayVersion=ray_version + ".dev0"))
    assert mutate("RayCluster", lambda d: d["spec"].pop("headGroupSpec"))
    assert mutate(
        "RayCluster",
        lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"].update(
            claimName="nope"
        ),
    )
    assert mutate(
        "RayCluster", lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].update(serviceAccountName="nope")
    )
    assert mutate(
        "RayCluster",
        lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"].update(
            name="nope"
        ),
    )
    assert mutate(
        "RayService",
        lambda d: d["spec"].update(
            serveConfigV2=d["spec"]["serveConfigV2"].replace("max_batch_size", "max_bacth_size")
        ),
    )


def test_check_launcher_catches_bad_configs():
    image = built_images()["infra/docker/Dockerfile"]
    config = load_docs(LAUNCHER)[0]

    def mutate(change) -> list[str]:
        copied = json.loads(json.dumps(config))
        change(copied)
        return check_launcher(copied, image)

    assert mutate(lambda c: c.pop("head_node_type"))
    assert mutate(lambda c: c.update(head_node_type="ray.head.nope"))
    assert mutate(lambda c: c["docker"].update(image="ghcr.io/your-org/diffbir-platform:latest"))
    assert mutate(lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].pop("GPU"))
    assert mutate(lambda c: c.update(max_workers=1))
    assert mutate(lambda c: c.update(no_such_key=1))  # Ray's schema
    assert mutate(lambda c: c["provider"].pop("region"))
