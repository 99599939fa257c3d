# Hyperparameter search for the phantom ConvNeXt-atto (python sweep.py config/sweep_convnext_phantom.py).
# Purpose: tune the optimizer and loss knobs of config/quickstart.py with a short budget per trial.
# Hardware: CPU, 2 cores: ~1.5 min per trial (300 iters at 64px), 20 trials ~30 min; one GPU: ~15 s per trial.
# Expected: the leaderboard's best trial reaches validation macro AUC ~0.9 (quickstart reaches >= 0.90 in
#   800 iters); learning_rate matters most, drop_path least at this size. (Not yet measured: an estimate.)
# Resume: rerun the same command; finished trials in out/sweep_convnext_phantom/sweep.jsonl are skipped.
train_config = "config/quickstart.py"
train_args = "--max_iters=300 --lr_decay_iters=300 --eval_interval=100 --warmup_iters=20 --tensorboard=False"
method = "bayes"
n_trials = 20
n_init = 6           # ~1.5x the 5 dimensions, random, before the GP
seed = 0
mode = "max"         # the objective is train.py's best_metric = best validation auc_macro
trial_timeout = 900  # seconds: a trial that has not finished by then is killed and recorded as failed
out_dir = "out/sweep_convnext_phantom"
space = {
    "learning_rate": ("log", 3e-4, 1e-2),   # AdamW peak LR; ConvNeXt from scratch likes ~1e-3 to 4e-3
    "weight_decay": ("log", 1e-3, 0.3),
    "drop_path": ("uniform", 0.0, 0.3),
    "focal_gamma": ("uniform", 0.5, 3.0),   # used by loss=focal and bce+focal (Lin et al. 2017 use 2)
    "bce_weight": ("uniform", 0.3, 1.0),    # bce+focal mix
    "loss": ("choice", ["bce", "focal", "bce+focal"]),
}
