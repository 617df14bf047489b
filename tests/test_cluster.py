"""Scale-out: launcher YAMLs against Ray's schema, the KubeRay manifest, and on one two-node local
cluster with token authentication: the preflight, `ray job submit` of the main job (with a node
drained for preemption mid-run), and the token checked for real."""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import agent_ports, stop_sessions, unclaimed_port
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCHERS = ["cluster/aws.yaml", "cluster/gcp.yaml"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_passes_rays_schema_with_three_roles(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / name).read_text()))
    validate_config(config)  # raises on any schema error
    types = config["available_node_types"]
    assert set(types) == {"head", "gpu_worker", "cpu_decode_worker"} and config["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["resources"]["GPU"] == 8
    assert (types["gpu_worker"]["min_workers"], types["gpu_worker"]["max_workers"]) == (0, 2)
    assert "GPU" not in types["cpu_decode_worker"]["resources"]
    if name == "cluster/aws.yaml":  # multi-node all-reduce over EFA, not TCP
        assert [ni["InterfaceType"] for ni in types["gpu_worker"]["node_config"]["NetworkInterfaces"]] == ["efa"]
        assert "--device=/dev/infiniband" in types["gpu_worker"]["docker"]["worker_run_options"]
    assert (types["cpu_decode_worker"]["min_workers"], types["cpu_decode_worker"]["max_workers"]) == (0, 8)
    assert config["docker"]["image"].startswith("rayproject/ray:") and config["docker"]["image"].endswith("-py311-gpu")
    assert any("pip install" in c and "ppma_ray" in c for c in config["setup_commands"])
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in start


def test_kuberay_rayjob_has_what_a_rayjob_needs():
    job = yaml.safe_load((ROOT / "cluster/kuberay.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert "jobs/pretrain.py" in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) == 8
    decode = groups["cpu-decode-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in decode


def test_no_yaml_opens_the_internet_or_holds_a_token():
    for f in sorted((ROOT / "cluster").glob("*.yaml")) + sorted((ROOT / "jobs/configs").glob("*.yaml")):
        text = f.read_text()
        body = "\n".join(line.split("#", 1)[0] for line in text.splitlines())  # comments may say "no 0.0.0.0/0"
        assert "0.0.0.0/0" not in body and "::/0" not in body, f
        assert not re.search(r"RAY_AUTH_TOKEN\s*[=:]\s*\S", body), f  # tokens come from files or secrets
        for rule in yaml.safe_load(text).get("provider", {}).get("security_group", {}).get("IpPermissions", []):
            assert rule["FromPort"] == rule["ToPort"] == 22, f  # only SSH is opened, never Ray's ports


def test_every_gcp_node_joins_the_dedicated_subnetwork():
    """With a subnetwork on every node type Ray skips its own pick (the project's first subnet,
    usually the default network that opens SSH to the internet); the header says how to create it."""
    text = (ROOT / "cluster/gcp.yaml").read_text()
    cfg = yaml.safe_load(text)
    for name, node in cfg["available_node_types"].items():
        (iface,) = node["node_config"]["networkInterfaces"]
        assert iface["subnetwork"].endswith("/subnetworks/ppma-subnet"), name
    assert "gcloud compute firewall-rules create ppma-ssh" in text and "--allow=tcp:22" in text


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head with token auth (1 CPU) and a CPU-only decode node (1 CPU, a custom ``decode_node``
    resource to find it by), both on localhost; started once for this module and stopped as
    soon as it is done, so its daemons do not share the 2 cores with the rest of the suite. Each
    node has its own temp dir, as on separate machines: sharing one, both nodes' log monitors
    forwarded every worker line, and the job's console showed each progress line twice."""
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    token = secrets.token_hex(16)
    gcs, dash = unclaimed_port(), unclaimed_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{BIN}:{env['PATH']}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=1",
                             "--include-dashboard=true",
                            f"--dashboard-port={dash}", f"--temp-dir={temp}", "--block", *agent_ports()],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_http(f"http://127.0.0.1:{dash}")
    worker = subprocess.Popen([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
                               '--resources={"decode_node": 1}', f"--temp-dir={temp}/decode_node", "--block",
                               *agent_ports()],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_nodes(f"http://127.0.0.1:{dash}", token, 2)
    yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env, "token": token, "temp": temp}
    stop_sessions([worker, head])
    shutil.rmtree(temp, ignore_errors=True)


def _alive_nodes(dashboard: str, token: str) -> list[dict]:
    """The alive nodes (``node_id``, ``resources_total``, ...), asked of the dashboard's state API
    with the token: no driver joins the cluster just to look."""
    request = urllib.request.Request(f"{dashboard}/api/v0/nodes?limit=100", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return [n for n in json.loads(r.read())["data"]["result"]["result"] if n["state"] == "ALIVE"]


def _wait_for_nodes(dashboard: str, token: str, count: int | None = None, resource: str | None = None,
                    seconds: int = 240) -> list[dict]:
    """Until ``count`` nodes are alive, or one with ``resource`` (a node joins seconds after its
    ``ray start``; one stopped by an earlier test may still count as alive for a while)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            nodes = _alive_nodes(dashboard, token)
            if (count is None or len(nodes) == count) and (resource is None or any(
                    resource in n["resources_total"] for n in nodes)):
                return nodes
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(1)
    pytest.fail(f"the cluster at {dashboard} did not reach {count} nodes / a node with {resource}")


def _start_node(cluster, *args) -> subprocess.Popen:
    """One more node with 1 CPU; a temp dir of its own, as on another machine (see the fixture)."""
    temp = tempfile.mkdtemp(prefix="node", dir=cluster["temp"])
    return subprocess.Popen([str(BIN / "ray"), "start", f"--address={cluster['gcs']}", "--num-cpus=1", "--block",
                             f"--temp-dir={temp}", *args, *agent_ports()], env=cluster["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_http(url: str, seconds: int = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(1)
    pytest.fail(f"{url} did not come up")


def _preflight(cluster, demo_root, *sets):
    args = ["--set", "scaling.cpus_per_worker=0.5", "--set", f"data.demo_root={demo_root}", *sets]
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    return subprocess.run([sys.executable, str(ROOT / "jobs/preflight.py"), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_preflight_passes_on_two_nodes_and_fails_clearly_on_unwritable_storage(two_node_cluster, demo_root, tmp_path):
    ok = _preflight(two_node_cluster, demo_root, "--set", f"run.storage_path={tmp_path / 'runs'}")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("| PASS |") >= 6 and "FAIL" not in ok.stdout
    assert ok.stdout.count("storage shared with node") == 2 and "data reachable from workers | PASS" in ok.stdout
    bad = _preflight(two_node_cluster, demo_root, "--set", "run.storage_path=/dev/null/runs")
    assert bad.returncode == 1
    assert "| storage writable (driver) | FAIL | /dev/null/runs is not writable" in bad.stdout


def test_preflight_asks_for_missing_resources_waits_for_a_node_and_times_out_clearly(two_node_cluster, demo_root, tmp_path):
    """An autoscaling cluster starts without the nodes a run needs: the preflight asks for them and
    waits (here a node joins by hand, as the autoscaler would add one), or fails with a clear line."""
    needs_3_cpus = ["--set", f"run.storage_path={tmp_path / 'runs'}", "--set", "scaling.cpus_per_worker=2"]
    late = _preflight(two_node_cluster, demo_root, *needs_3_cpus, "--set", "scaling.resource_wait_s=3")
    assert late.returncode == 1, late.stdout + late.stderr
    assert "waiting for the cluster to scale up" in late.stdout
    assert "| autoscaling | FAIL | the cluster did not provide the resources within 3 s" in late.stdout

    args = ["--set", f"data.demo_root={demo_root}", *needs_3_cpus, "--set", "scaling.resource_wait_s=240"]
    env = {**two_node_cluster["env"], "RAY_ADDRESS": two_node_cluster["gcs"], "PYTHONUNBUFFERED": "1"}  # each line as said
    waiting = subprocess.Popen([sys.executable, str(ROOT / "jobs/preflight.py"), *args], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    for line in waiting.stdout:  # the node joins once the preflight waits (a loaded machine may take longer than any sleep)
        seen.append(line)
        if "waiting for the cluster to scale up" in line:
            break
    node = _start_node(two_node_cluster)
    try:
        out, err = waiting.communicate(timeout=280)
    finally:
        stop_sessions([node])
    out = "".join(seen) + out
    assert waiting.returncode == 0, out + err
    assert "waiting for the cluster to scale up" in out and "| CPUs | PASS |" in out


def test_token_auth_refuses_a_job_with_no_token_or_a_wrong_one(two_node_cluster):
    """The right token is accepted by every other test of this module (each joins or submits with
    it); here a submission without it or with another is refused."""
    def submit(**env):
        cmd = [str(BIN / "ray"), "job", "submit", "--address", two_node_cluster["dashboard"], "--", "python", "-c", "print('hi')"]
        return subprocess.run(cmd, env={**two_node_cluster["env"], **env}, capture_output=True, text=True, timeout=300)

    wrong = submit(RAY_AUTH_TOKEN=secrets.token_hex(16))
    assert wrong.returncode != 0 and re.search(r"(?i)unauthori|authenticat", wrong.stdout + wrong.stderr)
    none = submit(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN="")
    assert none.returncode != 0 and re.search(r"(?i)unauthori|authenticat", none.stdout + none.stderr)


def _placement(cluster) -> dict:
    """Where the cluster ran the Train workers and the decode tasks (Ray's state API)."""
    code = """
import json, ray
from ray.util.state import list_actors, list_tasks
ray.init(address=%r, log_to_driver=False)
nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
print(json.dumps({
    "decode_node": next(i for i, r in nodes.items() if "decode_node" in r),
    "train_workers": [a.node_id for a in list_actors(address=%r, filters=[("class_name", "=", "RayTrainWorker")],
                                                     limit=1000)],
    "decode_tasks": [t.node_id for t in list_tasks(address=%r, limit=10000, raise_on_missing_output=False)
                     if "decode_batch" in t.name and t.node_id],
}))
""" % (cluster["gcs"], cluster["dashboard"], cluster["dashboard"])  # explicit: the test session runs other Ray instances
    r = subprocess.run([sys.executable, "-c", code], env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


DRAINER = """
import sys, time
import ray
from ray.core.generated import autoscaler_pb2
gcs = ray._raylet.GcsClient(address=sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
accepted, why = gcs.drain_node(sys.argv[2], autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                               "spot reclaim", time.time_ns() // 1_000_000 + int(float(sys.argv[3]) * 1000))
print("accepted" if accepted else f"refused: {why}", flush=True)
"""


def test_ray_job_submit_runs_pretrain_on_the_cluster_and_checkpoints_when_its_node_is_preempted(
        two_node_cluster, demo_root, tmp_path):
    """The README's `ray job submit -- python jobs/pretrain.py`, against the cluster, in the scale-out
    shape: the Train worker on a node marked for training (here a spot node), the decode tasks on the
    CPU nodes. Mid-run the spot node is reclaimed, as a cloud does it: Ray is told it will be preempted
    (a drain with reason PREEMPTION and a deadline). Ray Train's watcher passes that on, and the run
    writes a whole, resumable checkpoint at its next log step, long before `run.checkpoint_every`,
    says so on the console, and trains on (here it finishes before the deadline)."""
    from ppma_ray.train.checkpoint import checkpoint_problem, read_train_state

    cluster, env = two_node_cluster, two_node_cluster["env"]
    spot = _start_node(cluster, '--resources={"spot": 1}')
    nodes = _wait_for_nodes(cluster["dashboard"], cluster["token"], resource="spot")
    spot_id = next(n["node_id"] for n in nodes if "spot" in n["resources_total"])
    # the no-human list labelled by class names, as Kinetics' CSV is: the job writes the ids it used
    rows = [line.rsplit(";", 1) for line in (demo_root / "nohuman/train.csv").read_text().splitlines()]
    (tmp_path / "named.csv").write_text("path,label\n" + "".join(f"{p},scene_{y}\n" for p, y in rows))
    # one epoch of 48 one-video steps: no checkpoint before the last step but the preemption's
    tiny = ["model.depth=2", "model.decoder_depth=1", "data.clip.img_size=32", "data.clip.short_side=36",
            "data.clip.num_frames=8", "scaling.cpus_per_worker=0.5", "scaling.worker_resources={spot: 1}",
            "mae.epochs=1", "mae.batch_size=4", "run.log_every=1", "run.checkpoint_every=1000",
            f"data.sources.nohuman={{manifest: {tmp_path / 'named.csv'}, root: {demo_root / 'nohuman'}}}",
            f"run.storage_path={tmp_path / 'runs'}", f"data.demo_root={demo_root}", "run.name=spot"]
    # the watcher the other tests turn off (conftest), looking for drains every 0.5 s instead of 5
    runtime_env = json.dumps({"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1",
                                           "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}})
    out = tmp_path / "out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(ROOT),
           "--runtime-env-json", runtime_env, "--", "python", "jobs/pretrain.py", "--stage", "mae",
           *[a for t in tiny for a in ("--set", t)], "--output-dir", str(out)]
    # `ray drain-node`'s own call, from a process ready before the run starts: the CLI takes seconds to
    # import, in which the tiny run would be over. The deadline is one the run always beats: at 60 s,
    # a run slowed by the other test worker took 60 s for its 48 steps, the node was reclaimed under
    # the finished run, and Ray Train waited for a spot node that never came
    drainer = subprocess.Popen([sys.executable, "-c", DRAINER, cluster["gcs"], spot_id, "600"], env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert drainer.stdout.readline().strip() == "ready"
    log, metrics = tmp_path / "job.log", tmp_path / "runs/spot-mae/mae_metrics.jsonl"
    try:
        for _ in range(30):  # the dashboard answers before its job agent is ready
            with open(log, "w") as sink:
                job = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
            deadline = time.time() + 300
            # the drain follows the run's first step, seen in its own metrics file (`ray job submit`
            # passes the console on seconds late)
            while job.poll() is None and time.time() < deadline and not metrics.is_file():
                time.sleep(0.05)
            if job.poll() is None or "No available agent" not in log.read_text():
                break
            time.sleep(2)
        drainer.stdin.write("go\n")
        drainer.stdin.flush()
        assert drainer.stdout.readline().strip() == "accepted"
        job.wait(timeout=300)
    finally:
        job.kill()
        drainer.kill()
        stop_sessions([spot])  # Ray's state API still lists where the run's tasks and actors ran
    console = log.read_text()
    assert job.returncode == 0 and "succeeded" in console, console[-4000:]
    # the console through `ray job submit`: each progress line once, none of Ray's own lines
    progress = [x for x in console.splitlines() if "[mae] epoch 1/1 step" in x]
    assert progress and len(progress) == len(set(progress)), progress
    assert "Starting execution of Dataset" not in console
    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["mae"]["steps"] == 48 and Path(results["stages"]["mae"]["checkpoint"]).is_dir()
    assert json.loads((out / "label_maps/nohuman.json").read_text()) == {f"scene_{y}": y for y in range(6)}
    assert f"data.sources.nohuman: 6 named classes, ids in {out / 'label_maps/nohuman.json'}" in console

    notice = re.search(r"\[mae\] node\(s\) (\w+) \(ranks \[0\]\) will be preempted, \d+ s before the deadline: "
                       r"checkpoint at step (\d+)", console)
    assert notice and spot_id.startswith(notice[1]), console[-4000:]
    steps = {read_train_state(c)["step"]: c for c in (tmp_path / "runs/spot-mae").glob("checkpoint_2*")}
    assert sorted(steps) == [int(notice[2]), 48] and int(notice[2]) < 10, steps
    assert checkpoint_problem(steps[int(notice[2])]) is None

    placement = _placement(cluster)
    assert placement["train_workers"] == [spot_id]  # the custom resource kept training on its node
    decode = placement["decode_tasks"]
    # the spot node's CPU is half taken by the worker: whole-CPU decode tasks run on the CPU nodes
    assert decode and spot_id not in decode and placement["decode_node"] in decode, placement
    print(f"two-node run: {results['stages']['mae']['clips_per_s']:.1f} clips/s, {decode.count(placement['decode_node'])} "
          f"of {len(decode)} decode tasks on the decode node, the Train worker on the spot node")


