"""Experiment tracking and provenance: a real MLflow tracking server (sqlite store, localhost) read back through
MlflowClient, a W&B offline run read back from its own files, and the provenance fields in config.json and the
checkpoints. The MLflow / W&B tests skip when the package is not installed (CI installs both)."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import common
import tracking
import train
from conftest import ROOT

TINY = ["--model=convnext_atto", "--image_size=32", "--batch_size=8", "--eval_batch_size=64", "--log_interval=5",
        "--warmup_iters=2", "--learning_rate=1e-3", "--device=cpu"]
PROVENANCE = ("git_commit", "git_dirty", "torch_version", "cuda_version", "world_size", "data_hash")


def run(out, data_dir, *extra):
    return train.main([f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, *extra])


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# provenance and the Logger's own checks (fast)


def test_provenance_names_commit_versions_and_data(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"data_hash": "sha256:abc"}))
    prov = tracking.provenance({"data_dir": str(tmp_path)}, 4)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert prov["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert prov["git_dirty"] in ((True, False) if head.returncode == 0 else (None,))
    assert prov["torch_version"] == str(torch.__version__) and prov["world_size"] == 4
    assert prov["data_hash"] == "sha256:abc"
    assert tracking.provenance({"data_dir": str(tmp_path / "none")}, 1)["data_hash"] is None


def test_trackers_knob_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown tracker 'mlfow'"):
        tracking.Logger(str(tmp_path), {"trackers": "tensorboard,mlfow"})
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install mlflow"):
        tracking.Logger(str(tmp_path), {"trackers": "mlflow"})
    assert tracking.parse_trackers({"trackers": "tensorboard,wandb", "tensorboard_log": False}) == ("wandb",)
    step, flat = tracking.flatten_record({"iter": 3, "split": "val", "auc_macro": 0.7, "auc": {"Pleural Effusion": 0.6},
                                        "final": False, "note": "x"})
    assert step == 3 and flat == {"val/auc_macro": 0.7, "val/auc/Pleural Effusion": 0.6}


@pytest.mark.slow
def test_config_and_checkpoints_carry_provenance(tmp_path, tiny_phantom):
    out = str(tmp_path / "run")
    run(out, tiny_phantom, "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2", "--tensorboard_log=False")
    cfg = json.load(open(os.path.join(out, "config.json")))
    want = tracking.provenance({"data_dir": tiny_phantom}, 1)
    assert {k: cfg[k] for k in PROVENANCE} == want
    with open(os.path.join(tiny_phantom, "meta.json")) as f:
        assert cfg["data_hash"] == json.load(f).get("data_hash")
    for name in ("ckpt.pt", "best.pt"):
        ck = common.load_checkpoint(os.path.join(out, name))
        assert {k: ck[k] for k in PROVENANCE} == want, name


# -----------------------------------------------------------------------------
# MLflow: one real tracking server per session


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # ~10 s on an idle machine; minutes on a loaded one
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn / job-runner children
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_mlflow_server_gets_params_metrics_artifacts_and_resume(tmp_path, tiny_phantom, mlflow_server):
    from mlflow import MlflowClient
    out = str(tmp_path / "mlrun")
    knobs = ["--trackers=tensorboard,mlflow", f"--mlflow_uri={mlflow_server}", "--mlflow_experiment=nanorad-test",
             "--track_checkpoints=True", "--eval_interval=3", "--lr_decay_iters=12"]
    run(out, tiny_phantom, *knobs, "--max_iters=6")
    run_id = common.load_checkpoint(os.path.join(out, "ckpt.pt"))["trackers"]["mlflow"]
    client = MlflowClient(tracking_uri=mlflow_server)
    r = client.get_run(run_id)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert r.data.params == {k: str(v) for k, v in cfg.items()}  # the resolved config (+ provenance), every key
    assert r.info.run_name == "mlrun" and r.info.status == "FINISHED"
    assert r.data.tags["script"] == "train.py" and r.data.tags["git_commit"] == str(cfg["git_commit"])
    assert r.data.tags["world_size"] == "1" and r.data.tags["data_hash"] == str(cfg["data_hash"])
    evals = [e for e in records(out) if e.get("split") == "val" and not e.get("final")]  # the eval records
    hist = client.get_metric_history(run_id, "val/auc_macro")  # one point per eval, the metrics.jsonl value
    assert [(m.step, m.value) for m in hist] == [(e["iter"], pytest.approx(e["auc_macro"])) for e in evals]
    assert [m.step for m in hist] == [0, 3, 6]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [5, 6]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.json", "metrics.jsonl", "train.log", "best.pt"}
    assert os.path.isdir(os.path.join(out, "tb"))  # TensorBoard still written next to MLflow

    run(out, tiny_phantom, *knobs, "--max_iters=12", "--init_from=resume")  # continues the same MLflow run
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["trackers"]["mlflow"] == run_id
    exp = client.get_experiment_by_name("nanorad-test")
    assert len(client.search_runs([exp.experiment_id])) == 1
    r = client.get_run(run_id)
    assert [m.step for m in client.get_metric_history(run_id, "val/auc_macro")] == [0, 3, 6, 9, 12]
    assert r.info.status == "FINISHED" and r.data.tags["resume.init_from"] == "resume" and r.data.tags["resume.max_iters"] == "12"


# -----------------------------------------------------------------------------
# W&B offline: the run's own record file (a LevelDB-style log of protobuf Records, what `wandb sync` uploads)


def wandb_records(path):
    from wandb.proto import wandb_internal_pb2 as pb
    buf = open(path, "rb").read()
    assert buf[:4] == b":W&B", path
    pos, pending, out = 7, b"", []  # 7-byte file header; then 32 KiB blocks of (crc 4, length 2, type 1) chunks
    while pos + 7 <= len(buf):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(buf[pos + 4:pos + 6], "little"), buf[pos + 6]
        pending += buf[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            r = pb.Record()
            r.ParseFromString(pending)
            out.append(r)
            pending = b""
    return out


@pytest.mark.slow
def test_wandb_offline_run_has_config_and_metrics(tmp_path, tiny_phantom, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "wbrun")
    run(out, tiny_phantom, "--trackers=wandb", "--wandb_mode=offline", "--max_iters=6", "--lr_decay_iters=6",
        "--eval_interval=3")
    run_id = common.load_checkpoint(os.path.join(out, "ckpt.pt"))["trackers"]["wandb"]
    files = glob.glob(os.path.join(out, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
    assert len(files) == 1, os.listdir(os.path.join(out, "wandb"))
    config, history = {}, []
    for r in wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            assert r.run.display_name == "wbrun"
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert {k: config[k] for k in cfg} == cfg
    evals = [e for e in records(out) if e.get("split") == "val" and not e.get("final")]  # the eval records
    points = [(h["_step"], h["val/auc_macro"]) for h in history if "val/auc_macro" in h]
    assert points == [(e["iter"], pytest.approx(e["auc_macro"])) for e in evals] and [p[0] for p in points] == [0, 3, 6]
    assert any("train/loss" in h for h in history)
    assert os.path.exists(os.path.join(os.path.dirname(files[0]), "files", "config.json"))  # artifacts at the end
    assert not os.path.isdir(os.path.join(out, "tb"))  # trackers=wandb alone: no TensorBoard


# -----------------------------------------------------------------------------
# dvc.yaml: the quick start's stages call real knobs and chain prepare -> train -> evaluate


def test_dvc_pipeline_commands_and_chain():
    yaml = pytest.importorskip("yaml")
    import importlib
    import shlex
    stages = yaml.safe_load(open(ROOT / "dvc.yaml"))["stages"]
    assert list(stages) == ["prepare", "train", "evaluate"]
    for name, st in stages.items():
        python, script, *args = shlex.split(st["cmd"])
        assert python == "python" and (ROOT / script).exists(), st["cmd"]
        defaults = importlib.import_module(script[:-3]).DEFAULTS
        for a in args:
            assert a.split("=", 1)[0][2:] in defaults, f"{name}: {a} is not a knob of {script}"
    paths = lambda st, key: {next(iter(o)) if isinstance(o, dict) else o for o in st.get(key, [])}  # noqa: E731
    assert "data/phantom" in paths(stages["prepare"], "outs") & paths(stages["train"], "deps")
    assert "out/quickstart/best.pt" in paths(stages["train"], "outs") & paths(stages["evaluate"], "deps")
    for st in stages.values():
        assert all((ROOT / d).exists() for d in paths(st, "deps") if d.endswith(".py"))
