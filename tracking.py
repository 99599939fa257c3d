"""
Where a run's numbers go, and what traces a run to its code and data. Logger: stdout + out_dir/train.log,
out_dir/metrics.jsonl and the trackers named in cfg['trackers'] (TensorBoard, MLflow, Weights & Biases; ray_train.py
adds Ray Train's reports). provenance(): git commit + dirty flag, torch / CUDA versions, world size, the data's
content hash, written into config.json and every checkpoint. mlflow and wandb are imported only when asked for.
"""

import functools
import glob
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

# -----------------------------------------------------------------------------
# provenance: which code, which software and which data made a run (config.json and every checkpoint carry it)


@functools.lru_cache(maxsize=None)
def _git_state():
    """(commit, dirty) of the checkout this file was imported from, read once per process: the code that is running.
    Untracked files (a new config file, data/) do not count as dirty. (None, None) outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        status = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if commit.returncode != 0 or status.returncode != 0:
        return None, None
    return commit.stdout.strip(), bool(status.stdout.strip())


def provenance(cfg, world_size):
    """The fields that trace a run to its code and data: git commit and dirty flag, torch / CUDA versions, world size
    and the prepared data's content hash (data_hash in <data_dir>/meta.json, written by prepare; None when absent)."""
    commit, dirty = _git_state()
    data_dir = cfg.get("data_dir") or os.path.join("data", str(cfg.get("dataset", "")))
    meta_path = os.path.join(data_dir, "meta.json")
    data_hash = None
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            data_hash = json.load(f).get("data_hash")
    cuda = None if torch.version.cuda is None else str(torch.version.cuda)
    return {"git_commit": commit, "git_dirty": dirty, "torch_version": str(torch.__version__), "cuda_version": cuda,
            "world_size": world_size, "data_hash": data_hash}


# -----------------------------------------------------------------------------
# logging: stdout + out_dir/train.log, out_dir/metrics.jsonl, and the trackers in cfg['trackers']:
# TensorBoard (out_dir/tb), MLflow, Weights & Biases; ray_train.py adds 'ray' (metrics reported to Ray Train)

TRACKERS = ("tensorboard", "mlflow", "wandb", "ray")

# The tracker knobs of every train script (train.py, train_clip.py and train_gpt.py add them to their config with
# globals().update(tracking.KNOBS)); set them like any knob: --trackers=tensorboard,mlflow --mlflow_uri=http://...
KNOBS = dict(
    tensorboard=True,  # out_dir/tb; view with: tensorboard --logdir out
    trackers="tensorboard",  # comma-separated: tensorboard | mlflow | wandb (pip install mlflow / wandb); e.g. tensorboard,mlflow
    mlflow_uri="",  # MLflow tracking server, e.g. http://mlflow.lab:5000; "" = $MLFLOW_TRACKING_URI or MLflow's local default
    mlflow_experiment="nanorad",  # MLflow experiment (created when missing); the run is named after out_dir
    wandb_project="nanorad",  # W&B project; the run is named after out_dir
    wandb_mode="online",  # online | offline (files in out_dir/wandb; upload later with: wandb sync out_dir/wandb/offline-run-*)
    track_checkpoints=False,  # also upload best.pt to the trackers at the end (large files)
)
_ARTIFACTS = ("config.json", "metrics.jsonl", "train.log", "eval_*.json", "predictions_*.csv", "*.png")


def require(module, pip, needed_by):
    """The one way nanorad imports an optional package (onnx, onnxruntime, mlflow, wandb, ray, fastapi, pydicom,
    timm, transformers, ...): when the feature that needs it runs. A missing package is an ImportError with one
    sentence, what needs it and the pip command (exit code 2 on the command line); a package that is installed but
    fails to import (a broken dependency of its own) says that instead. needed_by: 'export.py --to=onnx'."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and (module == e.name or module.startswith(f"{e.name}.")):  # it, or a package above it
            raise ImportError(f"{needed_by} needs {module}, which is not installed: pip install {pip}") from None
        raise ImportError(f"{needed_by} needs {module}, which is installed but does not import ({type(e).__name__}: "
                          f"{e}): reinstall it (pip install --force-reinstall {pip})") from e


def parse_trackers(cfg):
    """cfg['trackers'] ('tensorboard,mlflow') -> a tuple of names; tensorboard_log=False (or tensorboard=False) drops
    TensorBoard, as it always did."""
    names = tuple(t.strip() for t in str(cfg.get("trackers", "tensorboard")).split(",") if t.strip())
    for t in names:
        if t not in TRACKERS:
            raise ValueError(f"trackers={cfg.get('trackers')!r}: unknown tracker {t!r}; choose a comma-separated list of "
                             f"{', '.join(TRACKERS[:3])} (ray is added by ray_train.py)")
    if not cfg.get("tensorboard_log", cfg.get("tensorboard", True)):
        names = tuple(t for t in names if t != "tensorboard")
    return names


def _metric_name(name):
    return re.sub(r"[^\w\-. :/]", "_", name)  # the characters MLflow accepts in a metric name


def flatten_record(record):
    """A metrics.jsonl record -> (step, {'<split>/<key>': number}); nested dicts (per-class AUC) add '/<key>'."""
    step = record.get("iter", record.get("step", record.get("iters")))
    prefix = "final" if record.get("final") else (record.get("split") or "metrics")  # the run's summary: final/...
    out = {}

    def walk(d, path):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{path}/{k}")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[_metric_name(f"{path}/{k}")] = v

    walk({k: v for k, v in record.items() if k not in ("iter", "step", "split", "final")}, prefix)
    return step, out


class Logger:
    """What a run prints and records. The master writes stdout + train.log, metrics.jsonl and every tracker named in
    cfg['trackers']; the trackers get the scalars the scripts log (train/loss, ...) and every metrics.jsonl record
    under the same names ('val/auc_macro', 'val/auc/<class>'), one point per name and step. The MLflow / W&B run
    starts at the first metric (so that resume(ids) from a checkpoint comes first and continues the same run), is
    named after out_dir, carries the config as params and the provenance as tags, and gets the run folder's files at
    close(). With 'ray' every rank reports each metrics.jsonl record to Ray Train, so jsonl() must be called on every
    rank at the same points. Logger(out_dir, True/False, master) is the older TensorBoard-only form."""

    def __init__(self, out_dir, cfg=True, master=True):
        if not isinstance(cfg, dict):
            cfg = {"trackers": "tensorboard" if cfg else ""}
        self.out_dir, self.cfg, self.master = out_dir, cfg, master
        self.tb, self.mlflow, self.wandb, self.ray = None, None, None, None
        self.ids, self.tags, self.started, self.last_step = {}, {}, False, {}
        names = parse_trackers(cfg)
        if "ray" in names:
            self.ray = require("ray.train", '"ray[train]"', "trackers includes 'ray'")
        if not master:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.log_file = open(os.path.join(out_dir, "train.log"), "a")
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("tensorboard is not installed (pip install tensorboard); logging to train.log and metrics.jsonl only")
            else:
                self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        if "mlflow" in names:
            self.mlflow = require("mlflow", "mlflow", "trackers includes 'mlflow'")
        if "wandb" in names:
            self.wandb = require("wandb", "wandb", "trackers includes 'wandb'")

    def set_tags(self, **tags):
        """script, git commit, data hash, world size...: tags of the MLflow run (W&B: its config has them)."""
        self.tags.update(tags)

    def resume(self, ids):
        """Continue the tracker runs a checkpoint recorded (tracker_ids()) instead of starting new ones."""
        assert not self.started, "Logger.resume(ids) must come before the first metric"
        self.ids.update(ids or {})

    def tracker_ids(self):
        """{'mlflow': run id, 'wandb': run id} of this run, for the checkpoint."""
        if self.master and (self.mlflow or self.wandb):
            self._start()
        return dict(self.ids)

    def line(self, text):
        if self.master:
            print(text, flush=True)
            self.log_file.write(text + "\n")
            self.log_file.flush()

    def scalars(self, values, step, prefix=""):
        if self.tb is not None:
            for k, v in values.items():
                if v is not None and np.isfinite(v):
                    self.tb.add_scalar(prefix + k, v, step)
        self._track({_metric_name(prefix + k): v for k, v in values.items()}, step)

    def jsonl(self, record):
        if self.master:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        step, flat = flatten_record(record)
        self._track(flat, step)
        if self.ray is not None:  # a barrier across the workers: every rank calls jsonl
            pointer = None
            if self.master:  # Ray's checkpoint registry gets a pointer to the run folder (Result.metrics_dataframe)
                d = tempfile.mkdtemp()
                with open(os.path.join(d, "nanorad.json"), "w") as f:
                    json.dump({"out_dir": os.path.abspath(self.out_dir), "step": step, "record": record}, f)
                pointer = self.ray.Checkpoint.from_directory(d)
            self.ray.report({**flat, "step": step}, checkpoint=pointer)
            if pointer is not None:
                shutil.rmtree(pointer.path)  # Ray has copied it to its storage

    def _track(self, values, step):
        """One point per (name, step) to MLflow / W&B: an eval record and the TensorBoard scalars of the same eval
        carry the same names."""
        if not self.master or not (self.mlflow or self.wandb) or step is None:
            return
        values = {k: float(v) for k, v in values.items()
                  if v is not None and math.isfinite(v) and self.last_step.get(k) != step}
        if not values:
            return
        self.last_step.update({k: step for k in values})
        self._start()
        if self.mlflow is not None:
            from mlflow.entities import Metric
            ms = int(time.time() * 1000)
            metrics = [Metric(k, v, ms, int(step)) for k, v in values.items()]
            for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
                self.mlflow_client.log_batch(self.ids["mlflow"], metrics=metrics[i:i + 1000])
        if self.wandb is not None:
            self.wandb_run.log(values, step=int(step))

    def _params(self):
        """This run's resolved config + provenance: what config.json holds for a fresh run (a resumed run keeps its
        first config.json, so the knobs it changed are compared against the tracker's params, not that file)."""
        return {**self.cfg, **{k: v for k, v in self.tags.items() if k != "script"}}

    def _start(self):
        if self.started:
            return
        self.started = True
        params, name = self._params(), os.path.basename(os.path.normpath(self.out_dir))
        tags = {k: str(v) for k, v in self.tags.items()}
        if self.mlflow is not None:
            from mlflow.entities import Param, RunTag
            self.mlflow_client = client = self.mlflow.MlflowClient(tracking_uri=self.cfg.get("mlflow_uri") or None)
            exp_name = self.cfg.get("mlflow_experiment") or "nanorad"
            exp = client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
            run_id = self.ids.get("mlflow")
            if run_id and self._mlflow_run_exists(run_id):
                client.update_run(run_id, status="RUNNING")
                # params are write-once in MLflow: a resumed run records the knobs it changed as tags
                old = client.get_run(run_id).data.params
                changed = [RunTag(f"resume.{k}", str(v)[:5000]) for k, v in params.items() if old.get(k, str(v)) != str(v)]
                client.log_batch(run_id, tags=changed[:100])
                self.line(f"mlflow: continuing run {run_id} ({client.tracking_uri})")
            else:
                if run_id:
                    self.line(f"mlflow: run {run_id} of the checkpoint is not on {client.tracking_uri}: starting a new run")
                sys_tags = {"mlflow.source.name": tags.get("script", ""), "mlflow.source.git.commit": tags.get("git_commit", "")}
                run_id = client.create_run(exp_id, run_name=name, tags={**sys_tags, **tags}).info.run_id
                ps = [Param(k, str(v)) for k, v in params.items()]
                for i in range(0, len(ps), 100):  # MLflow's limit per batch
                    client.log_batch(run_id, params=ps[i:i + 100])
                self.line(f"mlflow: run {run_id} in experiment {exp_name!r} ({client.tracking_uri})")
            self.ids["mlflow"] = run_id
        if self.wandb is not None:
            mode = self.cfg.get("wandb_mode", "online")
            if mode not in ("online", "offline"):
                raise ValueError(f"wandb_mode must be online or offline, got {mode!r}")
            run_id = self.ids.get("wandb")
            self.wandb_run = self.wandb.init(project=self.cfg.get("wandb_project") or "nanorad", name=name, id=run_id,
                                             resume="allow" if run_id else None, mode=mode, dir=self.out_dir,
                                             config={**params, **{f"tag/{k}": v for k, v in tags.items()}},
                                             tags=[tags["script"]] if "script" in tags else None, reinit="create_new")
            if run_id:
                self.wandb_run.config.update(params, allow_val_change=True)
            self.ids["wandb"] = self.wandb_run.id
            self.line(f"wandb: run {self.wandb_run.id} ({mode}) in project {self.wandb_run.project!r}")

    def _mlflow_run_exists(self, run_id):
        try:
            self.mlflow_client.get_run(run_id)
        except self.mlflow.exceptions.MlflowException:
            return False
        return True

    def close(self):
        """Close the files; upload the run folder's files (+ best.pt with track_checkpoints) and end the tracker runs,
        FAILED when an exception is on its way out of the script."""
        if not self.master:
            return
        failed = sys.exc_info()[0] is not None
        if self.tb is not None:
            self.tb.close()
        if self.started:
            files = sorted({p for pat in _ARTIFACTS for p in glob.glob(os.path.join(self.out_dir, pat))})
            if self.cfg.get("track_checkpoints") and os.path.exists(os.path.join(self.out_dir, "best.pt")):
                files.append(os.path.join(self.out_dir, "best.pt"))
            if self.mlflow is not None:
                for p in files:
                    self.mlflow_client.log_artifact(self.ids["mlflow"], p)
                self.mlflow_client.set_terminated(self.ids["mlflow"], status="FAILED" if failed else "FINISHED")
            if self.wandb is not None:
                for p in files:
                    self.wandb_run.save(p, base_path=self.out_dir, policy="now")
                self.wandb_run.finish(exit_code=1 if failed else 0)
        self.log_file.close()
